"""Plain-PyTorch versions of every kernel: the "torch" backend and the test oracle.

Each function has the same signature and semantics as its Triton twin, and computes what the released Qwen-VL
code computes (norm statistics and rotary in fp32, residuals and the MLP gate in the model dtype). Layouts follow
flash-attn 2: `[batch, seqlen, heads, head_dim]`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps=1e-6, residual=None):
    """RMSNorm over the last dim, `x * rsqrt(mean(x^2) + eps)` in fp32, cast back to x's dtype, times weight.

    With `residual`, first forms `h = x + residual` (in x's dtype) and returns `(rms_norm(h), h)`: the pre-norm
    block's residual add fused into its next norm.
    """
    if residual is not None:
        h = x + residual
        return rms_norm(h, weight, eps), h
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return out * weight


def layer_norm(x, weight, bias, eps=1e-6):
    """LayerNorm over the last dim (the ViT and the adapter use eps 1e-6)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin, position_ids=None):
    """GPT-NeoX rotary embedding on q `[B, T, H, D]` and k `[B, T, Hk, D]`, as the Qwen decoder applies it.

    `cos`, `sin`: fp32 tables `[S, R/2]` (R = rotary dims, even, <= D; Qwen-VL rotates the full head) for positions
    0..S-1, i.e. cos(p * inv_freq). `position_ids`: `[B, T]` or `[T]` int positions into the tables (default
    0..T-1), so KV-cache offsets and left padding are expressed by the caller. Computed in fp32, cast back.
    Returns the rotated `(q, k)`.
    """
    T = q.shape[1]
    if position_ids is None:
        position_ids = torch.arange(T, device=q.device)
    c = cos[position_ids].float()
    s = sin[position_ids].float()
    if c.dim() == 2:  # [T, R/2] -> [1, T, 1, R]
        c, s = c[None], s[None]
    c = torch.cat((c, c), dim=-1)[:, :, None, :]
    s = torch.cat((s, s), dim=-1)[:, :, None, :]
    rot = c.shape[-1]

    def rotate(t):
        tr, tp = t[..., :rot].float(), t[..., rot:].float()
        tr = tr * c + _rotate_half(tr) * s
        return torch.cat((tr, tp), dim=-1).type_as(t)

    return rotate(q), rotate(k)


def swiglu(a, b):
    """The Qwen MLP gate: `a * silu(b)`, called as `swiglu(w1(x), w2(x))` (w2 is the branch through SiLU)."""
    return a * F.silu(b)


def _attention_mask(Tq, Tk, causal, seq_start, device):
    """Boolean `[B or 1, 1, Tq, Tk]` mask of allowed (query, key) pairs, or None when everything is allowed."""
    mask = None
    if causal:
        # bottom-right aligned, as flash-attn >= 2.1: query i sees keys j <= i + Tk - Tq
        i = torch.arange(Tq, device=device)[:, None]
        j = torch.arange(Tk, device=device)[None, :]
        mask = (j <= i + (Tk - Tq))[None, None]
    if seq_start is not None:
        j = torch.arange(Tk, device=device)
        pad = (j[None, :] >= seq_start.to(device=device, dtype=torch.long)[:, None])[:, None, None, :]
        mask = pad if mask is None else (mask & pad)
    return mask


