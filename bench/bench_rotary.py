"""Rotary embedding of q and k in the decoder, B4 T2048 32 heads x 128: forward and forward + backward."""
import pytest
import torch

import shapes
from benchlib.cases import cuda_only, params, randn
from benchlib.env import DEVICE, DTYPE, ON_CUDA, compile_available, optional_module, ours
from benchlib.timing import rotating_step, rotation_count
from qwenvl_kernels import reference as ref

CASES = ["rotary fwd", "rotary fwd+bwd"]
IMPLS = ["torch", "flash-attn", "liger", "triton", "compile"]
COSTS = {"triton": 8, "compile": 20}


def _tables(T, D):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, device=DEVICE).float() / D))
    freqs = torch.outer(torch.arange(T, device=DEVICE).float(), inv_freq)
    return freqs.cos(), freqs.sin()                       # fp32 [T, D/2], as the model's RotaryEmbedding


def _function(impl: str, cos, sin):
    """fn(q, k) -> (q', k') in our layout [B, T, H, D]; baselines get their own layout prepared outside the step."""
    if impl == "torch":
        return lambda q, k: ref.apply_rotary(q, k, cos, sin), "bthd"
    if impl == "triton":
        rot = ours().apply_rotary
        return lambda q, k: rot(q, k, cos, sin), "bthd"
    if impl == "compile":
        compile_available()
        f = torch.compile(ref.apply_rotary, dynamic=False)
        return lambda q, k: f(q, k, cos, sin), "bthd"
    cuda_only(impl)
    if impl == "flash-attn":
        rotary = optional_module("flash_attn.layers.rotary")
        c, s = cos.to(DTYPE), sin.to(DTYPE)           # its Triton kernel takes tables in the input dtype
        # the same [B, T, H, D] layout and half-width tables: NeoX style is interleaved=False
        return lambda q, k: (rotary.apply_rotary_emb(q, c, s, interleaved=False),
                             rotary.apply_rotary_emb(k, c, s, interleaved=False)), "bthd"
    if impl == "liger":
        rope = optional_module("liger_kernel.ops.rope").LigerRopeFunction
        c = torch.cat((cos, cos), -1)[None].to(DTYPE)   # HF layout: [1, T, D] full-width tables, q [B, H, T, D]
        s = torch.cat((sin, sin), -1)[None].to(DTYPE)
        return lambda q, k: rope.apply(q, k, c, s), "bhtd"
    raise KeyError(impl)


@pytest.mark.parametrize("case, impl", params(CASES, IMPLS, COSTS))
def test_rotary(bm, suite, case, impl):
    backward = case.endswith("fwd+bwd")
    s = shapes.shape("rotary", ON_CUDA)
    B, T, Hn, D = s["B"], s["T"], s["H"], s["D"]
    e = torch.empty((), dtype=DTYPE).element_size()
    flops, nbytes = shapes.cost("rotary", s, e, backward)

    def setup():
        cos, sin = _tables(T, D)
        fn, layout = _function(impl, cos, sin)
        sets = []
        for _ in range(rotation_count(2 * B * T * Hn * D * e)):
            q, k = randn(B, T, Hn, D), randn(B, T, Hn, D)
            if layout == "bhtd":
                q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
            sets.append((q.requires_grad_(backward), k.requires_grad_(backward)))
        return rotating_step(sets, fn, backward)

    suite.run(bm, case=case, impl=impl, setup=setup, flops=flops, nbytes=nbytes, shape=s,
              title=f"rotary q,k B{B} T{T} {Hn}x{D}")
