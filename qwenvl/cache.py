"""The decoder's KV cache: keys and values of every layer, grown as tokens arrive."""
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
