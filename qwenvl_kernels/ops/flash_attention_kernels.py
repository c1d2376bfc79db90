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

Head dims. A power of two (64, 128) is one block; any other multiple of 8 up to 128 is split into column blocks of
64, 32 and 16 that cover it rounded up to 16 (104 = 64 + 32 + 16: the ViT's attention does 12.5% less tensor-core
work than in the 128-wide block that FlashAttention 2, cuDNN and SDPA pad it to). Strides: any, but the kernels
are told that every stride except the head dim's is a multiple of 8 elements (the launcher copies an input for
which that is false), which keeps every tile load 16 bytes wide for the ViT's q/k/v, sliced out of its qkv
projection with a head stride of 312. Compiled code for sm_90a: bench/compile_check.py (the static gate).
"""
from __future__ import annotations

import triton
import triton.language as tl


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------
# The head dim is covered by up to three column blocks of widths BLOCK_D, BLOCK_D1, BLOCK_D2 (powers of two, at
# least 16, the tl.dot minimum; BLOCK_D1 = BLOCK_D2 = 0 when absent): one block of next_power_of_2(head_dim)
# (64, 128), or a split that follows the head dim more closely, 104 = 64 + 32 + 16 instead of a 128-wide block
# with 24 padded columns (12.5% less tensor-core work). Products over the head dim (QK^T, dO V^T) are sums of one
# tl.dot per block; products into it (PV, dS K, ...) fill one accumulator per block. Tile loads mask the columns
# from HEAD_DIM on (`dm*`: they read as 0 and add 0 to every dot; with HEAD_DIM a multiple of 8 the mask is
# constant over 8-element runs, so loads stay 16 bytes wide); tiles that may cross a sequence end also mask rows.
# Loads and masks are written inline rather than through a helper: a nested jit call is free when compiled but
# costs milliseconds per call under the interpreter, and these run per block.

@triton.jit
def _mult8(stride):
    """A stride the launcher guarantees to be a multiple of 8 elements, said so to the compiler. Triton specializes
    integer arguments on divisibility by 16 only: a head stride of 104 or 312 elements (the ViT's q/k/v, sliced out
    of its qkv projection) leaves every tile address of unknown alignment and every load 2 bytes wide, with no
    cp.async pipelining. (stride // 8) * 8 is the same value, known to be a multiple of 8 (16 bytes of a 16-bit
    type): the tile loads become 16-byte cp.async. Batch and head strides always go through it; row strides only
    when one of them is not a multiple of 16 (ROW_STRIDE8; Triton knows the others, and rounding those would cost
    the dK/dV kernel registers)."""
    return (stride >> 3) << 3


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
def _query_block(CU_Q, CU_K, SEQ_START, seqlen_q, seqlen_k, n_heads, group, VARLEN: tl.constexpr,
                 HAS_SEQ_START: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """The query block of this program (forward and dQ): (q_len, k_len, first, m_start, shift, b, h, kv head,
    first query row in memory, first key row in memory), the indices as int64. The caller returns when
    m_start >= q_len."""
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
    row0 = (q_start + m_start).to(tl.int64)
    k0 = (k_start + 0 * b).to(tl.int64)
    return (q_len, k_len, first, m_start, k_len - q_len, b.to(tl.int64), h.to(tl.int64), (h // group).to(tl.int64),
            row0, k0)


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
def _head_cols(BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Column offsets of the three head-dim blocks and their masks ([1, width]; a block of width 0 gets a dummy)."""
    d0 = tl.arange(0, BLOCK_D)
    dm0 = d0[None, :] < HEAD_DIM
    d1 = 0
    dm1 = 0
    d2 = 0
    dm2 = 0
    if BLOCK_D1 > 0:
        d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
        dm1 = d1[None, :] < HEAD_DIM
    if BLOCK_D2 > 0:
        d2 = (BLOCK_D + BLOCK_D1) + tl.arange(0, BLOCK_D2)
        dm2 = d2[None, :] < HEAD_DIM
    return d0, dm0, d1, dm1, d2, dm2


@triton.jit
def _load_blocks(rows, stride_d, row_ok, d0, dm0, d1, dm1, d2, dm2,
                 BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr):
    """A [rows, head dim] tile (`rows`: the pointers of its first column) as its column blocks (0: absent)."""
    t0 = tl.load(rows + d0[None, :] * stride_d, mask=row_ok & dm0, other=0.0)
    t1 = 0
    t2 = 0
    if BLOCK_D1 > 0:
        t1 = tl.load(rows + d1[None, :] * stride_d, mask=row_ok & dm1, other=0.0)
    if BLOCK_D2 > 0:
        t2 = tl.load(rows + d2[None, :] * stride_d, mask=row_ok & dm2, other=0.0)
    return t0, t1, t2


@triton.jit
def _zero_blocks(ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr):
    """fp32 accumulators for the column blocks (0: absent)."""
    a0 = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    a1 = 0
    a2 = 0
    if BLOCK_D1 > 0:
        a1 = tl.zeros([ROWS, BLOCK_D1], dtype=tl.float32)
    if BLOCK_D2 > 0:
        a2 = tl.zeros([ROWS, BLOCK_D2], dtype=tl.float32)
    return a0, a1, a2


@triton.jit
def _store_blocks(rows, stride_d, row_ok, a0, a1, a2, scale, d0, dm0, d1, dm1, d2, dm2,
                  BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr):
    """Store the column blocks (fp32, times `scale`: a number, or a [rows, 1] column) in the output's dtype."""
    tl.store(rows + d0[None, :] * stride_d, (a0 * scale).to(rows.dtype.element_ty), mask=row_ok & dm0)
    if BLOCK_D1 > 0:
        tl.store(rows + d1[None, :] * stride_d, (a1 * scale).to(rows.dtype.element_ty), mask=row_ok & dm1)
    if BLOCK_D2 > 0:
        tl.store(rows + d2[None, :] * stride_d, (a2 * scale).to(rows.dtype.element_ty), mask=row_ok & dm2)


