"""Flash attention (qwenvl_kernels.ops.flash_attention) against qwenvl_kernels.reference, forward and backward.

Every kernel-allocated buffer is filled with NaN first (tests/conftest.py), so a skipped element cannot pass.
The reference runs in float64 on the same (rounded) inputs; errors are judged at the tolerance of the kernel dtype.
"""

import pytest
import torch

import qwenvl_kernels.ops.flash_attention as fa
from qwenvl_kernels import launch, reference
from qwenvl_kernels.launch import UnsupportedInput
from qwenvl_kernels.ops.flash_attn_interface import flash_attn_func, flash_attn_varlen_func
from tests.helpers import CUDA, DEVICE, TEST_DTYPES, assert_close, needs_cuda, non_contiguous

pytestmark = pytest.mark.triton


def _randn(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, dtype=dtype, device=device)


def _ref_with_grads(ref_fn, inputs, do, **kwargs):
    """The reference output and gradients of `inputs`, in float64."""
    xs = [x.detach().double().requires_grad_() for x in inputs]
    out = ref_fn(*xs, **kwargs)
    grads = torch.autograd.grad(out, xs, do.double())
    return out, grads


def _check(out, grads, ref_out, ref_grads, dtype, names=("dq", "dk", "dv")):
    assert out.dtype == dtype
    assert_close(out, ref_out, dtype=dtype, name="out")
    for g, r, n in zip(grads, ref_grads, names):
        assert g.dtype == dtype, n
        assert_close(g, r, dtype=dtype, name=n)


def _run_attention(B, Tq, Tk, H, Hk, D, causal, dtype, seq_start=None, softmax_scale=None):
    q = _randn(B, Tq, H, D, dtype=dtype).requires_grad_()
    k = _randn(B, Tk, Hk, D, dtype=dtype).requires_grad_()
    v = _randn(B, Tk, Hk, D, dtype=dtype).requires_grad_()
    out = fa.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, seq_start=seq_start)
    do = _randn(*out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_out, ref_grads = _ref_with_grads(reference.attention, (q, k, v), do, causal=causal,
                                         softmax_scale=softmax_scale, seq_start=seq_start)
    _check(out, grads, ref_out, ref_grads, dtype)
    return out, grads


# A covering set rather than the full product: every seqlen of {1, 7, 63, 257}, every head_dim of {64, 80, 104,
# 128}, causal and not, Tq < Tk and Tq > Tk (rows above the diagonal see no key), GQA, batch > 1, both dtypes.
# (B, Tq, Tk, H, Hk, D, causal, dtype)
CASES = [
    (2, 63, 63, 2, 2, 64, False, torch.float32),
    (2, 63, 63, 4, 2, 80, True, torch.float16),        # GQA
    (1, 257, 257, 1, 1, 104, True, torch.float32),
    (2, 7, 63, 2, 1, 128, True, torch.float16),        # Tq < Tk: bottom-right causal, GQA
    (2, 63, 7, 2, 2, 64, True, torch.float32),         # Tq > Tk: the first 56 rows see no key
    (3, 1, 7, 4, 1, 80, False, torch.float16),         # one query (decode-like), 4 heads per KV head
    (1, 7, 257, 2, 2, 104, False, torch.float16),
    (2, 257, 63, 2, 1, 128, False, torch.float32),
    (2, 257, 257, 4, 1, 80, True, torch.float16),      # 4 query heads per KV head over many key blocks
]


@pytest.mark.parametrize("B,Tq,Tk,H,Hk,D,causal,dtype", CASES)
def test_attention(B, Tq, Tk, H, Hk, D, causal, dtype):
    _run_attention(B, Tq, Tk, H, Hk, D, causal, dtype)


def test_rows_without_keys_are_zero():
    # causal with Tq > Tk: rows i < Tq - Tk see no key; they must be exactly 0 (not NaN) with zero dq
    out, (dq, dk, dv) = _run_attention(1, 20, 5, 2, 2, 64, True, torch.float32)
    assert torch.equal(out[:, :15], torch.zeros_like(out[:, :15]))
    assert torch.equal(dq[:, :15], torch.zeros_like(dq[:, :15]))


def test_seqlen_one():
    # one query, one key: out = v, dv = dO, and dq = dk = 0 up to rounding (relative errors are meaningless)
    for dtype in TEST_DTYPES[:2]:
        q, k, v = (_randn(2, 1, 2, 64, dtype=dtype).requires_grad_() for _ in range(3))
        out = flash_attn_func(q, k, v, causal=True)
        do = _randn(*out.shape, dtype=dtype)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
        assert_close(out, v.detach(), dtype=dtype)
        assert_close(dv, do, dtype=dtype)
        assert dq.abs().max() < 1e-2 and dk.abs().max() < 1e-2


def test_softmax_scale_and_flash_attn_func():
    q = _randn(2, 33, 2, 80).requires_grad_()
    k = _randn(2, 45, 2, 80).requires_grad_()
    v = _randn(2, 45, 2, 80).requires_grad_()
    out = flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=0.3, causal=True)
    do = _randn(*out.shape)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_out, ref_grads = _ref_with_grads(reference.attention, (q, k, v), do, causal=True, softmax_scale=0.3)
    _check(out, grads, ref_out, ref_grads, torch.float32)