def attention(q, k, v, causal=False, softmax_scale=None, seq_start=None):
    """Softmax attention, q `[B, Tq, H, D]`, k and v `[B, Tk, Hk, D]` (H divisible by Hk: grouped-query).

    `causal` aligns to the bottom-right corner when Tq != Tk (query i sees keys j <= i + Tk - Tq).
    `seq_start`: optional int `[B]`: keys j < seq_start[b] are masked (left padding). A query that sees no key
    at all (a padding row) gets zeros. Returns `[B, Tq, H, D]` in q's dtype.
    """
    B, Tq, H, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if Hk != H:
        kt = kt.repeat_interleave(H // Hk, dim=1)
        vt = vt.repeat_interleave(H // Hk, dim=1)
    mask = _attention_mask(Tq, Tk, causal, seq_start, q.device)
    if mask is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, scale=scale)
    else:
        # a finite "minus infinity" keeps rows with no visible key finite; they are zeroed below
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, torch.finfo(q.dtype).min)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, scale=scale)
        out = out * mask.any(-1, keepdim=True).to(out.dtype)
    return out.transpose(1, 2)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                     softmax_scale=None):
    """Packed sequences (flash-attn 2 `flash_attn_varlen_func`): q `[total_q, H, D]`, k/v `[total_k, Hk, D]`,
    `cu_seqlens_*` int32 `[n + 1]` cumulative lengths. Each sequence attends only to itself."""
    out = torch.empty_like(q)
    n = cu_seqlens_q.numel() - 1
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(n):
        qs, qe, ks, ke = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if qe == qs:
            continue
        if ke == ks:
            out[qs:qe] = 0
            continue
        o = attention(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], causal=causal, softmax_scale=softmax_scale)
        out[qs:qe] = o[0]
    return out


def decode_attention(q, k_cache, v_cache, cache_seqlens, cache_starts=None, softmax_scale=None):
    """Attention of a few new tokens against a KV cache (generation).

    q `[B, Tq, H, D]`: the new tokens, already written to the cache at positions
    `cache_seqlens[b] - Tq .. cache_seqlens[b] - 1`. k_cache, v_cache `[B, S, Hk, D]` with S >= max(cache_seqlens).
    Row b sees keys `cache_starts[b] <= j < cache_seqlens[b]` (cache_starts: left padding, default 0), causal
    among the new tokens. Returns `[B, Tq, H, D]`.
    """
    B, Tq = q.shape[:2]
    out = torch.empty_like(q)
    for b in range(B):
        L = int(cache_seqlens[b])
        s = int(cache_starts[b]) if cache_starts is not None else 0
        out[b:b + 1] = attention(q[b:b + 1], k_cache[b:b + 1, s:L], v_cache[b:b + 1, s:L], causal=True,
                                 softmax_scale=softmax_scale)
    return out


def resampler_attention(query, pos_q, kv, pos_k, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                        num_heads):
    """The adapter's cross-attention with its 2D position terms, in the layout of `nn.MultiheadAttention`.

    query `[Nq, E]` (ln_q of the learned queries, shared by every image), pos_q `[Nq, E]` (the fixed sin-cos table),
    kv `[B, Nk, E]` (ln_kv of the projected patch features), pos_k `[Nk, E]` (the table at the patch grid);
    in_proj_weight `[3E, E]` stacks Wq; Wk; Wv, in_proj_bias `[3E]`; out_proj `[E, E]` and `[E]`.
    Computes `out_proj(softmax((query + pos_q) Wq' (kv + pos_k) Wk'^T / sqrt(E / heads)) kv Wv')` per image,
    where ' includes the bias. Returns `[B, Nq, E]`.
    """
    B, Nk, E = kv.shape
    Nq = query.shape[0]
    hd = E // num_heads
    wq, wk, wv = in_proj_weight.chunk(3)
    bq, bk, bv = in_proj_bias.chunk(3)
    q = F.linear(query + pos_q, wq, bq)                      # [Nq, E]
    k = F.linear(kv + pos_k, wk, bk)                         # [B, Nk, E]
    v = F.linear(kv, wv, bv)
    q = q.view(1, Nq, num_heads, hd).expand(B, Nq, num_heads, hd)
    k = k.view(B, Nk, num_heads, hd)
    v = v.view(B, Nk, num_heads, hd)
    o = attention(q, k, v).reshape(B, Nq, E)
    return F.linear(o, out_proj_weight, out_proj_bias)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean"):
    """The LM head and the next-token loss: `cross_entropy(hidden @ weight.T, labels)` with fp32 statistics.

    hidden `[N, H]`, weight `[V, H]`, labels `[N]` int (already shifted by the caller). "mean" divides by the
    number of labels that are not `ignore_index` (0 when every label is ignored, with zero gradients); "sum" lets
    gradient accumulation divide by the true token count itself.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    logits = F.linear(hidden, weight).float()
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        loss = loss / (labels != ignore_index).sum().clamp(min=1)
    return loss
