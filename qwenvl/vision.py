"""The vision side of Qwen-VL: ViT-bigG/14 and the position-aware adapter (a one-layer cross-attention Resampler).

Image [3, S, S] -> patches (conv, no bias) + learned absolute positions (bicubic to the grid) -> ln_pre -> pre-LN
blocks -> Resampler: n_queries learned queries attend to the patches, 2D sin-cos positions added to queries and keys
(not values) -> ln_post -> proj. Names are those of the released checkpoint (`transformer.visual...`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VisionConfig


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x):
        return self.kernels.layer_norm(x, self.weight, self.bias, self.eps)


def resize_positions(table: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """A square position table `[g*g, C]` resized to `n_tokens` (a square) positions: bicubic, fp32, as released."""
    src = math.isqrt(table.shape[0])
    tgt = math.isqrt(n_tokens)
    if tgt * tgt != n_tokens:
        raise ValueError(f"{n_tokens} patch tokens do not form a square grid")
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """The MAE-style fixed 2D sin-cos table `[grid*grid, dim]`: the first half of the channels encodes the column,
    the second half the row; each half is [sin, cos] of the position times 1/10000^(2i/half)."""
    half = dim // 2
    omega = torch.arange(half // 2, dtype=torch.float32) / (half / 2.0)
    omega = 1.0 / 10000**omega  # float32 throughout, as the released numpy code

    def encode(pos):
        out = pos.reshape(-1, 1).float() * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([encode(cols), encode(rows)], dim=1)


class VisualAttention(nn.Module):
    def __init__(self, width: int, heads: int, kernels):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.kernels = kernels

    def forward(self, x):
        B, T, W = x.shape
        # the released in_proj output is laid out per head as [q | k | v] (interleaved per head, unlike the decoder)
        qkv = self.in_proj(x).view(B, T, self.heads, 3, self.head_dim)
        o = self.kernels.attention(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2], causal=False)
        return self.out_proj(o.reshape(B, T, W))


class VisualBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, kernels):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.width, cfg.layer_norm_eps, kernels)
        self.attn = VisualAttention(cfg.width, cfg.heads, kernels)
        self.ln_2 = LayerNorm(cfg.width, cfg.layer_norm_eps, kernels)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(cfg.width, cfg.mlp_width))
        self.mlp.add_module("gelu", nn.GELU())  # exact (erf) GELU
        self.mlp.add_module("c_proj", nn.Linear(cfg.mlp_width, cfg.width))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualBlocks(nn.Module):
    """`transformer.visual.transformer.resblocks`: the stack of ViT blocks."""

    def __init__(self, cfg: VisionConfig, kernels):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualBlock(cfg, kernels) for _ in range(cfg.layers))
        self.grad_checkpointing = False

    def forward(self, x):
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class ResamplerAttention(nn.Module):
    """Parameters of the adapter's `nn.MultiheadAttention` under its names; the math is `kernels.resampler_attention`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)


class Resampler(nn.Module):
    """The position-aware adapter: n_queries learned queries cross-attend to the patch features once."""

    def __init__(self, cfg: VisionConfig, kernels):
        super().__init__()
        D = cfg.output_dim
        self.pos_embed = nn.Parameter(sincos_2d(D, math.isqrt(cfg.n_queries)), requires_grad=False)  # fixed table
        self.query = nn.Parameter(torch.empty(cfg.n_queries, D))
        self.kv_proj = nn.Linear(cfg.width, D, bias=False) if cfg.width != D else nn.Identity()
        self.attn = ResamplerAttention(D, cfg.adapter_heads)
        self.ln_q = LayerNorm(D, cfg.layer_norm_eps, kernels)
        self.ln_kv = LayerNorm(D, cfg.layer_norm_eps, kernels)
        self.kernels = kernels

    def forward(self, x):
        kv = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query)
        pos_k = resize_positions(self.pos_embed, x.shape[1])
        a = self.attn
        return self.kernels.resampler_attention(q, self.pos_embed, kv, pos_k, a.in_proj_weight, a.in_proj_bias,
                                                a.out_proj.weight, a.out_proj.bias, a.num_heads)


class VisionTransformer(nn.Module):
    """`transformer.visual`: pixels `[N, 3, S, S]` -> `[N, n_queries, output_dim]` features for the LLM."""

    def __init__(self, cfg: VisionConfig, kernels):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.pos_grid**2, cfg.width))
        self.ln_pre = LayerNorm(cfg.width, cfg.layer_norm_eps, kernels)
        self.transformer = VisualBlocks(cfg, kernels)
        self.attn_pool = Resampler(cfg, kernels)
        self.ln_post = LayerNorm(cfg.output_dim, cfg.layer_norm_eps, kernels)
        self.proj = nn.Parameter(torch.empty(cfg.output_dim, cfg.output_dim))

    def forward(self, pixel_values):
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))  # [N, width, g, g]
        x = x.flatten(2).transpose(1, 2)                            # [N, g*g, width]
        x = x + resize_positions(self.positional_embedding, x.shape[1])
        x = self.ln_pre(x)
        x = self.transformer(x)
        x = self.attn_pool(x)
        return self.ln_post(x) @ self.proj                          # proj is used as stored, not transposed
