"""Self-attention forward and forward + backward at the two shapes the model runs: the decoder's causal
B4 T2048 32 heads x 128, and the ViT's B8 T1024 (448 px, 32x32 patches) 16 heads x 104.

Ours is `qwenvl_kernels.flash_attn_func(q, k, v)` (flash-attn's call, [B, T, H, D]). Baselines: the torch reference
path, torch SDPA per backend (flash, cuDNN, efficient, math; each one that accepts the input, forced alone),
torch.compile of the reference, flash-attn when it imports. SDPA gets its preferred [B, H, T, D] layout, made contiguous outside
the timed step. Targets: decoder fwd and fwd+bwd >= 1.0x the fastest SDPA backend; ViT fwd+bwd >= 1.25x (head dim
104 computed in 64 + 32 + 16 blocks, where every SDPA backend pads it to 128)."""
import pytest
import torch

import shapes
from benchlib.cases import cuda_only, params, probe, randn, sdpa
from benchlib.env import DTYPE, ON_CUDA, compile_available, optional_module, ours
from benchlib.timing import rotating_step, rotation_count
from qwenvl_kernels import reference as ref

CASES = ["attn_decoder fwd", "attn_decoder fwd+bwd", "attn_vit fwd", "attn_vit fwd+bwd"]
IMPLS = ["torch", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "flash-attn", "triton", "compile"]
COSTS = {"triton": 8, "sdpa-math": 4, "compile": 40}


def _function(impl: str, causal: bool):
    """(fn(q, k, v) -> out, layout of q/k/v it takes)."""
    if impl == "torch":
        return (lambda q, k, v: ref.attention(q, k, v, causal=causal)), "bthd"
    if impl == "triton":
        fa = ours().flash_attn_func
        return (lambda q, k, v: fa(q, k, v, causal=causal)), "bthd"
    if impl == "compile":
        compile_available()
        f = torch.compile(ref.attention, dynamic=False)
        return (lambda q, k, v: f(q, k, v, causal=causal)), "bthd"
    if impl.startswith("sdpa-"):
        return sdpa(impl, is_causal=causal), "bhtd"
    if impl == "flash-attn":
        cuda_only(impl)
        fa = optional_module("flash_attn").flash_attn_func
        return (lambda q, k, v: fa(q, k, v, causal=causal)), "bthd"
    raise KeyError(impl)


@pytest.mark.parametrize("case, impl", params(CASES, IMPLS, COSTS))
def test_attention(bm, suite, case, impl):
    kind, mode = case.split()
    backward = mode == "fwd+bwd"
    s = shapes.shape(kind, ON_CUDA)
    B, T, Hn, D, causal = s["B"], s["T"], s["H"], s["D"], s["causal"]
    e = torch.empty((), dtype=DTYPE).element_size()
    flops, nbytes = shapes.cost(kind, s, e, backward)

    def setup():
        fn, layout = _function(impl, causal)
        sets = []
        for _ in range(rotation_count(4 * B * T * Hn * D * e)):
            qkv = [randn(B, T, Hn, D) for _ in range(3)]
            if layout == "bhtd":
                qkv = [t.transpose(1, 2).contiguous() for t in qkv]
            sets.append(tuple(t.requires_grad_(backward) for t in qkv))
        if impl != "triton":
            probe(fn, *sets[0], what=impl, backward=backward)
        return rotating_step(sets, fn, backward)

    suite.run(bm, case=case, impl=impl, setup=setup, flops=flops, nbytes=nbytes, shape=s,
              title=f"{'causal ' if causal else ''}attention B{B} T{T} {Hn}x{D} {mode}")
