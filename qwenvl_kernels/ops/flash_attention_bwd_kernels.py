"""Flash attention's backward kernels: delta = rowsum(dO * O), then dQ, then dK/dV (the algorithm, the head-dim
column blocks and the stride assumptions are described in `flash_attention_kernels.py`, whose helpers these share).
Their launch configurations and autograd live in `flash_attention.py`."""
from __future__ import annotations

import triton
import triton.language as tl

from .flash_attention_kernels import (_head_cols, _key_split, _load_blocks, _mult8, _query_block, _seq_info,
                                      _store_blocks, _zero_blocks)


@triton.jit(do_not_specialize=["seqlen_q"])
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_lb, stride_lh,
    seqlen_q, n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, ROW_STRIDE8: tl.constexpr,
    BLOCK_M: tl.constexpr,
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
    if ROW_STRIDE8:  # a row stride that is not a multiple of 16 (see _mult8)
        stride_ot = _mult8(stride_ot)
        stride_dot = _mult8(stride_dot)
    o = tl.load(O + b64 * _mult8(stride_ob) + h64 * _mult8(stride_oh) + row0 * stride_ot
                + (offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od), mask=mask, other=0.0)
    do = tl.load(DO + b64 * _mult8(stride_dob) + h64 * _mult8(stride_doh) + row0 * stride_dot
                 + (offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod), mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + row0 + offs_m, delta, mask=rows < q_len)


