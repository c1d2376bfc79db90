"""Checkpoint folders as released (config.json + safetensors or .bin shards, official names) <-> our modules.

Opening a folder reads only small things: config.json, the shard index and each safetensors file's header (names,
dtypes, shapes, byte ranges). All of it is checked, against the file sizes and against the model built on the meta
device, before one byte of tensor data is read or memory is allocated for the weights. Loading then goes shard by
shard, tensor by tensor (the host holds about one tensor), and refuses tensors that hold NaN or Inf. `.bin` shards
are read with `torch.load(weights_only=True)`: tensors only, nothing in them can run.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open

from .config import QwenVLConfig, dtype_name
from .jsonfile import read_json_object

# bytes per element of each safetensors dtype; the floating ones may fill a parameter
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_ST_FLOAT = {"F64", "F32", "F16", "BF16"}
_TORCH_TO_ST = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_MAX_HEADER = 100 << 20  # the safetensors format's own limit

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"


def read_safetensors_header(file: str) -> dict[str, tuple[str, tuple]]:
    """name -> (dtype, shape) from a safetensors file's header, checked against the file's size (no data read)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > _MAX_HEADER or 8 + n > size:
            raise ValueError(
                f"{file} is not a complete safetensors file (size {size} bytes, header length {n}): it is truncated "
                f"or corrupted; copy or download it again"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{file}: the safetensors header is not valid JSON: the file is corrupted") from None
    header.pop("__metadata__", None)
    out, data_end = {}, 0
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = dtype in _ST_ITEMSIZE and all(isinstance(d, int) and d >= 0 for d in shape) and 0 <= begin <= end
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{file}: the header entry of {name!r} is malformed ({info!r:.100}): the file is corrupted")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * _ST_ITEMSIZE[dtype]:
            raise ValueError(f"{file}: {name!r} is {list(shape)} {dtype} but spans {end - begin} bytes: corrupted")
        data_end = max(data_end, end)
        out[name] = (dtype, shape)
    if 8 + n + data_end > size:
        raise ValueError(
            f"{file} is truncated: its header describes {8 + n + data_end} bytes but the file has {size}; copy or "
            f"download it again"
        )
    return out


def _weight_files(path: str) -> list[str]:
    """The weight files of a checkpoint folder, in load order (the index's files, or the single file)."""
    present = [n for n in (SAFE_INDEX, SAFE_SINGLE, BIN_INDEX, BIN_SINGLE) if os.path.isfile(os.path.join(path, n))]
    if not present:
        raise FileNotFoundError(
            f"checkpoint {path}: no {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX} found"
        )
    if SAFE_INDEX in present and SAFE_SINGLE in present:
        raise ValueError(
            f"checkpoint {path} holds both {SAFE_SINGLE} and {SAFE_INDEX}: the weights of two models; remove the "
            f"stale one"
        )
    first = present[0]
    if not first.endswith(".index.json"):
        return [os.path.join(path, first)]
    index_path = os.path.join(path, first)
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(
            f"{index_path} has no 'weight_map' (an object: parameter name -> shard file name): fix or restore it"
        )
    files = sorted(set(weight_map.values()))
    outside = [f for f in files if os.path.basename(f) != f or f in (".", "..")]
    if outside:
        raise ValueError(f"{index_path} names shard(s) outside the checkpoint folder: {outside[:3]}")
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"checkpoint {path}: shard(s) {missing} named in {first} are missing")
    return [os.path.join(path, f) for f in files]


