"""decode_attention (flash-decoding) against reference.decode_attention."""
import pytest
import torch

import qwenvl_kernels.ops.decode_attention as mod
from qwenvl_kernels import get_backend, reference
from qwenvl_kernels.launch import UnsupportedInput
from qwenvl_kernels.ops.decode_attention import decode_attention
from tests.helpers import CUDA, DEVICE, TEST_DTYPES, assert_close, needs_cuda, non_contiguous

pytestmark = pytest.mark.triton


def _lengths(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def _inputs(B, Tq, H, Hk, D, S, dtype):
    q = torch.randn(B, Tq, H, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, S, Hk, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, S, Hk, D, device=DEVICE, dtype=dtype)
    return q, k, v


def _check(q, k, v, seqlens, starts=None, scale=None, **kw):
    out = decode_attention(q, k, v, seqlens, starts, scale, **kw)
    ref = reference.decode_attention(q.float(), k.float(), v.float(), seqlens, starts, scale)
    assert out.dtype == q.dtype
    assert_close(out, ref, dtype=q.dtype)
    return out


# (B, Tq, H, Hk, D, per-row lengths, per-row left padding or None); capacity S is larger than every length.
# Rows of group * Tq < 16 take the elementwise path, >= 16 the tl.dot path.
CASES = [
    pytest.param(1, 1, 4, 4, 64, [1], None, id="B1-Tq1-len1"),
    pytest.param(3, 1, 4, 2, 64, [7, 300, 63], [0, 5, 40], id="B3-Tq1-gqa2-d64-pad"),
    pytest.param(3, 4, 4, 1, 104, [300, 7, 63], [3, 0, 60], id="B3-Tq4-gqa4-d104-dot-pad"),
    pytest.param(1, 4, 2, 2, 128, [63], None, id="B1-Tq4-d128"),
    pytest.param(3, 4, 8, 2, 128, [63, 300, 7], [10, 0, 2], id="B3-Tq4-gqa4-d128-dot"),
]


# on the CPU the default choice is 1 split for these sizes (the interpreter counts 4 "SMs"): forced on and off
@pytest.mark.parametrize("num_splits", [1, 5] + ([None] if CUDA else []))
@pytest.mark.parametrize("dtype", TEST_DTYPES)
@pytest.mark.parametrize("B,Tq,H,Hk,D,lens,starts", CASES)
def test_matches_reference(B, Tq, H, Hk, D, lens, starts, dtype, num_splits):
    S = max(lens) + 9
    q, k, v = _inputs(B, Tq, H, Hk, D, S, dtype)
    _check(q, k, v, _lengths(lens), None if starts is None else _lengths(starts), num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_non_contiguous_inputs_and_sliced_cache(num_splits):
    B, Tq, H, Hk, D = 2, 1, 6, 3, 80
    q = non_contiguous(torch.randn(B, Tq, H, D, device=DEVICE, dtype=torch.float16), dim=2)
    # the caches are a window of a larger allocation: more capacity, more heads, wider rows
    k_big = torch.randn(B, 400, Hk + 2, D + 8, device=DEVICE, dtype=torch.float16)
    v_big = torch.randn(B, 400, Hk + 2, D + 8, device=DEVICE, dtype=torch.float16)
    k, v = k_big[:, :320, 1:Hk + 1, :D], v_big[:, :320, 2:, 8:]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    # the lengths themselves a strided view
    seqlens = _lengths([300, 0, 45, 0], torch.int64)[::2]
    _check(q, k, v, seqlens, num_splits=num_splits)


def test_q_slice_of_fused_qkv():
    B, Tq, H, D, S = 2, 2, 4, 64, 70
    qkv = torch.randn(B, Tq, 3 * H, D, device=DEVICE)
    q = qkv[:, :, :H]
    k = torch.randn(B, S, H, D, device=DEVICE)
    v = torch.randn(B, S, H, D, device=DEVICE)
    _check(q, k, v, _lengths([66, 17]), _lengths([2, 0]))


@pytest.mark.parametrize("num_splits", [1, 4])
def test_empty_and_partly_visible_rows(num_splits):
    # row 0: nothing cached; row 1: fully left-padded; row 2: 2 keys for 4 new tokens (the first two see none);
    # row 3: a length beyond the capacity is clamped, as slicing the cache clamps it
    B, Tq, H, D, S = 4, 4, 2, 32, 40
    q, k, v = _inputs(B, Tq, H, H, D, S, torch.float32)
    out = _check(q, k, v, _lengths([0, 30, 12, 50]), _lengths([0, 30, 10, 3]), num_splits=num_splits)
    assert (out[0] == 0).all() and (out[1] == 0).all() and (out[2, :2] == 0).all()


def test_softmax_scale_int64_lengths_and_more_splits_than_blocks():
    q, k, v = _inputs(2, 3, 4, 2, 48, 100, torch.float32)
    _check(q, k, v, _lengths([90, 33], torch.int64), _lengths([1, 0], torch.int64), scale=0.3, num_splits=16)


def test_many_query_rows_span_several_tiles():
    # group 8 x 16 new tokens = 128 query rows per KV head: more than one tile of rows
    q, k, v = _inputs(1, 16, 8, 1, 32, 50, torch.float16)
    _check(q, k, v, _lengths([45]), _lengths([4]), num_splits=2)


def test_split_choice(monkeypatch):
    monkeypatch.setattr(mod, "num_programs_hint", lambda device: 132)
    dev = torch.device(DEVICE)
    assert mod._choose_num_splits(32, 2560, dev) == 9  # B=1 x 32 KV heads: about two waves
    assert mod._choose_num_splits(32, 300, dev) == 2  # short context: few keys per split is not worth it
    assert mod._choose_num_splits(256, 2560, dev) == 1  # B=8 already fills the device
    # the default choice, split, end to end
    q, k, v = _inputs(1, 1, 2, 2, 16, 600, torch.float32)
    _check(q, k, v, _lengths([555]))


def test_zero_sized():
    q, k, v = _inputs(2, 0, 4, 2, 64, 10, torch.float32)
    assert decode_attention(q, k, v, _lengths([3, 4])).shape == (2, 0, 4, 64)


def test_auto_backend_falls_back_for_autograd():
    q, k, v = _inputs(1, 1, 2, 2, 16, 8, torch.float32)
    q.requires_grad_(True)
    seqlens = _lengths([5])
    with pytest.raises(UnsupportedInput, match="inference-only"):
        decode_attention(q, k, v, seqlens)
    out = get_backend("auto").decode_attention(q, k, v, seqlens)
    out.sum().backward()
    assert q.grad is not None
    with torch.no_grad():  # nothing to track: the kernel serves it
        assert_close(decode_attention(q, k, v, seqlens), reference.decode_attention(q, k, v, seqlens))


def _err(match, *args, **kw):
    with pytest.raises(UnsupportedInput, match=match):
        decode_attention(*args, **kw)


def test_errors():
    q, k, v = _inputs(2, 1, 4, 2, 64, 16, torch.float32)
    L = _lengths([3, 4])
    _err("q must be a 4-d tensor", q[0], k, v, L)
    _err("k_cache must be a 4-d tensor", q, k[0], v, L)
    _err("different dtypes", q, k.half(), v, L)
    _err("v_cache shape", q, k, v[:, :8], L)
    _err("batch and head_dim must match", q[:1], k, v, L)
    _err("not a multiple of 2 KV heads", q[:, :, :3], k, v, L)
    q100, k100 = torch.randn(2, 1, 4, 100), torch.randn(2, 16, 2, 100)
    _err("head_dim 100", q100, k100, k100, L)
    q136, k136 = torch.randn(2, 1, 2, 136), torch.randn(2, 16, 2, 136)
    _err("head_dim 136", q136, k136, k136, L)
    _err("more than 16", torch.randn(2, 17, 4, 64, device=DEVICE), k, v, L)
    _err("cache_seqlens has dtype torch.float32", q, k, v, L.float())
    _err(r"cache_seqlens has shape \(3,\)", q, k, v, _lengths([1, 2, 3]))
    _err("cache_starts has dtype torch.int16", q, k, v, L, L.to(torch.int16))
    _err("cache_starts is on meta", q, k, v, L, torch.zeros(2, dtype=torch.int32, device="meta"))
    _err("cache_seqlens must be an int32 or int64 tensor", q, k, v, [3, 4])
    _err("num_splits must be a positive int", q, k, v, L, num_splits=0)
    if not CUDA:
        _err("bfloat16 is not supported", q.bfloat16(), k.bfloat16(), v.bfloat16(), L)
    if CUDA:
        _err("different devices", q, k.cpu(), v, L)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 8])
def test_qwen_vl_sizes(B, dtype):
    # Qwen-VL's decoder: 32 heads of 128 (no GQA), a 2300-token context in a larger cache, ragged rows
    H, D, S = 32, 128, 2560
    q, k, v = _inputs(B, 1, H, H, D, S, dtype)
    lens = [2300 - 97 * i for i in range(B)]
    starts = [13 * i for i in range(B)]
    for splits in (None, 1):
        _check(q, k, v, _lengths(lens), _lengths(starts), num_splits=splits)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gqa_speculative_bf16(dtype):
    # several new tokens with grouped heads: the tl.dot path, with more rows than one tile
    q, k, v = _inputs(2, 16, 32, 4, 128, 2400, dtype)
    _check(q, k, v, _lengths([2300, 1111]), _lengths([0, 5]))


@needs_cuda
def test_no_host_sync():
    q, k, v = _inputs(2, 1, 32, 32, 128, 2048, torch.float16)
    L = _lengths([2000, 1500])
    decode_attention(q, k, v, L)  # first call may autotune, which synchronizes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        decode_attention(q, k, v, L)
        decode_attention(q, k, v, L, num_splits=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
