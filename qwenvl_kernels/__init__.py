"""Hand-written Triton kernels for Qwen-VL, each with a plain-PyTorch reference (`qwenvl_kernels.reference`).

Without triton installed, `import qwenvl_kernels` still works (the "torch" backend); the kernel functions then raise.
"""
from .backend import Backend, get_backend, triton_available
from .utils import UnsupportedInput

__all__ = ["Backend", "get_backend", "UnsupportedInput", "rms_norm", "layer_norm", "apply_rotary", "swiglu",
           "flash_attn_func", "flash_attn_varlen_func", "decode_attention", "resampler_attention",
           "linear_cross_entropy"]

if triton_available():
    # imported eagerly: a lazy import would let the submodules rms_norm, layer_norm and swiglu shadow their functions
    from .cross_entropy import linear_cross_entropy
    from .decode_attention import decode_attention
    from .flash_attention import flash_attn_func, flash_attn_varlen_func
    from .layer_norm import layer_norm
    from .resampler_attention import resampler_attention
    from .rms_norm import rms_norm
    from .rotary import apply_rotary
    from .swiglu import swiglu
else:
    def __getattr__(name):
        if name in __all__:
            raise ImportError(f"qwenvl_kernels.{name} needs the triton package: pip install triton")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
