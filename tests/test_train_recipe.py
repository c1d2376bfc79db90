"""The three-stage recipe: what trains in each stage, learning rates, schedule, optimizer groups, overrides."""
import math

import pytest
import torch

from qwenvl.config import QwenVLConfig
from qwenvl.model import QwenVL
from qwenvl.train.recipe import (PAPER, apply_freeze, build_optimizer, build_scheduler, lr_factor, param_groups,
                                 parameter_group, stage_recipe)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return QwenVL(QwenVLConfig.from_name("tiny"), kernels="torch")


def test_paper_values():
    # the released model's config: stage 1 at 224, then 448; the paper's optimizer settings in every stage
    config = QwenVLConfig.from_name("qwen-vl")
    r = {s: stage_recipe(s, config) for s in (1, 2, 3)}
    assert [r[s].lr for s in (1, 2, 3)] == [2e-4, 5e-5, 1e-5]
    assert [r[s].min_lr for s in (1, 2, 3)] == [1e-6, 1e-5, 1e-6]
    assert [r[s].image_size for s in (1, 2, 3)] == [224, 448, 448]
    for s in (1, 2, 3):
        assert r[s].betas == (0.9, 0.98) and r[s].eps == 1e-6
        assert r[s].weight_decay == 0.05 and r[s].grad_clip == 1.0
        assert r[s].defaults == "paper"
    assert (r[1].train_vit, r[1].train_adapter, r[1].train_llm) == (True, True, False)
    assert (r[2].train_vit, r[2].train_adapter, r[2].train_llm) == (True, True, True)
    assert (r[3].train_vit, r[3].train_adapter, r[3].train_llm) == (False, True, True)
    assert r[3].style == "chatml" and r[1].style == "plain"


def test_tiny_resolution_halves_then_full():
    config = QwenVLConfig.from_name("tiny")
    assert stage_recipe(1, config).image_size == config.vision.image_size // 2
    assert stage_recipe(2, config).image_size == config.vision.image_size


def test_overrides_and_demo_defaults():
    config = QwenVLConfig.from_name("tiny")
    r = stage_recipe(2, config, demo=True, lr=3e-3, steps=7, batch_size=None)
    assert r.lr == 3e-3 and r.steps == 7 and r.defaults == "demo"
    assert r.batch_size == stage_recipe(2, config, demo=True).batch_size  # None keeps the default
    assert stage_recipe(3, config, train_vit=True).train_vit
    with pytest.raises(ValueError, match="unknown recipe field"):
        stage_recipe(1, config, learning_rate=1.0)
    with pytest.raises(ValueError, match="min_lr"):
        stage_recipe(1, config, lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="stage must be"):
        stage_recipe(4, config)
    with pytest.raises(ValueError, match="patch size"):
        stage_recipe(2, config, image_size=100)


def test_parameter_groups_by_name():
    assert parameter_group("transformer.visual.conv1.weight") == "vit"
    assert parameter_group("transformer.visual.transformer.resblocks.0.attn.in_proj.weight") == "vit"
    assert parameter_group("transformer.visual.attn_pool.kv_proj.weight") == "adapter"
    assert parameter_group("transformer.visual.ln_post.weight") == "adapter"
    assert parameter_group("transformer.visual.proj") == "adapter"
    assert parameter_group("transformer.h.0.attn.c_attn.weight") == "llm"
    assert parameter_group("lm_head.weight") == "llm"


@pytest.mark.parametrize("stage,trains", [(1, {"vit", "adapter"}), (2, {"vit", "adapter", "llm"}),
                                          (3, {"adapter", "llm"})])
def test_freeze_policy(tiny_model, stage, trains):
    counts = apply_freeze(tiny_model, stage_recipe(stage, tiny_model.config))
    for name, p in tiny_model.named_parameters():
        group = parameter_group(name)
        if name.endswith("attn_pool.pos_embed"):
            assert not p.requires_grad, "the adapter's sin-cos table is fixed"
        else:
            assert p.requires_grad == (group in trains), name
    for group in ("vit", "adapter", "llm"):
        assert (counts[group]["trainable"] > 0) == (group in trains)
    # the optimizer holds exactly the trainable parameters
    opt = build_optimizer(tiny_model, stage_recipe(stage, tiny_model.config))
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in tiny_model.parameters() if p.requires_grad}


def test_weight_decay_and_vit_layer_decay(tiny_model):
    r = stage_recipe(1, tiny_model.config)  # paper: ViT layer-wise decay 0.95
    apply_freeze(tiny_model, r)
    groups = param_groups(tiny_model, r)
    lr_of = {n: g["lr"] for g in groups for n in g["names"]}
    wd_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    L = tiny_model.config.vision.layers
    top = f"transformer.visual.transformer.resblocks.{L - 1}.attn.in_proj.weight"
    assert math.isclose(lr_of[top], r.lr * 0.95)
    assert math.isclose(lr_of["transformer.visual.conv1.weight"], r.lr * 0.95 ** (L + 1))
    assert math.isclose(lr_of["transformer.visual.attn_pool.kv_proj.weight"], r.lr)
    assert wd_of["transformer.visual.conv1.weight"] == 0.05
    assert wd_of["transformer.visual.ln_pre.weight"] == 0.0  # no decay on norms and biases


def test_schedule_warmup_then_cosine():
    config = QwenVLConfig.from_name("tiny")
    r = stage_recipe(2, config, lr=1.0, min_lr=0.1, warmup_steps=4, steps=14)
    f = [lr_factor(s, r) for s in range(14)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert lr_factor(14, r) == pytest.approx(0.1)
    assert f[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    # the scheduler applies the same factors to every group (ViT groups keep their layer-wise ratio)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    sched = build_scheduler(opt, r)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(f[:6])


def test_paper_table_is_not_mutated():
    config = QwenVLConfig.from_name("tiny")
    stage_recipe(1, config, lr=5.0)
    assert PAPER[1].lr == 2e-4
