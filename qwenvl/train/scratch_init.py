"""Initialization for a model trained from scratch (a preset, not a released checkpoint).

`QwenVL.init_weights` draws every matrix with std 0.02, the released code's convention, which is tuned to widths of
1664-4096 (about 1/sqrt(width)). At the widths of the tiny presets (48-128) it is 4-6x smaller than 1/sqrt(fan_in):
attention starts uniform everywhere, the adapter hands the LLM nearly the same vector for every image, and in our
measurements the vision side never learned to localize (a linear read-out of box corners from the final image
features stayed at the mean-box error after 300 steps; with the fan-in scale below it reached 4-5 pixels of 100).

So, for from-scratch training only:
- every Linear and the patch convolution: normal with std 1/sqrt(fan_in); residual output projections (c_proj of
  the decoder and ViT blocks) further divided by sqrt(2 * layers), as the released scheme does for the decoder;
- the adapter's stacked in_proj: Xavier-uniform, which is what `nn.MultiheadAttention` (and hence the released
  Resampler) starts from;
- the ViT's learned position table: the 2D sin-cos table the adapter already uses, so that positions start smooth.
Embeddings, norms and the learned queries keep `init_weights`' values.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..vision import sincos_2d


@torch.no_grad()
def init_from_scratch(model, seed: int | None = None) -> None:
    if seed is not None:
        torch.manual_seed(seed)
    text_layers = model.config.text.num_hidden_layers
    vision_layers = model.config.vision.layers
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        std = 1.0 / math.sqrt(module.weight[0].numel())
        if name.endswith("c_proj") and ".h." in f".{name}":
            std /= math.sqrt(2 * text_layers)
        elif ".resblocks." in name and name.endswith(("mlp.c_proj", "attn.out_proj")):
            std /= math.sqrt(2 * vision_layers)
        module.weight.normal_(0.0, std)
    visual = model.transformer.visual
    nn.init.xavier_uniform_(visual.attn_pool.attn.in_proj_weight)
    table = sincos_2d(visual.cfg.width, visual.cfg.pos_grid)
    visual.positional_embedding.copy_(table.to(visual.positional_embedding.dtype))
