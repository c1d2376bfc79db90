"""The LM head and the loss, fused: 8192 tokens x 4096 hidden x 151936 vocabulary, forward and forward + backward.

The unfused reference materializes the bf16 logits, their fp32 copy and the gradient (several GB); the fused
kernel must not. Targets (fwd+bwd): memory allocated during the call <= 0.25x the unfused one, time <= 1.1x."""
import pytest
import torch

import harness as H
import shapes
from qwenvl_kernels import reference as ref

CASES = ["cross_entropy fwd", "cross_entropy fwd+bwd"]
IMPLS = ["torch", "liger", "triton", "compile"]


def _function(impl: str):
    if impl == "torch":
        return ref.linear_cross_entropy
    if impl == "triton":
        return H.kernels("triton").linear_cross_entropy
    if impl == "compile":
        H.compile_available()
        return torch.compile(ref.linear_cross_entropy, dynamic=False)
    if impl == "liger":
        if not H.ON_CUDA:
            raise H.Unavailable("liger-kernel runs on CUDA only")
        mod = H.optional_module("liger_kernel.transformers.fused_linear_cross_entropy")
        loss = mod.LigerFusedLinearCrossEntropyLoss(ignore_index=-100)

        def liger(h, w, labels):
            out = loss(w, h, labels)
            return out[0] if isinstance(out, tuple) else out

        return liger
    raise KeyError(impl)


@pytest.mark.parametrize("case, impl", H.params(CASES, IMPLS))
def test_cross_entropy(bm, suite, case, impl):
    backward = case.endswith("fwd+bwd")
    s = shapes.shape("cross_entropy", H.ON_CUDA)
    N, Hd, V = s["N"], s["H"], s["V"]
    e = torch.empty((), dtype=H.DTYPE).element_size()
    flops, nbytes = shapes.cost("cross_entropy", s, e, backward)

    def setup():
        fn = _function(impl)
        sets = []
        for _ in range(H.rotation_count((N + V) * Hd * e)):
            labels = torch.randint(0, V, (N,), device=H.DEVICE)
            labels[torch.rand(N, device=H.DEVICE) < 0.05] = -100   # a few ignored positions, as in real batches
            sets.append((H.randn(N, Hd, grad=backward), H.randn(V, Hd, scale=0.02, grad=backward), labels))
        return H.rotating_step(sets, fn, backward)

    cost = {"triton": 20, "compile": 60}.get(impl, 5) if H.ON_CUDA else 2
    suite.run(bm, case=case, impl=impl, setup=setup, flops=flops, nbytes=nbytes, shape=s,
              title=f"linear + cross-entropy {N}x{Hd}x{V}", cost_s=cost)
