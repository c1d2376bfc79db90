"""LayerNorm over the last dim (the ViT, width 1664, and the adapter, 4096), forward and backward in Triton.

Same anatomy as `rms_norm.py`: whole rows in registers (BLOCK_N = next power of two >= hidden, masked), several
rows per program for small hidden sizes, fp32 statistics with mean and rstd saved per row; the backward on a
persistent grid where each program accumulates partial dW and dB in fp32 and writes one row of [G, N] buffers
that a single torch sum finishes (no atomics).

Registered as the custom ops `qwenvl::layer_norm` and `qwenvl::layer_norm_backward`.

CONFIGS: the layout of rms_norm.py ("fwd/n{BLOCK_N}", "bwd/n{BLOCK_N}"; BLOCK_M and BLOCK_N in the kwargs, warps
differ). The other constexprs: none (fwd); COMPUTE_DX, COMPUTE_DW, COMPUTE_DB (bwd).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import Launcher, as_rows, check_device, check_param, check_tensors, empty, row_stride
from .rms_norm import check_hidden, check_rows_input, persistent_grid, row_configs, row_launch

CONFIGS = row_configs("fwd", "bwd")


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


_launch_fwd = Launcher(_layer_norm_fwd_kernel, CONFIGS, key=["N"])
_launch_bwd = Launcher(_layer_norm_bwd_kernel, CONFIGS, key=["N", "COMPUTE_DX", "COMPUTE_DW", "COMPUTE_DB"])


@torch.library.custom_op("qwenvl::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd); mean and rstd are [...] fp32 per row."""
    N = x.shape[-1]
    x2 = as_rows(x, N)
    M = x2.shape[0]
    y = empty(x.shape, x.dtype, x.device)
    mean = empty(x.shape[:-1], torch.float32, x.device)
    rstd = empty(x.shape[:-1], torch.float32, x.device)
    if M > 0 and N > 0:
        name, blocks = row_launch(CONFIGS, "fwd", N, M)
        _launch_fwd(name, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),), x2, weight.contiguous(),
                    bias.contiguous(), y.view(-1, N), mean, rstd, M, N, row_stride(x2), N, float(eps),
                    interpreter=blocks)
    return y, mean, rstd


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


@torch.library.custom_op("qwenvl::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                            rstd: torch.Tensor, need_dx: bool, need_dw: bool,
                            need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db); 0-element tensors for those not needed."""
    N = x.shape[-1]
    x2 = as_rows(x, N)
    M = x2.shape[0]
    w = weight.contiguous()
    # a fresh dx buffer: never write into the incoming gradient
    dx = empty(x.shape if need_dx else (0,), x.dtype, x.device)
    if M == 0 or N == 0:
        zeros = torch.zeros_like(w)
        return dx.zero_(), (zeros if need_dw else w.new_empty(0)), (zeros.clone() if need_db else w.new_empty(0))
    dy2 = as_rows(dy, N)
    name, blocks = row_launch(CONFIGS, "bwd", N, M)
    num_blocks = triton.cdiv(M, blocks["BLOCK_M"])
    G = persistent_grid(x.device, num_blocks)
    dw_part = empty((G, N) if need_dw else (1, 1), torch.float32, x.device)
    db_part = empty((G, N) if need_db else (1, 1), torch.float32, x.device)
    _launch_bwd(
        name, (G,), dy2, x2, w, mean, rstd, dx.view(-1, N) if need_dx else dy2, dw_part, db_part,
        M, N, row_stride(dy2), row_stride(x2), N if need_dx else 0, triton.cdiv(num_blocks, G),
        interpreter=blocks, COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
    )
    dw = dw_part.sum(0).to(w.dtype) if need_dw else w.new_empty(0)
    db = db_part.sum(0).to(w.dtype) if need_db else w.new_empty(0)
    return dx, dw, db


@_layer_norm_backward_op.register_fake
def _(dy, x, weight, mean, rstd, need_dx, need_dw, need_db):
    return (x.new_empty(x.shape if need_dx else (0,)), weight.new_empty(weight.shape if need_dw else (0,)),
            weight.new_empty(weight.shape if need_db else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics


def _backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return None, None, None, None
    x, w, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    grads = torch.ops.qwenvl.layer_norm_backward(dy, x, w, mean, rstd, *need)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,)


_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(x, weight, bias, eps=1e-6):
    """LayerNorm over the last dim, as `F.layer_norm(x, (N,), weight, bias, eps)`: statistics and affine in fp32,
    rounded once to x's dtype.

    x: `[..., N]` float32 / float16 / bfloat16 (CUDA; float32/float16 under TRITON_INTERPRET=1), N <= 16384, any
    strides. weight, bias: `[N]`, same dtype as x (both required). eps: float (the ViT and adapter use 1e-6).
    Returns `[..., N]` in x's dtype. Differentiable in x, weight and bias.
    Raises UnsupportedInput (before any launch) for what it cannot serve.
    """
    name = "layer_norm"
    check_rows_input(name, x)
    check_param(name, "weight", weight, x)
    check_param(name, "bias", bias, x)
    check_tensors(name, x, weight, bias)
    check_hidden(name, x.shape[-1])
    check_device(name, x)
    return torch.ops.qwenvl.layer_norm(x, weight, bias, float(eps))[0]
