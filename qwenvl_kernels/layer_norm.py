"""LayerNorm over the last dim (the ViT, width 1664, and the adapter, 4096), forward and backward in Triton.

Same anatomy as `rms_norm.py`: whole rows in registers (BLOCK_N = next power of two >= hidden, masked), several
rows per program for small hidden sizes, fp32 statistics with mean and rstd saved per row; the backward on a
persistent grid where each program accumulates partial dW and dB in fp32 and writes one row of [G, N] buffers
that a single torch sum finishes (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rms_norm import (_as_rows, _block_sizes, _check_hidden, _check_param, _launcher, _persistent_grid,
                       _row_stride)
from .utils import UnsupportedInput, check_tensors


@triton.jit
def _layer_norm_fwd_kernel(
    X, W, B, Y, MEAN, RSTD,
    M, N, stride_x, stride_y, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    # two passes over the registers, not E[x^2] - E[x]^2: no cancellation for rows with a large mean
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)

    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    # affine in fp32 and one rounding at the end, as torch's layer_norm
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART,
    M, N, stride_dy, stride_x, stride_dx, blocks_per_program,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pids = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    for i in range(0, blocks_per_program):
        blk = (pid + i * num_pids).to(tl.int64)
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]

        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        # masked lanes must be exactly 0 in xhat, or they would leak into the row means below
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)

        if COMPUTE_DX:
            g = dy * w[None, :]
            c1 = tl.sum(xhat * g, axis=1) / N
            c2 = tl.sum(g, axis=1) / N
            dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * xhat
        if COMPUTE_DB:
            db_acc += dy

    if COMPUTE_DW:
        tl.store(DW_PART + pid.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if COMPUTE_DB:
        tl.store(DB_PART + pid.to(tl.int64) * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)


_launch_fwd = _launcher(_layer_norm_fwd_kernel, ["N"])
_launch_bwd = _launcher(_layer_norm_bwd_kernel, ["N", "COMPUTE_DX", "COMPUTE_DW", "COMPUTE_DB"])


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        N = x.shape[-1]
        x2 = _as_rows(x, N)
        M = x2.shape[0]
        w = weight.contiguous()
        b = bias.contiguous()

        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        mean = torch.empty(M, dtype=torch.float32, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        if M > 0 and N > 0:
            block_m, block_n = _block_sizes(N, M)
            _launch_fwd(
                (triton.cdiv(M, block_m),), x2, w, b, y.view(-1, N), mean, rstd,
                M, N, _row_stride(x2), N, float(eps),
                BLOCK_M=block_m, BLOCK_N=block_n,
            )
        ctx.save_for_backward(x2, w, mean, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, w, mean, rstd = ctx.saved_tensors
        M, N = x2.shape
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = torch.empty(ctx.x_shape, dtype=x2.dtype, device=x2.device) if need_dx else None
        dw = db = None
        if M == 0 or N == 0:
            if need_dx:
                dx.zero_()
            dw = torch.zeros_like(w) if need_dw else None
            db = torch.zeros_like(w) if need_db else None
            return dx, dw, db, None

        dy2 = _as_rows(dy, N)
        block_m, block_n = _block_sizes(N, M)
        num_blocks = triton.cdiv(M, block_m)
        G = _persistent_grid(x2.device, num_blocks)
        dw_part = torch.empty((G, N) if need_dw else (1, 1), dtype=torch.float32, device=x2.device)
        db_part = torch.empty((G, N) if need_db else (1, 1), dtype=torch.float32, device=x2.device)
        # a fresh dx buffer: never write into the incoming gradient
        dx2 = dx.view(-1, N) if need_dx else dy2
        _launch_bwd(
            (G,), dy2, x2, w, mean, rstd, dx2, dw_part, db_part,
            M, N, _row_stride(dy2), _row_stride(x2), N if need_dx else 0, triton.cdiv(num_blocks, G),
            COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, COMPUTE_DB=need_db, BLOCK_M=block_m, BLOCK_N=block_n,
        )
        if need_dw:
            dw = dw_part.sum(0).to(w.dtype)
        if need_db:
            db = db_part.sum(0).to(w.dtype)
        return dx, dw, db, None


def layer_norm(x, weight, bias, eps=1e-6):
    """LayerNorm over the last dim, as `F.layer_norm(x, (N,), weight, bias, eps)`: statistics and affine in fp32,
    rounded once to x's dtype.

    x: `[..., N]` float32 / float16 / bfloat16 (CUDA; float32/float16 under TRITON_INTERPRET=1), N <= 16384, any
    strides. weight, bias: `[N]`, same dtype as x (both required). eps: float (the ViT and adapter use 1e-6).
    Returns `[..., N]` in x's dtype. Differentiable in x, weight and bias.
    Raises UnsupportedInput (before any launch) for what it cannot serve.
    """
    name = "layer_norm"
    if not isinstance(x, torch.Tensor):
        raise UnsupportedInput(f"{name}: x must be a tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise UnsupportedInput(f"{name}: x must have at least one dim [..., hidden], got a scalar")
    _check_param(name, "weight", weight, x)
    _check_param(name, "bias", bias, x)
    check_tensors(name, x, weight, bias)
    _check_hidden(name, x.shape[-1])
    return _LayerNormFunction.apply(x, weight, bias, eps)
