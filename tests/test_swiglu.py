"""swiglu (Triton) against reference.swiglu: forward, gradients of both inputs, layouts, sizes, errors."""
import pytest
import torch

from qwenvl_kernels import UnsupportedInput, reference
from qwenvl_kernels.ops.swiglu import swiglu
from tests.helpers import CUDA, DEVICE, TEST_DTYPES, assert_close, needs_cuda, non_contiguous

pytestmark = pytest.mark.triton  # outputs are poisoned by tests/conftest.py


def check(a, b, strided_grad=False):
    """Forward and the gradients of a and b against the reference; inputs and incoming gradients untouched."""
    dtype = a.dtype
    a0, b0 = a.clone(), b.clone()
    av, bv = a.detach().requires_grad_(), b.detach().requires_grad_()
    ar, br = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    out = swiglu(av, bv)
    ref = reference.swiglu(ar, br)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref.detach(), dtype)
    g = torch.randn_like(ref)
    if strided_grad:
        g = non_contiguous(g, dim=0 if g.dim() > 1 else -1)
    g0 = g.clone()
    out.backward(g)
    ref.backward(g0)
    assert_close(av.grad, ar.grad, dtype, name="da")
    assert_close(bv.grad, br.grad, dtype, name="db")
    assert torch.equal(a, a0) and torch.equal(b, b0), "inputs were modified"
    assert torch.equal(g, g0), "the incoming gradient was modified"


def rand(*shape, dtype=torch.float32):
    # b spans the whole SiLU curve: the negative tail, the bend, the linear part
    return torch.randn(*shape, device=DEVICE, dtype=dtype) * 3


@pytest.mark.parametrize("shape", [(1,), (7,), (127,), (4097,), (2, 7, 33), (3, 5, 4, 9)])
@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_shapes(shape, dtype):
    check(rand(*shape, dtype=dtype), rand(*shape, dtype=dtype))


@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_non_contiguous(dtype):
    a = non_contiguous(rand(2, 9, 40, dtype=dtype))
    b = non_contiguous(rand(2, 9, 40, dtype=dtype), dim=1)
    check(a, b, strided_grad=True)
    # the two halves of one fused w1 | w2 projection, and a transposed view
    ab = rand(3, 11, 2 * 48, dtype=dtype)
    a, b = ab.chunk(2, dim=-1)
    check(a, b, strided_grad=True)
    check(rand(33, 5, dtype=dtype).t(), rand(5, 33, dtype=dtype))


def test_one_input_needs_grad_and_expanded_grad():
    a, b = rand(5, 300), rand(5, 300)
    bv = b.clone().requires_grad_()
    br = b.clone().requires_grad_()
    swiglu(a, bv).sum().backward()               # an expanded (stride 0) incoming gradient
    reference.swiglu(a, br).sum().backward()
    assert_close(bv.grad, br.grad, name="db")
    av = a.clone().requires_grad_()
    ar = a.clone().requires_grad_()
    swiglu(av, b).sum().backward()
    reference.swiglu(ar, b).sum().backward()
    assert_close(av.grad, ar.grad, name="da")


@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_extreme_gate_values(dtype):
    # sigmoid saturates in both directions without inf * 0 or overflow
    big = 80.0 if dtype == torch.float32 else 20.0
    b = torch.tensor([-big, -30.0, -10.0, -1e-3, 0.0, 1e-3, 10.0, 30.0, big], device=DEVICE).to(dtype)
    a = torch.linspace(-2, 2, b.numel(), device=DEVICE).to(dtype)
    check(a, b)


def test_empty_and_no_grad():
    a = torch.randn(0, 5, device=DEVICE)
    assert swiglu(a, a).shape == (0, 5)
    a, b = rand(4, 6, dtype=torch.float16), rand(4, 6, dtype=torch.float16)
    with torch.no_grad():
        assert_close(swiglu(a, b), reference.swiglu(a, b))


def test_backend_wiring():
    from qwenvl_kernels import backend

    assert backend._triton_function("swiglu") is swiglu
    if not CUDA:  # "auto" falls back to the reference for bf16 under the interpreter
        a, b = rand(5).bfloat16(), rand(5).bfloat16()
        assert torch.equal(backend._auto("swiglu")(a, b), reference.swiglu(a, b))


def test_errors():
    a = rand(4, 8)
    with pytest.raises(UnsupportedInput, match="one shape"):
        swiglu(a, rand(1, 8))
    with pytest.raises(UnsupportedInput, match="different dtypes"):
        swiglu(a, a.half())
    with pytest.raises(UnsupportedInput, match="not supported"):
        swiglu(a.long(), a.long())
    with pytest.raises(UnsupportedInput, match="expected tensors"):
        swiglu(a, 2.0)
    if not CUDA:
        with pytest.raises(UnsupportedInput, match="bfloat16"):
            swiglu(a.bfloat16(), a.bfloat16())


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_qwen_mlp_size(dtype):
    # the decoder MLP at 8192 tokens: w1(x), w2(x) are [8192, 11008] (90M elements)
    check(rand(8192, 11008, dtype=dtype), rand(8192, 11008, dtype=dtype), strided_grad=True)


@needs_cuda
def test_cuda_past_int32_offsets():
    # 2^31 + a few elements: the last blocks start past what an int32 offset can address
    n = 2 ** 31 + 4099
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs 40 GiB of GPU memory")
    a = torch.randn(n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, device="cuda", dtype=torch.float16) * 3
    with torch.no_grad():
        out = swiglu(a, b)
    for sl in (slice(0, 8192), slice(2 ** 31 - 8192, 2 ** 31 + 64), slice(n - 8192, n)):
        assert_close(out[sl], reference.swiglu(a[sl], b[sl]), name=f"out[{sl}]")
    del out
    av, bv = a.requires_grad_(), b.requires_grad_()
    g = torch.randn(n, device="cuda", dtype=torch.float16)
    swiglu(av, bv).backward(g)
    for sl in (slice(0, 8192), slice(n - 8192, n)):
        ar, br = a[sl].detach().requires_grad_(), b[sl].detach().requires_grad_()
        reference.swiglu(ar, br).backward(g[sl])
        assert_close(av.grad[sl], ar.grad, name="da tail")
        assert_close(bv.grad[sl], br.grad, name="db tail")