def _read_bin(file: str) -> dict:
    """A `.bin` shard, memory-mapped: tensors only (weights_only), data paged in when copied."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{file} holds objects other than tensors, and is refused: unpickling them could run code ({e})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{file} cannot be read as PyTorch weights ({e}): truncated or corrupted?") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} is not a state dict (parameter name -> tensor)")
    return state


@dataclass
class Checkpoint:
    """A checkpoint folder opened without reading tensor data: its config and every tensor's (file, dtype, shape)."""

    path: str
    config: QwenVLConfig
    files: list
    tensors: dict = field(default_factory=dict)   # name -> (file, dtype name, shape)
    _bins: dict = field(default_factory=dict)     # .bin file -> memory-mapped state dict

    def check_against(self, model) -> None:
        """Names, shapes and kinds of the stored tensors against the model's parameters (a meta model will do)."""
        targets = dict(model.named_parameters(remove_duplicate=False))
        tied = model.config.text.tie_word_embeddings
        unexpected = [n for n in self.tensors if n not in targets]
        missing = [n for n in targets if n not in self.tensors and not (tied and n == "lm_head.weight")]
        misshaped, not_float = [], []
        for name, (file, dtype, shape) in self.tensors.items():
            p = targets.get(name)
            if p is None:
                continue
            if tuple(shape) != tuple(p.shape):
                misshaped.append(f"{name}: checkpoint {tuple(shape)} vs model {tuple(p.shape)}")
            elif dtype not in _ST_FLOAT:
                not_float.append(f"{name} ({dtype})")
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}"
                            f"{' ...' if len(unexpected) > 10 else ''}")
        if misshaped:
            problems.append(f"mis-shaped keys: {misshaped[:10]}")
        if not_float:
            problems.append(f"tensors that are not 16/32/64-bit floats: {not_float[:10]}")
        if problems:
            raise ValueError(f"checkpoint {self.path} does not match the model of its config.json: "
                             + "; ".join(problems))

    def load_into(self, model) -> None:
        """Copy every stored tensor into the model's parameter of that name (after `check_against`)."""
        targets = dict(model.named_parameters(remove_duplicate=False))
        nonfinite = []
        with torch.no_grad():
            for file in self.files:
                for name, tensor in self._tensors_of(file):
                    if not bool(torch.isfinite(tensor).all()):
                        nonfinite.append(name)
                        continue
                    targets[name].copy_(tensor.to(targets[name].dtype))
        if nonfinite:
            raise ValueError(
                f"checkpoint {self.path}: {len(nonfinite)} tensor(s) hold NaN or Inf: {nonfinite[:10]}; the weights "
                f"are damaged (overwritten bytes, or saved from a diverged run): restore the file(s)"
            )

    def _tensors_of(self, file: str):
        if file in self._bins:
            yield from self._bins.pop(file).items()
            return
        names = [n for n, (f, _, _) in self.tensors.items() if f == file]
        try:
            with safe_open(file, framework="pt") as f:
                for name in names:
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{file} cannot be read ({e}): truncated or corrupted?") from None


def open_checkpoint(path) -> Checkpoint:
    """Config, weight files and tensor headers of a checkpoint folder, all checked; no tensor data is read."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path} is not a checkpoint folder (config.json + weights); models are never downloaded at run time"
        )
    config = QwenVLConfig.from_json(path)
    ckpt = Checkpoint(path, config, _weight_files(path))
    for file in ckpt.files:
        if file.endswith(".safetensors"):
            header = read_safetensors_header(file)
        else:
            ckpt._bins[file] = _read_bin(file)
            header = {n: (_TORCH_TO_ST.get(t.dtype, str(t.dtype)), tuple(t.shape)) for n, t in ckpt._bins[file].items()}
        for name, (dtype, shape) in header.items():
            if name in ckpt.tensors:
                raise ValueError(f"checkpoint {path}: {name} is stored twice ({ckpt.tensors[name][0]} and {file})")
            ckpt.tensors[name] = (file, dtype, shape)
    return ckpt


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_pretrained(model, path, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json and the weights under the official names: one model.safetensors, or shards + index.
    Weight files of an earlier save into the same folder that this one does not rewrite are removed."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.config.replace(dtype=dtype_name(model.dtype)).save_json(os.path.join(path, "config.json"))
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
        written = {SAFE_SINGLE}
        _atomic_save(save_file, shards[0], os.path.join(path, SAFE_SINGLE), meta)
    else:
        weight_map, written = {}, {SAFE_INDEX}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(save_file, shard, os.path.join(path, fname), meta)
            weight_map.update({n: fname for n in shard})
            written.add(fname)
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        tmp = os.path.join(path, SAFE_INDEX + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        os.replace(tmp, os.path.join(path, SAFE_INDEX))
    for stale in {os.path.basename(f) for f in glob.glob(os.path.join(path, "model*.safetensors*"))} - written:
        os.remove(os.path.join(path, stale))


def _atomic_save(save_file, tensors, file, meta):
    tmp = file + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.chmod(tmp, _umask_mode())  # safetensors creates its files 0600; every other file here gets the umask's mode
    os.replace(tmp, file)
