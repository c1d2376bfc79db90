"""The decoder's KV cache: keys and values of every layer, grown as tokens arrive.

The attention layers use a cache through `empty`, `write` and `attend` only, so a cache of another layout (the
static one of `qwenvl.compiled`, written at a position held in a tensor) plugs into the same decoder code.
"""
from __future__ import annotations

import torch


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
    def empty(self) -> bool:
        """No token cached yet: the next forward is the prefill."""
        return self.length == 0

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

    def attend(self, kernels, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Attention of the T new tokens `q [B, T, H, D]` (already written) to the cached tokens of their rows."""
        B, T = q.shape[:2]
        L = self.length + T
        if T <= 16 and not torch.is_grad_enabled():  # the decode kernel's case: a few tokens, inference
            lengths = torch.full((B,), L, dtype=torch.int32, device=q.device)
            return kernels.decode_attention(q, self.k[layer], self.v[layer], lengths, self.seq_start)
        return kernels.attention(q, self.k[layer][:, :L], self.v[layer][:, :L], causal=True, seq_start=self.seq_start)

    def load(self, other: "KVCache") -> None:
        """Hold what `other` holds: its tokens' keys and values, its rows' padding and NTK factors (grown to fit)."""
        n = other.length
        self.length = 0
        self.reserve(n)
        for mine, theirs in ((self.k, other.k), (self.v, other.v)):
            for layer in range(len(mine)):
                mine[layer][:, :n] = theirs[layer][:, :n]
        self.length = n
        self.seq_start = other.seq_start.clone()
        self.ntk_alphas = list(other.ntk_alphas)

    def reset(self) -> None:
        """Empty again, for another batch of the same size; the buffers are kept."""
        self.length = 0
        self.seq_start = torch.zeros(self.batch, dtype=torch.int32, device=self.k[0].device)
        self.ntk_alphas = [1.0] * self.batch
