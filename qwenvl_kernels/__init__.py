"""Hand-written Triton kernels for Qwen-VL, each with a plain-PyTorch reference (`qwenvl_kernels.reference`).

The kernels live in `qwenvl_kernels.ops.<name>` (modules, never shadowed); this package exports their functions,
each a torch.library custom op (namespace `qwenvl`) that torch.compile traces as one opaque op. Without triton
installed, `import qwenvl_kernels` still works (the "torch" backend); the kernel functions then raise.
"""
from .backend import Backend, get_backend
from .launch import UnsupportedInput, interpreting, triton_available

__all__ = ["Backend", "get_backend", "UnsupportedInput", "interpreting", "triton_available",
           # the kernels (qwenvl_kernels.ops)
           "rms_norm", "layer_norm", "apply_rotary", "swiglu", "flash_attn_func", "flash_attn_varlen_func",
           "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache", "decode_attention", "resampler_attention",
           "linear_cross_entropy"]

if triton_available():
    from .ops.cross_entropy import linear_cross_entropy
    from .ops.decode_attention import decode_attention
    from .ops.flash_attn_interface import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                           flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                           flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)
    from .ops.layer_norm import layer_norm
    from .ops.resampler_attention import resampler_attention
    from .ops.rms_norm import rms_norm
    from .ops.rotary import apply_rotary
    from .ops.swiglu import swiglu
else:
    def __getattr__(name):
        if name in __all__:
            raise ImportError(f"qwenvl_kernels.{name} needs the triton package: pip install triton")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
