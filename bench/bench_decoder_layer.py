"""One decoder layer of Qwen-7B (RMSNorm, c_attn, rotary, causal attention, c_proj, fused residual + RMSNorm, SwiGLU
MLP) at B4 T2048 x 4096: forward and forward + backward, torch backend against the Triton kernels."""
import pytest
import torch

from benchlib.cases import params, randn
from benchlib.env import ON_CUDA, backend, compile_available
from benchlib.models import Lazy, build_on_device, decoder_rope, init_params_, model_config, set_kernels
from benchlib.timing import count_step_flops, rotating_step

CASES = ["decoder_layer fwd", "decoder_layer fwd+bwd"]
IMPLS = ["torch", "triton", "compile"]
COSTS = {"torch": 6, "triton": 10, "compile": 60}
B, T = (4, 2048) if ON_CUDA else (1, 16)


def _build():
    from qwenvl.text import QWenBlock

    cfg = model_config().text
    block = init_params_(build_on_device(lambda: QWenBlock(cfg, backend("torch"))))
    return cfg, block, decoder_rope(cfg, T)


LAYER = Lazy(_build)


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    LAYER.release()


@pytest.mark.model
@pytest.mark.parametrize("case, impl", params(CASES, IMPLS, COSTS))
def test_decoder_layer(bm, suite, case, impl):
    backward = case.endswith("fwd+bwd")
    facts = {}

    def setup():
        if impl == "compile":
            compile_available()
        cfg, block, rope = LAYER()
        block.requires_grad_(backward)
        x = randn(B, T, cfg.hidden_size, grad=backward)
        set_kernels(block, "torch")
        run = lambda x, m: m(x, rope)  # noqa: E731
        facts["flops"] = count_step_flops(run, (x, block), backward)
        if impl == "compile":
            compiled = torch.compile(block, dynamic=False)
            run = lambda x, m: compiled(x, rope)  # noqa: E731
        else:
            set_kernels(block, impl)
        return rotating_step([(x, block)], run, backward)

    suite.run(bm, case=case, impl=impl, setup=setup, mode="module", shape={"B": B, "T": T},
              title=f"decoder layer B{B} T{T}", tokens=B * T)
    suite.add_rate(case, impl, facts.get("flops"))
