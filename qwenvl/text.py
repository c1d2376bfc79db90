"""The Qwen-7B decoder of Qwen-VL: RMSNorm, rotary (dynamic NTK, log-n), attention with a KV cache, SwiGLU MLP.

Module and parameter names are those of the released checkpoint (`transformer.h.{i}.attn.c_attn` ...). Every
kernel call goes through `self.kernels`, the backend chosen once when the model is built.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

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


class KVCache:
    """Preallocated keys and values of every layer, `[batch, capacity, heads, head_dim]`.

    All rows share one write position (`length`): a batch is left-padded, and `seq_start[b]` is the index of row b's
    first real token, so its keys before that are masked and its positions count from there. `ntk_alphas` are the
    rows' dynamic-NTK factors fixed at prefill, which decoding keeps.
    """

    def __init__(self, n_layers, batch, capacity, heads, head_dim, dtype, device, seq_start=None):
        self.k = [torch.empty(batch, capacity, heads, head_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty_like(t) for t in self.k]
        self.length = 0
        self.seq_start = seq_start if seq_start is not None else torch.zeros(batch, dtype=torch.int32, device=device)
        self.ntk_alphas = [1.0] * batch

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def reserve(self, new_tokens: int) -> None:
        """Grow the buffers (doubling) so that `new_tokens` more fit."""
        need = self.length + new_tokens
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity)
        for layer in range(len(self.k)):
            for buf in (self.k, self.v):
                old = buf[layer]
                grown = old.new_empty((old.shape[0], cap) + tuple(old.shape[2:]))
                grown[:, : self.length] = old[:, : self.length]
                buf[layer] = grown

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        T = k.shape[1]
        self.k[layer][:, self.length : self.length + T] = k
        self.v[layer][:, self.length : self.length + T] = v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows `index` (beam bookkeeping, dropping finished rows)."""
        self.k = [t[index] for t in self.k]
        self.v = [t[index] for t in self.v]
        self.seq_start = self.seq_start[index]
        self.ntk_alphas = [self.ntk_alphas[i] for i in index.tolist()]


class QWenAttention(nn.Module):
    def __init__(self, config: TextConfig, kernels):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.hidden = config.hidden_size
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)  # bias even with no_bias
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=not config.no_bias)
        self.kernels = kernels

    def forward(self, x, rope, layer_idx=0, cache: KVCache | None = None, seq_start=None, cu_seqlens=None,
                max_seqlen=None):
        """rope: (cos, sin, position_ids, logn) for these tokens; logn is None or `[B or 1, T, 1, 1]`."""
        B, T, _ = x.shape
        cos, sin, position_ids, logn = rope
        q, k, v = self.c_attn(x).split(self.hidden, dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_heads, self.head_dim)
        v = v.view(B, T, self.n_heads, self.head_dim)
        q, k = self.kernels.apply_rotary(q, k, cos, sin, position_ids)
        if logn is not None:
            q = q * logn.to(q.dtype)
        if cu_seqlens is not None:  # packed sequences: [1, total] with boundaries in cu_seqlens
            o = self.kernels.varlen_attention(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                              causal=True)[None]
        elif cache is None or cache.length == 0:
            if cache is not None:
                cache.write(layer_idx, k, v)
            o = self.kernels.attention(q, k, v, causal=True, seq_start=seq_start)
        else:
            cache.write(layer_idx, k, v)
            L = cache.length + T
            if T <= 16 and not torch.is_grad_enabled():
                lengths = torch.full((B,), L, dtype=torch.int32, device=x.device)
                o = self.kernels.decode_attention(q, cache.k[layer_idx], cache.v[layer_idx], lengths, cache.seq_start)
            else:
                o = self.kernels.attention(q, cache.k[layer_idx][:, :L], cache.v[layer_idx][:, :L], causal=True,
                                           seq_start=cache.seq_start)
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

    def forward(self, h, rope, layer_idx=0, cache=None, seq_start=None, cu_seqlens=None, max_seqlen=None):
        a = self.attn(self.ln_1(h), rope, layer_idx, cache, seq_start, cu_seqlens, max_seqlen)
        normed, h = self.ln_2(a, residual=h)  # h + attn, then its norm, in one pass
        return h + self.mlp(normed)
