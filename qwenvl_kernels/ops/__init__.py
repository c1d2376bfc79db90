"""The Triton kernels, one module per kernel (never shadowed by a function of the same name).

Each module holds its @triton.jit kernels (flash attention's: in `flash_attention_kernels` and
`flash_attention_bwd_kernels`), its `CONFIGS` (launch name -> CUDA candidates), its torch.library custom ops with
their fake implementations and autograd, and its thin public functions. The package `qwenvl_kernels` exports the functions.
"""

# the kernel modules, in the order the benchmarks and the compile check list them
MODULES = ("rms_norm", "layer_norm", "rotary", "swiglu", "flash_attention", "decode_attention",
           "resampler_attention", "cross_entropy")
