"""Flash attention (FlashAttention-2 scheme) in Triton, forward and backward, for the ViT and the Qwen decoder.

Public functions:
- `flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False)`: the flash-attn 2 call.
- `attention(q, k, v, causal=False, softmax_scale=None, seq_start=None)`: what the model's backend calls; the
  semantics of `qwenvl_kernels.reference.attention` (adds left padding through `seq_start`).
- `flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
  softmax_scale=None, causal=False)`: packed sequences, the semantics of `reference.varlen_attention`.

All three share one set of kernels; features are `tl.constexpr` flags (CAUSAL, HAS_SEQ_START, VARLEN).

Algorithm. The forward keeps a running row max `m` and row sum `l` in fp32 (online softmax) with the scores in
log2 units (`qk_scale = softmax_scale * log2(e)`, so `exp2` is used throughout), and stores per query row only
`lse2 = m + log2(l)` (fp32, log2 units; -inf for a row that sees no key), never a seqlen_q x seqlen_k matrix.
The backward recomputes P = exp2(S * qk_scale - lse2) block by block:
  1. a preprocess kernel computes delta = rowsum(dO * O) in fp32;
  2. a dK/dV kernel: one program per (key block, batch, KV head) iterates over the query blocks of every query
     head that shares the KV head (grouped-query attention sums there, in registers) and writes dK, dV once;
  3. a dQ kernel: one program per (query block, batch, head) iterates over the key blocks and writes dQ once.
Two kernels rather than one dK/dV kernel that also adds into an fp32 dQ with `atomic_add`: the split recomputes
QK^T and dO V^T once more (7 block matmuls instead of 5, about 40% more backward FLOPs at equal efficiency), but
it is deterministic (atomics add in a different order every run), needs no fp32 dQ scratch buffer and final
cast, has no atomic contention on dQ rows (every key block of a row, times H/Hk for grouped-query attention),
and is safe to autotune (the autotuner reruns a kernel, and atomics would accumulate across its trials).

Masking is split per block: the key blocks that every row of a query block sees in full run a loop without the
causal and sequence-end masks (only the left-padding compare, when seq_start is given); only the blocks that
straddle the causal diagonal or the sequence end pay for the full masks.

The head dim is padded to BLOCK_D = next_power_of_2(D) (at least 16, the smallest `tl.dot` size) with a mask, so
head_dim 80 and 104 run in a 128-wide block.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .utils import UnsupportedInput, check_tensors, interpreting, next_power_of_2

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 128
# CUDA grid axis 1 is limited to 65535 programs
_MAX_GRID_Y = 65535

# Block sizes under the interpreter: small, and M != N so that tests exercise blocks that straddle the causal
# diagonal in both directions. Tests may change these (they are read at every launch).
INTERPRETER_BLOCKS = {"fwd": (32, 16), "dq": (32, 16), "dkdv": (16, 32), "pre": 32}
# Tests set this to fill every kernel-allocated buffer with NaN first, so an element a kernel skips cannot pass.
_POISON_OUTPUTS = False


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------
# Tile loads take `dmask` = offs_d < HEAD_DIM (the padded head-dim columns read as 0 and add 0 to every dot; with
# HEAD_DIM a multiple of 8 the mask is constant over 8-element runs, so loads stay vectorized); tiles that may
# cross a sequence end also mask rows. Loads and masks are written inline rather than through a helper: a nested
# jit call is free when compiled but costs milliseconds per call under the interpreter, and these run per block.

@triton.jit
def _seq_info(CU_Q, CU_K, SEQ_START, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr, HAS_SEQ_START: tl.constexpr):
    """For batch entry (or packed sequence) b: first row in memory and length of its queries and keys, and
    `first`, the first key it may see (left padding; clamped into [0, k_len])."""
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        k_len = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = 0
        q_len = seqlen_q
        k_start = 0
        k_len = seqlen_k
    if HAS_SEQ_START:
        first = tl.minimum(tl.maximum(tl.load(SEQ_START + b).to(tl.int32), 0), k_len)
    else:
        first = 0
    return q_start, q_len, k_start, k_len, first


@triton.jit
def _key_split(m_start, k_len, shift, first, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Split the keys that query rows [m_start, m_start + BLOCK_M) may see into [lo, mid), where every row of the
    block sees every key up to the left-padding mask, and [mid, hi), which needs the causal and sequence-end masks.
    lo and mid are multiples of BLOCK_N (or mid == hi). `shift` = k_len - q_len: causal is aligned to the
    bottom-right corner (row i sees keys j <= i + shift).
    The left-padding block is not given a loop of its own: one compare per score of [lo, mid) is cheaper than
    a third pipelined loop."""
    hi = k_len
    full_end = k_len
    if CAUSAL:
        hi = tl.minimum(k_len, tl.maximum(m_start + (BLOCK_M + shift), 0))
        full_end = tl.minimum(k_len, tl.maximum(m_start + (shift + 1), 0))
    lo = (first // BLOCK_N) * BLOCK_N
    mid = tl.maximum(tl.minimum((full_end // BLOCK_N) * BLOCK_N, hi), lo)
    return lo, mid, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_tile, v_tile, stride_kt, stride_vt, dmask,
               n_lo, n_hi, rows_shift, first, k_len, qk_scale, offs_n,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEQ_START: tl.constexpr,
               DOT_PREC: tl.constexpr):
    # counting blocks rather than `range(n_lo, n_hi, BLOCK_N)`: with a loop start that depends on a loaded value
    # (seq_start), ptxas serializes the sm_90 wgmma instructions of the pipelined loop
    for it in range(0, tl.cdiv(n_hi - n_lo, BLOCK_N)):
        start_n = tl.multiple_of(n_lo + it * BLOCK_N, BLOCK_N)
        n64 = start_n.to(tl.int64)
        k_ptrs = k_base + n64 * stride_kt + k_tile
        v_ptrs = v_base + n64 * stride_vt + v_tile
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols[:, None] < k_len) & dmask, other=0.0)
        else:
            k = tl.load(k_ptrs, mask=dmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            valid = cols[None, :] < k_len
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows_shift[:, None])
            if HAS_SEQ_START:
                valid = valid & (cols[None, :] >= first)
            s = tl.where(valid, s, float("-inf"))
        elif HAS_SEQ_START:
            # every row still sees a key of this block: the block holds `first` or lies past it
            s = tl.where(cols[None, :] >= first, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # a row with no visible key so far has m = -inf: exponentiate against 0 so that -inf - -inf never
            # makes a NaN; m itself stays -inf so that it is no false lower bound for later blocks
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=(cols[:, None] < k_len) & dmask, other=0.0)
        else:
            v = tl.load(v_ptrs, mask=dmask, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, SEQ_START, CU_Q, CU_K,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_heads, group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEQ_START: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        # the last query blocks see the most keys: launch them first so that the grid ends on short work
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    q_start, q_len, k_start, k_len, first = _seq_info(CU_Q, CU_K, SEQ_START, b, seqlen_q, seqlen_k,
                                                      VARLEN, HAS_SEQ_START)
    m_start = pid_m * BLOCK_M
    if m_start >= q_len:
        return
    shift = k_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < HEAD_DIM
    rows = m_start + offs_m
    row_mask = (rows[:, None] < q_len) & dmask
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // group).to(tl.int64)
    row0 = (q_start + m_start).to(tl.int64)
    k0 = (k_start + 0 * b).to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + row0 * stride_qt
                + (offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd), mask=row_mask, other=0.0)
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k0 * stride_kt
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k0 * stride_vt
    k_tile = offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_tile = offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    rows_shift = rows + shift

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, mid, hi = _key_split(m_start, k_len, shift, first, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_tile, v_tile, stride_kt, stride_vt, dmask,
                               lo, mid, rows_shift, first, k_len, qk_scale, offs_n,
                               BLOCK_N, False, CAUSAL, HAS_SEQ_START, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_tile, v_tile, stride_kt, stride_vt, dmask,
                               mid, hi, rows_shift, first, k_len, qk_scale, offs_n,
                               BLOCK_N, True, CAUSAL, HAS_SEQ_START, DOT_PREC)

    # a row that saw no key (above the diagonal when q_len > k_len, or every key padded) outputs 0, lse = -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    tl.store(O + b64 * stride_ob + h64 * stride_oh + row0 * stride_ot
             + (offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od),
             out.to(O.dtype.element_ty), mask=row_mask)
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + row0 + offs_m, lse, mask=rows < q_len)