@pytest.mark.parametrize("dtype", TEST_DTYPES[:2])
def test_packed_qkv_and_non_contiguous_grad(dtype):
    # the ViT slices q, k, v out of one [B, T, H, 3, D] tensor; dO arrives strided
    B, T, H, D = 2, 63, 2, 104
    qkv = _randn(B, T, H, 3, D, dtype=dtype).requires_grad_()
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    out = fa.attention(q, k, v)
    do = non_contiguous(_randn(B, T, H, D, dtype=dtype), dim=1)
    do_copy = do.clone()
    (dqkv,) = torch.autograd.grad(out, (qkv,), do)
    assert torch.equal(do, do_copy), "backward wrote into the incoming gradient"
    x = qkv.detach().double().requires_grad_()
    ref = reference.attention(*x.unbind(3))
    (ref_dqkv,) = torch.autograd.grad(ref, (x,), do.double())
    assert_close(out, ref, dtype=dtype)
    assert_close(dqkv, ref_dqkv, dtype=dtype, name="dqkv")


def test_non_contiguous_head_dim_and_partial_grads():
    # strided head dim (copied once), a frozen q, strided dO along the last dim; GQA, causal, Tq < Tk
    q = non_contiguous(_randn(2, 30, 4, 80), dim=-1)
    k = non_contiguous(_randn(2, 37, 2, 80), dim=1).requires_grad_()
    v = non_contiguous(_randn(2, 37, 2, 80), dim=-1).requires_grad_()
    out = fa.attention(q, k, v, causal=True)
    do = non_contiguous(_randn(2, 30, 4, 80), dim=-1)
    dk, dv = torch.autograd.grad(out, (k, v), do)
    ref_out, (_, ref_dk, ref_dv) = _ref_with_grads(reference.attention, (q, k, v), do, causal=True)
    _check(out, (dk, dv), ref_out, (ref_dk, ref_dv), torch.float32, names=("dk", "dv"))


@pytest.mark.parametrize("causal,index_dtype", [(False, torch.int64), (True, torch.int32)])
def test_seq_start_left_padding(causal, index_dtype):
    # batch entry 1 is left-padded by 9 tokens, entry 2 entirely padded (every query row sees no key)
    B, T, H, D = 3, 40, 2, 64
    seq_start = torch.tensor([0, 9, T], dtype=index_dtype, device=DEVICE)
    out, (dq, dk, dv) = _run_attention(B, T, T, H, H, D, causal, torch.float32, seq_start=seq_start)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    for g in (dq, dk, dv):
        assert torch.equal(g[2], torch.zeros_like(g[2]))
    assert torch.equal(dk[1, :9], torch.zeros_like(dk[1, :9]))  # padded keys get no gradient
    if causal:
        assert torch.equal(out[1, :9], torch.zeros_like(out[1, :9]))  # padded query rows see no key


def test_seq_start_fp16_gqa_uneven_blocks(monkeypatch):
    # other block shapes than the default: the split into masked / unmasked key blocks must not depend on them
    monkeypatch.setitem(fa.INTERPRETER_BLOCKS, "fwd", (16, 32))
    monkeypatch.setitem(fa.INTERPRETER_BLOCKS, "dq", (16, 64))
    monkeypatch.setitem(fa.INTERPRETER_BLOCKS, "dkdv", (32, 16))
    seq_start = torch.tensor([5, 0, 50], device=DEVICE)
    _run_attention(3, 40, 63, 4, 2, 80, True, torch.float16, seq_start=seq_start)


@pytest.mark.parametrize("D", [64, 104])
def test_cuda_block_shapes(monkeypatch, D):
    # the numbers of the CUDA default configs (first of each autotune list), checked here under the interpreter
    for kind in ("fwd", "dq", "dkdv"):
        consts = fa.launch_constexprs(kind, D, True, True, False, torch.float16, False)
        cfg = fa.CONFIGS[fa.launch_name(kind, consts)][0]
        monkeypatch.setitem(fa.INTERPRETER_BLOCKS, kind, (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]))
    seq_start = torch.tensor([0, 70], device=DEVICE)
    _run_attention(2, 150, 200, 2, 1, D, True, torch.float16, seq_start=seq_start)


