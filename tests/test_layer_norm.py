"""qwenvl_kernels.layer_norm against qwenvl_kernels.reference.layer_norm (F.layer_norm) run in float64: the
output (to about half an ulp of its dtype) and the gradients of x, weight and bias."""
import pytest
import torch

from qwenvl_kernels import launch, reference
from qwenvl_kernels.launch import UnsupportedInput
from qwenvl_kernels.ops.layer_norm import layer_norm
from tests.helpers import CUDA, DEVICE, TEST_DTYPES, assert_close, needs_cuda, non_contiguous

pytestmark = pytest.mark.triton

CPU_DTYPES = [torch.float32, torch.float16]
# the forward against the float64 reference: the kernel rounds once, after the fp32 affine (as F.layer_norm means
# to), so its error is about half an ulp of the output dtype, far under the generic fp16 / bf16 tolerances.
# (The fp16 torch reference itself is off by up to 5e-4 absolute for hidden 1, where the exact output is the bias.)
FWD_TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (6e-4, 1e-3), torch.bfloat16: (5e-3, 1e-2)}


def _inputs(shape, dtype, device=DEVICE, offset=0.0):
    N = shape[-1]
    x = (torch.randn(shape, device=device) * 2.0 + offset).to(dtype)
    w = (1.0 + 0.5 * torch.randn(N, device=device)).to(dtype)
    b = (0.5 * torch.randn(N, device=device)).to(dtype)
    return x, w, b


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _check(x, w, b, dtype, gy=None, eps=1e-6):
    xk, wk, bk = _leaf(x), _leaf(w), _leaf(b)
    y = layer_norm(xk, wk, bk, eps)
    assert y.dtype == dtype and y.shape == x.shape
    x64, w64, b64 = _leaf(x.double()), _leaf(w.double()), _leaf(b.double())
    y64 = reference.layer_norm(x64, w64, b64, eps)
    assert_close(y, y64.detach(), dtype, "y", *FWD_TOL[dtype])

    gy = torch.randn_like(y) if gy is None else gy
    y.backward(gy)
    y64.backward(gy.double())
    # hidden 1: x - mean is exactly 0, so are dx and dweight; float64 agrees, a float32 reference would not
    assert_close(xk.grad, x64.grad, dtype, "dx")
    assert_close(wk.grad, w64.grad, dtype, "dweight")
    assert_close(bk.grad, b64.grad, dtype, "dbias")
    assert wk.grad.dtype == dtype and bk.grad.dtype == dtype
    return y


# (hidden, leading dims): few rows for the wide rows (the ViT's 1664, the adapter's 4096), which cost the
# interpreter most; 3x7 rows still give more row blocks than the 4 persistent backward programs, the last ragged
SHAPES = [(1, (1,)), (1, (3, 37)), (7, (1,)), (7, (3, 37)), (127, (1,)), (127, (3, 37)),
          (1664, (1,)), (1664, (3, 7)), (4096, (1,)), (4096, (3, 7))]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("N,lead", SHAPES, ids=[f"{n}-{'x'.join(map(str, l))}" for n, l in SHAPES])
def test_parity(dtype, N, lead):
    x, w, b = _inputs((*lead, N), dtype)
    _check(x, w, b, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_many_rows_small_hidden(dtype):
    x, w, b = _inputs((2, 1250, 7), dtype)
    _check(x, w, b, dtype)


def test_large_mean_and_eps():
    # rows far from zero: a one-pass E[x^2] - E[x]^2 variance would lose most digits here
    x, w, b = _inputs((2, 3, 5, 96), torch.float32, offset=300.0)
    _check(x, w, b, torch.float32)
    x, w, b = _inputs((4, 64), torch.float32)
    _check(x * 0.01, w, b, torch.float32, eps=0.25)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("N", [127, 1664])
def test_non_contiguous(dtype, N):
    x, w, b = _inputs((3, 5, N), dtype)
    _check(non_contiguous(x, -1), w, b, dtype, gy=non_contiguous(torch.randn_like(x), 0))
    # unit stride along hidden but gaps between rows: served through the row stride
    x, w, b = _inputs((4, 9, N), dtype)
    _check(x[:, ::2], w, b, dtype, gy=non_contiguous(torch.randn(4, 5, N).to(dtype), -1))
    _check(x.transpose(0, 1), w, b, dtype)


def test_strided_params_and_incoming_gradient_untouched():
    x, w, b = _inputs((6, 33), torch.float32)
    gy = torch.randn(6, 33)
    gy0 = gy.clone()
    _check(x, non_contiguous(w), non_contiguous(b), torch.float32, gy=gy)
    assert torch.equal(gy, gy0), "the backward wrote into the incoming gradient"


def test_every_output_written():
    """Every buffer the function allocates starts as NaN: a skipped element (row, lane or partial) shows."""
    assert launch.POISON_OUTPUTS, "tests/conftest.py turns the poisoning on"
    x, w, b = _inputs((3, 7, 4096), torch.float32)
    _check(x, w, b, torch.float32)
    x, w, b = _inputs((2, 1250, 7), torch.float16)
    _check(x, w, b, torch.float16)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True)], ids=["x", "weight", "bias", "weight+bias"])
