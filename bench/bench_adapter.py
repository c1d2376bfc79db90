"""The adapter (position-aware Resampler) as a module: kv_proj 1664 -> 4096, ln_kv / ln_q, the 2D-positional
cross-attention of 256 queries over 1024 patches per image, batch 16; forward and forward + backward.
(The attention alone, against the official nn.MultiheadAttention design, is bench_resampler.py.)"""
import pytest
import torch

from benchlib.cases import params, randn
from benchlib.env import ON_CUDA, backend, compile_available
from benchlib.models import Lazy, build_on_device, init_params_, set_kernels, vision_config
from benchlib.timing import count_step_flops, rotating_step

CASES = ["adapter fwd", "adapter fwd+bwd"]
IMPLS = ["torch", "triton", "compile"]
COSTS = {"torch": 6, "triton": 10, "compile": 60}
BATCH = 16 if ON_CUDA else 2


def _build():
    from qwenvl.vision import Resampler

    cfg = vision_config()
    adapter = build_on_device(lambda: Resampler(cfg, backend("torch")))
    return cfg, init_params_(adapter)


ADAPTER = Lazy(_build)


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    ADAPTER.release()


@pytest.mark.model
@pytest.mark.parametrize("case, impl", params(CASES, IMPLS, COSTS))
def test_adapter(bm, suite, case, impl):
    backward = case.endswith("fwd+bwd")
    facts = {}

    def setup():
        if impl == "compile":
            compile_available()
        cfg, adapter = ADAPTER()
        adapter.requires_grad_(backward)
        adapter.pos_embed.requires_grad_(False)            # the fixed sin-cos table
        x = randn(BATCH, cfg.grid ** 2, cfg.width, grad=backward)
        set_kernels(adapter, "torch")
        run = lambda x, m: m(x)  # noqa: E731
        facts["flops"] = count_step_flops(run, (x, adapter), backward)
        if impl == "compile":
            compiled = torch.compile(adapter, dynamic=False)
            run = lambda x, m: compiled(x)  # noqa: E731
        else:
            set_kernels(adapter, impl)
        return rotating_step([(x, adapter)], run, backward)

    suite.run(bm, case=case, impl=impl, setup=setup, mode="module", shape={"batch": BATCH},
              title=f"adapter module, batch {BATCH}")
    suite.add_rate(case, impl, facts.get("flops"))
