"""Decode attention: one new token per row against a KV cache of 2048 positions, 32 heads x 128, batch 1 and 8
(the generation step of the decoder). Bound by reading the cache once."""
import pytest
import torch

import shapes
from benchlib.cases import cuda_only, params, probe, randn, sdpa
from benchlib.env import DEVICE, DTYPE, ON_CUDA, optional_module, ours
from benchlib.timing import rotating_step, rotation_count
from qwenvl_kernels import reference as ref

CASES = ["decode_b1", "decode_b8"]
IMPLS = ["torch", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flash-attn", "triton"]
COSTS = {"triton": 8}


def _function(impl: str):
    """(fn(q, k_cache, v_cache, lengths), layout): "cache" takes our [B, S, H, D] cache, "bhtd" the valid part in
    SDPA's layout (a copy made outside the step, as a cache kept in that layout would be)."""
    if impl == "torch":
        return (lambda q, k, v, n: ref.decode_attention(q, k, v, n)), "cache"
    if impl == "triton":
        dec = ours().decode_attention
        return (lambda q, k, v, n: dec(q, k, v, n)), "cache"
    if impl.startswith("sdpa-"):
        attend = sdpa(impl)
        return (lambda q, k, v, n: attend(q, k, v)), "bhtd"
    if impl == "flash-attn":
        cuda_only(impl)
        fa = optional_module("flash_attn").flash_attn_with_kvcache
        return (lambda q, k, v, n: fa(q, k, v, cache_seqlens=n)), "cache"
    raise KeyError(impl)


@pytest.mark.parametrize("case, impl", params(CASES, IMPLS, COSTS))
def test_decode_attention(bm, suite, case, impl):
    s = shapes.shape(case, ON_CUDA)
    B, L, Hn, D = s["B"], s["L"], s["H"], s["D"]
    S = L + 64                                             # cache capacity past the filled length, as in generation
    e = torch.empty((), dtype=DTYPE).element_size()
    flops, nbytes = shapes.cost(case, s, e)

    def setup():
        fn, layout = _function(impl)
        sets = []
        for _ in range(rotation_count(2 * B * S * Hn * D * e)):
            q = randn(B, 1, Hn, D)
            k, v = randn(B, S, Hn, D), randn(B, S, Hn, D)
            n = torch.full((B,), L, dtype=torch.int32, device=DEVICE)
            if layout == "bhtd":
                q = q.transpose(1, 2).contiguous()
                k, v = (t[:, :L].transpose(1, 2).contiguous() for t in (k, v))
            sets.append((q, k, v, n))
        if impl != "triton":
            probe(fn, *sets[0], what=impl)
        return rotating_step(sets, fn, backward=False)

    suite.run(bm, case=case, impl=impl, setup=setup, flops=flops, nbytes=nbytes, shape=s,
              title=f"decode attention B{B} L{L} {Hn}x{D}")
