"""Checkpoint folders as released (config.json + safetensors or .bin shards, official names) <-> our modules.

Loading goes shard by shard, tensor by tensor, into a model built without memory (meta device), so the host holds
about one shard plus the model. Every mismatch (missing, unexpected or mis-shaped keys, a missing shard) raises an
error that names what is wrong.
"""
from __future__ import annotations

import json
import os

import torch

from .config import QwenVLConfig

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _shard_files(path: str) -> list[str]:
    """The weight files of a checkpoint folder, in load order."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index_name)
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
            if missing:
                raise FileNotFoundError(f"checkpoint {path}: shard(s) {missing} named in {index_name} are missing")
            return [os.path.join(path, f) for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise FileNotFoundError(
        f"checkpoint {path}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
        f"pytorch_model.bin.index.json found"
    )


def _read_shard(file: str):
    """Yield (name, tensor) from one shard without loading more than that shard."""
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()


def _model_tensors(model) -> dict:
    """Name -> parameter of the model under the official names (a tied lm_head is stored once, as both names)."""
    return dict(model.named_parameters(remove_duplicate=False))


def load_state(model, path: str, dtype: torch.dtype | None = None) -> None:
    """Copy the weights of checkpoint folder `path` into `model` (whose parameters may be on any device)."""
    targets = _model_tensors(model)
    seen, unexpected, misshaped = set(), [], []
    for file in _shard_files(path):
        for name, tensor in _read_shard(file):
            p = targets.get(name)
            if p is None:
                unexpected.append(name)
                continue
            if tuple(tensor.shape) != tuple(p.shape):
                misshaped.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(p.shape)}")
                continue
            with torch.no_grad():
                p.copy_(tensor.to(dtype or p.dtype))
            seen.add(name)
    tied = model.config.text.tie_word_embeddings
    missing = [n for n in targets if n not in seen and not (tied and n == "lm_head.weight")]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if misshaped:
        problems.append(f"mis-shaped keys: {misshaped[:10]}")
    if problems:
        raise ValueError(f"checkpoint {path} does not match the model of its config.json: " + "; ".join(problems))


def load_pretrained(path, dtype=None, device=None, kernels="auto"):
    """Build the model of `path/config.json` and load its weights (see `QwenVL.from_pretrained`)."""
    from .model import QwenVL

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path} is not a checkpoint folder (config.json + weights); models are never downloaded at run time"
        )
    config = QwenVLConfig.from_json(path)
    dtype = resolve_dtype(dtype) or _DTYPES[config.dtype]
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = QwenVL(config, kernels=kernels)
    model = model.to_empty(device=device).to(dtype)
    load_state(model, path)
    model.eval()
    return model


def save_pretrained(model, path, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json and the weights under the official names: one model.safetensors, or shards + index."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    config = model.config
    dtype_name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[model.dtype]
    config.replace(dtype=dtype_name).save_json(os.path.join(path, "config.json"))
    state = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()}
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        _atomic_save(save_file, shards[0], os.path.join(path, "model.safetensors"), meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(save_file, shard, os.path.join(path, fname), meta)
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    tmp = os.path.join(path, "model.safetensors.index.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, "model.safetensors.index.json"))


def _atomic_save(save_file, tensors, file, meta):
    tmp = file + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, file)