@triton.jit
def _fwd_inner(acc0, acc1, acc2, l_i, m_i, q0, q1, q2, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
               d0, dm0, d1, dm1, d2, dm2, n_lo, n_hi, rows_shift, first, k_len, qk_scale, offs_n,
               BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_SEQ_START: tl.constexpr, DOT_PREC: tl.constexpr):
    # m_i is the running row max of the scaled scores (log2 units): the raw scores s are reduced first and the scale
    # meets them only inside exp2(s * qk_scale - m), one FFMA per score instead of a multiply and a subtraction
    # (qk_scale > 0, checked by the launcher, so the max commutes with the scale)
    k_tile = offs_n[:, None] * stride_kt
    v_tile = offs_n[:, None] * stride_vt
    # counting blocks rather than `range(n_lo, n_hi, BLOCK_N)`: with a loop start that depends on a loaded value
    # (seq_start), ptxas serializes the sm_90 wgmma instructions of the pipelined loop
    for it in range(0, tl.cdiv(n_hi - n_lo, BLOCK_N)):
        start_n = tl.multiple_of(n_lo + it * BLOCK_N, BLOCK_N)
        n64 = start_n.to(tl.int64)
        k_blk = k_base + n64 * stride_kt + k_tile
        v_blk = v_base + n64 * stride_vt + v_tile
        cols = start_n + offs_n
        rmask = cols[:, None] < k_len
        k0 = tl.load(k_blk + d0[None, :] * stride_kd, mask=(rmask & dm0) if MASKED else dm0, other=0.0)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            k1 = tl.load(k_blk + d1[None, :] * stride_kd, mask=(rmask & dm1) if MASKED else dm1, other=0.0)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PREC)
        if BLOCK_D2 > 0:
            k2 = tl.load(k_blk + d2[None, :] * stride_kd, mask=(rmask & dm2) if MASKED else dm2, other=0.0)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
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
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if MASKED:
            # a row with no visible key so far has m = -inf: exponentiate against 0 so that -inf - -inf never
            # makes a NaN; m itself stays -inf so that it is no false lower bound for later blocks
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s * qk_scale - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = tl.load(v_blk + d0[None, :] * stride_vd, mask=(rmask & dm0) if MASKED else dm0, other=0.0)
        p = p.to(v0.dtype)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
        if BLOCK_D1 > 0:
            v1 = tl.load(v_blk + d1[None, :] * stride_vd, mask=(rmask & dm1) if MASKED else dm1, other=0.0)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
        if BLOCK_D2 > 0:
            v2 = tl.load(v_blk + d2[None, :] * stride_vd, mask=(rmask & dm2) if MASKED else dm2, other=0.0)
            acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc0, acc1, acc2, l_i, m_i


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, SEQ_START, CU_Q, CU_K,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_heads, group, qk_scale,
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
        stride_ot = _mult8(stride_ot)
    q_rows = (Q + b64 * _mult8(stride_qb) + h64 * _mult8(stride_qh) + row0 * stride_qt
              + offs_m[:, None] * stride_qt)
    q0, q1, q2 = _load_blocks(q_rows, stride_qd, row_ok, d0, dm0, d1, dm1, d2, dm2, BLOCK_D1, BLOCK_D2)
    acc0, acc1, acc2 = _zero_blocks(BLOCK_M, BLOCK_D, BLOCK_D1, BLOCK_D2)
    k_base = K + b64 * _mult8(stride_kb) + hk64 * _mult8(stride_kh) + k0 * stride_kt
    v_base = V + b64 * _mult8(stride_vb) + hk64 * _mult8(stride_vh) + k0 * stride_vt
    rows_shift = rows + shift

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, mid, hi = _key_split(m_start, k_len, shift, first, BLOCK_M, BLOCK_N, CAUSAL)
    # the masked blocks (the causal diagonal, the sequence end) first: when the unmasked loop runs no iteration,
    # its exit would otherwise hand the masked loop's wgmma an accumulator defined by plain moves (the zeros),
    # and ptxas serializes every wgmma of that loop (C7515)
    acc0, acc1, acc2, l_i, m_i = _fwd_inner(
        acc0, acc1, acc2, l_i, m_i, q0, q1, q2, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        d0, dm0, d1, dm1, d2, dm2, mid, hi, rows_shift, first, k_len, qk_scale, offs_n,
        BLOCK_D1, BLOCK_D2, BLOCK_N, True, CAUSAL, HAS_SEQ_START, DOT_PREC)
    acc0, acc1, acc2, l_i, m_i = _fwd_inner(
        acc0, acc1, acc2, l_i, m_i, q0, q1, q2, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        d0, dm0, d1, dm1, d2, dm2, lo, mid, rows_shift, first, k_len, qk_scale, offs_n,
        BLOCK_D1, BLOCK_D2, BLOCK_N, False, CAUSAL, HAS_SEQ_START, DOT_PREC)

    # a row that saw no key (above the diagonal when q_len > k_len, or every key padded) outputs 0, lse = -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o_rows = (O + b64 * _mult8(stride_ob) + h64 * _mult8(stride_oh) + row0 * stride_ot
              + offs_m[:, None] * stride_ot)
    _store_blocks(o_rows, stride_od, row_ok, acc0, acc1, acc2, (1.0 / l_safe)[:, None], d0, dm0, d1, dm1, d2, dm2,
                  BLOCK_D1, BLOCK_D2)
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + row0 + offs_m, lse, mask=rows < q_len)
