"""Decode attention: one new token per row against a KV cache of 2048 positions, 32 heads x 128, batch 1 and 8
(the generation step of the decoder). Bound by reading the cache once."""
import pytest
import torch
import torch.nn.functional as F

import harness as H
import shapes
from qwenvl_kernels import reference as ref

CASES = ["decode_b1", "decode_b8"]
IMPLS = ["torch", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flash-attn", "triton"]


def _function(impl: str):
    """(fn(q, k_cache, v_cache, lengths), layout): "cache" takes our [B, S, H, D] cache, "bhtd" the valid part in
    SDPA's layout (a copy made outside the step, as a cache kept in that layout would be)."""
    if impl == "torch":
        return (lambda q, k, v, n: ref.decode_attention(q, k, v, n)), "cache"
    if impl == "triton":
        dec = H.kernels("triton").decode_attention
        return (lambda q, k, v, n: dec(q, k, v, n)), "cache"
    if impl.startswith("sdpa-"):
        backend, sdpa_kernel = H.sdpa_backend(impl)

        def sdpa(q, k, v, n):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        return sdpa, "bhtd"
    if impl == "flash-attn":
        if not H.ON_CUDA:
            raise H.Unavailable("flash-attn runs on CUDA only")
        fa = H.optional_module("flash_attn").flash_attn_with_kvcache
        return (lambda q, k, v, n: fa(q, k, v, cache_seqlens=n)), "cache"
    raise KeyError(impl)


@pytest.mark.parametrize("case, impl", H.params(CASES, IMPLS))
def test_decode_attention(bm, suite, case, impl):
    s = shapes.shape(case, H.ON_CUDA)
    B, L, Hn, D = s["B"], s["L"], s["H"], s["D"]
    S = L + 64                                             # cache capacity past the filled length, as in generation
    e = torch.empty((), dtype=H.DTYPE).element_size()
    flops, nbytes = shapes.cost(case, s, e)

    def setup():
        fn, layout = _function(impl)
        sets = []
        for _ in range(H.rotation_count(2 * B * S * Hn * D * e)):
            q = H.randn(B, 1, Hn, D)
            k, v = H.randn(B, S, Hn, D), H.randn(B, S, Hn, D)
            n = torch.full((B,), L, dtype=torch.int32, device=H.DEVICE)
            if layout == "bhtd":
                q = q.transpose(1, 2).contiguous()
                k, v = (t[:, :L].transpose(1, 2).contiguous() for t in (k, v))
            sets.append((q, k, v, n))
        H.probe(fn, *sets[0], what=impl)
        return H.rotating_step(sets, fn, backward=False)

    suite.run(bm, case=case, impl=impl, setup=setup, flops=flops, nbytes=nbytes, shape=s,
              title=f"decode attention B{B} L{L} {Hn}x{D}", cost_s=20 if impl == "triton" and H.ON_CUDA else 2)
