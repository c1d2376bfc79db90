"""qwenvl_kernels.rms_norm against qwenvl_kernels.reference.rms_norm: forward (in the input dtype, so the rounding
order of the released Qwen code is checked) and gradients of x, weight and residual (against a float64 oracle)."""
import pytest
import torch

from qwenvl_kernels import launch, reference
from qwenvl_kernels.launch import UnsupportedInput
from qwenvl_kernels.ops.rms_norm import rms_norm
from tests.helpers import CUDA, DEVICE, TEST_DTYPES, assert_close, needs_cuda, non_contiguous

pytestmark = pytest.mark.triton

CPU_DTYPES = [torch.float32, torch.float16]
# forward against the reference in the same dtype: fp16 must agree far below fp16's own tolerance, which it only
# does when the normalized row is rounded before the weight multiplies it (the other order gives ~3e-4)
FWD_TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (5e-5, 2e-3), torch.bfloat16: (5e-4, 2e-2)}
TOLERANCES_ABS = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _inputs(shape, dtype, residual, device=DEVICE):
    N = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    w = (1.0 + 0.5 * torch.randn(N, device=device)).to(dtype)
    r = torch.randn(shape, device=device).to(dtype) if residual else None
    return x, w, r


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _check(x, w, r, dtype, gy=None, gh=None, eps=1e-6):
    """Forward vs the same-dtype reference; every gradient vs the reference run in float64."""
    has_res = r is not None
    xk, wk, rk = _leaf(x), _leaf(w), _leaf(r)
    out = rms_norm(xk, wk, eps, residual=rk)
    y, h = out if has_res else (out, None)

    with torch.no_grad():
        ref = reference.rms_norm(x, w, eps, residual=r)
    y_ref, h_ref = ref if has_res else (ref, None)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype, "y", *FWD_TOL[dtype])
    if has_res:
        assert torch.equal(h, h_ref), "h = x + residual must be exactly the model-dtype sum"

    gy = torch.randn_like(y) if gy is None else gy
    if has_res:
        gh = torch.randn_like(h) if gh is None else gh
        torch.autograd.backward([y, h], [gy, gh])
    else:
        y.backward(gy)

    x64, w64, r64 = _leaf(x.double()), _leaf(w.double()), _leaf(None if r is None else r.double())
    ref64 = reference.rms_norm(x64, w64, eps, residual=r64)
    if has_res:
        torch.autograd.backward([ref64[0], ref64[1]], [gy.double(), gh.double()])
    else:
        ref64.backward(gy.double())
    if x.shape[-1] == 1:
        # hidden 1: y = w * sign(x), so dx ~ eps / |x|^3 is pure cancellation (the fp32 reference is no better);
        # bound the error against the size of the terms that cancel, |g * w * rstd|
        h64 = x64 + r64 if has_res else x64
        scale = (gy.double() * w.double() / h64.detach().abs()).abs().max()
        tol = TOLERANCES_ABS[dtype]
        assert (xk.grad.double() - x64.grad).abs().max() <= tol * scale, "dx (hidden 1)"
        if has_res:
            assert (rk.grad.double() - r64.grad).abs().max() <= tol * scale, "dresidual (hidden 1)"
    else:
        assert_close(xk.grad, x64.grad, dtype, "dx")
        if has_res:
            assert_close(rk.grad, r64.grad, dtype, "dresidual")
    assert_close(wk.grad, w64.grad, dtype, "dweight")
    assert wk.grad.dtype == dtype
    return y


