"""Flash-decoding: attention of a few new tokens against a KV cache, for generation (inference only).

Same semantics as `qwenvl_kernels.reference.decode_attention`.

Phase 1 (`_decode_partial_kernel`): one program per (batch row, KV head, block of query rows, key split). The query
rows of a program are all the queries that share its KV head, `group * Tq` of them (row r is token r // group of
query head hk * group + r % group), so every K/V block is loaded once for the whole group. With at least
`_DOT_MIN_ROWS` rows the scores and the value sum go through `tl.dot`; with fewer (the common group = 1, Tq = 1
case) a dot would be mostly padding, so they are an elementwise product and a sum. Each program keeps an online
softmax (running max, running sum, unnormalized accumulator) in fp32 over its share of the row's key blocks.
When the key length is split over several programs (small B * Hk: not enough programs to fill the GPU), they write
their partial (max, sum, acc) to fp32 scratch and phase 2 (`_decode_combine_kernel`) merges them; with one split
phase 1 normalizes and writes the output itself.

Lengths stay on the device: the kernels read cache_seqlens / cache_starts themselves, so a call never syncs with
the host. The number of splits is therefore chosen from the cache capacity S, an upper bound of the key length;
splits that get no key block exit after writing an empty partial.

Registered as the custom op `qwenvl::decode_attention` (with its fake implementation; no autograd: inference only).

CONFIGS: "partial/fma" and "partial/dot" (phase 1 on its elementwise and its tl.dot path: candidates over num_warps
and num_stages, keyed on the structural constexprs; every candidate a distinct program, which the static gate of
bench/compile_check.py checks) and "combine" (phase 2, fixed). `launch_constexprs(tq, group, head_dim, dtype)` gives phase 1's constexprs but
HAS_STARTS and SPLIT (whether cache_starts is given, whether the key length is split); phase 2's are HEAD_DIM,
BLOCK_D and BLOCK_S = next_power_of_2(num_splits).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..launch import (LOG2E, Launcher, UnsupportedInput, block_d, check_device, check_head_dim, check_index,
                      check_tensors, dot_precision, empty, next_power_of_2, num_programs_hint, softmax_scale_of)

MAX_NEW_TOKENS = 16
# a tl.dot tile needs at least 16 rows; below that the rows would be mostly padding
_DOT_MIN_ROWS = 16
# query rows per program on the tl.dot path (more rows are spread over the grid)
_MAX_BLOCK_M = 64
# keys per split below which splitting the key length costs more (scratch traffic, phase 2) than it gains
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 64

CONFIGS = {
    # the elementwise path is not software-pipelined (no tl.dot): num_stages changes nothing, only the warps
    "partial/fma": [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 2, 8)],
    # wgmma: one warpgroup on the 64-row block, pipelined K/V loads
    "partial/dot": [triton.Config({}, num_warps=4, num_stages=s) for s in (3, 2)],
    "combine": [triton.Config({}, num_warps=4)],
}


def launch_constexprs(tq: int, group: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Phase 1's constexprs for tq new tokens, `group` query heads per KV head (all but HAS_STARTS and SPLIT)."""
    rows = group * tq
    use_dot = rows >= _DOT_MIN_ROWS
    bd = block_d(head_dim)
    if use_dot:
        # wgmma takes 64 rows per warpgroup: fewer rows would fall back to mma.sync. Decoding is memory-bound, the
        # padded rows cost tensor-core time only
        bm, bn = _MAX_BLOCK_M, 64
    else:
        bm = next_power_of_2(rows)
        # the elementwise path materializes a [BLOCK_M, BLOCK_N, BLOCK_D] product: bound its size
        bn = max(16, min(64, 8192 // (bm * bd)))
    return dict(TQ=tq, GROUP=group, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, USE_DOT=use_dot,
                DOT_PRECISION=dot_precision(dtype))


@triton.jit
def _decode_partial_kernel(
    Q, K, V, Out, MidAcc, MidM, MidL, SeqLens, Starts,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_len, stride_start,
    S, Hk, n_mblocks, num_splits, qk_scale,
    TQ: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr, SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    mblock = pid % n_mblocks
    bh = pid // n_mblocks
    hk = (bh % Hk).to(tl.int64)
    b = (bh // Hk).to(tl.int64)

    # the key range of this batch row, clamped to the cache as slicing k_cache[b, start:len] would clamp it
    seqlen = tl.minimum(tl.load(SeqLens + b * stride_len).to(tl.int32), S)
    if HAS_STARTS:
        start = tl.maximum(tl.load(Starts + b * stride_start).to(tl.int32), 0)
    else:
        start = 0
    n_keys = tl.maximum(seqlen - start, 0)
    # whole key blocks per split, so that splits never share a block
    n_blocks = tl.cdiv(n_keys, BLOCK_N)
    blocks_per_split = tl.cdiv(n_blocks, num_splits)
    blk_lo = split * blocks_per_split
    blk_hi = tl.minimum(blk_lo + blocks_per_split, n_blocks)

    rows = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < TQ * GROUP
    t = rows // GROUP
    head = hk * GROUP + (rows % GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # causal among the new tokens: token t sits at position seqlen - TQ + t and sees keys up to it; padding rows
    # (t >= TQ) are cut at seqlen by the key mask below
    key_end = seqlen - TQ + 1 + t

    q_ptrs = (Q + b * stride_qb + t[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if not USE_DOT:
        # the scale (log2 units) folded into the fp32 query once, not into every score
        q = q.to(tl.float32) * qk_scale

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + b * stride_kb + hk * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + hk * stride_vh + offs_d[None, :] * stride_vd
    for blk in range(blk_lo, blk_hi):
        offs_n = start + blk * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen
        kv_mask = n_ok[:, None] & d_ok[None, :]
        offs_n64 = offs_n.to(tl.int64)
        k = tl.load(k_base + offs_n64[:, None] * stride_kn, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n64[:, None] * stride_vn, mask=kv_mask, other=0.0)
        if USE_DOT:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        else:
            qk = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        # scores in the log2 domain (exp2 is the cheap exponential). The elementwise path has the scale in q; the
        # tl.dot path applies it to the row max and inside exp2's FFMA (scale > 0), not to every score first
        allowed = (offs_n[None, :] < key_end[:, None]) & n_ok[None, :]
        qk = tl.where(allowed, qk, float("-inf"))
        if USE_DOT:
            m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        # a row that has seen no allowed key yet keeps max -inf; subtracting 0 instead keeps exp2 free of NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        if USE_DOT:
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        else:
            p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            # the accumulator goes into the product: defined by wgmma only, never serialized
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m_i = m_new

    if SPLIT:
        # scratch laid out [B, TQ, H, num_splits, (HEAD_DIM)], contiguous
        H = Hk * GROUP
        mid_row = ((b * TQ + t) * H + head) * num_splits + split
        tl.store(MidM + mid_row, m_i, mask=row_ok)
        tl.store(MidL + mid_row, l_i, mask=row_ok)
        tl.store(MidAcc + mid_row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    else:
        # a row with no visible key has l = 0 and acc = 0: dividing by 1 gives the zeros the reference gives
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_ptrs = (Out + b * stride_ob + t[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh
                  + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_combine_kernel(
    Out, MidAcc, MidM, MidL,
    stride_ob, stride_ot, stride_oh, stride_od,
    TQ, H, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b * TQ + t) * H + h
    h = row % H
    t = (row // H) % TQ
    b = row // (H * TQ)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < HEAD_DIM
    base = row * num_splits
    # an absent split reads as an empty partial (max -inf, sum 0, acc 0)
    m = tl.load(MidM + base + offs_s, mask=s_ok, other=float("-inf"))
    l = tl.load(MidL + base + offs_s, mask=s_ok, other=0.0)
    acc = tl.load(MidAcc + (base + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    m_max = tl.max(m, axis=0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_use)
    l_sum = tl.sum(w * l, axis=0)
    o = tl.sum(w[:, None] * acc, axis=0)
    o = o / tl.where(l_sum > 0.0, l_sum, 1.0)
    o_ptrs = Out + b * stride_ob + t * stride_ot + h * stride_oh + offs_d * stride_od
    tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=d_ok)


_launch_partial = Launcher(_decode_partial_kernel, CONFIGS,
                           key=["HEAD_DIM", "GROUP", "TQ", "BLOCK_M", "BLOCK_N", "USE_DOT", "SPLIT"])
_launch_combine = Launcher(_decode_combine_kernel, CONFIGS, key=[])


def _choose_num_splits(programs: int, capacity: int, device: torch.device) -> int:
    """Enough key splits to give the device about two waves of programs, but at least _MIN_KEYS_PER_SPLIT keys
    (of the cache capacity, the host's only bound on the key length) per split."""
    sms = num_programs_hint(device)
    if programs >= sms:
        return 1
    want = triton.cdiv(2 * sms, programs)
    by_length = triton.cdiv(max(capacity, 1), _MIN_KEYS_PER_SPLIT)
    return max(1, min(want, by_length, _MAX_SPLITS))


@torch.library.custom_op("qwenvl::decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
               cache_starts: Optional[torch.Tensor], softmax_scale: float, num_splits: int) -> torch.Tensor:
    """num_splits 0: chosen from the grid and the cache capacity."""
    B, Tq, H, D = q.shape
    S, Hk = k_cache.shape[1], k_cache.shape[2]
    out = empty((B, Tq, H, D), q.dtype, q.device)
    if out.numel() == 0:
        return out
    group = H // Hk
    consts = launch_constexprs(Tq, group, D, q.dtype)
    n_mblocks = triton.cdiv(group * Tq, consts["BLOCK_M"])
    programs = B * Hk * n_mblocks
    splits = num_splits or _choose_num_splits(programs, S, q.device)
    split = splits > 1

    if split:
        mid_m = empty((B, Tq, H, splits), torch.float32, q.device)
        mid_l = empty((B, Tq, H, splits), torch.float32, q.device)
        mid_acc = empty((B, Tq, H, splits, D), torch.float32, q.device)
    else:
        mid_m = mid_l = mid_acc = out  # unused: SPLIT is off
    starts = cache_starts if cache_starts is not None else cache_seqlens  # unused when HAS_STARTS is off

    _launch_partial(
        "partial/dot" if consts["USE_DOT"] else "partial/fma", (programs, splits), q, k_cache, v_cache, out, mid_acc, mid_m, mid_l, cache_seqlens, starts,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        cache_seqlens.stride(0), starts.stride(0),
        S, Hk, n_mblocks, splits, softmax_scale * LOG2E,
        **consts, HAS_STARTS=cache_starts is not None, SPLIT=split,
    )
    if split:
        _launch_combine("combine", (B * Tq * H,), out, mid_acc, mid_m, mid_l, *out.stride(), Tq, H, splits,
                        HEAD_DIM=D, BLOCK_S=next_power_of_2(splits), BLOCK_D=consts["BLOCK_D"])
    return out


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cache_starts, softmax_scale, num_splits):
    return q.new_empty(q.shape)


def check_decode(name, q, k_cache, v_cache, cache_seqlens, cache_starts) -> None:
    """What the decode kernel serves (shared with flash_attn_with_kvcache)."""
    for what, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise UnsupportedInput(f"{name}: {what} must be a 4-d tensor "
                                   f"({'[B, Tq, H, D]' if what == 'q' else '[B, S, Hk, D]'}), got {shape}")
    check_tensors(name, q, k_cache, v_cache)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise UnsupportedInput(f"{name} is inference-only (no backward); call it under torch.no_grad() "
                               "or torch.inference_mode(), or use the torch reference for gradients")
    B, Tq, H, D = q.shape
    Bk, S, Hk, Dk = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise UnsupportedInput(f"{name}: v_cache shape {tuple(v_cache.shape)} differs from k_cache "
                               f"shape {tuple(k_cache.shape)}; they must match")
    if Bk != B or Dk != D:
        raise UnsupportedInput(f"{name}: k_cache {tuple(k_cache.shape)} does not fit q {tuple(q.shape)}: "
                               f"batch and head_dim must match ([B, S, Hk, D] against [B, Tq, H, D])")
    if Hk == 0 or H % Hk != 0:
        raise UnsupportedInput(f"{name}: {H} query heads are not a multiple of {Hk} KV heads")
    check_head_dim(name, D)
    if Tq > MAX_NEW_TOKENS:
        raise UnsupportedInput(f"{name}: {Tq} new tokens per call is more than {MAX_NEW_TOKENS}; "
                               f"use the prefill attention (flash_attn_func) for longer chunks")
    check_index(name, "cache_seqlens", cache_seqlens, (B,), q.device, hint=" (one per batch row)")
    if cache_starts is not None:
        check_index(name, "cache_starts", cache_starts, (B,), q.device, hint=" (one per batch row)")
    check_device(name, q)


def decode_attention(q, k_cache, v_cache, cache_seqlens, cache_starts=None, softmax_scale=None, *, num_splits=None):
    """Attention of a few new tokens against a KV cache (generation), flash-decoding style. Inference only.

    q: `[B, Tq, H, D]`, 1 <= Tq <= 16, the new tokens, already written to the cache at positions
       `cache_seqlens[b] - Tq .. cache_seqlens[b] - 1`. Any strides.
    k_cache, v_cache: `[B, S, Hk, D]`, S (capacity) >= max(cache_seqlens), H divisible by Hk (grouped-query);
       any strides (e.g. a slice of a larger cache).
    cache_seqlens: int32 or int64 `[B]` on q's device: row b's valid length (clamped to S, as slicing would).
    cache_starts: optional int32 or int64 `[B]`: left padding, row b sees keys `cache_starts[b] <= j <
       cache_seqlens[b]`; default 0.
    softmax_scale: default 1 / sqrt(D).
    num_splits: keyword-only override of the number of key splits (testing and tuning); default chosen from B,
       Hk, S and the device's SM count.
    q, k_cache, v_cache: one dtype of fp16, bf16, fp32 (no bf16 under the interpreter); D a multiple of 8, <= 128.
    Causal among the new tokens: token t sees keys j <= cache_seqlens[b] - Tq + t. A query that sees no key
    gets zeros. Returns `[B, Tq, H, D]` in q's dtype. Never syncs with the host.
    """
    name = "decode_attention"
    check_decode(name, q, k_cache, v_cache, cache_seqlens, cache_starts)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise UnsupportedInput(f"{name}: num_splits must be a positive int, got {num_splits!r}")
    scale = softmax_scale_of(name, softmax_scale, q.shape[-1])
    return torch.ops.qwenvl.decode_attention(q, k_cache, v_cache, cache_seqlens, cache_starts, scale,
                                             num_splits or 0)
