"""Stand-in for the released visual.py: the ViT (sequence-first blocks with the per-head interleaved `in_proj`),
the `Resampler` adapter (one `nn.MultiheadAttention` with 2D sin-cos positions), `ln_post` and `proj`.

`VisionTransformer.encode` reads image files from the paths the token stream carries, as the released one does
(without its torchvision transform and without URLs: PIL bicubic resize and the CLIP normalization)."""
import math
from collections import OrderedDict
from functools import partial
from typing import Callable, List, Optional

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def get_abs_pos(abs_pos, tgt_size):
    """A square [L, C] position table bicubic-resized (in fp32) to tgt_size entries."""
    src, tgt = int(math.sqrt(abs_pos.size(0))), int(math.sqrt(tgt_size))
    if src == tgt:
        return abs_pos
    grid = abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(dtype=abs_pos.dtype)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """MAE-style table [grid², embed_dim]: the first half of the channels encodes the column, the second the row."""
    half = embed_dim // 2
    omega = 1.0 / 10000 ** (np.arange(half // 2, dtype=np.float64) / (half / 2.0))

    def encode(pos):
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    return np.concatenate([encode(cols), encode(rows)], axis=1)


class Resampler(nn.Module):
    """The position-aware adapter: learned queries cross-attend to the patch features (one layer, no residual)."""

    def __init__(self, grid_size, embed_dim, num_heads, kv_dim=None, norm_layer=nn.LayerNorm):
        super().__init__()
        self.num_queries = grid_size ** 2
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        table = torch.from_numpy(get_2d_sincos_pos_embed(embed_dim, grid_size)).float()
        self.pos_embed = nn.Parameter(table).requires_grad_(False)
        self.query = nn.Parameter(torch.zeros(self.num_queries, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        if kv_dim is not None and kv_dim != embed_dim:
            self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        else:
            self.kv_proj = nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = norm_layer(embed_dim)
        self.ln_kv = norm_layer(embed_dim)

    def forward(self, x, attn_mask=None):
        pos_embed = get_abs_pos(self.pos_embed, x.size(1))
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # [patches, images, E]
        n_images = x.shape[1]
        q = self.ln_q(self.query)
        out = self.attn(self._repeat(q, n_images) + self.pos_embed.unsqueeze(1), x + pos_embed.unsqueeze(1), x,
                        attn_mask=attn_mask)[0]
        return out.permute(1, 0, 2)

    def _repeat(self, query, N: int):
        return query.unsqueeze(1).repeat(1, N, 1)


class VisualAttention(nn.Module):
    """Self-attention over [s, b, h] inputs; in_proj's output is laid out [heads, q|k|v] per head."""

    def __init__(self, embed_dim, num_heads, bias=True, kdim=None, vdim=None):
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        assert embed_dim % num_heads == 0
        self.hidden_size_per_attention_head = embed_dim // num_heads
        self.num_attention_heads_per_partition = num_heads
        self.hidden_size_per_partition = embed_dim
        assert self._qkv_same_embed_dim, "Only Support SelfAttention Currently"
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.norm_factor = math.sqrt(self.hidden_size_per_attention_head)

    def forward(self, query, key, value, attn_mask=None):
        sq, b, _ = query.size()
        assert query is key, "Only Support Self-Attention Currently"
        heads, hd = self.num_attention_heads_per_partition, self.hidden_size_per_attention_head
        mixed = self.in_proj(query).view(sq, b, heads, 3 * hd)
        q, k, v = mixed.split(hd, dim=-1)
        q = q.reshape(sq, b * heads, hd).transpose(0, 1)
        k = k.reshape(sq, b * heads, hd).transpose(0, 1)
        v = v.reshape(sq, b * heads, hd).transpose(0, 1)
        q = q / self.norm_factor
        if attn_mask is not None:
            scores = torch.baddbmm(attn_mask, q, k.transpose(-2, -1))
        else:
            scores = torch.bmm(q, k.transpose(-2, -1))
        ctx = torch.bmm(scores.softmax(dim=-1), v)  # [b * heads, sq, hd]
        ctx = ctx.view(b, heads, sq, hd).permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
        return self.out_proj(ctx)


class VisualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, mlp_ratio: float = 4.0, act_layer: Callable = nn.GELU,
                 norm_layer: Callable = nn.LayerNorm, is_cross_attention: bool = False):
        super().__init__()
        self.ln_1 = norm_layer(d_model)
        if is_cross_attention:
            self.ln_1_kv = norm_layer(d_model)
        self.ln_2 = norm_layer(d_model)
        mlp_width = int(d_model * mlp_ratio)
        self.attn = VisualAttention(d_model, n_head)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, mlp_width)),
            ("gelu", act_layer()),
            ("c_proj", nn.Linear(mlp_width, d_model)),
        ]))

    def attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
        k_x = k_x if k_x is not None else q_x
        v_x = v_x if v_x is not None else q_x
        attn_mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        return self.attn(q_x, k_x, v_x, attn_mask=attn_mask)

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        k_x = self.ln_1_kv(k_x) if hasattr(self, "ln_1_kv") and k_x is not None else None
        v_x = self.ln_1_kv(v_x) if hasattr(self, "ln_1_kv") and v_x is not None else None
        x = q_x + self.attention(q_x=self.ln_1(q_x), k_x=k_x, v_x=v_x, attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, act_layer: Callable = nn.GELU,
                 norm_layer: Callable = nn.LayerNorm):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList([
            VisualAttentionBlock(width, heads, mlp_ratio, act_layer=act_layer, norm_layer=norm_layer)
            for _ in range(layers)
        ])

    def get_cast_dtype(self) -> torch.dtype:
        return self.resblocks[0].mlp.c_fc.weight.dtype

    def get_cast_device(self) -> torch.device:
        return self.resblocks[0].mlp.c_fc.weight.device

    def forward(self, x, attn_mask: Optional[torch.Tensor] = None):
        for r in self.resblocks:
            x = r(x, attn_mask=attn_mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_ratio: float,
                 n_queries: int = 256, output_dim: int = 512, **kwargs):
        super().__init__()
        self.image_size = (image_size, image_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(256, width))
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.ln_pre = norm_layer(width)
        self.transformer = TransformerBlock(width, layers, heads, mlp_ratio, act_layer=nn.GELU, norm_layer=norm_layer)
        self.attn_pool = Resampler(grid_size=int(math.sqrt(n_queries)), embed_dim=output_dim,
                                   num_heads=output_dim // 128, kv_dim=width, norm_layer=norm_layer)
        self.ln_post = norm_layer(output_dim)
        self.proj = nn.Parameter(output_dim ** -0.5 * torch.randn(output_dim, output_dim))

    def forward(self, x: torch.Tensor):
        x = x.to(dtype=self.transformer.get_cast_dtype(), device=self.transformer.get_cast_device())
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [images, grid², width]
        x = x + get_abs_pos(self.positional_embedding, x.size(1))
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)  # sequence-first through the blocks, as released
        x = self.transformer(x)
        x = x.permute(1, 0, 2)
        x = self.attn_pool(x)
        x = self.ln_post(x)
        return x @ self.proj

    def image_transform(self, image):
        image = image.convert("RGB").resize(self.image_size, Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
        return (pixels - mean) / std

    def encode(self, image_paths: List[str]):
        images = []
        for path in image_paths:
            with Image.open(path) as image:
                images.append(self.image_transform(image))
        return self(torch.stack(images, dim=0))
