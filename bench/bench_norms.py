"""RMSNorm (decoder) and LayerNorm (ViT, adapter): forward and forward + backward at 8192 rows x 4096.

The target: forward + backward moves its bytes (x, y; x, dy, dx) at >= 85% of the measured copy bandwidth."""
import pytest
import torch

import shapes
from benchlib.cases import cuda_only, params, randn
from benchlib.env import DEVICE, DTYPE, ON_CUDA, compile_available, optional_module, ours
from benchlib.timing import rotating_step, rotation_count
from qwenvl_kernels import reference as ref

EPS = 1e-6
CASES = ["rms_norm fwd", "rms_norm fwd+bwd", "layer_norm fwd", "layer_norm fwd+bwd", "layer_norm_vit fwd+bwd"]
IMPLS = ["torch", "liger", "triton", "compile"]
COSTS = {"triton": 5, "compile": 20}


def _function(kind: str, impl: str):
    rms = kind == "rms_norm"
    if impl == "torch":
        return ref.rms_norm if rms else ref.layer_norm
    if impl == "triton":
        return ours().rms_norm if rms else ours().layer_norm
    if impl == "compile":
        compile_available()
        return torch.compile(ref.rms_norm if rms else ref.layer_norm, dynamic=False)
    if impl == "liger":
        cuda_only("liger-kernel")
        if rms:
            fn = optional_module("liger_kernel.ops.rms_norm").LigerRMSNormFunction
            # offset 0 and "llama" casting: Qwen's order (normalize in fp32, cast, then scale); no in-place backward
            return lambda x, w, eps: fn.apply(x, w, eps, 0.0, "llama", False)
        fn = optional_module("liger_kernel.ops.layer_norm").LigerLayerNormFunction
        return lambda x, w, b, eps: fn.apply(x, w, b, eps)
    raise KeyError(impl)


@pytest.mark.parametrize("case, impl", params(CASES, IMPLS, COSTS))
def test_norm(bm, suite, case, impl):
    kind, mode = case.split()
    backward = mode == "fwd+bwd"
    s = shapes.shape(kind, ON_CUDA)
    M, N = s["M"], s["N"]
    e = torch.empty((), dtype=DTYPE).element_size()
    flops, nbytes = shapes.cost(kind, s, e, backward)

    def setup():
        fn = _function(kind, impl)
        sets = []
        for _ in range(rotation_count(M * N * e)):
            x = randn(M, N, grad=backward)
            w = (1 + 0.1 * torch.randn(N, device=DEVICE)).to(DTYPE).requires_grad_(backward)
            if kind == "rms_norm":
                sets.append((x, w, EPS))
            else:
                sets.append((x, w, randn(N, scale=0.1, grad=backward), EPS))
        return rotating_step(sets, fn, backward)

    suite.run(bm, case=case, impl=impl, setup=setup, flops=flops, nbytes=nbytes, shape=s,
              title=f"{kind} {M}x{N} {mode}")
