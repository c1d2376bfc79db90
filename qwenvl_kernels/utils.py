"""Shared plumbing of the Triton kernels: the error type, interpreter detection, input checks, launch helpers."""
from __future__ import annotations

import os

import torch


class UnsupportedInput(ValueError):
    """A kernel cannot serve this input (dtype, shape, device). Raised before any launch; "auto" falls back."""


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU in interpreter mode (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensors(name: str, *tensors: torch.Tensor, dtypes=SUPPORTED_DTYPES) -> None:
    """All tensors on one device that Triton can run on, with one floating dtype from `dtypes`."""
    t0 = tensors[0]
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise UnsupportedInput(f"{name}: expected tensors, got {type(t).__name__}")
        if t.device != t0.device:
            raise UnsupportedInput(f"{name}: inputs are on different devices ({t0.device} and {t.device}); move them to one")
        if t.dtype != t0.dtype:
            raise UnsupportedInput(f"{name}: inputs have different dtypes ({t0.dtype} and {t.dtype}); cast them to one")
    if t0.dtype not in dtypes:
        raise UnsupportedInput(f"{name}: dtype {t0.dtype} is not supported; use one of {[str(d) for d in dtypes]}")
    if t0.device.type == "cpu" and not interpreting():
        raise UnsupportedInput(
            f"{name}: the Triton kernels run on CUDA tensors; on the CPU set TRITON_INTERPRET=1 before importing triton "
            f"(slow, for testing) or use kernels='torch'"
        )
    if t0.device.type not in ("cpu", "cuda"):
        raise UnsupportedInput(f"{name}: device {t0.device} is not supported by the Triton kernels")
    if t0.device.type == "cpu" and t0.dtype == torch.bfloat16:
        # the interpreter's bf16 tl.dot is wrong and its bf16 arithmetic slow: refuse rather than be silently wrong
        raise UnsupportedInput(f"{name}: bfloat16 is not supported under the Triton interpreter; use float32 or float16")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def num_programs_hint(device: torch.device) -> int:
    """How many programs fill the device once (persistent grids); a small fixed number under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
