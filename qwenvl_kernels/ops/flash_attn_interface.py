"""flash-attn 2's call signatures (flash_attn.flash_attn_interface) over our kernels: code written for flash-attn
runs unchanged, defaults spelled out or not.

- `flash_attn_func`, `flash_attn_qkvpacked_func`, `flash_attn_kvpacked_func`: fixed-length batches;
- `flash_attn_varlen_func`, `flash_attn_varlen_qkvpacked_func`, `flash_attn_varlen_kvpacked_func`: packed sequences;
- `flash_attn_with_kvcache`: decoding against a KV cache (the decode kernel), appending new keys in place.

What is served: every argument at its default; `deterministic` either way (our backward is always deterministic);
`window_size` (-1, -1), or any window that equals plain or causal attention ((-1, 0) is causal; a window side
at least seqlen_k is unlimited, as flash-attn treats it); `return_attn_probs=True` returns `(out, softmax_lse,
None)`: softmax_lse in natural-log units, [batch, nheads, seqlen_q] ([nheads, total_q] for packed sequences),
+inf for a row that sees no key, as flash-attn 2 stores it; the third element, flash-attn's dropout-encoded
probabilities, is None (they exist there only with dropout, which is not implemented here). Anything else
(dropout, a real sliding window, softcap, ALiBi, paged KV) raises UnsupportedInput naming the argument.
"""
from __future__ import annotations

import torch

from ..launch import LN2, UnsupportedInput, check_index, check_tensor
from .decode_attention import check_decode, decode_attention
from .flash_attention import fixed_length, packed


