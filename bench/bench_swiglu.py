"""The decoder MLP's gate, `a * silu(b)`, at B4 T2048 x 11008: forward and forward + backward."""
import pytest
import torch

import harness as H
import shapes
from qwenvl_kernels import reference as ref

CASES = ["swiglu fwd", "swiglu fwd+bwd"]
IMPLS = ["torch", "liger", "triton", "compile"]


def _function(impl: str):
    if impl == "torch":
        return ref.swiglu
    if impl == "triton":
        return H.kernels("triton").swiglu
    if impl == "compile":
        H.compile_available()
        return torch.compile(ref.swiglu, dynamic=False)
    if impl == "liger":
        if not H.ON_CUDA:
            raise H.Unavailable("liger-kernel runs on CUDA only")
        silu_mul = H.optional_module("liger_kernel.ops.swiglu").LigerSiLUMulFunction
        return lambda a, b: silu_mul.apply(b, a)          # Liger computes silu(first) * second
    raise KeyError(impl)


@pytest.mark.parametrize("case, impl", H.params(CASES, IMPLS))
def test_swiglu(bm, suite, case, impl):
    backward = case.endswith("fwd+bwd")
    s = shapes.shape("swiglu", H.ON_CUDA)
    M, F = s["M"], s["F"]
    e = torch.empty((), dtype=H.DTYPE).element_size()
    flops, nbytes = shapes.cost("swiglu", s, e, backward)

    def setup():
        fn = _function(impl)
        sets = [(H.randn(M, F, grad=backward), H.randn(M, F, grad=backward))
                for _ in range(H.rotation_count(2 * M * F * e))]
        return H.rotating_step(sets, fn, backward)

    suite.run(bm, case=case, impl=impl, setup=setup, flops=flops, nbytes=nbytes, shape=s,
              title=f"swiglu {M}x{F}", cost_s=20 if impl == "compile" else 2)
