"""The adapter's cross-attention with its 2D position terms, fused: cuBLAS projections around one Triton
flash-attention kernel that broadcasts the shared queries over the batch and adds the key position term on load.

What it computes (exactly `qwenvl_kernels.reference.resampler_attention`, i.e. `nn.MultiheadAttention` the way the
official Resampler calls it, with the 256 queries repeated per image)::

    Q   = (query + pos_q) Wq^T + bq                      [Nq, E]     once, shared by every image
    K_b = (kv_b + pos_k) Wk^T + bk                       [Nk, E]     per image b
    V_b = kv_b Wv^T + bv                                 [Nk, E]
    O_b = concat_h softmax(Q_h K_bh^T / sqrt(d)) V_bh    [Nq, E]     heads of d = E / num_heads
    out_b = O_b Wo^T + bo                                [Nq, E]

The algebra that makes it cheap. The key projection is linear, so

    K_b = (kv_b Wk^T + bk) + pos_k Wk^T = K_x,b + P_k

where `K_x = kv Wk^T + bk` comes out of ONE cuBLAS matmul together with V (the stacked rows [Wk; Wv] of
in_proj_weight, bias [bk; bv]: a [B*Nk, E] x [E, 2E] product written as one [B, Nk, 2E] buffer), and
`P_k = pos_k Wk^T` is a single [Nk, E] x [E, E] product per call, not per image. `kv + pos_k` is never formed
per image; the Triton kernel adds the P_k tile to the K_x tile as it loads it (in fp32, rounded to the input dtype
before the tensor-core product, which is where the reference rounds `k` as well). Q is computed once ([Nq, E]) and
read by every image with a batch stride of 0: the official module's per-image copy of the queries is not made.

Forward kernel (grid: query blocks x batch*heads): flash attention with online softmax in fp32 (exp2 with the
scale folded into log2(e)), saving the row statistics lse = m + log2(l) (base 2) in fp32, [B, H, Nq].

Backward, by recomputation (no Nq x Nk matrix is ever stored), with Delta = rowsum(dO * O) from a small kernel:
  * dK/dV kernel (grid: key blocks x batch*heads): for one image's key block, loop over all query blocks,
    recompute P^T, accumulate dV_b = P^T dO_b and dK_b = scale * dS^T Q in fp32 registers. dK_b is the gradient
    of both K_x,b and P_k, so it is written into the first half of a [B, Nk, 2E] buffer whose second half gets
    dV_b: exactly the layout of the stacked K_x | V buffer, so the chain rule through [Wk; Wv] is again ONE
    matmul each way. dP_k = sum_b dK_b is reduced after the kernel (a [B, Nk, E] -> [Nk, E] sum, cheap next to
    the matmuls) rather than with atomics or a batch loop: that keeps the grid B times wider and deterministic.
  * dQ kernel (grid: query blocks x heads x S): the queries are shared, so dQ = sum_b sum_keys dS_b K_b. Each
    program keeps one dQ tile in fp32 registers and loops over images b = s, s + S, ... and over all key blocks
    of each; the S partial sums ([S, Nq, E] fp32) are added after. S = 1 when query blocks x heads already
    fill the GPU (B = 1, or long Nq); otherwise S splits the batch so that there are about two programs per SM.
    Deterministic (no atomics), no [B, Nq, E] dQ buffer.
Then the chain rule through the projections (cuBLAS):
    dO            = dout Wo                      dWo = sum_b dout_b^T O_b,   dbo = sum dout
    d(query)      = dQ Wq                         (also the gradient of pos_q, returned when it requires one)
    dWq           = dQ^T (query + pos_q),         dbq = sum_rows dQ
    [dWk; dWv]    = sum_b [dK_b; dV_b]^T kv_b,    then dWk += dP_k^T pos_k
    [dbk; dbv]    = sum [dK; dV]
    d(kv)         = [dK | dV] [Wk; Wv]            one matmul
    d(pos_k)      = dP_k Wk                       (cheap, computed only when pos_k requires a gradient)
Saved for backward: the inputs (no copies), Q [Nq, E], the K_x | V buffer [B, Nk, 2E], P_k [Nk, E], O [B, Nq, E]
and lse [B, H, Nq] fp32 — what a plain MHA would save, without the per-image query copies and key sums.

Head dims up to 128 (any value: the block is padded to a power of two, at least 16, with a mask); any Nq, Nk, B;
fp16, bf16 (CUDA only: the interpreter's bf16 dot is wrong) and fp32 (dot products in IEEE fp32, not TF32, so
fp32 matches the reference closely). Under autocast the op runs in its inputs' dtype (autocast is switched off
inside forward and backward, whose kernels need one dtype throughout); backward is once-differentiable.

Registered as the custom ops `qwenvl::resampler_attention` (the output and what the backward needs) and
`qwenvl::resampler_attention_backward`.

CONFIGS: "fwd", "dkv", "dq" (candidates over BLOCK_M, BLOCK_N in the kwargs, warps and stages, keyed on the head
size and DOT_PREC) and "delta" (fixed). The other constexprs (`launch_constexprs(head_dim, dtype)`): HEAD_DIM,
BLOCK_D, DOT_PREC; "delta" takes HEAD_DIM and BLOCK_D.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..launch import (LOG2E, MAX_HEAD_DIM, Launcher, UnsupportedInput, block_d, check_device, check_tensors,
                      dot_precision, empty, interpreting, num_programs_hint, unit_last_stride)


def _c(bm, bn, w, s):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


# The candidates that compile to unserialized wgmma without spills under Triton 3.6 and 3.9 (bench/compile_check.py
# checks every one for sm_90a), with 64 rows per warpgroup (8 warps on 64 rows would split each product's columns
# between the two warpgroups) and score tiles at least 32 wide (mma.sync below 64 query rows, 64x16 wgmma below 32
# keys).
CONFIGS = {
    "fwd": [_c(128, 64, 8, 3), _c(128, 64, 8, 2), _c(64, 64, 4, 3), _c(64, 64, 4, 2)],
    "dkv": [_c(32, 128, 8, 2), _c(32, 128, 8, 3), _c(32, 64, 4, 2), _c(32, 64, 4, 3)],
    "dq": [_c(128, 64, 8, 2), _c(128, 64, 8, 3), _c(128, 32, 8, 3), _c(64, 64, 4, 2)],
    "delta": [triton.Config({"BLOCK_M": 32}, num_warps=4)],
}
# small blocks under the interpreter so that the tests' short sequences still cross block edges
_INTERPRETER = {"BLOCK_M": 16, "BLOCK_N": 16}
# the block the dQ batch split is sized with on CUDA (the autotuned BLOCK_M is chosen later, at launch)
_NOMINAL_BLOCK_M = 64


def launch_constexprs(head_dim: int, dtype: torch.dtype) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), DOT_PREC=dot_precision(dtype))


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(Q, KX, V, PK, O, LSE,
                stride_qm, stride_kb, stride_kn, stride_pn, stride_ob, stride_om,
                H, NQ, NK, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < NQ
    mask_d = offs_d < HEAD_DIM
    col = h * HEAD_DIM + offs_d
    rows_m = offs_m.to(tl.int64)

    # Q has no batch stride: every image reads the same query tile
    q = tl.load(Q + rows_m[:, None] * stride_qm + col[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    kx_base = KX + b * stride_kb
    v_base = V + b * stride_kb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < NK
        rows_n = offs_n.to(tl.int64)
        tile_mask = mask_n[:, None] & mask_d[None, :]
        kx = tl.load(kx_base + rows_n[:, None] * stride_kn + col[None, :], mask=tile_mask, other=0.0)
        pk = tl.load(PK + rows_n[:, None] * stride_pn + col[None, :], mask=tile_mask, other=0.0)
        k = (kx.to(tl.float32) + pk.to(tl.float32)).to(q.dtype)
        v = tl.load(v_base + rows_n[:, None] * stride_kn + col[None, :], mask=tile_mask, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # m is the row max of the scaled scores: the scale (> 0) meets each score once, inside exp2's FFMA.
        # The first key block always holds a real key, so m_new is finite and alpha(-inf) = 0 on the first step
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # the accumulator goes into the product (not added after it): defined by wgmma only, never serialized
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(O + b * stride_ob + rows_m[:, None] * stride_om + col[None, :], acc.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * NQ + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _delta_kernel(O, DO, DELTA, stride_ob, stride_om, stride_dob, stride_dom, H, NQ,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < NQ
    mask = mask_m[:, None] & (offs_d < HEAD_DIM)[None, :]
    col = h * HEAD_DIM + offs_d
    rows_m = offs_m.to(tl.int64)
    o = tl.load(O + b * stride_ob + rows_m[:, None] * stride_om + col[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + rows_m[:, None] * stride_dom + col[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * NQ + offs_m, delta, mask=mask_m)


@triton.jit
def _bwd_dkv_kernel(Q, KX, V, PK, DO, LSE, DELTA, DK, DV,
                    stride_qm, stride_kb, stride_kn, stride_pn, stride_dob, stride_dom, stride_gb, stride_gn,
                    H, NQ, NK, qk_scale, sm_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < NK
    mask_d = offs_d < HEAD_DIM
    col = h * HEAD_DIM + offs_d
    rows_n = offs_n.to(tl.int64)
    tile_mask = mask_n[:, None] & mask_d[None, :]

    kx = tl.load(KX + b * stride_kb + rows_n[:, None] * stride_kn + col[None, :], mask=tile_mask, other=0.0)
    pk = tl.load(PK + rows_n[:, None] * stride_pn + col[None, :], mask=tile_mask, other=0.0)
    k = (kx.to(tl.float32) + pk.to(tl.float32)).to(kx.dtype)
    v = tl.load(V + b * stride_kb + rows_n[:, None] * stride_kn + col[None, :], mask=tile_mask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    stat_base = pid_bh.to(tl.int64) * NQ
    do_base = DO + b * stride_dob
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < NQ
        rows_m = offs_m.to(tl.int64)
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + rows_m[:, None] * stride_qm + col[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + rows_m[:, None] * stride_dom + col[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + stat_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + stat_base + offs_m, mask=mask_m, other=0.0)

        # transposed scores [BLOCK_N, BLOCK_M]: padded rows/columns would give exp2(-lse), which may overflow
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])
        p_t = tl.where(mask_n[:, None] & mask_m[None, :], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)

    dk = dk * sm_scale
    out_off = b * stride_gb + rows_n[:, None] * stride_gn + col[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=tile_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=tile_mask)


@triton.jit
def _bwd_dq_kernel(Q, KX, V, PK, DO, LSE, DELTA, DQ,
                   stride_qm, stride_kb, stride_kn, stride_pn, stride_dob, stride_dom, stride_dqs, stride_dqm,
                   B, H, NQ, NK, SPLIT, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < NQ
    mask_d = offs_d < HEAD_DIM
    col = h * HEAD_DIM + offs_d
    rows_m = offs_m.to(tl.int64)
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + rows_m[:, None] * stride_qm + col[None, :], mask=q_mask, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # the queries are shared by the batch: their gradient sums over this program's share of the images
    first = pid_s.to(tl.int64)
    for i in range(0, tl.cdiv(B - pid_s, SPLIT)):
        b = first + i * SPLIT
        do = tl.load(DO + b * stride_dob + rows_m[:, None] * stride_dom + col[None, :], mask=q_mask, other=0.0)
        stat_off = (b * H + h) * NQ + offs_m
        lse = tl.load(LSE + stat_off, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + stat_off, mask=mask_m, other=0.0)
        kx_base = KX + b * stride_kb
        v_base = V + b * stride_kb
        for start_n in range(0, NK, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < NK
            rows_n = offs_n.to(tl.int64)
            tile_mask = mask_n[:, None] & mask_d[None, :]
            kx = tl.load(kx_base + rows_n[:, None] * stride_kn + col[None, :], mask=tile_mask, other=0.0)
            pk = tl.load(PK + rows_n[:, None] * stride_pn + col[None, :], mask=tile_mask, other=0.0)
            k = (kx.to(tl.float32) + pk.to(tl.float32)).to(q.dtype)
            v = tl.load(v_base + rows_n[:, None] * stride_kn + col[None, :], mask=tile_mask, other=0.0)

            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            p = tl.exp2(s - lse[:, None])
            p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)

    dq = dq * sm_scale
    tl.store(DQ + pid_s.to(tl.int64) * stride_dqs + rows_m[:, None] * stride_dqm + col[None, :], dq, mask=q_mask)


# launch configurations: fixed under the interpreter, autotuned over launch parameters on CUDA, keyed on the head
# size and dtype (the autotuner adds argument dtypes to the key), never on sequence lengths or batch
_TUNE_KEY = ["HEAD_DIM", "BLOCK_D", "DOT_PREC"]
_launch_fwd = Launcher(_fwd_kernel, CONFIGS, key=_TUNE_KEY)
_launch_dkv = Launcher(_bwd_dkv_kernel, CONFIGS, key=_TUNE_KEY)
_launch_dq = Launcher(_bwd_dq_kernel, CONFIGS, key=_TUNE_KEY)
_launch_delta = Launcher(_delta_kernel, CONFIGS, key=[])


def _dq_split(B: int, n_prog: int, device: torch.device) -> int:
    """How many slices of the batch the dQ kernel runs side by side (1 when the grid already fills the device)."""
    target = 2 * num_programs_hint(device)
    split = max(1, min(B, triton.cdiv(target, max(n_prog, 1))))
    per = triton.cdiv(B, split)  # even shares: 4 images in 3 slices would make one slice twice as slow
    return triton.cdiv(B, per)


@torch.library.custom_op("qwenvl::resampler_attention", mutates_args=())
def _resampler_op(query: torch.Tensor, pos_q: torch.Tensor, kv: torch.Tensor, pos_k: torch.Tensor,
                  in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor, out_proj_weight: torch.Tensor,
                  out_proj_bias: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, Q, K_x | V, P_k, O, lse): the output and what the backward reuses."""
    # autocast would hand the kernels projections in another dtype than the gradients of backward: the op runs in
    # its inputs' dtype (cast them to run it in bf16)
    with torch.autocast(kv.device.type, enabled=False):
        B, Nk, E = kv.shape
        Nq = query.shape[0]
        H = num_heads
        D = E // H
        w_q, w_k, w_kv = in_proj_weight[:E], in_proj_weight[E:2 * E], in_proj_weight[E:]

        q = unit_last_stride(F.linear(query + pos_q, w_q, in_proj_bias[:E]))    # [Nq, E], once for the batch
        kxv = unit_last_stride(F.linear(kv, w_kv, in_proj_bias[E:]))            # [B, Nk, 2E] = K_x | V
        p_k = unit_last_stride(F.linear(pos_k, w_k))                            # [Nk, E], once per grid
        k_x, v = kxv[..., :E], kxv[..., E:]

        o = empty((B, Nq, E), kv.dtype, kv.device)
        lse = empty((B, H, Nq), torch.float32, kv.device)
        _launch_fwd("fwd", lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H),
                    q, k_x, v, p_k, o, lse,
                    q.stride(0), kxv.stride(0), kxv.stride(1), p_k.stride(0), o.stride(0), o.stride(1),
                    H, Nq, Nk, LOG2E / math.sqrt(D), interpreter=_INTERPRETER, **launch_constexprs(D, kv.dtype))
        out = F.linear(o, out_proj_weight, out_proj_bias)
    return out, q, kxv, p_k, o, lse