@triton.jit(do_not_specialize=["seqlen_q"])
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_lb, stride_lh,
    seqlen_q, n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
    else:
        q_start = 0
        q_len = seqlen_q
    m_start = pid_m * BLOCK_M
    if m_start >= q_len:
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m_start + offs_m
    mask = (rows[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    row0 = (q_start + m_start).to(tl.int64)
    o = tl.load(O + b64 * stride_ob + h64 * stride_oh + row0 * stride_ot
                + (offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od), mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + row0 * stride_dot
                 + (offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod), mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + row0 + offs_m, delta, mask=rows < q_len)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, k_tile, v_tile, stride_kt, stride_vt, dmask,
              n_lo, n_hi, rows_shift, first, k_len, qk_scale, offs_n,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEQ_START: tl.constexpr,
              DOT_PREC: tl.constexpr):
    # counting blocks rather than `range(n_lo, n_hi, BLOCK_N)`: with a loop start that depends on a loaded value
    # (seq_start), ptxas serializes the sm_90 wgmma instructions of the pipelined loop
    for it in range(0, tl.cdiv(n_hi - n_lo, BLOCK_N)):
        start_n = tl.multiple_of(n_lo + it * BLOCK_N, BLOCK_N)
        n64 = start_n.to(tl.int64)
        k_ptrs = k_base + n64 * stride_kt + k_tile
        v_ptrs = v_base + n64 * stride_vt + v_tile
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols[:, None] < k_len) & dmask, other=0.0)
            v = tl.load(v_ptrs, mask=(cols[:, None] < k_len) & dmask, other=0.0)
        else:
            k = tl.load(k_ptrs, mask=dmask, other=0.0)
            v = tl.load(v_ptrs, mask=dmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            valid = cols[None, :] < k_len
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows_shift[:, None])
            if HAS_SEQ_START:
                valid = valid & (cols[None, :] >= first)
            p = tl.where(valid, p, 0.0)
        elif HAS_SEQ_START:
            p = tl.where(cols[None, :] >= first, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, SEQ_START, CU_Q, CU_K,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_heads, group, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEQ_START: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    q_start, q_len, k_start, k_len, first = _seq_info(CU_Q, CU_K, SEQ_START, b, seqlen_q, seqlen_k,
                                                      VARLEN, HAS_SEQ_START)
    m_start = pid_m * BLOCK_M
    if m_start >= q_len:
        return
    shift = k_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < HEAD_DIM
    rows = m_start + offs_m
    row_mask = (rows[:, None] < q_len) & dmask
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // group).to(tl.int64)
    row0 = (q_start + m_start).to(tl.int64)
    k0 = (k_start + 0 * b).to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + row0 * stride_qt
                + (offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd), mask=row_mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + row0 * stride_dot
                 + (offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod), mask=row_mask, other=0.0)
    l_ptrs = b64 * stride_lb + h64 * stride_lh + row0 + offs_m
    lse = tl.load(LSE + l_ptrs, mask=rows < q_len, other=0.0)
    # a row that sees no key has lse = -inf: +inf makes every exp2(s - lse) of that row 0 instead of NaN
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + l_ptrs, mask=rows < q_len, other=0.0)
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k0 * stride_kt
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k0 * stride_vt
    k_tile = offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_tile = offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    rows_shift = rows + shift

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, mid, hi = _key_split(m_start, k_len, shift, first, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, k_tile, v_tile, stride_kt, stride_vt, dmask,
                   lo, mid, rows_shift, first, k_len, qk_scale, offs_n,
                   BLOCK_N, False, CAUSAL, HAS_SEQ_START, DOT_PREC)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, k_tile, v_tile, stride_kt, stride_vt, dmask,
                   mid, hi, rows_shift, first, k_len, qk_scale, offs_n,
                   BLOCK_N, True, CAUSAL, HAS_SEQ_START, DOT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + row0 * stride_dqt
             + (offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd),
             dq.to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, l_ptrs, LSE, DELTA, q_tile, do_tile, stride_qt, stride_dot, dmask,
                m_lo, m_hi, col_ok, cols_shift, q_len, qk_scale, offs_m,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    # works on the transposed scores S^T [keys, queries], so that P^T and dS^T come out directly
    for it in range(0, tl.cdiv(m_hi - m_lo, BLOCK_M)):  # counting blocks: see _fwd_inner
        start_m = tl.multiple_of(m_lo + it * BLOCK_M, BLOCK_M)
        m64 = start_m.to(tl.int64)
        q_ptrs = q_base + m64 * stride_qt + q_tile
        do_ptrs = do_base + m64 * stride_dot + do_tile
        if MASKED:
            rows = start_m + offs_m
            q = tl.load(q_ptrs, mask=(rows[:, None] < q_len) & dmask, other=0.0)
            lse = tl.load(LSE + l_ptrs + m64, mask=rows < q_len, other=0.0)
        else:
            q = tl.load(q_ptrs, mask=dmask, other=0.0)
            lse = tl.load(LSE + l_ptrs + m64)
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            valid = (rows[None, :] < q_len) & col_ok
            if CAUSAL:
                valid = valid & (cols_shift[:, None] <= rows[None, :])
            p_t = tl.where(valid, p_t, 0.0)
            do = tl.load(do_ptrs, mask=(rows[:, None] < q_len) & dmask, other=0.0)
            delta = tl.load(DELTA + l_ptrs + m64, mask=rows < q_len, other=0.0)
        else:
            do = tl.load(do_ptrs, mask=dmask, other=0.0)
            delta = tl.load(DELTA + l_ptrs + m64)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, SEQ_START, CU_Q, CU_K,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_kv_heads, group, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEQ_START: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    q_start, q_len, k_start, k_len, first = _seq_info(CU_Q, CU_K, SEQ_START, b, seqlen_q, seqlen_k,
                                                      VARLEN, HAS_SEQ_START)
    n_start = pid_n * BLOCK_N
    if n_start >= k_len:
        return
    shift = k_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < HEAD_DIM
    cols = n_start + offs_n
    col_mask = (cols[:, None] < k_len) & dmask
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    col0 = (k_start + n_start).to(tl.int64)
    q0 = (q_start + 0 * b).to(tl.int64)
    k = tl.load(K + b64 * stride_kb + hk64 * stride_kh + col0 * stride_kt
                + (offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd), mask=col_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + hk64 * stride_vh + col0 * stride_vt
                + (offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd), mask=col_mask, other=0.0)
    col_ok = cols[:, None] < k_len
    if HAS_SEQ_START:
        col_ok = col_ok & (cols[:, None] >= first)
    cols_shift = cols - shift
    q_tile = offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    do_tile = offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod

    # The query blocks that see this key block: [m0, m1) masked, [m1, m2) no mask, [m2, m3) masked.
    m3 = q_len
    m0 = 0
    m1 = 0
    if CAUSAL:
        # row i sees key j iff j <= i + shift: the first block with a row that sees key n_start, and the first
        # block whose rows all see the whole key block
        m0 = (tl.maximum(n_start - shift, 0) // BLOCK_M) * BLOCK_M
        m1 = tl.cdiv(tl.maximum(n_start + (BLOCK_N - 1) - shift, 0), BLOCK_M) * BLOCK_M
    if HAS_SEQ_START:
        # a key block entirely in the left padding gets zero gradients: no query block to visit
        m3 = tl.where(n_start + BLOCK_N <= first, 0, m3)
        m0 = tl.minimum(m0, m3)
    m1 = tl.maximum(tl.minimum(m1, m3), m0)
    whole_block = n_start + BLOCK_N <= k_len
    if HAS_SEQ_START:
        whole_block = whole_block & (n_start >= first)
    m2 = tl.maximum(tl.where(whole_block, (m3 // BLOCK_M) * BLOCK_M, m1), m1)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # grouped-query attention: query heads hk * group ... hk * group + group - 1 share this KV head, their
    # contributions are summed here in registers
    for g in range(0, group):
        h64 = (hk * group + g).to(tl.int64)
        q_base = Q + b64 * stride_qb + h64 * stride_qh + q0 * stride_qt
        do_base = DO + b64 * stride_dob + h64 * stride_doh + q0 * stride_dot
        l_ptrs = b64 * stride_lb + h64 * stride_lh + q0 + offs_m
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, l_ptrs, LSE, DELTA, q_tile, do_tile,
                             stride_qt, stride_dot, dmask, m0, m1, col_ok, cols_shift, q_len, qk_scale, offs_m,
                             BLOCK_M, True, CAUSAL, DOT_PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, l_ptrs, LSE, DELTA, q_tile, do_tile,
                             stride_qt, stride_dot, dmask, m1, m2, col_ok, cols_shift, q_len, qk_scale, offs_m,
                             BLOCK_M, False, CAUSAL, DOT_PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, l_ptrs, LSE, DELTA, q_tile, do_tile,
                             stride_qt, stride_dot, dmask, m2, m3, col_ok, cols_shift, q_len, qk_scale, offs_m,
                             BLOCK_M, True, CAUSAL, DOT_PREC)
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + col0 * stride_dkt
             + (offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd),
             dk.to(DK.dtype.element_ty), mask=col_mask)
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + col0 * stride_dvt
             + (offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd),
             dv.to(DV.dtype.element_ty), mask=col_mask)


# --------------------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------------------

def _cfg(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# H100-minded candidates per kernel and head-dim bucket (BLOCK_D <= 64, BLOCK_D == 128) for 16-bit inputs. BLOCK_M
# is the query block, BLOCK_N the key block. The forward wants a tall query block (128) so that every K/V tile
# is reused by many rows, with a 64-wide key block at d=128 to keep the fp32 accumulator and P in registers; the
# dK/dV kernel holds two [BLOCK_N, BLOCK_D] fp32 accumulators plus K and V, hence wide key blocks, narrow query
# blocks and 8 warps there. Checked offline (Triton 3.9 AOT for sm_90, ptxas -v): all of them compile, use wgmma
# and cp.async pipelining, and spill at most ~50 bytes (d=128 dK/dV, fwd (128, 32)); none serializes its wgmma.
_CUDA_CONFIGS = {
    ("fwd", 64): [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3)],
    ("fwd", 128): [_cfg(128, 64, 8, 3), _cfg(128, 32, 4, 4), _cfg(64, 64, 4, 3)],
    ("dq", 64): [_cfg(128, 64, 8, 3), _cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3)],
    ("dq", 128): [_cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3), _cfg(64, 64, 8, 3)],
    ("dkdv", 64): [_cfg(32, 128, 8, 3), _cfg(64, 64, 8, 3), _cfg(32, 64, 4, 3)],
    ("dkdv", 128): [_cfg(32, 64, 8, 3), _cfg(16, 128, 8, 3), _cfg(32, 128, 8, 2)],
}
# On CUDA, 16-bit launches are autotuned over the list above once per key; with AUTOTUNE = False they take the
# first config of each list (no tuning time: short jobs, tests that only check numbers).
AUTOTUNE = True
# fp32 inputs are the exactness path, not a speed path: products in full fp32 ("ieee": FMA, no tensor cores; tf32
# would be ~1e-3 off the fp32 reference), which needs far more registers, so one small fixed config, not tuned
# (tuning would also compile every fp32 candidate, tens of seconds each).
_FP32_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
# structural sizes and features only, never a sequence length (that would retune at every new length); the
# autotuner adds the dtypes of the tensor arguments to the key itself
_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "HAS_SEQ_START", "VARLEN", "DOT_PREC"]
_KERNELS = {"fwd": _attn_fwd_kernel, "dq": _attn_bwd_dq_kernel, "dkdv": _attn_bwd_dkdv_kernel}


