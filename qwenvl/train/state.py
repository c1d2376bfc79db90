"""Training checkpoints: a loadable model folder plus what it takes to continue exactly where training stopped.

A checkpoint folder holds config.json + model.safetensors (official names, `QwenVL.from_pretrained` reads it), the
tokenizer files (`qwenvl generate` reads them), optimizer.pt, rng.pt and trainer_state.json (stage, step, data
position, recipe). It is written under a temporary name and renamed into place, so a kill during a save leaves the
previous checkpoint as it was; a folder named checkpoint-* is always complete.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import torch

from ..checkpoint import save_pretrained
from .distributed import Dist, barrier

STATE_FILE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def stage_dir(out: str, stage: int) -> str:
    return os.path.join(out, f"stage{stage}")


def final_dir(out: str, stage: int) -> str:
    return os.path.join(stage_dir(out, stage), "final")


def checkpoints(folder: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in a stage folder, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = _CKPT.match(name)
        if m and os.path.isfile(os.path.join(folder, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE_FILE))


class _FullState:
    """What `save_pretrained` needs of a model, from a gathered state dict (FSDP2 keeps only shards on each rank)."""

    def __init__(self, config, state: dict):
        self.config = config
        self._state = state
        self.dtype = next(iter(state.values())).dtype

    def named_parameters(self):
        return iter(self._state.items())


def _gather(model, optimizer, d: Dist):
    """Full model and optimizer state dicts (CPU tensors, parameter names as keys) on rank 0."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return model_state, optim_state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str, model, tokenizer, optimizer, scheduler, trainer_state: dict, d: Dist, keep: int = 0) -> None:
    """Write a checkpoint atomically to `path` (rank 0 writes; every rank must call, FSDP gathers collectively)."""
    model_state, optim_state = _gather(model, optimizer, d)
    if d.main:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        # model_state holds every parameter, frozen ones included: the folder is a complete model
        state = {k: v for k, v in model_state.items() if isinstance(v, torch.Tensor)}
        save_pretrained(_FullState(model.config, state), tmp)
        tokenizer.save_pretrained(tmp)
        if optim_state is not None:
            torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict()},
                       os.path.join(tmp, "optimizer.pt"))
        torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
        _write_generation_config(tmp, trainer_state.get("data", {}))
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(trainer_state, f, indent=2, sort_keys=True)
        _fsync_dir(tmp)
        if os.path.exists(path):
            # re-saving a step (after a resume): move the old one aside only once the new one is complete
            old = os.path.join(parent, f".old-{os.path.basename(path)}-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        if keep > 0:
            for _, stale in checkpoints(parent)[:-keep]:
                shutil.rmtree(stale, ignore_errors=True)
    barrier(d)


def _write_generation_config(folder: str, data: dict) -> None:
    """generation_config.json as the released models have it: `chat_format` tells `qwenvl generate` whether to
    wrap prompts in ChatML (stage 3 trains on ChatML; stages 1-2 on raw text). `system` (our key) is the system
    prompt the model was fine-tuned with, for tools that want to prompt it the same way."""
    style = data.get("style")
    if style is None:
        return
    config = {"chat_format": "chatml" if style == "chatml" else "raw"}
    if style == "chatml" and "system" in data:
        config["system"] = data["system"]
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def _fsync_dir(folder: str) -> None:
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            os.fsync(f.fileno())


def read_state(path: str) -> dict:
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no {STATE_FILE})")
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def load_optimizer(path: str, model, optimizer, scheduler) -> None:
    """Restore optimizer and scheduler state saved by `save` into the (possibly wrapped or sharded) model's ones."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    file = os.path.join(path, "optimizer.pt")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} is missing: {path} is a model folder, not a resumable checkpoint")
    saved = torch.load(file, map_location="cpu", weights_only=False)
    set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(saved["scheduler"])


def load_rng(path: str) -> None:
    set_rng_state(torch.load(os.path.join(path, "rng.pt"), map_location="cpu", weights_only=False))
