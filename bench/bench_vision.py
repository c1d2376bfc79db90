"""The vision tower at 448 px: ViT-bigG/14 (all 48 layers, width 1664, 1024 patches) and the adapter, images to the
256 x 4096 features the LLM receives. Forward at batch 8 (inference) and forward + backward at batch 4 (training);
a shrunk "tiny" preset on the CPU. Timed as a user sees it (host gaps included)."""
import pytest
import torch

import harness as H

CASES = ["vision_tower fwd", "vision_tower fwd+bwd"]
IMPLS = ["torch", "triton", "compile"]
BATCH = {"fwd": 8, "fwd+bwd": 4} if H.ON_CUDA else {"fwd": 1, "fwd+bwd": 1}


def _build():
    from qwenvl.config import QwenVLConfig
    from qwenvl.vision import VisionTransformer

    cfg = (QwenVLConfig.from_name("qwen-vl") if H.ON_CUDA else H.cpu_config()).vision
    tower = H.build_on_device(lambda: VisionTransformer(cfg, H.kernels("torch")))
    return cfg, H.init_params_(tower)


TOWER = H.Lazy(_build)


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    TOWER.release()


@pytest.mark.model
@pytest.mark.parametrize("case, impl", H.params(CASES, IMPLS))
def test_vision_tower(bm, suite, case, impl):
    mode = case.split()[1]
    backward = mode == "fwd+bwd"
    B = BATCH[mode]
    facts = {}

    def setup():
        if impl == "compile":
            H.compile_available("model")
        cfg, tower = TOWER()
        tower.requires_grad_(backward)
        tower.attn_pool.pos_embed.requires_grad_(False)    # the fixed sin-cos table
        S = cfg.image_size
        pixels = H.randn(B, 3, S, S)
        H.set_kernels(tower, "torch")
        run = lambda px, m: m(px)  # noqa: E731
        facts["flops"] = H.count_step_flops(run, (pixels, tower), backward)
        if impl == "compile":
            compiled = torch.compile(tower)
            run = lambda px, m: compiled(px)  # noqa: E731
        else:
            H.set_kernels(tower, impl)
        facts["layers"], facts["image_size"] = cfg.layers, S
        return H.rotating_step([(pixels, tower)], run, backward)

    suite.run(bm, case=case, impl=impl, setup=setup, mode="module", shape={"batch": B},
              title=f"ViT + adapter, 448 px, batch {B}, {mode}", cost_s=30 if H.ON_CUDA else 2,
              flops=None, extra=facts)
    H.add_rate(suite, case, impl, facts.get("flops"))