@triton.jit
def _dq_inner(dq0, dq1, dq2, q0, q1, q2, do0, do1, do2, lse, delta, k_base, v_base, stride_kt, stride_kd,
              stride_vt, stride_vd, d0, dm0, d1, dm1, d2, dm2, n_lo, n_hi, rows_shift, first, k_len, qk_scale,
              offs_n, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_SEQ_START: tl.constexpr, DOT_PREC: tl.constexpr):
    k_tile = offs_n[:, None] * stride_kt
    v_tile = offs_n[:, None] * stride_vt
    for it in range(0, tl.cdiv(n_hi - n_lo, BLOCK_N)):  # counting blocks: see _fwd_inner
        start_n = tl.multiple_of(n_lo + it * BLOCK_N, BLOCK_N)
        n64 = start_n.to(tl.int64)
        k_blk = k_base + n64 * stride_kt + k_tile
        v_blk = v_base + n64 * stride_vt + v_tile
        cols = start_n + offs_n
        rmask = cols[:, None] < k_len
        k0 = tl.load(k_blk + d0[None, :] * stride_kd, mask=(rmask & dm0) if MASKED else dm0, other=0.0)
        v0 = tl.load(v_blk + d0[None, :] * stride_vd, mask=(rmask & dm0) if MASKED else dm0, other=0.0)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            k1 = tl.load(k_blk + d1[None, :] * stride_kd, mask=(rmask & dm1) if MASKED else dm1, other=0.0)
            v1 = tl.load(v_blk + d1[None, :] * stride_vd, mask=(rmask & dm1) if MASKED else dm1, other=0.0)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PREC)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PREC)
        if BLOCK_D2 > 0:
            k2 = tl.load(k_blk + d2[None, :] * stride_kd, mask=(rmask & dm2) if MASKED else dm2, other=0.0)
            v2 = tl.load(v_blk + d2[None, :] * stride_vd, mask=(rmask & dm2) if MASKED else dm2, other=0.0)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
            dp = tl.dot(do2, tl.trans(v2), dp, input_precision=DOT_PREC)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            valid = cols[None, :] < k_len
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows_shift[:, None])
            if HAS_SEQ_START:
                valid = valid & (cols[None, :] >= first)
            p = tl.where(valid, p, 0.0)
        elif HAS_SEQ_START:
            p = tl.where(cols[None, :] >= first, p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k0.dtype)
        dq0 = tl.dot(ds, k0, dq0, input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
        if BLOCK_D2 > 0:
            dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PREC)
    return dq0, dq1, dq2


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
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEQ_START: tl.constexpr, VARLEN: tl.constexpr, ROW_STRIDE8: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    q_len, k_len, first, m_start, shift, b64, h64, hk64, row0, k0 = _query_block(
        CU_Q, CU_K, SEQ_START, seqlen_q, seqlen_k, n_heads, group, VARLEN, HAS_SEQ_START, CAUSAL, BLOCK_M)
    if m_start >= q_len:
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0, dm0, d1, dm1, d2, dm2 = _head_cols(BLOCK_D, BLOCK_D1, BLOCK_D2, HEAD_DIM)
    rows = m_start + offs_m
    row_ok = rows[:, None] < q_len
    if ROW_STRIDE8:  # a row stride that is not a multiple of 16 (see _mult8)
        stride_qt = _mult8(stride_qt)
        stride_kt = _mult8(stride_kt)
        stride_vt = _mult8(stride_vt)
        stride_dot = _mult8(stride_dot)
        stride_dqt = _mult8(stride_dqt)
    q_rows = (Q + b64 * _mult8(stride_qb) + h64 * _mult8(stride_qh) + row0 * stride_qt
              + offs_m[:, None] * stride_qt)
    do_rows = (DO + b64 * _mult8(stride_dob) + h64 * _mult8(stride_doh) + row0 * stride_dot
               + offs_m[:, None] * stride_dot)
    q0, q1, q2 = _load_blocks(q_rows, stride_qd, row_ok, d0, dm0, d1, dm1, d2, dm2, BLOCK_D1, BLOCK_D2)
    do0, do1, do2 = _load_blocks(do_rows, stride_dod, row_ok, d0, dm0, d1, dm1, d2, dm2, BLOCK_D1, BLOCK_D2)
    dq0, dq1, dq2 = _zero_blocks(BLOCK_M, BLOCK_D, BLOCK_D1, BLOCK_D2)
    l_ptrs = b64 * stride_lb + h64 * stride_lh + row0 + offs_m
    lse = tl.load(LSE + l_ptrs, mask=rows < q_len, other=0.0)
    # a row that sees no key has lse = -inf: +inf makes every exp2(s - lse) of that row 0 instead of NaN
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + l_ptrs, mask=rows < q_len, other=0.0)
    k_base = K + b64 * _mult8(stride_kb) + hk64 * _mult8(stride_kh) + k0 * stride_kt
    v_base = V + b64 * _mult8(stride_vb) + hk64 * _mult8(stride_vh) + k0 * stride_vt
    rows_shift = rows + shift

    lo, mid, hi = _key_split(m_start, k_len, shift, first, BLOCK_M, BLOCK_N, CAUSAL)
    # masked blocks first, as in the forward (wgmma accumulators defined by wgmma only)
    dq0, dq1, dq2 = _dq_inner(dq0, dq1, dq2, q0, q1, q2, do0, do1, do2, lse, delta, k_base, v_base, stride_kt,
                              stride_kd, stride_vt, stride_vd, d0, dm0, d1, dm1, d2, dm2, mid, hi, rows_shift,
                              first, k_len, qk_scale, offs_n,
                              BLOCK_D1, BLOCK_D2, BLOCK_N, True, CAUSAL, HAS_SEQ_START, DOT_PREC)
    dq0, dq1, dq2 = _dq_inner(dq0, dq1, dq2, q0, q1, q2, do0, do1, do2, lse, delta, k_base, v_base, stride_kt,
                              stride_kd, stride_vt, stride_vd, d0, dm0, d1, dm1, d2, dm2, lo, mid, rows_shift,
                              first, k_len, qk_scale, offs_n,
                              BLOCK_D1, BLOCK_D2, BLOCK_N, False, CAUSAL, HAS_SEQ_START, DOT_PREC)
    dq_rows = (DQ + b64 * _mult8(stride_dqb) + h64 * _mult8(stride_dqh) + row0 * stride_dqt
               + offs_m[:, None] * stride_dqt)
    _store_blocks(dq_rows, stride_dqd, row_ok, dq0, dq1, dq2, sm_scale, d0, dm0, d1, dm1, d2, dm2, BLOCK_D1, BLOCK_D2)