def test_partial_gradients(needs):
    x, w, b = _inputs((5, 129), torch.float32)
    ins = [t.detach().clone().requires_grad_(n) for t, n in zip((x, w, b), needs)]
    y = layer_norm(*ins)
    g = torch.randn_like(y)
    y.backward(g)
    refs = [t.detach().double().requires_grad_(n) for t, n in zip((x, w, b), needs)]
    reference.layer_norm(*refs, 1e-6).backward(g.double())
    for k, r, n, name in zip(ins, refs, needs, ("dx", "dweight", "dbias")):
        if n:
            assert_close(k.grad, r.grad, name=name)
        else:
            assert k.grad is None


def test_no_grad_and_empty():
    x, w, b = _inputs((3, 40), torch.float16)
    with torch.no_grad():
        y = layer_norm(x, w, b)
    assert_close(y, reference.layer_norm(x.double(), w.double(), b.double()), torch.float16, "y",
                 *FWD_TOL[torch.float16])
    e = torch.randn(0, 40, requires_grad=True)
    out = layer_norm(e, w.float(), b.float())
    assert out.shape == (0, 40)
    out.sum().backward()
    assert e.grad.shape == (0, 40)


def test_errors():
    x = torch.randn(4, 32, device=DEVICE)
    w = torch.randn(32, device=DEVICE)
    b = torch.randn(32, device=DEVICE)
    with pytest.raises(UnsupportedInput, match="weight dtype torch.float16 differs from x dtype torch.float32"):
        layer_norm(x, w.half(), b)
    with pytest.raises(UnsupportedInput, match="bias dtype torch.float16 differs from x dtype torch.float32"):
        layer_norm(x, w, b.half())
    with pytest.raises(UnsupportedInput, match=r"bias has shape \(31,\), expected \[32\]"):
        layer_norm(x, w, b[:31])
    with pytest.raises(UnsupportedInput, match="bias must be a tensor"):
        layer_norm(x, w, None)
    with pytest.raises(UnsupportedInput, match="hidden size 16385 > 16384"):
        n = 16385
        layer_norm(torch.randn(1, n, device=DEVICE), torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE))
    with pytest.raises(UnsupportedInput, match="dtype torch.float64 is not supported"):
        layer_norm(x.double(), w.double(), b.double())
    if not CUDA:
        with pytest.raises(UnsupportedInput, match="bfloat16 is not supported under the Triton interpreter"):
            layer_norm(x.bfloat16(), w.bfloat16(), b.bfloat16())


@needs_cuda
@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(8, 1024, 1664), (2, 4096, 4096), (3, 256, 4096)],
                         ids=["vit-1664", "8192x4096", "adapter-256q"])
def test_cuda_qwen_sizes(dtype, shape):
    x, w, b = _inputs(shape, dtype)
    _check(x, w, b, dtype)


@needs_cuda
@pytest.mark.parametrize("N", [1, 64, 5120, 16384])
def test_cuda_hidden_sizes_bf16(N):
    x, w, b = _inputs((3, 257, N), torch.bfloat16)
    _check(x, w, b, torch.bfloat16)