@_resampler_op.register_fake
def _(query, pos_q, kv, pos_k, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads):
    B, Nk, E = kv.shape
    Nq = query.shape[0]
    return (kv.new_empty(B, Nq, E), kv.new_empty(Nq, E), kv.new_empty(B, Nk, 2 * E), kv.new_empty(Nk, E),
            kv.new_empty(B, Nq, E), kv.new_empty(B, num_heads, Nq, dtype=torch.float32))


@torch.library.custom_op("qwenvl::resampler_attention_backward", mutates_args=())
def _resampler_backward_op(grad_out: torch.Tensor, query: torch.Tensor, pos_q: torch.Tensor, kv: torch.Tensor,
                           pos_k: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, q: torch.Tensor,
                           kxv: torch.Tensor, p_k: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, num_heads: int,
                           need: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of (query and pos_q: one tensor, kv, pos_k, in_proj_weight, in_proj_bias, out_proj_weight,
    out_proj_bias); `need` flags the 8 tensor inputs of the forward; a 0-element tensor for what is not needed."""
    with torch.autocast(grad_out.device.type, enabled=False):
        grads = _backward_chain(grad_out, query, pos_q, kv, pos_k, w_in, w_out, q, kxv, p_k, o, lse, num_heads,
                                need)
    none = kv.new_empty(0)
    d_query = grads[0] if grads[0] is not None else grads[1]
    return tuple(g if g is not None else none.clone() for g in (d_query, *grads[2:8]))


@_resampler_backward_op.register_fake
def _(grad_out, query, pos_q, kv, pos_k, w_in, w_out, q, kxv, p_k, o, lse, num_heads, need):
    shapes = (query, kv, pos_k, w_in, w_in[:, 0], w_out, w_out[:, 0])
    flags = (need[0] or need[1], *need[2:8])
    return tuple(kv.new_empty(t.shape if f else (0,)) for t, f in zip(shapes, flags))


def _setup_context(ctx, inputs, output):
    query, pos_q, kv, pos_k, in_proj_weight, _, out_proj_weight, _, num_heads = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the intermediates
    ctx.save_for_backward(query, pos_q, kv, pos_k, in_proj_weight, out_proj_weight, *output[1:])
    ctx.num_heads = num_heads


def _backward(ctx, grad_out, *_):
    need = list(ctx.needs_input_grad[:8])
    if grad_out is None or not any(need):
        return (None,) * 9
    grads = torch.ops.qwenvl.resampler_attention_backward(grad_out, *ctx.saved_tensors, ctx.num_heads, need)
    d_query = grads[0]
    return ((d_query if need[0] else None, d_query if need[1] else None)
            + tuple(g if n else None for g, n in zip(grads[1:], need[2:])) + (None,))


_resampler_op.register_autograd(_backward, setup_context=_setup_context)


def _backward_chain(grad_out, query, pos_q, kv, pos_k, w_in, w_out, q, kxv, p_k, o, lse, num_heads, need):
    """The chain rule of the module doc: [d query, d pos_q, d kv, d pos_k, d in_proj_weight, d in_proj_bias,
    d out_proj_weight, d out_proj_bias], None where `need` is off."""
    B, Nk, E = kv.shape
    Nq = query.shape[0]
    H = num_heads
    D = E // H
    sm_scale = 1.0 / math.sqrt(D)
    consts = launch_constexprs(D, kv.dtype)
    need_dq = need[0] or need[1] or need[4] or need[5]
    need_dkv = need[2] or need[3] or need[4] or need[5]

    grads = [None] * 9
    if need[6]:
        grads[6] = grad_out.reshape(B * Nq, E).t() @ o.reshape(B * Nq, E)
    if need[7]:
        grads[7] = grad_out.sum((0, 1))
    if not (need_dq or need_dkv):
        return tuple(grads)

    # matmul never writes into grad_out and accepts any strides
    d_o = unit_last_stride(torch.matmul(grad_out, w_out))                   # [B, Nq, E]
    delta = empty((B, H, Nq), torch.float32, kv.device)
    _launch_delta("delta", lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H),
                  o, d_o, delta, o.stride(0), o.stride(1), d_o.stride(0), d_o.stride(1), H, Nq,
                  HEAD_DIM=D, BLOCK_D=consts["BLOCK_D"])

    k_x, v = kxv[..., :E], kxv[..., E:]
    qk_scale = sm_scale * LOG2E
    common = (q.stride(0), kxv.stride(0), kxv.stride(1), p_k.stride(0), d_o.stride(0), d_o.stride(1))

    w_q, w_k, w_kv = w_in[:E], w_in[E:2 * E], w_in[E:]
    grad_w_in = empty(w_in.shape, w_in.dtype, w_in.device) if need[4] else None

    if need_dq:
        n_blocks = triton.cdiv(Nq, _INTERPRETER["BLOCK_M"] if interpreting() else _NOMINAL_BLOCK_M)
        split = _dq_split(B, n_blocks * H, kv.device)
        dq_part = empty((split, Nq, E), torch.float32, kv.device)
        _launch_dq("dq", lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), H, split),
                   q, k_x, v, p_k, d_o, lse, delta, dq_part,
                   *common, dq_part.stride(0), dq_part.stride(1),
                   B, H, Nq, Nk, split, qk_scale, sm_scale, interpreter=_INTERPRETER, **consts)
        dq = (dq_part[0] if split == 1 else dq_part.sum(0)).to(q.dtype)    # [Nq, E]
        if need[0] or need[1]:
            d_query = dq @ w_q
            grads[0] = d_query if need[0] else None
            grads[1] = d_query if need[1] else None
        if need[4]:
            torch.matmul(dq.t(), query + pos_q, out=grad_w_in[:E])
        if need[5]:
            d_bq = dq.sum(0)

    if need_dkv:
        dkxv = empty((B, Nk, 2 * E), kv.dtype, kv.device)                   # [dK | dV], the K_x | V layout
        _launch_dkv("dkv", lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B * H),
                    q, k_x, v, p_k, d_o, lse, delta, dkxv[..., :E], dkxv[..., E:],
                    *common, dkxv.stride(0), dkxv.stride(1),
                    H, Nq, Nk, qk_scale, sm_scale, interpreter=_INTERPRETER, **consts)
        d_pk = dkxv[..., :E].sum(0) if (need[3] or need[4]) else None      # [Nk, E]: P_k is in every K_b
        if need[2]:
            grads[2] = torch.matmul(dkxv, w_kv)                              # [B, Nk, E]
        if need[3]:
            grads[3] = d_pk @ w_k
        if need[4]:
            torch.matmul(dkxv.reshape(B * Nk, 2 * E).t(), kv.reshape(B * Nk, E), out=grad_w_in[E:])
            grad_w_in[E:2 * E].addmm_(d_pk.t(), pos_k)
        if need[5]:
            d_bkv = dkxv.sum((0, 1))

    if need[4]:
        grads[4] = grad_w_in
    if need[5]:
        grads[5] = torch.cat((d_bq, d_bkv))
    return tuple(grads)


def _validate(query, pos_q, kv, pos_k, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads):
    name = "resampler_attention"
    check_tensors(name, query, pos_q, kv, pos_k, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise UnsupportedInput(f"{name}: num_heads must be a positive int, got {num_heads!r}")
    if kv.dim() != 3:
        raise UnsupportedInput(f"{name}: kv must be [batch, Nk, E], got shape {tuple(kv.shape)}")
    B, Nk, E = kv.shape
    if query.dim() != 2 or query.shape[1] != E:
        raise UnsupportedInput(
            f"{name}: query must be [Nq, E] with E = {E} (the last dim of kv), got shape {tuple(query.shape)}; "
            f"the queries are shared by the batch: pass them once, not repeated per image")
    Nq = query.shape[0]
    expected = {
        "pos_q": (pos_q, (Nq, E)),
        "pos_k": (pos_k, (Nk, E)),
        "in_proj_weight": (in_proj_weight, (3 * E, E)),
        "in_proj_bias": (in_proj_bias, (3 * E,)),
        "out_proj_weight": (out_proj_weight, (E, E)),
        "out_proj_bias": (out_proj_bias, (E,)),
    }
    for arg, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise UnsupportedInput(f"{name}: {arg} must have shape {shape}, got {tuple(t.shape)}")
    if min(B, Nq, Nk, E) == 0:
        raise UnsupportedInput(f"{name}: empty input (batch {B}, Nq {Nq}, Nk {Nk}, E {E}); every size must be >= 1")
    if E % num_heads:
        raise UnsupportedInput(f"{name}: E = {E} is not divisible by num_heads = {num_heads}")
    head_dim = E // num_heads
    if head_dim > MAX_HEAD_DIM:
        raise UnsupportedInput(
            f"{name}: head_dim {head_dim} (E {E} / {num_heads} heads) is above the kernel's limit of "
            f"{MAX_HEAD_DIM}; use more heads or kernels='torch'")
    check_device(name, kv)


def resampler_attention(query, pos_q, kv, pos_k, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                        num_heads):
    """The Qwen-VL adapter's cross-attention with its 2D position terms (Triton; differentiable).

    Same semantics as `qwenvl_kernels.reference.resampler_attention` (`nn.MultiheadAttention` with query input
    `query + pos_q` repeated per image, key input `kv + pos_k`, value input `kv`), without repeating the queries.

    Args:
        query: `[Nq, E]`, the learned queries after ln_q, shared by every image (Qwen-VL: 256 x 4096).
        pos_q: `[Nq, E]`, the fixed sin-cos table of the queries.
        kv: `[B, Nk, E]`, ln_kv of the projected patch features (Nk = 1024 at 448 px, 256 at 224 px); any strides.
        pos_k: `[Nk, E]`, the sin-cos table interpolated to the patch grid.
        in_proj_weight: `[3E, E]` = [Wq; Wk; Wv]; in_proj_bias `[3E]`.
        out_proj_weight: `[E, E]`; out_proj_bias `[E]`.
        num_heads: E must be divisible by it; head_dim = E / num_heads <= 128 (Qwen-VL: 32 heads of 128).
    All tensors on one CUDA device (or the CPU under TRITON_INTERPRET=1) in one dtype: float16, bfloat16 (CUDA
    only) or float32. Gradients flow to every tensor argument (pos_q and pos_k too, if they require them).

    Returns:
        `[B, Nq, E]` in the input dtype.

    Raises:
        UnsupportedInput: before any launch, for wrong shapes, dtypes, devices, or head_dim > 128.
    """
    _validate(query, pos_q, kv, pos_k, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads)
    return torch.ops.qwenvl.resampler_attention(query, pos_q, kv, pos_k, in_proj_weight, in_proj_bias,
                                                out_proj_weight, out_proj_bias, num_heads)[0]
