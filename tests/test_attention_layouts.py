"""The layouts and head dims the sm_90 code paths depend on, against the reference, forward and backward.

- head dims that are split into column blocks (104 = 64 + 32 + 16, 80, 96, 40, 72) agree with the unsplit path
  and the reference, at odd lengths (1, 7, 257, 1025);
- strides that are multiples of 8 but not of 16 (the ViT's qkv with an odd number of heads: row stride 936, head
  stride 312), which the kernels round to multiples of 8 in registers;
- strides or offsets that are not multiples of 8 elements (16 bytes), which the launcher copies first;
- the positive softmax scale the folded-scale kernels need.
"""

import pytest
import torch

import qwenvl_kernels.ops.decode_attention as da
import qwenvl_kernels.ops.flash_attention as fa
from qwenvl_kernels import reference
from qwenvl_kernels.launch import UnsupportedInput
from tests.helpers import DEVICE, assert_close


def _grads(fn, q, k, v, do, **kw):
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def _check_against_reference(q, k, v, dtype, do=None, **kw):
    """Output and gradients of fa.attention against the float64 reference, on these very (strided) inputs."""
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    do = torch.randn(q.shape, dtype=dtype, device=DEVICE) if do is None else do
    got = _grads(fa.attention, q, k, v, do, **kw)
    x = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = _grads(reference.attention, *x, do.double(), **kw)
    for g, w, name in zip(got, want, ("out", "dq", "dk", "dv")):
        assert_close(g, w, dtype=dtype, name=name)
    return got


@pytest.mark.parametrize("head_dim,blocks", [
    (104, (64, 32, 16)), (80, (64, 16, 0)), (96, (64, 32, 0)), (40, (32, 16, 0)), (72, (64, 16, 0)),
    (64, (64, 0, 0)), (128, (128, 0, 0)), (120, (128, 0, 0)), (24, (32, 0, 0)), (8, (16, 0, 0)),
])
def test_head_blocks(head_dim, blocks):
    for kind in ("fwd", "dq", "dkdv"):
        got = fa.head_blocks(head_dim, kind)
        assert got == (blocks if fa.SPLIT_HEAD[kind] else (max(16, 1 << (head_dim - 1).bit_length()), 0, 0))
        assert sum(got) >= head_dim and all(b == 0 or b >= 16 for b in got)


@pytest.mark.triton
@pytest.mark.parametrize("B,Tq,Tk,H,D,causal,dtype", [
    (2, 7, 7, 2, 104, False, torch.float32),
    (1, 257, 257, 2, 104, True, torch.float16),
    (3, 1, 9, 1, 80, False, torch.float16),     # one query (one key would make dq exactly 0: no relative error)
    (1, 63, 63, 3, 96, True, torch.float32),
    (2, 33, 40, 1, 40, True, torch.float16),
    (1, 70, 70, 2, 72, False, torch.float32),
])
def test_split_head_dim_matches_unsplit(monkeypatch, B, Tq, Tk, H, D, causal, dtype):
    q, do = (torch.randn(B, Tq, H, D, dtype=dtype, device=DEVICE) for _ in range(2))
    k, v = (torch.randn(B, Tk, H, D, dtype=dtype, device=DEVICE) for _ in range(2))
    split = _check_against_reference(q.clone(), k.clone(), v.clone(), dtype, do, causal=causal)
    monkeypatch.setattr(fa, "SPLIT_HEAD", {"fwd": False, "dq": False, "dkdv": False})
    whole = _check_against_reference(q.clone(), k.clone(), v.clone(), dtype, do, causal=causal)
    for a, b, name in zip(split, whole, ("out", "dq", "dk", "dv")):
        assert_close(a, b, dtype=dtype, name=f"{name} split vs one block")


@pytest.mark.triton
def test_long_sequence_vit_head(monkeypatch):
    # 1025 tokens: 17 blocks of 64 (the last with one row), the split head dim; wide blocks keep the interpreter fast
    for kind in ("fwd", "dq", "dkdv"):
        monkeypatch.setitem(fa.INTERPRETER_BLOCKS, kind, (64, 64))
    q, k, v = (torch.randn(1, 1025, 1, 104, dtype=torch.float16, device=DEVICE) for _ in range(3))
    _check_against_reference(q, k, v, torch.float16)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vit_qkv_with_odd_head_count(dtype):
    # [B, T, H, 3, D] with H = 3, D = 104: head stride 312, row stride 936, neither a multiple of 16 (both of 8)
    B, T, H, D = 2, 41, 3, 104
    qkv = torch.randn(B, T, H, 3, D, dtype=dtype, device=DEVICE)
    q, k, v = qkv.unbind(3)
    assert q.stride() == (T * H * 3 * D, H * 3 * D, 3 * D, 1) and q.stride(1) % 16 == 8
    assert fa.tile_ready(q) is q, "strides that are multiples of 8 must not be copied"
    assert fa.row_stride8(q, k, v)
    _check_against_reference(q, k, v, dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strides_not_multiple_of_8_are_copied(dtype):
    # a row stride of H * D + 4 and a start 4 elements into the buffer: tiles could not be read 16 bytes at a
    # time, and the in-kernel rounding of strides to multiples of 8 would read the wrong rows: copied first
    B, T, H, D = 2, 19, 2, 104
    wide = torch.randn(B, T, H * D + 4, dtype=dtype, device=DEVICE)
    q = wide[..., : H * D].view(B, T, H, D)
    k = wide[..., 4: 4 + H * D].view(B, T, H, D)
    v = torch.randn(B, T, H, D, dtype=dtype, device=DEVICE)
    assert fa.tile_ready(q) is not q and fa.tile_ready(q).is_contiguous()
    assert fa.tile_ready(k) is not k
    assert fa.tile_ready(v) is v
    _check_against_reference(q, k, v, dtype, causal=True)


def test_size_one_dims_may_have_any_stride():
    # a size-1 dim's stride never multiplies a nonzero index: no copy for it
    x = torch.randn(1, 5, 1, 64, device=DEVICE).as_strided((1, 5, 1, 64), (7, 64, 3, 1))
    assert fa.tile_ready(x) is x


@pytest.mark.triton
@pytest.mark.parametrize("scale", [0.0, -0.125])
def test_non_positive_scale_is_refused(scale):
    q, k, v = (torch.randn(1, 4, 1, 64, device=DEVICE) for _ in range(3))
    with pytest.raises(UnsupportedInput, match="softmax_scale must be positive"):
        fa.attention(q, k, v, softmax_scale=scale)
    lengths = torch.full((1,), 4, dtype=torch.int32, device=DEVICE)
    with torch.no_grad(), pytest.raises(UnsupportedInput, match="softmax_scale must be positive"):
        da.decode_attention(q[:, :1], k, v, lengths, softmax_scale=scale)