@functools.lru_cache(maxsize=None)
def _tuned_kernel(kind: str, bucket: int):
    return triton.autotune(configs=_CUDA_CONFIGS[(kind, bucket)], key=_TUNE_KEY)(_KERNELS[kind])


def _launch(kind, n_rows, n_bh, args, consts):
    """Launch kernel `kind` over (blocks of n_rows, n_bh). The row blocks are query blocks (BLOCK_M) for the
    forward and dQ kernels, key blocks (BLOCK_N) for dK/dV."""
    row_block = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    bucket = 64 if consts["BLOCK_D"] <= 64 else 128
    fixed = None
    if interpreting():  # the autotuner needs a GPU driver
        fixed = dict(zip(("BLOCK_M", "BLOCK_N"), INTERPRETER_BLOCKS[kind]))
    elif consts["DOT_PREC"] == "ieee":
        fixed = dict(_FP32_CONFIG)
    elif not AUTOTUNE:
        cfg = _CUDA_CONFIGS[(kind, bucket)][0]
        fixed = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if fixed is not None:
        _KERNELS[kind][(triton.cdiv(n_rows, fixed[row_block]), n_bh)](*args, **consts, **fixed)
        return
    grid = lambda meta: (triton.cdiv(n_rows, meta[row_block]), n_bh)  # noqa: E731
    _tuned_kernel(kind, bucket)[grid](*args, **consts)