def _causal(name, causal, window_size, seqlen_k):
    """The causal flag that (causal, window_size) amounts to; raises for a real sliding window."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise UnsupportedInput(f"{name}: window_size must be a pair (left, right), got {window_size!r}")
    left, right = (-1 if w is None or w < 0 or w >= seqlen_k else int(w) for w in window_size)
    if causal:
        right = 0  # flash-attn's causal mask overrides the right side of any window
    if left == -1 and right in (-1, 0):
        return right == 0
    raise UnsupportedInput(f"{name}: window_size={tuple(window_size)} (sliding-window local attention) is not "
                           f"implemented; pass window_size=(-1, -1) (or (-1, 0), which is causal)")


def _check_options(name, softcap, alibi_slopes, deterministic, return_attn_probs=False, block_table=None):
    if softcap != 0.0:
        raise UnsupportedInput(f"{name}: softcap={softcap!r} (soft-capped scores) is not implemented; pass "
                               f"softcap=0.0")
    if alibi_slopes is not None:
        raise UnsupportedInput(f"{name}: alibi_slopes is not implemented (Qwen-VL uses rotary positions); pass "
                               f"alibi_slopes=None")
    if not isinstance(deterministic, bool):
        raise UnsupportedInput(f"{name}: deterministic must be a bool, got {deterministic!r} (the backward is "
                               f"deterministic either way)")
    if not isinstance(return_attn_probs, bool):
        raise UnsupportedInput(f"{name}: return_attn_probs must be a bool, got {return_attn_probs!r}")
    if block_table is not None:
        raise UnsupportedInput(f"{name}: block_table (a paged KV cache) is not implemented; pass contiguous "
                               f"k/v and block_table=None")


def _result(out, lse2, return_attn_probs):
    if not return_attn_probs:
        return out
    # our kernels keep lse in log2 units and -inf for an empty row; flash-attn 2 returns natural log and +inf
    lse = torch.where(lse2 == float("-inf"), float("inf"), lse2 * LN2)
    return out, lse, None


def _unpack(name, t, what, count, ndim, layout):
    check_tensor(name, what, t, ndim, layout)
    if t.shape[-3] != count:
        raise UnsupportedInput(f"{name}: {what} must be {layout}, got shape {tuple(t.shape)}")
    return t.unbind(-3)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2 `flash_attn_func`: q [batch, seqlen_q, nheads, headdim], k/v [batch, seqlen_k, nheads_k,
    headdim], float16/bfloat16/float32 (no bfloat16 under the interpreter); headdim a multiple of 8, at most 128;
    nheads a multiple of nheads_k. causal aligns to the bottom-right corner when seqlen_q != seqlen_k (a row that
    sees no key outputs zeros). See the module doc for the other arguments. Returns [batch, seqlen_q, nheads,
    headdim], or (out, softmax_lse [batch, nheads, seqlen_q], None) with return_attn_probs."""
    name = "flash_attn_func"
    _check_options(name, softcap, alibi_slopes, deterministic, return_attn_probs)
    check_tensor(name, "k", k, 4, "[batch, seqlen, heads, head_dim]")
    causal = _causal(name, causal, window_size, k.shape[1])
    out, lse = fixed_length(name, q, k, v, causal, softmax_scale, None, dropout_p)
    return _result(out, lse, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2 `flash_attn_qkvpacked_func`: qkv [batch, seqlen, 3, nheads, headdim]; as `flash_attn_func`
    on its three slices (read in place; gradients flow back into qkv)."""
    q, k, v = _unpack("flash_attn_qkvpacked_func", qkv, "qkv", 3, 5, "[batch, seqlen, 3, heads, head_dim]")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2 `flash_attn_kvpacked_func`: q [batch, seqlen_q, nheads, headdim], kv [batch, seqlen_k, 2,
    nheads_k, headdim]; as `flash_attn_func` with k, v = kv's slices."""
    k, v = _unpack("flash_attn_kvpacked_func", kv, "kv", 2, 5, "[batch, seqlen, 2, heads_k, head_dim]")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2 `flash_attn_varlen_func` (`reference.varlen_attention`): packed sequences that attend only to
    themselves. q [total_q, nheads, headdim], k/v [total_k, nheads_k, headdim] (dtypes, head dims and heads as in
    `flash_attn_func`); cu_seqlens_q/k int32 [num_seqs + 1], non-decreasing from 0 to total_q / total_k (checked
    on the host with one small copy, skipped while torch.compile traces); max_seqlen_q/k: the longest sequence
    lengths (None: read from cu_seqlens). Causal is bottom-right aligned per sequence; a query of a sequence with
    no key outputs zeros. Returns [total_q, nheads, headdim], or (out, softmax_lse [nheads, total_q], None)."""
    name = "flash_attn_varlen_func"
    _check_options(name, softcap, alibi_slopes, deterministic, return_attn_probs, block_table)
    # a window is unlimited from max_seqlen_k on (any larger window sees every key of every sequence)
    causal = _causal(name, causal, window_size, max_seqlen_k if max_seqlen_k is not None else float("inf"))
    out, lse = packed(name, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                      dropout_p)
    return _result(out, lse, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash-attn 2 `flash_attn_varlen_qkvpacked_func`: qkv [total, 3, nheads, headdim], one cu_seqlens."""
    q, k, v = _unpack("flash_attn_varlen_qkvpacked_func", qkv, "qkv", 3, 4, "[total, 3, heads, head_dim]")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2 `flash_attn_varlen_kvpacked_func`: q [total_q, nheads, headdim], kv [total_k, 2, nheads_k,
    headdim]."""
    k, v = _unpack("flash_attn_varlen_kvpacked_func", kv, "kv", 2, 4, "[total, 2, heads_k, head_dim]")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attn 2 `flash_attn_with_kvcache` on the decode kernel (inference only: call it under torch.no_grad()).

    q [batch, seqlen_q, nheads, headdim] (seqlen_q <= 16) against k_cache/v_cache [batch, seqlen_cache, nheads_k,
    headdim], any strides. cache_seqlens: an int or int32/int64 [batch] (None: the whole cache). k, v [batch,
    seqlen_new, nheads_k, headdim], optional: written into the caches in place at positions cache_seqlens ..
    cache_seqlens + seqlen_new - 1 (the caches must have room: an index past the cache raises torch's index
    error), then attended to. cache_leftpad [batch]: row b's keys start there. causal is bottom-right aligned (query
    t sees keys up to seqlen_k - seqlen_q + t); with seqlen_q > 1 it must be True (the decode kernel is causal
    among the new tokens). num_splits: 0 picks the split of the key length; softmax_scale as flash_attn_func.
    Not served (UnsupportedInput): rotary_cos/rotary_sin (apply `apply_rotary` to q and k first), cache_batch_idx,
    block_table, a sliding window, softcap, alibi_slopes, return_softmax_lse=True. Returns [batch, seqlen_q,
    nheads, headdim].
    """
    name = "flash_attn_with_kvcache"
    _check_options(name, softcap, alibi_slopes, False, False, block_table)
    for arg, value, what in (("rotary_cos", rotary_cos, "rotate q and k with qwenvl_kernels.apply_rotary first"),
                             ("rotary_sin", rotary_sin, "rotate q and k with qwenvl_kernels.apply_rotary first"),
                             ("cache_batch_idx", cache_batch_idx, "index the caches (k_cache[idx]) first"),
                             ("return_softmax_lse", return_softmax_lse or None,
                              "the decode kernel keeps no lse; use flash_attn_func(return_attn_probs=True)")):
        if value is not None:
            raise UnsupportedInput(f"{name}: {arg} is not implemented; {what}")
    check_tensor(name, "k_cache", k_cache, 4, "[batch, seqlen_cache, heads_k, head_dim]")
    check_tensor(name, "q", q, 4, "[batch, seqlen_q, heads, head_dim]")
    B, S = k_cache.shape[:2]
    causal = _causal(name, causal, window_size, S)
    if not causal and q.shape[1] > 1:
        raise UnsupportedInput(f"{name}: causal=False with {q.shape[1]} query tokens is not implemented (the decode "
                               f"kernel is causal among the new tokens); pass causal=True or use flash_attn_func")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise UnsupportedInput(f"{name}: num_splits must be an int >= 0 (0: automatic), got {num_splits!r}")
    if cache_seqlens is None:
        if k is not None:
            raise UnsupportedInput(f"{name}: appending k/v needs cache_seqlens (where to write them)")
        cache_seqlens = S
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=k_cache.device)
    check_index(name, "cache_seqlens", cache_seqlens, (B,), q.device, hint=" (one per batch row)")
    if (k is None) != (v is None):
        raise UnsupportedInput(f"{name}: pass both k and v (the new keys and values), or neither")
    seqlens = cache_seqlens
    if k is not None:
        # validated as a cache of their own before anything is written
        check_decode(name, q, k, v, cache_seqlens, cache_leftpad)
        check_decode(name, q, k_cache, v_cache, cache_seqlens, cache_leftpad)
        if k.shape[2] != k_cache.shape[2] or k.dtype != k_cache.dtype:
            raise UnsupportedInput(f"{name}: k {tuple(k.shape)} {k.dtype} does not fit k_cache "
                                   f"{tuple(k_cache.shape)} {k_cache.dtype}: heads, head_dim and dtype must match")
        new = k.shape[1]
        rows = torch.arange(B, device=k_cache.device)[:, None]
        cols = cache_seqlens.to(torch.long)[:, None] + torch.arange(new, device=k_cache.device)
        k_cache[rows, cols] = k
        v_cache[rows, cols] = v
        seqlens = cache_seqlens + new
    return decode_attention(q, k_cache, v_cache, seqlens, cache_leftpad, softmax_scale,
                            num_splits=num_splits or None)
