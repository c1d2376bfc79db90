"""qwenvl_kernels.resampler_attention against qwenvl_kernels.reference.resampler_attention (forward and the
gradients of every tensor argument, against a float64 oracle), and the reference against nn.MultiheadAttention
called the way the official Qwen-VL Resampler calls it."""
import math

import pytest
import torch
import torch.nn as nn

from qwenvl_kernels import launch, reference
from qwenvl_kernels.launch import UnsupportedInput
from qwenvl_kernels.ops.resampler_attention import _dq_split, resampler_attention
from tests.helpers import CUDA, DEVICE, TEST_DTYPES, assert_close, needs_cuda, non_contiguous

pytestmark = pytest.mark.triton

NAMES = ("query", "pos_q", "kv", "pos_k", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias")
TRAINED = ("query", "kv", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias")


def _inputs(B, Nq, Nk, E, dtype, device=DEVICE, q_scale=1.0):
    """Random (never zero) inputs in `dtype`, scaled like the real adapter: unit-variance activations (after
    LayerNorm), weights of std 1/sqrt(E), small nonzero biases."""
    def r(*shape, std=1.0):
        return (torch.randn(*shape, device=device) * std).to(dtype)

    return {
        "query": r(Nq, E, std=q_scale),
        "pos_q": r(Nq, E, std=0.5),
        "kv": r(B, Nk, E),
        "pos_k": r(Nk, E, std=0.5),
        "in_proj_weight": r(3 * E, E, std=E ** -0.5),
        "in_proj_bias": r(3 * E, std=0.1),
        "out_proj_weight": r(E, E, std=E ** -0.5),
        "out_proj_bias": r(E, std=0.1),
    }


def _check(inp, H, dtype, grad=None, requires=TRAINED, layouts=None, oracle=torch.float64, tol=None):
    """Forward and every requested gradient against the reference run in `oracle` precision on the same values.
    `layouts` maps an argument name to a function giving the (same-valued) tensor the kernel receives."""
    layouts = layouts or {}
    leaves = {n: t.detach().clone().requires_grad_(n in requires) for n, t in inp.items()}
    args = {n: layouts.get(n, lambda t: t)(t) for n, t in leaves.items()}
    out = resampler_attention(*(args[n] for n in NAMES), H)
    B, Nk, E = inp["kv"].shape
    assert out.shape == (B, inp["query"].shape[0], E) and out.dtype == dtype

    ref_leaves = {n: t.detach().to(oracle).requires_grad_(n in requires) for n, t in inp.items()}
    ref = reference.resampler_attention(*(ref_leaves[n] for n in NAMES), H)
    tol = tol or {}
    assert_close(out, ref, dtype, "output", *tol.get("output", (None, None)))

    g = torch.randn_like(out) if grad is None else grad(torch.randn_like(out))
    g_before = g.clone()
    out.backward(g)
    assert torch.equal(g, g_before), "backward wrote into the incoming gradient"
    ref.backward(g.to(oracle))
    for n in NAMES:
        if n in requires:
            assert leaves[n].grad is not None, f"no gradient for {n}"
            assert leaves[n].grad.dtype == dtype
            assert_close(leaves[n].grad, ref_leaves[n].grad, dtype, f"grad {n}", *tol.get(n, (None, None)))
        else:
            assert leaves[n].grad is None


# (B, Nq, Nk, E, heads, non-contiguous kv and output gradient)
CASES = [
    (1, 16, 16, 64, 4, False),
    (3, 16, 49, 64, 4, True),      # several key blocks, the last one partial; dQ summed over a split batch
    (3, 7, 9, 208, 2, True),       # head_dim 104 (padded to 128), fewer keys than one block
    (2, 37, 9, 64, 4, False),      # several query blocks, the last one partial
]


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("B,Nq,Nk,E,H,strided", CASES)
def test_matches_reference(B, Nq, Nk, E, H, strided, dtype):
    inp = _inputs(B, Nq, Nk, E, dtype)
    if strided:
        _check(inp, H, dtype, grad=non_contiguous, layouts={"kv": non_contiguous})
    else:
        _check(inp, H, dtype)


def test_peaked_softmax_across_blocks():
    """Large scores (queries x 12): the running max must rescale earlier key blocks correctly."""
    _check(_inputs(2, 16, 49, 64, torch.float32, q_scale=12.0), 4, torch.float32)


def test_position_tables_get_gradients_and_odd_layouts():
    """pos_q and pos_k are fixed tables in Qwen-VL, but if they require gradients they get the right ones;
    non-contiguous query, tables and weights are read correctly."""
    inp = _inputs(2, 7, 16, 64, torch.float32)
    transposed = lambda t: t.t().contiguous().t()  # noqa: E731
    _check(inp, 4, torch.float32, requires=NAMES,
           layouts={"query": non_contiguous, "pos_k": non_contiguous, "in_proj_weight": transposed,
                    "out_proj_weight": non_contiguous, "kv": lambda t: non_contiguous(t, dim=1)})


@pytest.mark.parametrize("requires", [("kv",), ("query",), ("out_proj_weight", "out_proj_bias")], ids=str)
def test_partial_requires_grad(requires):
    """Frozen pieces (e.g. a frozen adapter in training stage 3) skip their kernels and still give the rest."""
    _check(_inputs(2, 7, 9, 64, torch.float32), 4, torch.float32, requires=requires)


def test_every_buffer_written():
    """The op allocates its outputs and scratch (O, lse, Delta, dQ partials, dK|dV) itself, NaN-filled by the
    tests' poisoning switch, so an element a kernel skips cannot pass."""
    assert launch.POISON_OUTPUTS, "tests/conftest.py turns the poisoning on"
    _check(_inputs(3, 19, 21, 64, torch.float32), 4, torch.float32)


def test_expanded_output_gradient():
    """`out.sum().backward()` hands backward a gradient with all strides 0."""
    _check(_inputs(2, 7, 9, 64, torch.float32), 4, torch.float32, grad=lambda g: g[:1, :1, :1].expand_as(g))


def test_autocast_keeps_input_dtype():
    inp = _inputs(2, 7, 9, 64, torch.float32)
    kv = inp["kv"].clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = resampler_attention(*(kv if n == "kv" else inp[n] for n in NAMES), 4)
        assert out.dtype == torch.float32
        out.backward(torch.ones_like(out))  # backward in the autocast region too
    ref_kv = inp["kv"].double().requires_grad_()
    ref = reference.resampler_attention(*(ref_kv if n == "kv" else inp[n].double() for n in NAMES), 4)
    ref.backward(torch.ones_like(ref))
    assert_close(out, ref, torch.float32)
    assert_close(kv.grad, ref_kv.grad, torch.float32, "grad kv")


def test_no_grad_forward():
    inp = _inputs(2, 7, 9, 64, torch.float16)
    with torch.no_grad():
        out = resampler_attention(*(inp[n] for n in NAMES), 4)
        ref = reference.resampler_attention(*(inp[n].double() for n in NAMES), 4)
    assert_close(out, ref, torch.float16)


def test_batch_shares_queries():
    """Each image's output is what it gets alone: nothing leaks between images through the shared queries."""
    inp = _inputs(3, 7, 9, 64, torch.float32)
    out = resampler_attention(*(inp[n] for n in NAMES), 4)
    one = dict(inp, kv=inp["kv"][1:2])
    assert_close(out[1:2], resampler_attention(*(one[n] for n in NAMES), 4), torch.float32)


def test_dq_split_shares_batch_evenly():
    dev = torch.device("cpu")  # num_programs_hint gives 4 on the CPU: a target of 8 programs
    assert _dq_split(1, 1, dev) == 1
    assert _dq_split(4, 100, dev) == 1
    assert _dq_split(3, 2, dev) == 3
    assert _dq_split(3, 4, dev) == 2
    # 4 slices of 5 or 9 images: the slowest slice does 2 (3) images either way, so fewer, fuller slices
    assert _dq_split(5, 2, dev) == 3
    assert _dq_split(9, 2, dev) == 3
    assert _dq_split(8, 2, dev) == 4


def test_matches_official_multihead_attention():
    """The reference (and the kernel) against nn.MultiheadAttention used as the official Resampler uses it:
    sequence-first, queries repeated per image, query = q + pos_q, key = kv + pos_k, value = kv."""
    B, Nq, Nk, E, H = 2, 7, 9, 64, 4
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(E, H).double()
    with torch.no_grad():  # torch initializes the biases to zero: make them matter
        mha.in_proj_bias.normal_(0, 0.1)
        mha.out_proj.bias.normal_(0, 0.1)
    inp = _inputs(B, Nq, Nk, E, torch.float64, device="cpu")
    q = inp["query"].clone().requires_grad_()
    x = inp["kv"].permute(1, 0, 2).clone().requires_grad_()         # [Nk, B, E], as the official module holds it
    pos_q, pos_k = inp["pos_q"], inp["pos_k"]
    official = mha(q.unsqueeze(1).repeat(1, B, 1) + pos_q.unsqueeze(1), x + pos_k.unsqueeze(1), x,
                   need_weights=False)[0].permute(1, 0, 2)           # [B, Nq, E]
    g = torch.randn_like(official)
    official.backward(g)

    params = (mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias)
    ref = reference.resampler_attention(q.detach(), pos_q, x.detach().permute(1, 0, 2), pos_k,
                                        *(p.detach() for p in params), H)
    assert_close(ref, official.detach(), torch.float64, "reference vs nn.MultiheadAttention")

    # the kernel (fp32) against the official module's output and its parameter gradients
    leaves = [t.detach().float().requires_grad_() for t in (q, x.permute(1, 0, 2), *params)]
    out = resampler_attention(leaves[0], pos_q.float(), leaves[1], pos_k.float(), *leaves[2:], H)
    assert_close(out, official.detach(), torch.float32, "kernel vs nn.MultiheadAttention")
    out.backward(g.float())
    expected = (q.grad, x.grad.permute(1, 0, 2), *(p.grad for p in params))
    for name, leaf, want in zip(("query", "kv", *NAMES[4:]), leaves, expected):
        assert_close(leaf.grad, want, torch.float32, f"grad {name} vs nn.MultiheadAttention")


@needs_cuda
@pytest.mark.parametrize("Nk", [1024, 256], ids=["448px", "224px"])
def test_qwenvl_size_bf16(Nk):
    """The real adapter: 4 images, 256 queries, 32 heads of 128, in bf16 against the fp32 reference."""
    inp = _inputs(4, 256, Nk, 4096, torch.bfloat16, device="cuda")
    _check(inp, 32, torch.bfloat16, oracle=torch.float32)


@needs_cuda
def test_qwenvl_size_fp32_no_tf32():
    """fp32 stays fp32 (IEEE dot products, not TF32) at the real size, one image."""
    inp = _inputs(1, 256, 256, 4096, torch.float32, device="cuda")
    _check(inp, 32, torch.float32, oracle=torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# errors, raised before any launch
# ----------------------------------------------------------------------------------------------------------------

def _bad(**changes):
    inp = _inputs(2, 7, 9, 64, torch.float32)
    heads = changes.pop("num_heads", 4)
    inp.update(changes)
    return [inp[n] for n in NAMES], heads


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("changes,match", [
    (dict(num_heads=5), "not divisible by num_heads"),
    (dict(num_heads=0), "num_heads must be a positive int"),
    (dict(num_heads=4.0), "num_heads must be a positive int"),
    (dict(query=_t(2, 7, 64)), "query must be \\[Nq, E\\]"),
    (dict(query=_t(7, 32)), "query must be \\[Nq, E\\]"),
    (dict(kv=_t(9, 64)), "kv must be \\[batch, Nk, E\\]"),
    (dict(pos_q=_t(8, 64)), "pos_q must have shape"),
    (dict(pos_k=_t(16, 64)), "pos_k must have shape"),
    (dict(in_proj_weight=_t(64, 64)), "in_proj_weight must have shape"),
    (dict(in_proj_bias=_t(64)), "in_proj_bias must have shape"),
    (dict(out_proj_weight=_t(64, 32)), "out_proj_weight must have shape"),
    (dict(out_proj_bias=_t(32)), "out_proj_bias must have shape"),
    (dict(kv=_t(2, 0, 64), pos_k=_t(0, 64)), "empty input"),
    (dict(kv=_t(2, 9, 64, dtype=torch.float16)), "different dtypes"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_errors(changes, match):
    args, heads = _bad(**changes)
    with pytest.raises(UnsupportedInput, match=match):
        resampler_attention(*args, heads)


def test_error_head_dim_too_large():
    inp = _inputs(1, 3, 5, 256, torch.float32)
    with pytest.raises(UnsupportedInput, match="head_dim 256 .* above the kernel's limit of 128"):
        resampler_attention(*(inp[n] for n in NAMES), 1)


def test_error_dtypes_and_devices(monkeypatch):
    inp = _inputs(1, 3, 5, 64, torch.float64)
    with pytest.raises(UnsupportedInput, match="dtype torch.float64 is not supported"):
        resampler_attention(*(inp[n] for n in NAMES), 4)
    if not CUDA:
        inp = _inputs(1, 3, 5, 64, torch.bfloat16)
        with pytest.raises(UnsupportedInput, match="bfloat16 is not supported under the Triton interpreter"):
            resampler_attention(*(inp[n] for n in NAMES), 4)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        inp = _inputs(1, 3, 5, 64, torch.float32)
        with pytest.raises(UnsupportedInput, match="TRITON_INTERPRET=1"):
            resampler_attention(*(inp[n] for n in NAMES), 4)
    else:
        inp = _inputs(1, 3, 5, 64, torch.float32)
        inp["kv"] = inp["kv"].cpu()
        with pytest.raises(UnsupportedInput, match="different devices"):
            resampler_attention(*(inp[n] for n in NAMES), 4)


def test_softmax_scale_is_head_dim():
    """The scale is 1/sqrt(head_dim) (E / heads), not 1/sqrt(E): a check independent of the reference."""
    B, Nq, Nk, E, H = 1, 3, 5, 64, 4
    inp = _inputs(B, Nq, Nk, E, torch.float32)
    out = resampler_attention(*(inp[n] for n in NAMES), H)
    d = E // H
    wq, wk, wv = inp["in_proj_weight"].chunk(3)
    bq, bk, bv = inp["in_proj_bias"].chunk(3)
    q = ((inp["query"] + inp["pos_q"]) @ wq.t() + bq).view(Nq, H, d).transpose(0, 1)
    k = ((inp["kv"][0] + inp["pos_k"]) @ wk.t() + bk).view(Nk, H, d).transpose(0, 1)
    v = (inp["kv"][0] @ wv.t() + bv).view(Nk, H, d).transpose(0, 1)
    o = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), -1) @ v
    want = o.transpose(0, 1).reshape(Nq, E) @ inp["out_proj_weight"].t() + inp["out_proj_bias"]
    assert_close(out[0], want, torch.float32)
