"""apply_rotary (Triton) against reference.apply_rotary: forward, gradients of q and k, positions, errors."""
import math

import pytest
import torch

from qwenvl_kernels import UnsupportedInput, reference
from qwenvl_kernels.ops.rotary import apply_rotary
from tests.helpers import CUDA, DEVICE, TEST_DTYPES, assert_close, needs_cuda, non_contiguous

pytestmark = pytest.mark.triton  # outputs are poisoned by tests/conftest.py


def tables(S, R, base=10000.0, device=DEVICE):
    """cos/sin `[S, R/2]` in fp32, as the decoder builds them."""
    inv_freq = 1.0 / base ** (torch.arange(0, R, 2, dtype=torch.float32, device=device) / R)
    freqs = torch.outer(torch.arange(S, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos(), freqs.sin()


def ntk_tables(S, D, L, seq_length=2048):
    """The dynamic-NTK tables of a prefill of length L (QWENVL_FACTS: Decoder)."""
    alpha = max(2 ** math.ceil(math.log2(L / seq_length) + 1) - 1, 1)
    return tables(S, D, base=10000.0 * alpha ** (D / (D - 2)))


def packed_qk(B, T, H, Hk, D, dtype):
    """q and k as the model gets them: strided views into one c_attn output [B, T, (H + 2 Hk) D]."""
    qkv = torch.randn(B, T, (H + 2 * Hk) * D, device=DEVICE, dtype=dtype)
    q = qkv[..., : H * D].view(B, T, H, D)
    k = qkv[..., H * D: (H + Hk) * D].view(B, T, Hk, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    return q, k


def check(q, k, cos, sin, position_ids=None, grads="plain"):
    """Forward and the gradients of q and k against the reference; the inputs must be left untouched."""
    dtype = q.dtype
    q0, k0 = q.detach().clone(), k.detach().clone()
    qr, kr = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    # the kernel gets the caller's (possibly strided) layout as a leaf that collects gradients
    qv = q.detach().requires_grad_()
    kv = k.detach().requires_grad_()
    oq, ok = apply_rotary(qv, kv, cos, sin, position_ids)
    rq, rk = reference.apply_rotary(qr, kr, cos, sin, position_ids)
    assert oq.dtype == dtype and ok.dtype == dtype
    assert_close(oq, rq.detach(), dtype, name="q")
    assert_close(ok, rk.detach(), dtype, name="k")
    gq, gk = torch.randn_like(rq), torch.randn_like(rk)
    if grads == "strided":
        gq, gk = non_contiguous(gq, dim=2), non_contiguous(gk, dim=-1)
    gq0, gk0 = gq.clone(), gk.clone()
    torch.autograd.backward((oq, ok), (gq, gk))
    torch.autograd.backward((rq, rk), (gq0, gk0))
    assert_close(qv.grad, qr.grad, dtype, name="dq")
    assert_close(kv.grad, kr.grad, dtype, name="dk")
    assert torch.equal(q.detach(), q0) and torch.equal(k.detach(), k0), "inputs were modified"
    assert torch.equal(gq, gq0) and torch.equal(gk, gk0), "incoming gradients were modified"


# head_dim, rotary dims: Qwen-VL's 128 over the full head, odd head_dims, partial rotary (dims past R pass through)
SHAPES = [(16, 16), (80, 80), (104, 104), (128, 128), (128, 64), (104, 40)]


@pytest.mark.parametrize("D,R", SHAPES)
@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_packed_qkv_strided_grads(D, R, dtype):
    q, k = packed_qk(2, 7, 3, 2, D, dtype)
    cos, sin = tables(16, R)
    check(q, k, cos, sin, grads="strided")


@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_contiguous_and_gqa(dtype):
    q = torch.randn(3, 5, 4, 80, device=DEVICE, dtype=dtype)
    k = torch.randn(3, 5, 1, 80, device=DEVICE, dtype=dtype)
    cos, sin = tables(9, 80)
    check(q, k, cos, sin)


def test_strided_head_dim():
    # a stride gap in the last dim too
    q = non_contiguous(torch.randn(2, 3, 2, 48, device=DEVICE))
    k = non_contiguous(torch.randn(2, 3, 5, 48, device=DEVICE), dim=2)
    cos, sin = tables(3, 32)
    check(q, k, cos, sin)


@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_kv_cache_offset(dtype):
    # decoding: a few new tokens at positions offset .. offset + T - 1, given as [T]
    cos, sin = tables(64, 128)
    for T, offset in ((1, 37), (5, 58)):
        q, k = packed_qk(2, T, 2, 1, 128, dtype)
        check(q, k, cos, sin, torch.arange(offset, offset + T, device=DEVICE))


def test_left_padding_batch_positions():
    # [B, T]: each row counts from its first real token; padded slots sit at position 0
    B, T = 3, 9
    pad = torch.tensor([0, 4, 8], device=DEVICE)
    pos = (torch.arange(T, device=DEVICE)[None, :] - pad[:, None]).clamp_min(0)
    q, k = packed_qk(B, T, 3, 3, 104, torch.float32)
    cos, sin = tables(T, 104)
    check(q, k, cos, sin, pos)
    check(q, k, cos, sin, pos.to(torch.int32))
    check(q, k, cos, sin, pos[1:2])                 # [1, T] broadcasts over the batch
    check(q, k, cos, sin, non_contiguous(pos))      # strided position_ids


def test_negative_positions_index_like_torch():
    q, k = packed_qk(1, 4, 2, 2, 16, torch.float32)
    cos, sin = tables(10, 16)
    check(q, k, cos, sin, torch.tensor([-10, -1, 0, 9], device=DEVICE))


@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_ntk_long_positions(dtype):
    # past the trained length (2048): a dynamic-NTK table and positions around 5000, prefill chunk and decode step
    S = 5008
    cos, sin = ntk_tables(S, 128, L=5000)
    q, k = packed_qk(2, 6, 2, 2, 128, dtype)
    check(q, k, cos, sin, torch.arange(4990, 4996, device=DEVICE))
    pos = torch.tensor([[0, 1, 2047, 2048, 4999, 5007], [4000, 4001, 4002, 4003, 4004, 4005]], device=DEVICE)
    check(q, k, cos, sin, pos)


def test_only_q_needs_grad_and_expanded_grad():
    q, k = packed_qk(2, 3, 2, 1, 80, torch.float32)
    cos, sin = tables(3, 80)
    qa = q.detach().requires_grad_()
    qr = q.detach().clone().requires_grad_()
    oq, ok = apply_rotary(qa, k, cos, sin)
    assert not ok.requires_grad
    oq.sum().backward()                              # an expanded (stride 0) incoming gradient
    rq, _ = reference.apply_rotary(qr, k, cos, sin)
    rq.sum().backward()
    assert_close(qa.grad, qr.grad, name="dq")
    # k's output unused: its gradient is materialized as zeros, q's is still right
    ka = k.detach().requires_grad_()
    qa.grad = None
    oq, ok = apply_rotary(qa, ka, cos, sin)
    (oq * 2).sum().backward()
    assert_close(qa.grad, 2 * qr.grad, name="dq")
    assert torch.equal(ka.grad, torch.zeros_like(ka))


def test_empty_and_no_grad():
    cos, sin = tables(4, 16)
    q = torch.randn(2, 0, 2, 16, device=DEVICE)
    oq, ok = apply_rotary(q, q, cos, sin)
    assert oq.shape == q.shape and ok.shape == q.shape
    q, k = packed_qk(1, 2, 1, 1, 16, torch.float16)
    with torch.no_grad():
        oq, ok = apply_rotary(q, k, cos, sin)
    assert_close(oq, reference.apply_rotary(q, k, cos, sin)[0])


def test_backend_wiring():
    import qwenvl_kernels
    from qwenvl_kernels import backend

    assert qwenvl_kernels.apply_rotary is apply_rotary
    assert backend._triton_function("apply_rotary") is apply_rotary
    # "auto" serves what the kernel can, and falls back to the reference on UnsupportedInput
    q, k = packed_qk(1, 4, 1, 1, 16, torch.float32)
    cos, sin = tables(4, 16)
    auto = backend._auto("apply_rotary")
    assert_close(auto(q, k, cos, sin)[0], reference.apply_rotary(q, k, cos, sin)[0])
    if not CUDA:  # bf16 is refused under the interpreter
        qb, kb = q.bfloat16(), k.bfloat16()
        assert torch.equal(auto(qb, kb, cos, sin)[1], reference.apply_rotary(qb, kb, cos, sin)[1])


def test_errors():
    q, k = packed_qk(2, 4, 2, 1, 16, torch.float32)
    cos, sin = tables(8, 16)
    with pytest.raises(UnsupportedInput, match="float32"):
        apply_rotary(q, k, cos.half(), sin.half())
    with pytest.raises(UnsupportedInput, match="one shape"):
        apply_rotary(q, k, cos, sin[:, :4])
    with pytest.raises(UnsupportedInput, match="2-D"):
        apply_rotary(q, k, cos[0], sin[0])
    wide_cos, wide_sin = tables(8, 32)
    with pytest.raises(UnsupportedInput, match="rotary dims but head_dim is 16"):
        apply_rotary(q, k, wide_cos, wide_sin)
    with pytest.raises(UnsupportedInput, match="head_dim"):
        apply_rotary(q[..., 0], k[..., 0], cos, sin)
    with pytest.raises(UnsupportedInput, match="must agree"):
        apply_rotary(q, k[:1], cos, sin)
    with pytest.raises(UnsupportedInput, match="different dtypes"):
        apply_rotary(q, k.half(), cos, sin)
    with pytest.raises(UnsupportedInput, match="longer than the cos/sin tables"):
        apply_rotary(q, k, cos[:3], sin[:3])
    with pytest.raises(UnsupportedInput, match="int32 or int64"):
        apply_rotary(q, k, cos, sin, torch.arange(4.0, device=DEVICE))
    with pytest.raises(UnsupportedInput, match=r"\[seqlen\]"):
        apply_rotary(q, k, cos, sin, torch.arange(3, device=DEVICE))
    with pytest.raises(UnsupportedInput, match=r"\[batch, seqlen\]"):
        apply_rotary(q, k, cos, sin, torch.zeros(3, 4, dtype=torch.long, device=DEVICE))
    with pytest.raises(UnsupportedInput, match=r"range over \[5, 8\] but the cos/sin tables have 8 rows"):
        apply_rotary(q, k, cos, sin, torch.arange(5, 9, device=DEVICE))
    with pytest.raises(UnsupportedInput, match="rows"):
        apply_rotary(q, k, cos, sin, torch.tensor([[0, 1, 2, 3], [-9, 0, 0, 0]], device=DEVICE))
    if not CUDA:
        with pytest.raises(UnsupportedInput, match="bfloat16"):
            apply_rotary(q.bfloat16(), k.bfloat16(), cos, sin)


def test_position_check_sees_in_place_updates():
    # the range check is skipped for a position_ids tensor already checked, unless it was written since
    q, k = packed_qk(1, 3, 1, 1, 16, torch.float32)
    cos, sin = tables(8, 16)
    pos = torch.arange(3, device=DEVICE)
    apply_rotary(q, k, cos, sin, pos)
    apply_rotary(q, k, cos, sin, pos)
    pos += 6                                         # a decode loop advancing its positions in place
    with pytest.raises(UnsupportedInput, match="rows"):
        apply_rotary(q, k, cos, sin, pos)
    pos = torch.tensor([[5, 6, 7]], device=DEVICE)
    apply_rotary(q, k, cos, sin, pos)
    with pytest.raises(UnsupportedInput, match="rows"):   # the same tensor against a shorter table
        apply_rotary(q, k, cos[:7], sin[:7], pos)
    with torch.inference_mode():
        ipos = torch.arange(3, device=DEVICE)
        apply_rotary(q, k, cos, sin, ipos)
        ipos += 6                                    # inference tensors have no version counter: checked each call
        with pytest.raises(UnsupportedInput, match="rows"):
            apply_rotary(q, k, cos, sin, ipos)


@needs_cuda
def test_cuda_qwen_sizes_bf16():
    # Qwen-VL decoder: 32 heads of 128, a 4096-token prefill past the trained length, then decode steps
    B, T, H, D = 2, 4096, 32, 128
    cos, sin = ntk_tables(8192, D, L=T)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q, k = packed_qk(B, T, H, H, D, dtype)
        check(q, k, cos, sin, grads="strided")
        q, k = packed_qk(B, 1, H, H, D, dtype)
        check(q, k, cos, sin, torch.tensor([[T], [T - 7]], device=DEVICE))
