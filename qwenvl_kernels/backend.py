"""The one seam between the model and its kernels: `get_backend("torch" | "triton" | "auto")`.

The model asks once, at build time, for an object whose functions it calls. "torch" gives the reference
implementations, "triton" the hand-written kernels (an explicit request that a kernel cannot serve raises
`UnsupportedInput`), "auto" the kernels on CUDA (or under TRITON_INTERPRET=1) and the reference elsewhere,
falling back per call, with one log line, when a kernel cannot serve an input.
"""
from __future__ import annotations

import functools
import importlib
import logging

import torch

from . import reference
from .launch import UnsupportedInput, interpreting, triton_available

log = logging.getLogger("qwenvl_kernels")

# function name -> module of qwenvl_kernels.ops that holds its Triton version
KERNEL_MODULES = {
    "rms_norm": "rms_norm",
    "layer_norm": "layer_norm",
    "apply_rotary": "rotary",
    "swiglu": "swiglu",
    "attention": "flash_attention",
    "varlen_attention": "flash_attention",
    "decode_attention": "decode_attention",
    "resampler_attention": "resampler_attention",
    "linear_cross_entropy": "cross_entropy",
}


class Backend:
    """A named set of the functions the model calls. Attributes: the names of KERNEL_MODULES, and `name`."""

    def __init__(self, name: str, functions: dict):
        self.name = name
        for fn_name, fn in functions.items():
            setattr(self, fn_name, fn)

    def __repr__(self):
        return f"Backend({self.name!r})"


def _triton_function(fn_name: str):
    module = importlib.import_module(f"qwenvl_kernels.ops.{KERNEL_MODULES[fn_name]}")
    return getattr(module, fn_name)


def _first_tensor(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


_warned: set = set()


def _auto(fn_name: str):
    ref = getattr(reference, fn_name)
    kernel = None

    @functools.wraps(ref)
    def call(*args, **kwargs):
        nonlocal kernel
        t = _first_tensor(args, kwargs)
        if t is None or not (t.is_cuda or interpreting()):
            return ref(*args, **kwargs)
        if kernel is None:
            kernel = _triton_function(fn_name)
        try:
            return kernel(*args, **kwargs)
        except UnsupportedInput as e:
            if fn_name not in _warned:
                _warned.add(fn_name)
                log.warning("kernels='auto': %s falls back to the torch reference: %s", fn_name, e)
            return ref(*args, **kwargs)

    return call


@functools.lru_cache(maxsize=None)
def get_backend(name: str = "auto") -> Backend:
    """The kernels the model calls: "torch" (reference), "triton" (kernels, errors on what they cannot serve),
    or "auto" (kernels on CUDA or under the interpreter, reference elsewhere and for what kernels cannot serve)."""
    if isinstance(name, Backend):
        return name
    if name == "torch":
        return Backend("torch", {f: getattr(reference, f) for f in KERNEL_MODULES})
    if name == "triton":
        if not triton_available():
            raise RuntimeError("kernels='triton' needs the triton package (pip install triton); or use kernels='torch'")
        if not torch.cuda.is_available() and not interpreting():
            raise RuntimeError(
                "kernels='triton' needs a CUDA GPU; on the CPU set TRITON_INTERPRET=1 before importing triton "
                "(slow, for testing), or use kernels='torch' / 'auto'"
            )
        return Backend("triton", {f: _triton_function(f) for f in KERNEL_MODULES})
    if name == "auto":
        if not triton_available() or not (torch.cuda.is_available() or interpreting()):
            log.info("kernels='auto': no CUDA GPU (or no triton): using the torch reference kernels")
            return Backend("auto", {f: getattr(reference, f) for f in KERNEL_MODULES})
        return Backend("auto", {f: _auto(f) for f in KERNEL_MODULES})
    raise ValueError(f"unknown kernels backend {name!r}: choose 'auto', 'torch' or 'triton'")
