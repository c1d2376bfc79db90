"""The Qwen-7B decoder of Qwen-VL: RMSNorm, rotary (dynamic NTK, log-n), attention with a KV cache, SwiGLU MLP.

Module and parameter names are those of the released checkpoint (`transformer.h.{i}.attn.c_attn` ...). Every
kernel call goes through `self.kernels`, the backend chosen once when the model is built.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

from .cache import KVCache
from .config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x, residual=None):
        return self.kernels.rms_norm(x, self.weight, self.eps, residual=residual)


def ntk_alpha(length: int, seq_length: int) -> float:
    """Dynamic-NTK factor of the released code, from the prefill length alone (1 up to the trained length)."""
    context_value = math.log(length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Log-n attention scaling of the released code: log(p + 1) / log(seq_length) past the trained length, else 1."""
    p1 = (positions + 1).double()
    return torch.where(p1 > seq_length, torch.log(p1) / math.log(seq_length), torch.ones_like(p1)).float()


class RotaryInputs(NamedTuple):
    """What rotary embedding needs for the tokens of one forward pass.

    cos, sin: fp32 tables `[L, rotary_dim / 2]`; positions: each token's row in them, `[T]` (shared by every row) or
    `[B, T]`; logn: the log-n query scale `[B or 1, T, 1, 1]` past the trained length, else None.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    logn: torch.Tensor | None = None


class Packing(NamedTuple):
    """Sequences packed into one row `[1, total]`: int32 boundaries `cu_seqlens` and the longest sequence."""

    cu_seqlens: torch.Tensor
    max_seqlen: int


def token_positions(T: int, past: int = 0, seq_start=None, cu_seqlens=None, device=None) -> torch.Tensor:
    """Rotary positions `[1 or B, T]` of T new tokens after `past` cached ones: the absolute index, counted from each
    row's first real token (`seq_start`, left padding), restarting at each packed sequence's start (`cu_seqlens`)."""
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device, torch.long)
        index = torch.arange(T, device=device)
        return (index - cu[torch.searchsorted(cu[1:], index, right=True)])[None]
    positions = torch.arange(past, past + T, device=device)[None]
    if seq_start is not None:
        positions = (positions - seq_start.to(device, torch.long)[:, None]).clamp(min=0)
    return positions


class RotaryEmbedding(nn.Module):
    """cos/sin tables of GPT-NeoX rotary embedding; the base grows with the dynamic-NTK factor alpha."""

    def __init__(self, dim: int, base: float):
        super().__init__()
        self.dim = dim
        self.base = base
        self._cache = {}

    def tables(self, length: int, alpha: float, device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 `[>= length, dim/2]` tables of cos(p * inv_freq) and sin(p * inv_freq)."""
        key = (float(alpha), str(device))
        cached = self._cache.get(key)
        if cached is None or cached[0].shape[0] < length:
            base = self.base * alpha ** (self.dim / (self.dim - 2))
            inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))
            n = max(2 * length, 16)
            freqs = torch.outer(torch.arange(n, device=device).float(), inv_freq)
            cached = (freqs.cos(), freqs.sin())
            if len(self._cache) > 8:  # a handful of alphas live at once (one per distinct prompt length class)
                self._cache.clear()
            self._cache[key] = cached
        return cached

    def inputs(self, positions: torch.Tensor, alphas: list, length: int, logn=None) -> RotaryInputs:
        """Tables for `length` positions and where each token reads them. Rows with different NTK factors read one
        stacked table (each alpha's block at its own offset), so the rotary kernel stays one launch."""
        unique = sorted(set(alphas))
        if len(unique) == 1:
            cos, sin = self.tables(length, unique[0], positions.device)
        else:
            blocks = [self.tables(length, a, positions.device) for a in unique]
            cos = torch.cat([c[:length] for c, _ in blocks])
            sin = torch.cat([s[:length] for _, s in blocks])
            offset = torch.tensor([unique.index(a) * length for a in alphas], device=positions.device)
            positions = positions.expand(len(alphas), -1) + offset[:, None]
        return RotaryInputs(cos, sin, positions if positions.shape[0] > 1 else positions[0], logn)


class QWenAttention(nn.Module):
    def __init__(self, config: TextConfig, kernels):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.hidden = config.hidden_size
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)  # bias even with no_bias
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=not config.no_bias)
        self.kernels = kernels

    def forward(self, x, rope: RotaryInputs, layer_idx: int = 0, cache: KVCache | None = None, seq_start=None,
                packing: Packing | None = None):
        """x `[B, T, hidden]`; seq_start `[B]` each row's first real token (left padding) or None."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.hidden, dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_heads, self.head_dim)
        v = v.view(B, T, self.n_heads, self.head_dim)
        q, k = self.kernels.apply_rotary(q, k, rope.cos, rope.sin, rope.positions)
        if rope.logn is not None:
            q = q * rope.logn.to(q.dtype)
        if packing is not None:  # packed sequences: [1, total] with boundaries in cu_seqlens
            cu, longest = packing
            o = self.kernels.varlen_attention(q[0], k[0], v[0], cu, cu, longest, longest, causal=True)[None]
        elif cache is None or cache.empty:
            if cache is not None:
                cache.write(layer_idx, k, v)
            o = self.kernels.attention(q, k, v, causal=True, seq_start=seq_start)
        else:  # the cache's layout decides how the new tokens see the cached ones (qwenvl.cache.KVCache.attend)
            cache.write(layer_idx, k, v)
            o = cache.attend(self.kernels, layer_idx, q)
        return self.c_proj(o.reshape(B, T, self.hidden))


class QWenMLP(nn.Module):
    def __init__(self, config: TextConfig, kernels):
        super().__init__()
        ff = config.mlp_width
        self.w1 = nn.Linear(config.hidden_size, ff, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, ff, bias=not config.no_bias)
        self.c_proj = nn.Linear(ff, config.hidden_size, bias=not config.no_bias)
        self.kernels = kernels

    def forward(self, x):
        # the released MLP: w1(x) * silu(w2(x)); w2 is the gated branch
        return self.c_proj(self.kernels.swiglu(self.w1(x), self.w2(x)))


class QWenBlock(nn.Module):
    def __init__(self, config: TextConfig, kernels):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon, kernels)
        self.attn = QWenAttention(config, kernels)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon, kernels)
        self.mlp = QWenMLP(config, kernels)

    def forward(self, h, rope: RotaryInputs, layer_idx: int = 0, cache: KVCache | None = None, seq_start=None,
                packing: Packing | None = None):
        a = self.attn(self.ln_1(h), rope, layer_idx, cache, seq_start, packing)
        normed, h = self.ln_2(a, residual=h)  # h + attn, then its norm, in one pass
        return h + self.mlp(normed)
