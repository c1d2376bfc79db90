"""The vision tower at 448 px: ViT-bigG/14 (all 48 layers, width 1664, 1024 patches) and the adapter, images to the
256 x 4096 features the LLM receives. Forward at batch 8 (inference) and forward + backward at batch 4 (training);
a shrunk "tiny" preset on the CPU. Timed as a user sees it (host gaps included)."""
import pytest
import torch

from benchlib.cases import params, randn
from benchlib.env import ON_CUDA, backend, compile_available
from benchlib.models import Lazy, build_on_device, init_params_, set_kernels, vision_config
from benchlib.timing import count_step_flops, rotating_step

CASES = ["vision_tower fwd", "vision_tower fwd+bwd"]
IMPLS = ["torch", "triton", "compile"]
COSTS = {"torch": 10, "triton": 15, "compile": 120}
BATCH = {"fwd": 8, "fwd+bwd": 4} if ON_CUDA else {"fwd": 1, "fwd+bwd": 1}


def _build():
    from qwenvl.vision import VisionTransformer

    cfg = vision_config()
    tower = build_on_device(lambda: VisionTransformer(cfg, backend("torch")))
    return cfg, init_params_(tower)


TOWER = Lazy(_build)


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    TOWER.release()


@pytest.mark.model
@pytest.mark.parametrize("case, impl", params(CASES, IMPLS, COSTS))
def test_vision_tower(bm, suite, case, impl):
    mode = case.split()[1]
    backward = mode == "fwd+bwd"
    B = BATCH[mode]
    facts = {}

    def setup():
        if impl == "compile":
            compile_available("model")
        cfg, tower = TOWER()
        tower.requires_grad_(backward)
        tower.attn_pool.pos_embed.requires_grad_(False)    # the fixed sin-cos table
        S = cfg.image_size
        pixels = randn(B, 3, S, S)
        set_kernels(tower, "torch")
        run = lambda px, m: m(px)  # noqa: E731
        facts["flops"] = count_step_flops(run, (pixels, tower), backward)
        if impl == "compile":
            compiled = torch.compile(tower)
            run = lambda px, m: compiled(px)  # noqa: E731
        else:
            set_kernels(tower, impl)
        facts["layers"], facts["image_size"] = cfg.layers, S
        return rotating_step([(pixels, tower)], run, backward)

    suite.run(bm, case=case, impl=impl, setup=setup, mode="module", shape={"batch": B},
              title=f"ViT + adapter, 448 px, batch {B}, {mode}", extra=facts)
    suite.add_rate(case, impl, facts.get("flops"))
