"""Flash attention (FlashAttention-2 scheme) in Triton, forward and backward, for the ViT and the Qwen decoder:
the kernels. Their launch configurations (CONFIGS), custom ops and autograd live in `flash_attention.py`, which
serves `attention` (the backend's call: `reference.attention`, with left padding through `seq_start`) and
`varlen_attention` (packed sequences); `flash_attn_interface.py` gives flash-attn 2's call signatures over them.

Every call runs this one set of kernels; features are `tl.constexpr` flags (CAUSAL, HAS_SEQ_START, VARLEN).

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

import triton
import triton.language as tl


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
