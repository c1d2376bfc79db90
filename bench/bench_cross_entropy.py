"""The LM head and the loss, fused: 8192 tokens x 4096 hidden x 151936 vocabulary, forward and forward + backward.

The unfused reference materializes the bf16 logits, their fp32 copy and the gradient (several GB); the fused
kernel must not. Targets (fwd+bwd): memory allocated during the call <= 0.25x the unfused one, time <= 1.1x."""
import pytest
import torch

import shapes
from benchlib.cases import cuda_only, params, randn
from benchlib.env import DEVICE, DTYPE, ON_CUDA, compile_available, optional_module, ours
from benchlib.timing import rotating_step, rotation_count
from qwenvl_kernels import reference as ref

CASES = ["cross_entropy fwd", "cross_entropy fwd+bwd"]
IMPLS = ["torch", "liger", "triton", "compile"]
COSTS = {"triton": 8, "torch": 4, "compile": 40}


def _function(impl: str):
    if impl == "torch":
        return ref.linear_cross_entropy
    if impl == "triton":
        return ours().linear_cross_entropy
    if impl == "compile":
        compile_available()
        return torch.compile(ref.linear_cross_entropy, dynamic=False)
    if impl == "liger":
        cuda_only("liger-kernel")
        mod = optional_module("liger_kernel.transformers.fused_linear_cross_entropy")
        loss = mod.LigerFusedLinearCrossEntropyLoss(ignore_index=-100)

        def liger(h, w, labels):
            out = loss(w, h, labels)
            return out[0] if isinstance(out, tuple) else out

        return liger
    raise KeyError(impl)


@pytest.mark.parametrize("case, impl", params(CASES, IMPLS, COSTS))
def test_cross_entropy(bm, suite, case, impl):
    backward = case.endswith("fwd+bwd")
    s = shapes.shape("cross_entropy", ON_CUDA)
    N, Hd, V = s["N"], s["H"], s["V"]
    e = torch.empty((), dtype=DTYPE).element_size()
    flops, nbytes = shapes.cost("cross_entropy", s, e, backward)

    def setup():
        fn = _function(impl)
        sets = []
        for _ in range(rotation_count((N + V) * Hd * e)):
            labels = torch.randint(0, V, (N,), device=DEVICE)
            labels[torch.rand(N, device=DEVICE) < 0.05] = -100   # a few ignored positions, as in real batches
            sets.append((randn(N, Hd, grad=backward), randn(V, Hd, scale=0.02, grad=backward), labels))
        return rotating_step(sets, fn, backward)

    suite.run(bm, case=case, impl=impl, setup=setup, flops=flops, nbytes=nbytes, shape=s,
              title=f"linear + cross-entropy {N}x{Hd}x{V}")
