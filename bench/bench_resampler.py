"""The adapter's cross-attention: 256 learned queries (shared by every image) over 1024 patch keys per image,
4096 wide in 32 heads, batch 16, with its 2D position terms and the in/out projections.

About 96% of its FLOPs are projection GEMMs that every implementation runs through cuBLAS, so its floor is not the
matmul ceiling but those GEMMs: "floor-gemms" times exactly the GEMMs of our fused path (`shapes.resampler_gemms`)
back to back on the same shapes, allocating their outputs (and the buffers the attention core must write) as the
real thing does. Baselines: the torch reference (`reference.resampler_attention`), torch.compile of it, and the
official design as the released Qwen-VL builds it: queries repeated per image and `nn.MultiheadAttention` in
[L, N, E] layout, called as the release calls it (need_weights left at its default, True: "mha-official") and with
need_weights=False ("mha-fast").
Targets (fwd+bwd): within 1.15x of floor-gemms; >= 1.3x mha-official; memory allocated beyond floor-gemms' under
half of one B x heads x Nq x Nk attention-weight tensor (the weights are never materialized)."""
import pytest
import torch
import torch.nn as nn

import shapes
from benchlib.cases import params, randn
from benchlib.env import DEVICE, DTYPE, ON_CUDA, compile_available, ours
from benchlib.timing import rotating_step, rotation_count
from qwenvl_kernels import reference as ref

CASES = ["resampler fwd", "resampler fwd+bwd"]
IMPLS = ["torch", "mha-official", "mha-fast", "floor-gemms", "triton", "compile"]
COSTS = {"triton": 10, "mha-official": 4, "compile": 40}


def official(query, pos_q, kv, pos_k, mha: nn.MultiheadAttention, need_weights=True):
    """The released Resampler's attention call (after ln_q / ln_kv): `[B, Nq, E]`."""
    B = kv.shape[0]
    q = (query + pos_q).unsqueeze(1).repeat(1, B, 1)      # _repeat(q, N) + pos_embed: [Nq, B, E]
    x = kv.permute(1, 0, 2)                                # [Nk, B, E]
    out = mha(q, x + pos_k.unsqueeze(1), x, need_weights=need_weights)[0]
    return out.permute(1, 0, 2)


def floor_step(s: dict, backward: bool):
    """One pass of the case's projection GEMMs (cuBLAS through torch.mm), outputs allocated in the step and kept to
    its end, with the buffers the attention core writes between them (O; dK | dV and dQ backward)."""
    B, Nq, Nk, E = s["B"], s["Nq"], s["Nk"], s["E"]
    gemms = []
    for _, M, N, K, layout in shapes.resampler_gemms(s, backward):
        a = randn(*((K, M) if layout == "tn" else (M, K)), scale=0.1)
        b = randn(*((N, K) if layout == "nt" else (K, N)), scale=0.1)
        gemms.append((a.t() if layout == "tn" else a, b.t() if layout == "nt" else b))
    core = [(B * Nq, E)] + ([(B * Nk, 2 * E), (Nq, E)] if backward else [])

    def step():
        kept = [torch.empty(shape, device=DEVICE, dtype=DTYPE) for shape in core]
        for a, b in gemms:
            kept.append(torch.mm(a, b))
        return kept

    return step


def _inputs(s: dict, backward: bool) -> dict:
    E, Nq, Nk, B = s["E"], s["Nq"], s["Nk"], s["B"]
    std = E ** -0.5
    return dict(query=randn(Nq, E, grad=backward), pos_q=randn(Nq, E, scale=0.5),
                kv=randn(B, Nk, E, grad=backward), pos_k=randn(Nk, E, scale=0.5),
                w_in=randn(3 * E, E, scale=std, grad=backward), b_in=randn(3 * E, scale=0.02, grad=backward),
                w_out=randn(E, E, scale=std, grad=backward), b_out=randn(E, scale=0.02, grad=backward))


