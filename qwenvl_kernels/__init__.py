"""Hand-written Triton kernels for Qwen-VL, each with a plain-PyTorch reference (`qwenvl_kernels.reference`).

The public kernel functions import Triton lazily, so `import qwenvl_kernels` works without it.
"""
from .backend import Backend, get_backend
from .utils import UnsupportedInput

_PUBLIC = {
    "rms_norm": "rms_norm",
    "layer_norm": "layer_norm",
    "apply_rotary": "rotary",
    "swiglu": "swiglu",
    "flash_attn_func": "flash_attention",
    "flash_attn_varlen_func": "flash_attention",
    "decode_attention": "decode_attention",
    "resampler_attention": "resampler_attention",
    "linear_cross_entropy": "cross_entropy",
}

__all__ = ["Backend", "get_backend", "UnsupportedInput", *_PUBLIC]


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
