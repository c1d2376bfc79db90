"""The adapter's cross-attention: 256 learned queries (shared by every image) over 1024 patch keys per image,
4096 wide in 32 heads, batch 16, with its 2D position terms and the in/out projections.

Baselines: the torch reference (`reference.resampler_attention`), torch.compile of it, and the official design as
the released Qwen-VL builds it: queries repeated per image and `nn.MultiheadAttention` in [L, N, E] layout, called as
the release calls it (need_weights left at its default, True: "mha-official") and with need_weights=False
("mha-fast"). Target: fwd+bwd >= 3x mha-official."""
import pytest
import torch
import torch.nn as nn

import harness as H
import shapes
from qwenvl_kernels import reference as ref

CASES = ["resampler fwd", "resampler fwd+bwd"]
IMPLS = ["torch", "mha-official", "mha-fast", "triton", "compile"]


def official(query, pos_q, kv, pos_k, mha: nn.MultiheadAttention, need_weights=True):
    """The released Resampler's attention call (after ln_q / ln_kv): `[B, Nq, E]`."""
    B = kv.shape[0]
    q = (query + pos_q).unsqueeze(1).repeat(1, B, 1)      # _repeat(q, N) + pos_embed: [Nq, B, E]
    x = kv.permute(1, 0, 2)                                # [Nk, B, E]
    out = mha(q, x + pos_k.unsqueeze(1), x, need_weights=need_weights)[0]
    return out.permute(1, 0, 2)


@pytest.mark.parametrize("case, impl", H.params(CASES, IMPLS))
def test_resampler(bm, suite, case, impl):
    backward = case.endswith("fwd+bwd")
    s = shapes.shape("resampler", H.ON_CUDA)
    B, Nq, Nk, E, heads = s["B"], s["Nq"], s["Nk"], s["E"], s["heads"]
    e = torch.empty((), dtype=H.DTYPE).element_size()
    flops, nbytes = shapes.cost("resampler", s, e, backward)

    def inputs():
        std = E ** -0.5
        return dict(query=H.randn(Nq, E, grad=backward), pos_q=H.randn(Nq, E, scale=0.5),
                    kv=H.randn(B, Nk, E, grad=backward), pos_k=H.randn(Nk, E, scale=0.5),
                    w_in=H.randn(3 * E, E, scale=std, grad=backward), b_in=H.randn(3 * E, scale=0.02, grad=backward),
                    w_out=H.randn(E, E, scale=std, grad=backward), b_out=H.randn(E, scale=0.02, grad=backward))

    def setup():
        sets = [inputs() for _ in range(H.rotation_count((B * Nk + 2 * Nq + Nk) * E * e + 4 * E * E * e))]
        if impl.startswith("mha-"):
            need_weights = impl == "mha-official"
            args = []
            for d in sets:
                mha = nn.MultiheadAttention(E, heads, device=H.DEVICE, dtype=H.DTYPE)
                with torch.no_grad():
                    mha.in_proj_weight.copy_(d["w_in"])
                    mha.in_proj_bias.copy_(d["b_in"])
                    mha.out_proj.weight.copy_(d["w_out"])
                    mha.out_proj.bias.copy_(d["b_out"])
                mha.requires_grad_(backward)
                args.append((d["query"], d["pos_q"], d["kv"], d["pos_k"], mha))
            fn = lambda q, pq, kv, pk, mha: official(q, pq, kv, pk, mha, need_weights)  # noqa: E731
            return H.rotating_step(args, fn, backward)
        if impl == "torch":
            f = ref.resampler_attention
        elif impl == "triton":
            f = H.kernels("triton").resampler_attention
        elif impl == "compile":
            H.compile_available()
            f = torch.compile(ref.resampler_attention, dynamic=False)
        else:
            raise KeyError(impl)
        args = [(d["query"], d["pos_q"], d["kv"], d["pos_k"], d["w_in"], d["b_in"], d["w_out"], d["b_out"])
                for d in sets]
        return H.rotating_step(args, lambda *a: f(*a, heads), backward)

    cost = {"triton": 30, "compile": 40}.get(impl, 4) if H.ON_CUDA else 2
    suite.run(bm, case=case, impl=impl, setup=setup, flops=flops, nbytes=nbytes, shape=s,
              title=f"resampler B{B} {Nq}q x {Nk}k, {E}/{heads} heads", cost_s=cost)