def _run_varlen(lens_q, lens_k, H, Hk, D, causal, dtype):
    cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
    q = _randn(sum(lens_q), H, D, dtype=dtype).requires_grad_()
    k = _randn(sum(lens_k), Hk, D, dtype=dtype).requires_grad_()
    v = _randn(sum(lens_k), Hk, D, dtype=dtype).requires_grad_()
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    do = _randn(*out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_out, ref_grads = _ref_with_grads(reference.varlen_attention, (q, k, v), do, cu_seqlens_q=cu_q,
                                         cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k),
                                         causal=causal)
    _check(out, grads, ref_out, ref_grads, dtype)


@pytest.mark.parametrize("lens_q,lens_k,H,Hk,D,causal,dtype", [
    ([17, 1, 63, 5], [17, 1, 63, 5], 2, 2, 80, False, torch.float32),   # ViT-style: images of uneven size
    ([17, 1, 40, 3], [30, 4, 40, 0], 4, 2, 64, True, torch.float16),    # Tq != Tk, an empty key sequence, GQA
])
def test_varlen(lens_q, lens_k, H, Hk, D, causal, dtype):
    _run_varlen(lens_q, lens_k, H, Hk, D, causal, dtype)


def test_varlen_strided_slices_of_packed_qkv():
    lens = [7, 33, 1]
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0).to(torch.int32)
    qkv = _randn(sum(lens), 3, 2, 104).requires_grad_()
    q, k, v = qkv.unbind(1)
    out = flash_attn_varlen_func(q, k, v, cu, cu, None, None)  # max_seqlen read from cu_seqlens
    do = _randn(*out.shape)
    (g,) = torch.autograd.grad(out, (qkv,), do)
    x = qkv.detach().double().requires_grad_()
    ref = reference.varlen_attention(*x.unbind(1), cu, cu, max(lens), max(lens))
    (ref_g,) = torch.autograd.grad(ref, (x,), do.double())
    assert_close(out, ref, dtype=torch.float32)
    assert_close(g, ref_g, dtype=torch.float32, name="dqkv")


def test_backend_wiring():
    from qwenvl_kernels import backend

    assert backend._triton_function("attention") is fa.attention
    assert backend._triton_function("varlen_attention") is fa.varlen_attention
    q, k, v = (_randn(9, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=q.device)
    # the reference's positional order (..., causal, softmax_scale) must mean the same in the kernel
    assert_close(fa.varlen_attention(q, k, v, cu, cu, 5, 5, True, 0.3),
                 reference.varlen_attention(q, k, v, cu, cu, 5, 5, True, 0.3))


def test_errors():
    q = _randn(2, 8, 4, 64)
    k = _randn(2, 8, 2, 64)
    with pytest.raises(UnsupportedInput, match="dropout_p"):
        flash_attn_func(q, k, k, dropout_p=0.1)
    with pytest.raises(UnsupportedInput, match="head_dim 136"):
        fa.attention(_randn(1, 8, 1, 136), _randn(1, 8, 1, 136), _randn(1, 8, 1, 136))
    with pytest.raises(UnsupportedInput, match="multiple of 8"):
        fa.attention(_randn(1, 8, 1, 36), _randn(1, 8, 1, 36), _randn(1, 8, 1, 36))
    with pytest.raises(UnsupportedInput, match="different dtypes"):
        fa.attention(q, k.half(), k.half())
    with pytest.raises(UnsupportedInput, match="different devices"):
        fa.attention(q, k, k.to("meta"))
    with pytest.raises(UnsupportedInput, match="4 dims"):
        fa.attention(q[0], k[0], k[0])
    with pytest.raises(UnsupportedInput, match="batch sizes"):
        fa.attention(q, k[:1], k[:1])
    with pytest.raises(UnsupportedInput, match="multiple of the number of key/value heads"):
        fa.attention(_randn(2, 8, 3, 64), k, k)
    with pytest.raises(UnsupportedInput, match="same shape"):
        fa.attention(q, k, k[:, :4])
    with pytest.raises(UnsupportedInput, match="same head_dim"):
        fa.attention(q, _randn(2, 8, 2, 32), _randn(2, 8, 2, 32))
    with pytest.raises(UnsupportedInput, match="seq_start must be an int32 or int64"):
        fa.attention(q, k, k, seq_start=torch.zeros(2))
    with pytest.raises(UnsupportedInput, match=r"seq_start must have shape \[batch\]"):
        fa.attention(q, k, k, seq_start=torch.zeros(3, dtype=torch.int64))
    if not CUDA:
        with pytest.raises(UnsupportedInput, match="bfloat16"):
            fa.attention(q.bfloat16(), k.bfloat16(), k.bfloat16())


def test_varlen_errors():
    q = _randn(10, 2, 64)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(UnsupportedInput, match="int32"):
        flash_attn_varlen_func(q, q, q, cu.long(), cu, 6, 6)
    with pytest.raises(UnsupportedInput, match="non-decreasing"):
        bad = torch.tensor([0, 7, 4, 10], dtype=torch.int32, device=DEVICE)
        flash_attn_varlen_func(q, q, q, bad, bad, 7, 7)
    with pytest.raises(UnsupportedInput, match="must equal the number of packed tokens"):
        flash_attn_varlen_func(q, q, q, cu, torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE), 6, 6)
    with pytest.raises(UnsupportedInput, match="must start at 0"):
        bad = torch.tensor([1, 4, 10], dtype=torch.int32, device=DEVICE)
        flash_attn_varlen_func(q, q, q, bad, cu, 6, 6)
    with pytest.raises(UnsupportedInput, match="max_seqlen"):
        flash_attn_varlen_func(q, q, q, cu, cu, 5, 6)
    with pytest.raises(UnsupportedInput, match="different numbers of sequences"):
        flash_attn_varlen_func(q, q, q, cu, torch.tensor([0, 10], dtype=torch.int32, device=DEVICE), 6, 10)
    with pytest.raises(UnsupportedInput, match="3 dims"):
        flash_attn_varlen_func(q[None], q[None], q[None], cu, cu, 6, 6)
    with pytest.raises(UnsupportedInput, match="dropout_p"):
        flash_attn_varlen_func(q, q, q, cu, cu, 6, 6, dropout_p=0.5)