def _launch_preprocess(n_rows, n_bh, args, consts):
    block_m = INTERPRETER_BLOCKS["pre"] if interpreting() else 64
    _attn_bwd_preprocess_kernel[(triton.cdiv(n_rows, block_m), n_bh)](*args, **consts, BLOCK_M=block_m,
                                                                       num_warps=4)


def _strides4(t, varlen):
    # varlen tensors are [1, total, heads, dim] views: batch entries are found through cu_seqlens, not a stride
    s = t.stride()
    return (0 if varlen else s[0], s[1], s[2], s[3])


def _new(shape, like, dtype=None):
    t = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    return t.fill_(float("nan")) if _POISON_OUTPUTS else t


# --------------------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------------------

class _FlashAttention(torch.autograd.Function):
    """q [B, Tq, H, D], k/v [B, Tk, Hk, D] (varlen: B = 1 view of the packed tensors, sequences from cu_seqlens).
    Inputs are already validated, and have a unit stride in the head dim."""

    @staticmethod
    def forward(ctx, q, k, v, seq_start, cu_q, cu_k, n_seq, max_q, max_k, scale, causal):
        varlen = cu_q is not None
        _, _, H, D = q.shape
        Hk = k.shape[2]
        block_d = max(16, next_power_of_2(D))
        o = _new(q.shape, q)
        if varlen:
            lse = _new((H, q.shape[1]), q, torch.float32)
            stride_l = (0, lse.stride(0))
        else:
            lse = _new((n_seq, H, max_q), q, torch.float32)
            stride_l = (lse.stride(0), lse.stride(1))
        consts = _consts(D, block_d, causal, seq_start is not None, varlen, q.dtype)
        if o.numel() > 0:
            dummy = q
            args = (q, k, v, o, lse, seq_start if seq_start is not None else dummy,
                    cu_q if varlen else dummy, cu_k if varlen else dummy,
                    *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(o, varlen),
                    *stride_l, max_q, max_k, H, H // Hk, scale * _LOG2E)
            _launch("fwd", max_q, n_seq * H, args, consts)
        ctx.save_for_backward(q, k, v, o, lse, seq_start, cu_q, cu_k)
        ctx.meta = (n_seq, max_q, max_k, scale, causal, stride_l, consts)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, seq_start, cu_q, cu_k = ctx.saved_tensors
        n_seq, max_q, max_k, scale, causal, stride_l, consts = ctx.meta
        varlen = cu_q is not None
        H, Hk = q.shape[2], k.shape[2]
        if do.stride(-1) != 1:
            do = do.contiguous()  # a copy: the incoming gradient is never written
        need_dq, need_dk, need_dv = ctx.needs_input_grad[:3]
        dq = _new(q.shape, q) if need_dq else None
        dk = _new(k.shape, k) if (need_dk or need_dv) else None
        dv = _new(v.shape, v) if (need_dk or need_dv) else None
        if q.numel() == 0 or k.numel() == 0:
            dk, dv = (dk if need_dk else None), (dv if need_dv else None)
            return (_zero_or_none(dq), _zero_or_none(dk), _zero_or_none(dv)) + (None,) * 8
        delta = torch.empty_like(lse)
        if _POISON_OUTPUTS:
            delta.fill_(float("nan"))
        dummy = q
        ss = seq_start if seq_start is not None else dummy
        cq = cu_q if varlen else dummy
        ck = cu_k if varlen else dummy
        _launch_preprocess(max_q, n_seq * H,
                           (o, do, delta, cq, *_strides4(o, varlen), *_strides4(do, varlen), *stride_l, max_q, H),
                           {"HEAD_DIM": consts["HEAD_DIM"], "BLOCK_D": consts["BLOCK_D"], "VARLEN": varlen})
        common = (*_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(do, varlen))
        if dq is not None:
            args = (q, k, v, do, dq, lse, delta, ss, cq, ck, *common, *_strides4(dq, varlen), *stride_l,
                    max_q, max_k, H, H // Hk, scale * _LOG2E, scale)
            _launch("dq", max_q, n_seq * H, args, consts)
        if dk is not None:
            args = (q, k, v, do, dk, dv, lse, delta, ss, cq, ck, *common, *_strides4(dk, varlen),
                    *_strides4(dv, varlen), *stride_l, max_q, max_k, Hk, H // Hk, scale * _LOG2E, scale)
            _launch("dkdv", max_k, n_seq * Hk, args, consts)
        return (dq, dk if need_dk else None, dv if need_dv else None) + (None,) * 8


def _zero_or_none(t):
    return None if t is None else t.zero_()


def _consts(head_dim, block_d, causal, has_seq_start, varlen, dtype):
    # 16-bit inputs ignore DOT_PREC; for fp32 see _FP32_CONFIG
    return {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "CAUSAL": bool(causal), "HAS_SEQ_START": has_seq_start,
            "VARLEN": varlen, "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32"}


# --------------------------------------------------------------------------------------------------------------
# Validation and public functions
# --------------------------------------------------------------------------------------------------------------

def _check_common(name, q, k, v, rank, layout, dropout_p, softmax_scale):
    for t, tn in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor):
            raise UnsupportedInput(f"{name}: {tn} must be a tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise UnsupportedInput(f"{name}: {tn} must have {rank} dims {layout}, got shape {tuple(t.shape)}")
    check_tensors(name, q, k, v)
    if dropout_p != 0.0:
        raise UnsupportedInput(f"{name}: dropout_p={dropout_p} is not implemented (Qwen-VL trains without "
                               f"attention dropout); pass dropout_p=0.0 or use kernels='torch'")
    if k.shape != v.shape:
        raise UnsupportedInput(f"{name}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    D = q.shape[-1]
    if k.shape[-1] != D:
        raise UnsupportedInput(f"{name}: q and k must have the same head_dim, got {D} and {k.shape[-1]}")
    if D > _MAX_HEAD_DIM or D % 8 != 0 or D == 0:
        raise UnsupportedInput(f"{name}: head_dim {D} is not supported: it must be a multiple of 8 and at most "
                               f"{_MAX_HEAD_DIM}; pad the head dim or use kernels='torch'")
    H, Hk = q.shape[-2], k.shape[-2]
    if Hk == 0 or H % Hk != 0:
        raise UnsupportedInput(f"{name}: the number of query heads ({H}) must be a multiple of the number of "
                               f"key/value heads ({Hk})")
    if softmax_scale is None:
        return 1.0 / math.sqrt(D)
    try:
        return float(softmax_scale)
    except (TypeError, ValueError):
        raise UnsupportedInput(f"{name}: softmax_scale must be a number or None, got {softmax_scale!r}") from None


def _unit_last_stride(t):
    # any strides work, but a strided head dim would make every tile load a gather: copy such inputs once
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_grid(name, n_bh):
    if n_bh > _MAX_GRID_Y:
        raise UnsupportedInput(f"{name}: batch x heads = {n_bh} exceeds the {_MAX_GRID_Y} programs a CUDA grid "
                               f"axis allows; split the batch")


def _attention(name, q, k, v, causal, softmax_scale, seq_start, dropout_p=0.0):
    scale = _check_common(name, q, k, v, 4, "[batch, seqlen, heads, head_dim]", dropout_p, softmax_scale)
    B, Tq, H, D = q.shape
    if k.shape[0] != B:
        raise UnsupportedInput(f"{name}: q and k/v have different batch sizes ({B} and {k.shape[0]})")
    if seq_start is not None:
        if not isinstance(seq_start, torch.Tensor) or seq_start.dtype not in (torch.int32, torch.int64):
            raise UnsupportedInput(f"{name}: seq_start must be an int32 or int64 tensor [batch], got "
                                   f"{getattr(seq_start, 'dtype', type(seq_start).__name__)}")
        if seq_start.shape != (B,):
            raise UnsupportedInput(f"{name}: seq_start must have shape [batch] = [{B}], got {tuple(seq_start.shape)}")
        seq_start = seq_start.to(device=q.device).contiguous()
    _check_grid(name, B * H)
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    return _FlashAttention.apply(q, k, v, seq_start, None, None, B, Tq, k.shape[1], scale, bool(causal))


def attention(q, k, v, causal=False, softmax_scale=None, seq_start=None):
    """Softmax attention with flash-attn 2 layout and semantics (`reference.attention`).

    q: [batch, seqlen_q, nheads, headdim]; k, v: [batch, seqlen_k, nheads_k, headdim]; one dtype among float16,
    bfloat16, float32, on one CUDA device (or the CPU under TRITON_INTERPRET=1). nheads must be a multiple of
    nheads_k (grouped-query attention), headdim a multiple of 8 and at most 128. Any strides.
    causal: query i sees keys j <= i + seqlen_k - seqlen_q (aligned to the bottom-right corner).
    softmax_scale: defaults to 1 / sqrt(headdim).
    seq_start: optional int32/int64 tensor [batch]: keys j < seq_start[b] are masked for batch entry b (left
    padding). A query row that sees no key outputs zeros and gets zero gradients.
    Returns [batch, seqlen_q, nheads, headdim] in q's dtype; differentiable in q, k and v.
    """
    return _attention("attention", q, k, v, causal, softmax_scale, seq_start)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash-attn 2 `flash_attn_func`: q [batch, seqlen_q, nheads, headdim], k/v [batch, seqlen_k, nheads_k,
    headdim], float16/bfloat16/float32; headdim a multiple of 8, at most 128; nheads a multiple of nheads_k.
    causal aligns to the bottom-right corner when seqlen_q != seqlen_k (a row that sees no key outputs zeros).
    dropout_p must be 0.0 (dropout is not implemented). Returns [batch, seqlen_q, nheads, headdim]."""
    return _attention("flash_attn_func", q, k, v, causal, softmax_scale, None, dropout_p)


def _check_cu(name, cu, which, total, max_seqlen, device):
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32:
        raise UnsupportedInput(f"{name}: {which} must be an int32 tensor, got "
                               f"{getattr(cu, 'dtype', type(cu).__name__)}; use .to(torch.int32)")
    if cu.dim() != 1 or cu.numel() < 1:
        raise UnsupportedInput(f"{name}: {which} must be 1-D [num_seqs + 1], got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise UnsupportedInput(f"{name}: {which} is on {cu.device} but q is on {device}; move it to {device}")
    vals = cu.cpu()  # one small host copy: the checks below would otherwise be silent out-of-bounds reads
    if int(vals[0]) != 0:
        raise UnsupportedInput(f"{name}: {which} must start at 0, got {int(vals[0])}")
    lens = vals[1:] - vals[:-1]
    if (lens < 0).any():
        raise UnsupportedInput(f"{name}: {which} must be non-decreasing (cumulative sequence lengths)")
    if int(vals[-1]) != total:
        raise UnsupportedInput(f"{name}: {which}[-1] = {int(vals[-1])} must equal the number of packed tokens "
                               f"{total}")
    longest = int(lens.max()) if lens.numel() else 0
    if max_seqlen is None:
        return cu.contiguous(), longest
    max_seqlen = int(max_seqlen)
    if max_seqlen < longest:
        raise UnsupportedInput(f"{name}: max_seqlen for {which} is {max_seqlen} but a sequence has {longest} tokens")
    return cu.contiguous(), max_seqlen


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False):
    """flash-attn 2 `flash_attn_varlen_func` (`reference.varlen_attention`): packed sequences that attend only to
    themselves. q [total_q, nheads, headdim], k/v [total_k, nheads_k, headdim] (dtypes, head dims and heads as in
    `flash_attn_func`); cu_seqlens_q/k int32 [num_seqs + 1], non-decreasing from 0 to total_q / total_k;
    max_seqlen_q/k: the longest sequence lengths (None: read from cu_seqlens, which is checked on the host anyway).
    Causal is bottom-right aligned per sequence; a query of a sequence with no key outputs zeros.
    Returns [total_q, nheads, headdim]; differentiable in q, k and v."""
    name = "flash_attn_varlen_func"
    scale = _check_common(name, q, k, v, 3, "[total_tokens, heads, head_dim]", dropout_p, softmax_scale)
    cu_q, max_q = _check_cu(name, cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, q.device)
    cu_k, max_k = _check_cu(name, cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, q.device)
    if cu_q.numel() != cu_k.numel():
        raise UnsupportedInput(f"{name}: cu_seqlens_q and cu_seqlens_k describe different numbers of sequences "
                               f"({cu_q.numel() - 1} and {cu_k.numel() - 1})")
    n = cu_q.numel() - 1
    H = q.shape[1]
    _check_grid(name, n * H)
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    o = _FlashAttention.apply(q[None], k[None], v[None], None, cu_q, cu_k, n, max_q, max_k, scale, bool(causal))
    return o[0]


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                     softmax_scale=None):
    """The backend's packed-sequence call, with `reference.varlen_attention`'s signature (no dropout argument)."""
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  softmax_scale=softmax_scale, causal=causal)
