"""The decoder MLP's gate, `a * silu(b)`, at B4 T2048 x 11008: forward and forward + backward."""
import pytest
import torch

import shapes
from benchlib.cases import cuda_only, params, randn
from benchlib.env import DTYPE, ON_CUDA, compile_available, optional_module, ours
from benchlib.timing import rotating_step, rotation_count
from qwenvl_kernels import reference as ref

CASES = ["swiglu fwd", "swiglu fwd+bwd"]
IMPLS = ["torch", "liger", "triton", "compile"]
COSTS = {"triton": 6, "compile": 20}


def _function(impl: str):
    if impl == "torch":
        return ref.swiglu
    if impl == "triton":
        return ours().swiglu
    if impl == "compile":
        compile_available()
        return torch.compile(ref.swiglu, dynamic=False)
    if impl == "liger":
        cuda_only("liger-kernel")
        silu_mul = optional_module("liger_kernel.ops.swiglu").LigerSiLUMulFunction
        return lambda a, b: silu_mul.apply(b, a)          # Liger computes silu(first) * second
    raise KeyError(impl)


@pytest.mark.parametrize("case, impl", params(CASES, IMPLS, COSTS))
def test_swiglu(bm, suite, case, impl):
    backward = case.endswith("fwd+bwd")
    s = shapes.shape("swiglu", ON_CUDA)
    M, F = s["M"], s["F"]
    e = torch.empty((), dtype=DTYPE).element_size()
    flops, nbytes = shapes.cost("swiglu", s, e, backward)

    def setup():
        fn = _function(impl)
        sets = [(randn(M, F, grad=backward), randn(M, F, grad=backward))
                for _ in range(rotation_count(2 * M * F * e))]
        return rotating_step(sets, fn, backward)

    suite.run(bm, case=case, impl=impl, setup=setup, flops=flops, nbytes=nbytes, shape=s, title=f"swiglu {M}x{F}")
