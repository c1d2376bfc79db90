"""The paper's three-stage recipe: what trains, at which resolution, and the optimizer and schedule of each stage.

Values from the Qwen-VL paper (Bai et al., 2023, section 3 and the hyper-parameter table of its appendix):
stage 1 pre-training trains the ViT and the adapter with the LLM frozen, at 224x224; stage 2 multi-task
pre-training trains everything at 448x448; stage 3 supervised fine-tuning freezes the ViT and trains the LLM and the
adapter. AdamW with beta1 0.9, beta2 0.98, eps 1e-6; cosine decay after a linear warm-up; peak learning rates
2e-4 / 5e-5 / 1e-5, minimum learning rates 1e-6 / 1e-5 / 1e-6; warm-up 500 / 400 / 3000 steps; 50k / 19k / 8k
steps; global batches 30720 / 4096 / 128; weight decay 0.05; gradient clipping 1.0; layer-wise learning-rate decay
0.95 on the ViT in stages 1 and 2. Every value can be overridden from the command line.

A model built from scratch (a preset such as `tiny` or `demo`, not a released checkpoint) cannot learn anything at
those learning rates in minutes, so the built-in demo uses its own defaults (`DEMO`), and says so when it runs.

A run shortened with `steps` keeps the warm-up's share of the schedule (3 steps of stage 3 warm up over 1 step, not
over the paper's 3000, which would leave the learning rate at a thousandth of its peak) and says so; a warm-up given
explicitly is kept, with a warning when the run ends before it does.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields, replace

import torch

log = logging.getLogger("qwenvl.train")

STAGES = (1, 2, 3)


@dataclass
class StageRecipe:
    stage: int
    train_vit: bool
    train_adapter: bool
    train_llm: bool
    lr: float
    min_lr: float
    warmup_steps: int
    steps: int
    style: str                      # "plain" pre-training text or "chatml" conversations
    image_size: int = 0             # filled from the model config by `stage_recipe`
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    vit_lr_decay: float = 1.0       # ViT block i (0-based) of L at lr * decay ** (L - i), patch embedding ** (L + 1)
    batch_size: int = 8             # per rank and micro-batch
    grad_accum: int = 1
    paper_global_batch: int = 0     # for reference in the logs
    mix: str = "caption=1"          # synthetic task mix of this stage
    defaults: str = "paper"         # where the values came from: "paper" or "demo"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


PAPER = {
    1: StageRecipe(1, train_vit=True, train_adapter=True, train_llm=False, lr=2e-4, min_lr=1e-6, warmup_steps=500,
                   steps=50_000, style="plain", vit_lr_decay=0.95, paper_global_batch=30720, mix="caption=1"),
    2: StageRecipe(2, train_vit=True, train_adapter=True, train_llm=True, lr=5e-5, min_lr=1e-5, warmup_steps=400,
                   steps=19_000, style="plain", vit_lr_decay=0.95, paper_global_batch=4096,
                   mix="caption=1,vqa=1,grounding=1,grounded_caption=1,ocr=1"),
    3: StageRecipe(3, train_vit=False, train_adapter=True, train_llm=True, lr=1e-5, min_lr=1e-6, warmup_steps=3000,
                   steps=8_000, style="chatml", vit_lr_decay=1.0, paper_global_batch=128,
                   mix="caption=1,vqa=1,grounding=1,grounded_caption=1,ocr=1"),
}

# The built-in demo: a from-scratch model on the synthetic set within minutes on a CPU. Peak learning rates of
# 5e-4 / 5e-4 / 3e-4: above the paper's (a tiny model from random weights needs them) but not far: at 2e-3 the
# adapter's output direction changed too much from step to step and localization never started. Grounding
# dominates the later mixes because it is the skill the demo is judged on; the rest keep every task kind in play.
DEMO = {
    1: dict(lr=5e-4, min_lr=5e-5, warmup_steps=20, steps=150, batch_size=32, vit_lr_decay=1.0),
    2: dict(lr=5e-4, min_lr=2e-5, warmup_steps=30, steps=1200, batch_size=32, vit_lr_decay=1.0,
            mix="caption=1,vqa=1,grounding=6,grounded_caption=1,ocr=1"),
    3: dict(lr=3e-4, min_lr=1e-5, warmup_steps=20, steps=300, batch_size=32,
            mix="caption=1,vqa=1,grounding=6,grounded_caption=1,ocr=1"),
}
DEMO_SYSTEM = ""  # the official system prompt costs ~30 byte-level tokens per example for nothing in the demo


def stage_image_size(stage: int, image_size: int, patch_size: int) -> int:
    """Stage 1 sees half the resolution (224 for a 448 model), later stages the model's own (a patch multiple)."""
    if stage != 1:
        return image_size
    half = (image_size // 2) // patch_size * patch_size
    if half < patch_size:
        raise ValueError(f"image_size {image_size} is too small to halve for stage 1 with patch size {patch_size}")
    return half


def stage_recipe(stage: int, config, demo: bool = False, **overrides) -> StageRecipe:
    """The recipe of a stage for a model config: the paper's values (or the demo's), then the overrides
    (None keeps the default)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    r = PAPER[stage]
    if demo:
        r = replace(r, defaults="demo", **DEMO[stage])
    r = replace(r, image_size=stage_image_size(stage, config.vision.image_size, config.vision.patch_size))
    names = {f.name for f in fields(StageRecipe)}
    unknown = [k for k in overrides if k not in names]
    if unknown:
        raise ValueError(f"unknown recipe field(s) {unknown}; known: {sorted(names)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    default_steps, default_warmup = r.steps, r.warmup_steps
    r = replace(r, **given)
    _check(r, config)
    if "warmup_steps" not in given and r.steps < default_steps and default_warmup:
        scaled = max(1, round(default_warmup * r.steps / default_steps))
        log.warning("stage %d: %d steps instead of %d: the warm-up keeps its share of the schedule, %d step(s) "
                    "instead of %d (pass --warmup-steps to choose)", stage, r.steps, default_steps, scaled,
                    default_warmup)
        r = replace(r, warmup_steps=scaled)
    elif r.warmup_steps >= r.steps:
        log.warning("stage %d: the warm-up (%d steps) is not shorter than the run (%d steps): the learning rate "
                    "never reaches its peak %g (it ends at %.2g)", stage, r.warmup_steps, r.steps, r.lr,
                    r.lr * r.steps / r.warmup_steps)
    return r


def _check(r: StageRecipe, config) -> None:
    if r.steps < 1:
        raise ValueError(f"stage {r.stage}: steps must be >= 1, got {r.steps}")
    if r.warmup_steps < 0 or r.lr <= 0 or r.min_lr < 0 or r.min_lr > r.lr:
        raise ValueError(f"stage {r.stage}: need lr > 0, 0 <= min_lr <= lr and warmup >= 0 (got lr {r.lr}, "
                         f"min_lr {r.min_lr}, warmup {r.warmup_steps})")
    if r.batch_size < 1 or r.grad_accum < 1:
        raise ValueError(f"stage {r.stage}: batch_size and grad_accum must be >= 1")
    if r.image_size % config.vision.patch_size:
        raise ValueError(f"stage {r.stage}: image size {r.image_size} is not a multiple of the patch size "
                         f"{config.vision.patch_size}")
    if not (r.train_vit or r.train_adapter or r.train_llm):
        raise ValueError(f"stage {r.stage}: nothing would train")
    if r.style not in ("plain", "chatml"):
        raise ValueError(f"stage {r.stage}: style must be 'plain' or 'chatml', got {r.style!r}")


# --- which parameters train ----------------------------------------------------------------------------------
def parameter_group(name: str) -> str:
    """'vit', 'adapter' or 'llm' for an official parameter name.

    The adapter is the Resampler and its output ln_post + proj (the paper's "adapter": what turns ViT features into
    LLM inputs); the official fine-tuning script's fix_vit leaves ln_post and proj frozen, this recipe trains them.
    """
    if name.startswith("transformer.visual."):
        rest = name[len("transformer.visual."):]
        if rest.startswith(("attn_pool.", "ln_post.")) or rest == "proj":
            return "adapter"
        return "vit"
    return "llm"


def apply_freeze(model, recipe: StageRecipe) -> dict:
    """Set requires_grad per the stage; returns trainable and frozen parameter counts per group."""
    train = {"vit": recipe.train_vit, "adapter": recipe.train_adapter, "llm": recipe.train_llm}
    counts = {g: {"trainable": 0, "frozen": 0} for g in train}
    for name, p in model.named_parameters():
        g = parameter_group(name)
        # the adapter's 2D sin-cos table is fixed by design: never trained, whatever the stage
        fixed = name.endswith("attn_pool.pos_embed")
        p.requires_grad_(train[g] and not fixed)
        counts[g]["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


def _vit_depth(name: str, n_layers: int) -> int:
    """Layer index for layer-wise decay: 0 for the patch embedding, i + 1 for block i (the top block is n_layers)."""
    marker = "transformer.visual.transformer.resblocks."
    if name.startswith(marker):
        return int(name[len(marker):].split(".")[0]) + 1
    return 0


def param_groups(model, recipe: StageRecipe) -> list[dict]:
    """AdamW groups of the trainable parameters: weight decay on matrices only (not norms, biases, 1-D tables),
    the ViT's learning rate decayed layer-wise from its top block down."""
    n_layers = model.config.vision.layers
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        if parameter_group(name) == "vit" and recipe.vit_lr_decay != 1.0:
            scale = recipe.vit_lr_decay ** (n_layers + 1 - _vit_depth(name, n_layers))
        wd = recipe.weight_decay if p.dim() >= 2 else 0.0
        key = (scale, wd)
        g = groups.setdefault(key, {"params": [], "names": [], "lr": recipe.lr * scale, "weight_decay": wd,
                                    "lr_scale": scale})
        g["params"].append(p)
        g["names"].append(name)
    if not groups:
        raise ValueError(f"stage {recipe.stage}: no trainable parameters")
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model, recipe: StageRecipe) -> torch.optim.AdamW:
    groups = param_groups(model, recipe)
    for g in groups:
        del g["names"]  # torch keeps unknown keys in param_groups; names would bloat every optimizer checkpoint
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=tuple(recipe.betas), eps=recipe.eps)


def lr_factor(step: int, recipe: StageRecipe) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up from lr/warmup to lr, cosine down to min_lr."""
    if recipe.warmup_steps and step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    span = max(1, recipe.steps - recipe.warmup_steps)
    progress = min(1.0, (step - recipe.warmup_steps) / span)
    floor = recipe.min_lr / recipe.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, recipe: StageRecipe):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, recipe))
