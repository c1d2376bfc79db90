"""One decoder layer of Qwen-7B (RMSNorm, c_attn, rotary, causal attention, c_proj, fused residual + RMSNorm, SwiGLU
MLP) at B4 T2048 x 4096: forward and forward + backward, torch backend against the Triton kernels."""
import pytest
import torch

import harness as H

CASES = ["decoder_layer fwd", "decoder_layer fwd+bwd"]
IMPLS = ["torch", "triton", "compile"]
B, T = (4, 2048) if H.ON_CUDA else (1, 16)


def _build():
    from qwenvl.text import QWenBlock, RotaryEmbedding

    cfg = H.model_config().text
    block = H.init_params_(H.build_on_device(lambda: QWenBlock(cfg, H.kernels("torch"))))
    cos, sin = RotaryEmbedding(cfg.rotary_dim, cfg.rotary_emb_base).tables(T, 1.0, H.DEVICE)
    rope = (cos, sin, torch.arange(T, device=H.DEVICE), None)
    return cfg, block, rope


LAYER = H.Lazy(_build)


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    LAYER.release()


@pytest.mark.model
@pytest.mark.parametrize("case, impl", H.params(CASES, IMPLS))
def test_decoder_layer(bm, suite, case, impl):
    backward = case.endswith("fwd+bwd")
    facts = {}

    def setup():
        if impl == "compile":
            H.compile_available()
        cfg, block, rope = LAYER()
        block.requires_grad_(backward)
        x = H.randn(B, T, cfg.hidden_size, grad=backward)
        H.set_kernels(block, "torch")
        run = lambda x, m: m(x, rope)  # noqa: E731
        facts["flops"] = H.count_step_flops(run, (x, block), backward)
        if impl == "compile":
            compiled = torch.compile(block, dynamic=False)
            run = lambda x, m: compiled(x, rope)  # noqa: E731
        else:
            H.set_kernels(block, impl)
        return H.rotating_step([(x, block)], run, backward)

    cost = {"compile": 60, "triton": 20}.get(impl, 5) if H.ON_CUDA else 2
    suite.run(bm, case=case, impl=impl, setup=setup, mode="module", shape={"B": B, "T": T},
              title=f"decoder layer B{B} T{T}", tokens=B * T, cost_s=cost)
    H.add_rate(suite, case, impl, facts.get("flops"))
