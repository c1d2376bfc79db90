"""Training checkpoints: a loadable model folder plus what it takes to continue exactly where training stopped.

A checkpoint folder holds config.json + model.safetensors (official names, `QwenVL.from_pretrained` reads it), the
tokenizer files (`qwenvl generate` reads them), optimizer.safetensors and rng.safetensors (tensors, with the plain
numbers and names as JSON in their metadata) and trainer_state.json (stage, step, data position, recipe). Nothing
in it is a pickle, so nothing in it can run code when it is read; a run folder of an older version that holds
optimizer.pt / rng.pt is refused with a message, never unpickled.

A checkpoint is written under a temporary name and renamed into place, so a kill during a save leaves the previous
checkpoint as it was; a folder named checkpoint-* is always complete. What a kill leaves behind (`.tmp-*`, `.old-*`,
`.del-*` folders) is cleaned up at the next start (`remove_orphans`).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import save_pretrained
from ..jsonfile import read_json_object
from .distributed import Dist, barrier

log = logging.getLogger("qwenvl.train")

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
PICKLES = ("optimizer.pt", "rng.pt")  # written by versions before 0.2: never loaded
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


def _save_tensors(file: str, tensors: dict, plain) -> None:
    """Tensors as safetensors, `plain` (JSON-able numbers, strings, lists) as JSON in the file's metadata."""
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, file,
              metadata={"format": "pt", "plain": json.dumps(plain)})


def _load_tensors(file: str) -> tuple[dict, object]:
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} is missing: {os.path.dirname(file)} is a model folder, not a resumable "
                                f"checkpoint")
    try:
        with safe_open(file, framework="pt") as f:
            plain = json.loads((f.metadata() or {}).get("plain", "null"))
            return {k: f.get_tensor(k) for k in f.keys()}, plain
    except Exception as e:  # a damaged file: SafetensorError, bad JSON
        raise ValueError(f"{file} cannot be read ({type(e).__name__}: {e}): the checkpoint is damaged") from None


def rng_state() -> tuple[dict, dict]:
    """(tensors, plain values) of every random generator training draws from."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda/{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = [tensors[f"cuda/{i}"] for i in range(len([k for k in tensors if k.startswith("cuda/")]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _split_optimizer(optim_state: dict, scheduler) -> tuple[dict, dict]:
    """A full optimizer state dict (parameter names as keys) as (tensors, plain values)."""
    tensors, state = {}, {}
    for param, values in optim_state["state"].items():
        state[param] = {}
        for key, v in values.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{param}/{key}"] = v
                state[param][key] = {"tensor": f"{param}/{key}"}
            else:
                state[param][key] = {"value": v}
    plain = {"state": state, "param_groups": optim_state["param_groups"],
             "scheduler": scheduler.state_dict() if scheduler is not None else None}
    return tensors, plain


def check_resumable(path: str) -> None:
    """Refuse, before any model is built, a checkpoint that cannot be resumed from (or holds only pickles)."""
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no {STATE_FILE})")
    ours = [n for n in (OPTIMIZER_FILE, RNG_FILE) if os.path.isfile(os.path.join(path, n))]
    pickles = [n for n in PICKLES if os.path.isfile(os.path.join(path, n))]
    if len(ours) < 2 and pickles:
        raise ValueError(
            f"{path} holds {', '.join(pickles)}: pickles written by an older version of qwenvl. They are never "
            f"loaded, because unpickling a file can run code. Start the stage again from the weights "
            f"(--model {path}, a new --out), or resume from a checkpoint written by this version"
        )
    if len(ours) < 2:
        missing = sorted({OPTIMIZER_FILE, RNG_FILE} - set(ours))
        raise FileNotFoundError(f"{path} lacks {missing}: it is a model folder, not a resumable checkpoint")
    read_state(path)


def remove_orphans(folder: str) -> list[str]:
    """Remove what killed saves left in a stage folder: temporary folders of processes that are gone, after putting
    back a checkpoint that was moved aside (`.old-*`) and whose replacement never landed."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        m = _ORPHAN.match(name)
        if m is None or _alive(int(m.group(3))):
            continue
        full = os.path.join(folder, name)
        target = os.path.join(folder, m.group(2))
        if m.group(1) == "old" and not os.path.exists(target):
            os.replace(full, target)  # killed between moving the old one aside and renaming the new one in
            continue
        shutil.rmtree(full, ignore_errors=True)
        removed.append(full)
    if removed:
        log.warning("removed %d folder(s) left by interrupted saves in %s", len(removed), folder)
    return removed


_ORPHAN = re.compile(r"^\.(tmp|old|del)-(.+)-(\d+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
            _save_tensors(os.path.join(tmp, OPTIMIZER_FILE), *_split_optimizer(optim_state, scheduler))
        _save_tensors(os.path.join(tmp, RNG_FILE), *rng_state())
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
                # renamed away first: a kill during the removal never leaves a half-deleted checkpoint-* behind
                gone = os.path.join(parent, f".del-{os.path.basename(stale)}-{os.getpid()}")
                os.replace(stale, gone)
                shutil.rmtree(gone, ignore_errors=True)
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
    file = os.path.join(path, STATE_FILE)
    state = read_json_object(file)
    needed = ("stage", "step", "tokens_seen", "plan", "recipe")
    if any(k not in state for k in needed):
        raise ValueError(f"{file} lacks {[k for k in needed if k not in state]}: not a training checkpoint of this "
                         f"version")
    return state


def load_optimizer(path: str, model, optimizer, scheduler) -> None:
    """Restore optimizer and scheduler state saved by `save` into the (possibly wrapped or sharded) model's ones."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    check_resumable(path)
    tensors, plain = _load_tensors(os.path.join(path, OPTIMIZER_FILE))
    try:
        state = {param: {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in values.items()}
                 for param, values in plain["state"].items()}
        saved = {"state": state, "param_groups": plain["param_groups"]}
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}/{OPTIMIZER_FILE} does not describe an optimizer state ({e}): damaged") from None
    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(plain["scheduler"])


def load_rng(path: str) -> None:
    check_resumable(path)
    set_rng_state(*_load_tensors(os.path.join(path, RNG_FILE)))