@triton.jit
def _dkdv_inner(dk0, dk1, dk2, dv0, dv1, dv2, k0, k1, k2, v0, v1, v2, q_base, do_base, l_ptrs, LSE, DELTA,
                stride_qt, stride_qd, stride_dot, stride_dod, d0, dm0, d1, dm1, d2, dm2,
                m_lo, m_hi, col_ok, cols_shift, q_len, qk_scale, offs_m,
                BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    # works on the transposed scores S^T [keys, queries], so that P^T and dS^T come out directly
    q_tile = offs_m[:, None] * stride_qt
    do_tile = offs_m[:, None] * stride_dot
    for it in range(0, tl.cdiv(m_hi - m_lo, BLOCK_M)):  # counting blocks: see _fwd_inner
        start_m = tl.multiple_of(m_lo + it * BLOCK_M, BLOCK_M)
        m64 = start_m.to(tl.int64)
        q_blk = q_base + m64 * stride_qt + q_tile
        do_blk = do_base + m64 * stride_dot + do_tile
        rows = start_m + offs_m
        rmask = rows[:, None] < q_len
        if MASKED:
            q0 = tl.load(q_blk + d0[None, :] * stride_qd, mask=rmask & dm0, other=0.0)
            lse = tl.load(LSE + l_ptrs + m64, mask=rows < q_len, other=0.0)
        else:
            q0 = tl.load(q_blk + d0[None, :] * stride_qd, mask=dm0, other=0.0)
            lse = tl.load(LSE + l_ptrs + m64)
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        s_t = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            q1 = tl.load(q_blk + d1[None, :] * stride_qd, mask=(rmask & dm1) if MASKED else dm1, other=0.0)
            s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=DOT_PREC)
        if BLOCK_D2 > 0:
            q2 = tl.load(q_blk + d2[None, :] * stride_qd, mask=(rmask & dm2) if MASKED else dm2, other=0.0)
            s_t = tl.dot(k2, tl.trans(q2), s_t, input_precision=DOT_PREC)
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        if MASKED:
            valid = (rows[None, :] < q_len) & col_ok
            if CAUSAL:
                valid = valid & (cols_shift[:, None] <= rows[None, :])
            p_t = tl.where(valid, p_t, 0.0)
            do0 = tl.load(do_blk + d0[None, :] * stride_dod, mask=rmask & dm0, other=0.0)
            delta = tl.load(DELTA + l_ptrs + m64, mask=rows < q_len, other=0.0)
        else:
            do0 = tl.load(do_blk + d0[None, :] * stride_dod, mask=dm0, other=0.0)
            delta = tl.load(DELTA + l_ptrs + m64)
        p16 = p_t.to(do0.dtype)
        dv0 = tl.dot(p16, do0, dv0, input_precision=DOT_PREC)
        dp_t = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            do1 = tl.load(do_blk + d1[None, :] * stride_dod, mask=(rmask & dm1) if MASKED else dm1, other=0.0)
            dv1 = tl.dot(p16, do1, dv1, input_precision=DOT_PREC)
            dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=DOT_PREC)
        if BLOCK_D2 > 0:
            do2 = tl.load(do_blk + d2[None, :] * stride_dod, mask=(rmask & dm2) if MASKED else dm2, other=0.0)
            dv2 = tl.dot(p16, do2, dv2, input_precision=DOT_PREC)
            dp_t = tl.dot(v2, tl.trans(do2), dp_t, input_precision=DOT_PREC)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q0.dtype)
        dk0 = tl.dot(ds_t, q0, dk0, input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            dk1 = tl.dot(ds_t, q1, dk1, input_precision=DOT_PREC)
        if BLOCK_D2 > 0:
            dk2 = tl.dot(ds_t, q2, dk2, input_precision=DOT_PREC)
    return dk0, dk1, dk2, dv0, dv1, dv2


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
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEQ_START: tl.constexpr, VARLEN: tl.constexpr, ROW_STRIDE8: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    d0, dm0, d1, dm1, d2, dm2 = _head_cols(BLOCK_D, BLOCK_D1, BLOCK_D2, HEAD_DIM)
    cols = n_start + offs_n
    col_in = cols[:, None] < k_len
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    col0 = (k_start + n_start).to(tl.int64)
    q0_row = (q_start + 0 * b).to(tl.int64)
    if ROW_STRIDE8:  # a row stride that is not a multiple of 16 (see _mult8)
        stride_qt = _mult8(stride_qt)
        stride_kt = _mult8(stride_kt)
        stride_vt = _mult8(stride_vt)
        stride_dot = _mult8(stride_dot)
        stride_dkt = _mult8(stride_dkt)
        stride_dvt = _mult8(stride_dvt)
    k_rows = (K + b64 * _mult8(stride_kb) + hk64 * _mult8(stride_kh) + col0 * stride_kt
              + offs_n[:, None] * stride_kt)
    v_rows = (V + b64 * _mult8(stride_vb) + hk64 * _mult8(stride_vh) + col0 * stride_vt
              + offs_n[:, None] * stride_vt)
    k0, k1, k2 = _load_blocks(k_rows, stride_kd, col_in, d0, dm0, d1, dm1, d2, dm2, BLOCK_D1, BLOCK_D2)
    v0, v1, v2 = _load_blocks(v_rows, stride_vd, col_in, d0, dm0, d1, dm1, d2, dm2, BLOCK_D1, BLOCK_D2)
    dk0, dk1, dk2 = _zero_blocks(BLOCK_N, BLOCK_D, BLOCK_D1, BLOCK_D2)
    dv0, dv1, dv2 = _zero_blocks(BLOCK_N, BLOCK_D, BLOCK_D1, BLOCK_D2)
    col_ok = col_in
    if HAS_SEQ_START:
        col_ok = col_ok & (cols[:, None] >= first)
    cols_shift = cols - shift

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

    # grouped-query attention: query heads hk * group ... hk * group + group - 1 share this KV head, their
    # contributions are summed here in registers
    for g in range(0, group):
        h64 = (hk * group + g).to(tl.int64)
        q_base = Q + b64 * _mult8(stride_qb) + h64 * _mult8(stride_qh) + q0_row * stride_qt
        do_base = DO + b64 * _mult8(stride_dob) + h64 * _mult8(stride_doh) + q0_row * stride_dot
        l_ptrs = b64 * stride_lb + h64 * stride_lh + q0_row + offs_m
        dk0, dk1, dk2, dv0, dv1, dv2 = _dkdv_inner(
            dk0, dk1, dk2, dv0, dv1, dv2, k0, k1, k2, v0, v1, v2, q_base, do_base, l_ptrs, LSE, DELTA,
            stride_qt, stride_qd, stride_dot, stride_dod, d0, dm0, d1, dm1, d2, dm2,
            m0, m1, col_ok, cols_shift, q_len, qk_scale, offs_m, BLOCK_D1, BLOCK_D2, BLOCK_M, True, CAUSAL, DOT_PREC)
        dk0, dk1, dk2, dv0, dv1, dv2 = _dkdv_inner(
            dk0, dk1, dk2, dv0, dv1, dv2, k0, k1, k2, v0, v1, v2, q_base, do_base, l_ptrs, LSE, DELTA,
            stride_qt, stride_qd, stride_dot, stride_dod, d0, dm0, d1, dm1, d2, dm2,
            m1, m2, col_ok, cols_shift, q_len, qk_scale, offs_m, BLOCK_D1, BLOCK_D2, BLOCK_M, False, CAUSAL, DOT_PREC)
        dk0, dk1, dk2, dv0, dv1, dv2 = _dkdv_inner(
            dk0, dk1, dk2, dv0, dv1, dv2, k0, k1, k2, v0, v1, v2, q_base, do_base, l_ptrs, LSE, DELTA,
            stride_qt, stride_qd, stride_dot, stride_dod, d0, dm0, d1, dm1, d2, dm2,
            m2, m3, col_ok, cols_shift, q_len, qk_scale, offs_m, BLOCK_D1, BLOCK_D2, BLOCK_M, True, CAUSAL, DOT_PREC)
    dk_rows = (DK + b64 * _mult8(stride_dkb) + hk64 * _mult8(stride_dkh) + col0 * stride_dkt
               + offs_n[:, None] * stride_dkt)
    dv_rows = (DV + b64 * _mult8(stride_dvb) + hk64 * _mult8(stride_dvh) + col0 * stride_dvt
               + offs_n[:, None] * stride_dvt)
    _store_blocks(dk_rows, stride_dkd, col_in, dk0, dk1, dk2, sm_scale, d0, dm0, d1, dm1, d2, dm2, BLOCK_D1, BLOCK_D2)
    _store_blocks(dv_rows, stride_dvd, col_in, dv0, dv1, dv2, 1.0, d0, dm0, d1, dm1, d2, dm2, BLOCK_D1, BLOCK_D2)