# (hidden, leading dims): few rows for the wide rows, which cost the interpreter most; 3x7 rows of 4096 still give
# more row blocks than the interpreter's 4 persistent backward programs, the last block ragged
SHAPES = [(1, (1,)), (1, (3, 37)), (7, (1,)), (7, (3, 37)), (127, (1,)), (127, (3, 37)),
          (1664, (1,)), (1664, (3, 7)), (4096, (1,)), (4096, (3, 7))]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("N,lead", SHAPES, ids=[f"{n}-{'x'.join(map(str, l))}" for n, l in SHAPES])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_parity(dtype, N, lead, residual):
    x, w, r = _inputs((*lead, N), dtype, residual)
    _check(x, w, r, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_many_rows_small_hidden(dtype, residual):
    # several programs of many rows each, the last one ragged; several row blocks per backward program
    x, w, r = _inputs((2, 1250, 7), dtype, residual)
    _check(x, w, r, dtype)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_leading_dims_and_eps(residual):
    x, w, r = _inputs((2, 3, 5, 64), torch.float32, residual)
    x = x * 0.01  # eps matters at this scale
    _check(x, w, r, torch.float32, eps=0.25)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("N", [127, 1664])
def test_non_contiguous(dtype, N):
    # x strided along the hidden dim, residual strided along a leading dim, both gradients strided too
    x, w, r = _inputs((3, 5, N), dtype, True)
    xs = non_contiguous(x, -1)
    rs = non_contiguous(r, 1)
    gy = non_contiguous(torch.randn_like(x), 0)
    gh = non_contiguous(torch.randn_like(x), -1)
    _check(xs, w, rs, dtype, gy=gy, gh=gh)
    # a leading-dim slice keeps unit stride along the hidden dim: served without a copy, through the row stride
    x, w, _ = _inputs((4, 9, N), dtype, False)
    _check(x[:, ::2], w, None, dtype, gy=non_contiguous(torch.randn(4, 5, N).to(dtype), 1))
    _check(x.transpose(0, 1), w, None, dtype)


def test_weight_strided_and_incoming_gradient_untouched():
    x, w, r = _inputs((6, 33), torch.float32, True)
    wide = torch.randn(66)
    wide[::2] = w
    ws = wide[::2]
    gy, gh = torch.randn(6, 33), torch.randn(6, 33)
    gy0, gh0 = gy.clone(), gh.clone()
    _check(x, ws, r, torch.float32, gy=gy, gh=gh)
    assert torch.equal(gy, gy0) and torch.equal(gh, gh0), "the backward wrote into the incoming gradient"


def test_every_output_written():
    """Every buffer the function allocates starts as NaN: a skipped element (row, lane or dW partial) shows."""
    assert launch.POISON_OUTPUTS, "tests/conftest.py turns the poisoning on"
    x, w, r = _inputs((3, 7, 4096), torch.float32, True)
    _check(x, w, r, torch.float32)
    x, w, _ = _inputs((2, 1250, 7), torch.float16, False)
    _check(x, w, None, torch.float16)


def test_partial_gradients():
    x, w, r = _inputs((5, 129), torch.float32, True)
    # weight frozen: gradients of x and residual only
    xk, rk = _leaf(x), _leaf(r)
    y, h = rms_norm(xk, w, 1e-6, residual=rk)
    (y.sum() + 2 * h.sum()).backward()
    x64, r64 = _leaf(x.double()), _leaf(r.double())
    y64, h64 = reference.rms_norm(x64, w.double(), 1e-6, residual=r64)
    (y64.sum() + 2 * h64.sum()).backward()
    assert_close(xk.grad, x64.grad, name="dx")
    assert_close(rk.grad, r64.grad, name="dresidual")
    # only the weight needs a gradient
    wk = _leaf(w)
    y = rms_norm(x, wk)
    g = torch.randn_like(y)
    y.backward(g)
    w64 = _leaf(w.double())
    reference.rms_norm(x.double(), w64).backward(g.double())
    assert_close(wk.grad, w64.grad, name="dweight")


def test_residual_one_output_used():
    x, w, r = _inputs((4, 50), torch.float32, True)
    # only h flows on: its gradient reaches x and residual unchanged, the weight gets zero
    xk, wk, rk = _leaf(x), _leaf(w), _leaf(r)
    _, h = rms_norm(xk, wk, 1e-6, residual=rk)
    gh = torch.randn_like(h)
    h.backward(gh)
    assert torch.equal(xk.grad, gh) and torch.equal(rk.grad, gh)
    assert torch.equal(wk.grad, torch.zeros_like(w))
    # only the normalized output flows on
    xk, wk, rk = _leaf(x), _leaf(w), _leaf(r)
    y, _ = rms_norm(xk, wk, 1e-6, residual=rk)
    gy = torch.randn_like(y)
    y.backward(gy)
    x64, w64, r64 = _leaf(x.double()), _leaf(w.double()), _leaf(r.double())
    reference.rms_norm(x64, w64, 1e-6, residual=r64)[0].backward(gy.double())
    assert_close(xk.grad, x64.grad, name="dx")
    assert_close(rk.grad, r64.grad, name="dresidual")
    assert_close(wk.grad, w64.grad, name="dweight")
    assert xk.grad.data_ptr() != rk.grad.data_ptr()


def test_no_grad_and_empty():
    x, w, r = _inputs((3, 40), torch.float16, True)
    with torch.no_grad():
        y, h = rms_norm(x, w, residual=r)
    assert_close(y, reference.rms_norm(x, w, residual=r)[0], torch.float16, "y", *FWD_TOL[torch.float16])
    e = torch.randn(0, 40, requires_grad=True)
    out = rms_norm(e, w.float())
    assert out.shape == (0, 40)
    out.sum().backward()
    assert e.grad.shape == (0, 40)


def test_errors():
    x = torch.randn(4, 32, device=DEVICE)
    w = torch.randn(32, device=DEVICE)
    with pytest.raises(UnsupportedInput, match="weight dtype torch.float16 differs from x dtype torch.float32"):
        rms_norm(x, w.half())
    with pytest.raises(UnsupportedInput, match=r"weight has shape \(31,\), expected \[32\]"):
        rms_norm(x, w[:31])
    with pytest.raises(UnsupportedInput, match=r"weight has shape \(1, 32\)"):
        rms_norm(x, w[None])
    with pytest.raises(UnsupportedInput, match="hidden size 16385 > 16384"):
        rms_norm(torch.randn(1, 16385, device=DEVICE), torch.randn(16385, device=DEVICE))
    with pytest.raises(UnsupportedInput, match="residual shape .* != x shape"):
        rms_norm(x, w, residual=torch.randn(1, 32, device=DEVICE))
    with pytest.raises(UnsupportedInput, match="residual dtype torch.float16 differs"):
        rms_norm(x, w, residual=x.half())
    with pytest.raises(UnsupportedInput, match="dtype torch.float64 is not supported"):
        rms_norm(x.double(), w.double())
    with pytest.raises(UnsupportedInput, match="at least one dim"):
        rms_norm(torch.tensor(1.0, device=DEVICE), w)
    if not CUDA:
        with pytest.raises(UnsupportedInput, match="bfloat16 is not supported under the Triton interpreter"):
            rms_norm(x.bfloat16(), w.bfloat16())


@needs_cuda
@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_cuda_qwen_size(dtype, residual):
    # the Qwen-7B decoder: hidden 4096, a training micro-batch of 8192 tokens
    x, w, r = _inputs((2, 4096, 4096), dtype, residual)
    _check(x, w, r, dtype)


@needs_cuda
@pytest.mark.parametrize("N", [1, 64, 1664, 5120, 16384])
def test_cuda_hidden_sizes_bf16(N):
    x, w, r = _inputs((3, 257, N), torch.bfloat16, True)
    _check(x, w, r, torch.bfloat16)


@needs_cuda
def test_cuda_offsets_past_int32():
    """More than 2^31 elements: row offsets must be int64. Checked on the last rows only."""
    N = 4096
    M = (1 << 31) // N + 3
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    w = (1.0 + 0.5 * torch.randn(N, device="cuda")).bfloat16()
    y = rms_norm(x, w)
    tail = slice(M - 5, M)
    assert_close(y[tail], reference.rms_norm(x.detach()[tail], w), torch.bfloat16, "y tail")
    g = torch.randn_like(y)
    y.backward(g)
    x64 = _leaf(x.detach()[tail].double())
    reference.rms_norm(x64, w.double()).backward(g[tail].double())
    assert_close(x.grad[tail], x64.grad, torch.bfloat16, "dx tail")