def _mha_step(sets: list, need_weights: bool, backward: bool):
    E, heads = sets[0]["w_out"].shape[0], shapes.shape("resampler", ON_CUDA)["heads"]
    args = []
    for d in sets:
        mha = nn.MultiheadAttention(E, heads, device=DEVICE, dtype=DTYPE)
        with torch.no_grad():
            mha.in_proj_weight.copy_(d["w_in"])
            mha.in_proj_bias.copy_(d["b_in"])
            mha.out_proj.weight.copy_(d["w_out"])
            mha.out_proj.bias.copy_(d["b_out"])
        mha.requires_grad_(backward)
        args.append((d["query"], d["pos_q"], d["kv"], d["pos_k"], mha))
    return rotating_step(args, lambda q, pq, kv, pk, mha: official(q, pq, kv, pk, mha, need_weights), backward)


@pytest.mark.parametrize("case, impl", params(CASES, IMPLS, COSTS))
def test_resampler(bm, suite, case, impl):
    backward = case.endswith("fwd+bwd")
    s = shapes.shape("resampler", ON_CUDA)
    B, Nq, Nk, E, heads = s["B"], s["Nq"], s["Nk"], s["E"], s["heads"]
    e = torch.empty((), dtype=DTYPE).element_size()
    flops, nbytes = shapes.cost("resampler", s, e, backward)

    def setup():
        if impl == "floor-gemms":
            return floor_step(s, backward)
        sets = [_inputs(s, backward) for _ in range(rotation_count((B * Nk + 2 * Nq + Nk) * E * e + 4 * E * E * e))]
        if impl.startswith("mha-"):
            return _mha_step(sets, impl == "mha-official", backward)
        if impl == "torch":
            f = ref.resampler_attention
        elif impl == "triton":
            f = ours().resampler_attention
        elif impl == "compile":
            compile_available()
            f = torch.compile(ref.resampler_attention, dynamic=False)
        else:
            raise KeyError(impl)
        args = [(d["query"], d["pos_q"], d["kv"], d["pos_k"], d["w_in"], d["b_in"], d["w_out"], d["b_out"])
                for d in sets]
        return rotating_step(args, lambda *a: f(*a, heads), backward)

    suite.run(bm, case=case, impl=impl, setup=setup, flops=flops, nbytes=nbytes, shape=s,
              title=f"resampler B{B} {Nq}q x {Nk}k, {E}/{heads} heads",
              case_meta={"attn_weight_bytes": B * heads * Nq * Nk * e})


def test_floor_gemms_are_the_reference_projections():
    """The floor's GEMMs are the reference's projections (its matrix products as torch counts them, forward), plus
    the one product our path adds (P_k = pos_k Wk^T, once per call instead of adding pos_k to every image's keys);
    backward, two products per projection, as the cost model counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    s = shapes.shape("resampler", False)
    B, Nq, Nk, E, heads = s["B"], s["Nq"], s["Nk"], s["E"], s["heads"]
    d = _inputs(s, backward=False)
    with FlopCounterMode(display=False) as counter:
        ref.resampler_attention(d["query"], d["pos_q"], d["kv"], d["pos_k"], d["w_in"], d["b_in"], d["w_out"],
                                d["b_out"], heads)
    products = sum(n for op, n in counter.get_flop_counts()["Global"].items()
                   if str(op).split(".")[1] in ("mm", "addmm", "bmm", "baddbmm"))
    floor = sum(2 * M * N * K for _, M, N, K, _ in shapes.resampler_gemms(s))
    assert products == floor - 2 * Nk * E * E > 0
    fwd_bwd = sum(2 * M * N * K for _, M, N, K, _ in shapes.resampler_gemms(s, backward=True))
    cost_flops, _ = shapes.cost("resampler", s, 4, backward=True)
    assert fwd_bwd + 3 * 4 * B * Nq * Nk * E == cost_flops + 4 * Nk * E * E
