"""The adapter (position-aware Resampler) as a module: kv_proj 1664 -> 4096, ln_kv / ln_q, the 2D-positional
cross-attention of 256 queries over 1024 patches per image, batch 16; forward and forward + backward.
(The attention alone, against the official nn.MultiheadAttention design, is bench_resampler.py.)"""
import pytest
import torch

import harness as H

CASES = ["adapter fwd", "adapter fwd+bwd"]
IMPLS = ["torch", "triton", "compile"]
BATCH = 16 if H.ON_CUDA else 2


def _build():
    from qwenvl.config import QwenVLConfig
    from qwenvl.vision import Resampler

    cfg = (QwenVLConfig.from_name("qwen-vl") if H.ON_CUDA else H.cpu_config()).vision
    adapter = H.build_on_device(lambda: Resampler(cfg, H.kernels("torch")))
    return cfg, H.init_params_(adapter)


ADAPTER = H.Lazy(_build)


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    ADAPTER.release()


@pytest.mark.model
@pytest.mark.parametrize("case, impl", H.params(CASES, IMPLS))
def test_adapter(bm, suite, case, impl):
    backward = case.endswith("fwd+bwd")
    facts = {}

    def setup():
        if impl == "compile":
            H.compile_available()
        cfg, adapter = ADAPTER()
        adapter.requires_grad_(backward)
        adapter.pos_embed.requires_grad_(False)            # the fixed sin-cos table
        x = H.randn(BATCH, cfg.grid ** 2, cfg.width, grad=backward)
        H.set_kernels(adapter, "torch")
        run = lambda x, m: m(x)  # noqa: E731
        facts["flops"] = H.count_step_flops(run, (x, adapter), backward)
        if impl == "compile":
            compiled = torch.compile(adapter, dynamic=False)
            run = lambda x, m: compiled(x)  # noqa: E731
        else:
            H.set_kernels(adapter, impl)
        return H.rotating_step([(x, adapter)], run, backward)

    cost = {"compile": 60, "triton": 20}.get(impl, 5) if H.ON_CUDA else 2
    suite.run(bm, case=case, impl=impl, setup=setup, mode="module", shape={"batch": BATCH},
              title=f"adapter module, batch {BATCH}", cost_s=cost)
    H.add_rate(suite, case, impl, facts.get("flops"))
