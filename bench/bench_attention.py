"""Self-attention forward and forward + backward at the two shapes the model runs: the decoder's causal
B4 T2048 32 heads x 128, and the ViT's B8 T1024 (448 px, 32x32 patches) 16 heads x 104.

Baselines: the torch reference path, torch SDPA per backend (flash, cuDNN, efficient; each one that accepts the
input), torch.compile of the reference, flash-attn when it imports. SDPA gets its preferred [B, H, T, D] layout,
made contiguous outside the timed step. Targets: decoder fwd and fwd+bwd >= 1.0x the best SDPA backend, ViT fwd+bwd
>= 1.1x."""
import pytest
import torch
import torch.nn.functional as F

import harness as H
import shapes
from qwenvl_kernels import reference as ref

CASES = ["attn_decoder fwd", "attn_decoder fwd+bwd", "attn_vit fwd", "attn_vit fwd+bwd"]
IMPLS = ["torch", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flash-attn", "triton", "compile"]


def _function(impl: str, causal: bool):
    """(fn(q, k, v) -> out, layout of q/k/v it takes)."""
    if impl == "torch":
        return (lambda q, k, v: ref.attention(q, k, v, causal=causal)), "bthd"
    if impl == "triton":
        attn = H.kernels("triton").attention
        return (lambda q, k, v: attn(q, k, v, causal=causal)), "bthd"
    if impl == "compile":
        H.compile_available()
        f = torch.compile(ref.attention, dynamic=False)
        return (lambda q, k, v: f(q, k, v, causal=causal)), "bthd"
    if impl.startswith("sdpa-"):
        backend, sdpa_kernel = H.sdpa_backend(impl)

        def sdpa(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa, "bhtd"
    if impl == "flash-attn":
        if not H.ON_CUDA:
            raise H.Unavailable("flash-attn runs on CUDA only")
        fa = H.optional_module("flash_attn").flash_attn_func
        return (lambda q, k, v: fa(q, k, v, causal=causal)), "bthd"
    raise KeyError(impl)


@pytest.mark.parametrize("case, impl", H.params(CASES, IMPLS))
def test_attention(bm, suite, case, impl):
    kind, mode = case.split()
    backward = mode == "fwd+bwd"
    s = shapes.shape(kind, H.ON_CUDA)
    B, T, Hn, D, causal = s["B"], s["T"], s["H"], s["D"], s["causal"]
    e = torch.empty((), dtype=H.DTYPE).element_size()
    flops, nbytes = shapes.cost(kind, s, e, backward)

    def setup():
        fn, layout = _function(impl, causal)
        sets = []
        for _ in range(H.rotation_count(4 * B * T * Hn * D * e)):
            qkv = [H.randn(B, T, Hn, D) for _ in range(3)]
            if layout == "bhtd":
                qkv = [t.transpose(1, 2).contiguous() for t in qkv]
            sets.append(tuple(t.requires_grad_(backward) for t in qkv))
        H.probe(fn, *sets[0], what=impl, backward=backward)
        return H.rotating_step(sets, fn, backward)

    cost = {"triton": 30, "compile": 40}.get(impl, 3) if H.ON_CUDA else 2
    suite.run(bm, case=case, impl=impl, setup=setup, flops=flops, nbytes=nbytes, shape=s,
              title=f"{'causal ' if causal else ''}attention B{B} T{T} {Hn}x{D} {mode}", cost_s=cost)
