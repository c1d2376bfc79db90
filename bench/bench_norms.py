"""RMSNorm (decoder) and LayerNorm (ViT, adapter): forward and forward + backward at 8192 rows x 4096.

The target: forward + backward moves its bytes (x, y; x, dy, dx) at >= 85% of the measured copy bandwidth."""
import pytest
import torch

import harness as H
import shapes
from qwenvl_kernels import reference as ref

EPS = 1e-6
CASES = ["rms_norm fwd", "rms_norm fwd+bwd", "layer_norm fwd", "layer_norm fwd+bwd", "layer_norm_vit fwd+bwd"]
IMPLS = ["torch", "liger", "triton", "compile"]


def _function(kind: str, impl: str):
    rms = kind == "rms_norm"
    if impl == "torch":
        return ref.rms_norm if rms else ref.layer_norm
    if impl == "triton":
        k = H.kernels("triton")
        return k.rms_norm if rms else k.layer_norm
    if impl == "compile":
        H.compile_available()
        return torch.compile(ref.rms_norm if rms else ref.layer_norm, dynamic=False)
    if impl == "liger":
        if not H.ON_CUDA:
            raise H.Unavailable("liger-kernel runs on CUDA only")
        if rms:
            fn = H.optional_module("liger_kernel.ops.rms_norm").LigerRMSNormFunction
            # offset 0 and "llama" casting: Qwen's order (normalize in fp32, cast, then scale); no in-place backward
            return lambda x, w, eps: fn.apply(x, w, eps, 0.0, "llama", False)
        fn = H.optional_module("liger_kernel.ops.layer_norm").LigerLayerNormFunction
        return lambda x, w, b, eps: fn.apply(x, w, b, eps)
    raise KeyError(impl)


@pytest.mark.parametrize("case, impl", H.params(CASES, IMPLS))
def test_norm(bm, suite, case, impl):
    kind, mode = case.split()
    backward = mode == "fwd+bwd"
    s = shapes.shape(kind, H.ON_CUDA)
    M, N = s["M"], s["N"]
    e = torch.empty((), dtype=H.DTYPE).element_size()
    flops, nbytes = shapes.cost(kind, s, e, backward)

    def setup():
        fn = _function(kind, impl)
        n_sets = H.rotation_count(M * N * e)
        sets = []
        for _ in range(n_sets):
            x = H.randn(M, N, grad=backward)
            w = (1 + 0.1 * torch.randn(N, device=H.DEVICE)).to(H.DTYPE).requires_grad_(backward)
            if kind == "rms_norm":
                sets.append((x, w, EPS))
            else:
                sets.append((x, w, H.randn(N, scale=0.1, grad=backward), EPS))
        return H.rotating_step(sets, fn, backward)

    suite.run(bm, case=case, impl=impl, setup=setup, flops=flops, nbytes=nbytes, shape=s,
              title=f"{kind} {M}x{N} {mode}", cost_s=20 if impl == "compile" else 2)