# ------------------------------------------------------------------------------------------------ CUDA only
# Coverage tests launch the default config of each kernel (no autotuning: every new head_dim / flag / dtype key
# would otherwise compile all candidates); the two real Qwen-VL shapes run autotuned, as the model does.

@pytest.fixture
def no_autotune(monkeypatch):
    monkeypatch.setattr(launch, "AUTOTUNE", False)


@needs_cuda
@pytest.mark.usefixtures("no_autotune")
@pytest.mark.parametrize("B,Tq,Tk,H,Hk,D,causal,dtype", [
    (2, 1025, 1025, 4, 2, 80, True, torch.bfloat16),
    (2, 257, 1025, 2, 2, 104, True, torch.float16),
    (2, 1025, 63, 2, 1, 128, True, torch.bfloat16),
    (3, 1025, 1025, 2, 2, 64, False, torch.float16),
    (2, 1, 1025, 4, 4, 128, False, torch.bfloat16),
    (2, 1025, 1025, 2, 1, 64, True, torch.float32),
    (1, 257, 1025, 2, 2, 104, False, torch.float32),
])
def test_attention_cuda(B, Tq, Tk, H, Hk, D, causal, dtype):
    _run_attention(B, Tq, Tk, H, Hk, D, causal, dtype)


@needs_cuda
@pytest.mark.usefixtures("no_autotune")
def test_seq_start_and_varlen_cuda():
    seq_start = torch.tensor([0, 300, 1025], device=DEVICE, dtype=torch.int32)
    _run_attention(3, 1025, 1025, 4, 2, 128, True, torch.bfloat16, seq_start=seq_start)
    _run_varlen([1025, 1, 300, 77], [1025, 1, 300, 77], 4, 4, 104, False, torch.bfloat16)
    _run_varlen([1025, 1, 300, 77], [900, 5, 1025, 0], 4, 2, 64, True, torch.float16)


def _real_shape(B, T, H, D, causal, dtype=torch.bfloat16):
    q, k, v = (_randn(B, T, H, D, dtype=dtype).requires_grad_() for _ in range(3))
    out = fa.attention(q, k, v, causal=causal)
    do = _randn(*out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), do)
    # fp32 reference on the GPU (float64 would be slow at these sizes); well within bf16 tolerances
    xs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = reference.attention(*xs, causal=causal)
    ref_grads = torch.autograd.grad(ref, xs, do.float())
    _check(out, grads, ref, ref_grads, dtype)


@needs_cuda
def test_vit_bigg_shape_cuda():
    _real_shape(2, 1024, 16, 104, causal=False)


@needs_cuda
def test_decoder_shape_cuda():
    _real_shape(1, 2048, 32, 128, causal=True)


@needs_cuda
@pytest.mark.usefixtures("no_autotune")
def test_deterministic_backward_cuda():
    q, k, v = (_randn(2, 1025, 4, 128, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    do = _randn(2, 1025, 4, 128, dtype=torch.bfloat16)
    g1 = torch.autograd.grad(fa.attention(q, k, v, causal=True), (q, k, v), do)
    g2 = torch.autograd.grad(fa.attention(q, k, v, causal=True), (q, k, v), do)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
