"""RMSNorm (the Qwen decoder's norm) with an optional fused residual add, forward and backward in Triton.

Anatomy: one program normalizes BLOCK_M whole rows held in registers (BLOCK_N = next power of two >= hidden, masked),
so statistics take a single pass in fp32. The backward recomputes the normalized row from the saved fp32 rstd and
reduces the weight gradient on a persistent grid: each program owns a fixed subset of rows, accumulates its partial
dW in fp32 registers, writes one row of a [G, N] buffer, and a single torch sum finishes it (no atomics).

Registered as the custom ops `qwenvl::rms_norm` and `qwenvl::rms_norm_backward` (fake implementations and autograd
included), so torch.compile sees one opaque op each way.

CONFIGS (shared layout with layer_norm.py, built by `row_configs`): "fwd/n{BLOCK_N}" and "bwd/n{BLOCK_N}" for
BLOCK_N = 16, 32, ..., 16384 (the hidden size N rounds up to BLOCK_N, at least 16). Each candidate's kwargs hold
BLOCK_M (rows per program: about 4096 elements per tile) and BLOCK_N; the candidates differ in num_warps only, the
first being about 16 fp32 elements per thread. The other constexprs: HAS_RESIDUAL (fwd); HAS_DH, COMPUTE_DW (bwd).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..launch import (Launcher, UnsupportedInput, as_rows, check_device, check_param, check_tensor, check_tensors,
                      empty, interpreting, next_power_of_2, num_programs_hint, row_stride)

MAX_HIDDEN = 16384

# The rows of a program tile together hold about this many elements. Under the interpreter every program costs
# a Python-level launch, so fewer, wider tiles are much faster there.
_TILE_ELEMS_CUDA = 4096
_TILE_ELEMS_INTERP = 16384


# ---------------------------------------------------------------------------------------------------------------
# launch configurations and helpers (shared with layer_norm.py)
# ---------------------------------------------------------------------------------------------------------------

def _default_warps(block_m: int, block_n: int) -> int:
    """About 16 fp32 elements per thread for the tile, between 1 and 16 warps."""
    return max(1, min(16, next_power_of_2(block_m * block_n) // 512))


def row_configs(*kinds: str) -> dict:
    """CONFIGS of the row kernels: per kind and BLOCK_N, the default warps first, then half and twice as many."""
    configs = {}
    for kind in kinds:
        for block_n in (16 << i for i in range(11)):
            # not clipped by the row count: BLOCK_M is a constexpr, tying it to M would recompile per length
            block_m = max(1, _TILE_ELEMS_CUDA // block_n)
            w = _default_warps(block_m, block_n)
            configs[f"{kind}/n{block_n}"] = [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=n)
                                             for n in dict.fromkeys((w, max(1, w // 2), min(32, w * 2)))]
    return configs


def row_block_n(N: int) -> int:
    # a block of at least 16 lanes keeps every layout legal on the GPU for tiny hidden sizes (N = 1, 7)
    return max(next_power_of_2(N), 16)


def row_launch(configs: dict, kind: str, N: int, M: int):
    """(launch name, {BLOCK_M, BLOCK_N}) of a row kernel for M rows of hidden size N. Every candidate of a launch
    has the same blocks (they differ in warps), so the host can size grids with them before the launch; under the
    interpreter the tile takes as many rows as fit _TILE_ELEMS_INTERP elements (at most M)."""
    block_n = row_block_n(N)
    name = f"{kind}/n{block_n}"
    if interpreting():
        return name, {"BLOCK_M": max(1, min(_TILE_ELEMS_INTERP // block_n, next_power_of_2(M))), "BLOCK_N": block_n}
    return name, dict(configs[name][0].kwargs)


def persistent_grid(device: torch.device, num_blocks: int) -> int:
    """Programs of the backward's persistent grid: enough to fill the device (two per SM on CUDA, so one program's
    loads overlap another's reductions), never more than there are row blocks."""
    g = num_programs_hint(device)
    if device.type == "cuda":
        g *= 2
    return max(1, min(g, num_blocks))


def check_hidden(name: str, N: int):
    if N > MAX_HIDDEN:
        raise UnsupportedInput(
            f"{name}: hidden size {N} > {MAX_HIDDEN}: one row must fit in one program's registers; "
            f"use kernels='torch' for this size"
        )


def check_rows_input(name: str, x) -> None:
    check_tensor(name, "x", x)
    if x.dim() == 0:
        raise UnsupportedInput(f"{name}: x must have at least one dim [..., hidden], got a scalar")


CONFIGS = row_configs("fwd", "bwd")


# ---------------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, H, RSTD,
    M, N, stride_x, stride_r, stride_y, stride_h, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        # the residual stream lives in the model dtype: round the sum before taking statistics of it
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + rows[:, None] * stride_h + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)

    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    # as the released Qwen code: round the normalized row to the model dtype, then scale by the weight
    n = (xf * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    y = n * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DH, DX, DW_PART,
    M, N, stride_dy, stride_x, stride_dh, stride_dx, blocks_per_program,
    HAS_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pids = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    for i in range(0, blocks_per_program):
        # interleaved row blocks: neighbouring programs touch neighbouring rows at the same time
        blk = (pid + i * num_pids).to(tl.int64)
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]

        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)

        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat)); the rounding to the model dtype is a
        # straight-through step, as autograd sees it in the reference
        c = tl.sum(g * xhat, axis=1) / N
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

        if COMPUTE_DW:
            # the weight multiplies the normalized row as rounded to the model dtype
            dw_acc += dy * xhat.to(X.dtype.element_ty).to(tl.float32)

    if COMPUTE_DW:
        tl.store(DW_PART + pid.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


_launch_fwd = Launcher(_rms_norm_fwd_kernel, CONFIGS, key=["N", "HAS_RESIDUAL"])
_launch_bwd = Launcher(_rms_norm_bwd_kernel, CONFIGS, key=["N", "HAS_DH", "COMPUTE_DW"])


# ---------------------------------------------------------------------------------------------------------------
# custom ops and autograd
# ---------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("qwenvl::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor],
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, rstd): h = x + residual (a 0-element tensor without residual), rstd [...] fp32 per row."""
    N = x.shape[-1]
    x2 = as_rows(x, N)
    M = x2.shape[0]
    w = weight.contiguous()
    has_res = residual is not None
    r2 = as_rows(residual, N) if has_res else None

    y = empty(x.shape, x.dtype, x.device)
    h = empty(x.shape if has_res else (0,), x.dtype, x.device)
    rstd = empty(x.shape[:-1], torch.float32, x.device)
    y2 = y.view(-1, N)
    h2 = h.view(-1, N) if has_res else y2
    if M > 0 and N > 0:
        name, blocks = row_launch(CONFIGS, "fwd", N, M)
        _launch_fwd(
            name, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),), x2, r2 if has_res else x2, w, y2, h2, rstd,
            M, N, row_stride(x2), row_stride(r2) if has_res else 0, N, N, float(eps),
            interpreter=blocks, HAS_RESIDUAL=has_res,
        )
    return y, h, rstd


@_rms_norm_op.register_fake
def _(x, weight, residual, eps):
    return (x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,)),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("qwenvl::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: Optional[torch.Tensor], dh: Optional[torch.Tensor], xs: torch.Tensor,
                          weight: torch.Tensor, rstd: torch.Tensor, need_dx: bool,
                          need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) for the normalized rows xs (x, or h with the fused residual); 0-element tensors when not needed."""
    N = xs.shape[-1]
    w = weight.contiguous()
    none = xs.new_empty(0)
    if dy is None:
        # only h was used downstream: its gradient passes straight to x and residual
        dx = dh.to(dtype=xs.dtype, memory_format=torch.contiguous_format, copy=True) if dh is not None else None
        if dx is None and need_dx:
            dx = torch.zeros_like(xs, memory_format=torch.contiguous_format)
        return (dx if need_dx else none), (torch.zeros_like(w) if need_dw else none)
    x2 = as_rows(xs, N)
    M = x2.shape[0]
    if M == 0 or N == 0:
        dx = torch.zeros(xs.shape, dtype=xs.dtype, device=xs.device)
        if dh is not None:
            dx = dx + dh
        return (dx if need_dx else none), (torch.zeros_like(w) if need_dw else none)
    dy2 = as_rows(dy, N)
    has_dh = dh is not None
    dh2 = as_rows(dh, N) if has_dh else None
    # a fresh buffer: never write into the incoming gradient (autograd may share it elsewhere)
    dx = empty(xs.shape, xs.dtype, xs.device)
    name, blocks = row_launch(CONFIGS, "bwd", N, M)
    num_blocks = triton.cdiv(M, blocks["BLOCK_M"])
    G = persistent_grid(xs.device, num_blocks)
    dw_part = empty((G, N) if need_dw else (1, 1), torch.float32, xs.device)
    _launch_bwd(
        name, (G,), dy2, x2, w, rstd, dh2 if has_dh else dy2, dx.view(-1, N), dw_part,
        M, N, row_stride(dy2), row_stride(x2), row_stride(dh2) if has_dh else 0, N, triton.cdiv(num_blocks, G),
        interpreter=blocks, HAS_DH=has_dh, COMPUTE_DW=need_dw,
    )
    return (dx if need_dx else none), (dw_part.sum(0).to(w.dtype) if need_dw else none)


@_rms_norm_backward_op.register_fake
def _(dy, dh, xs, weight, rstd, need_dx, need_dw):
    return xs.new_empty(xs.shape if need_dx else (0,)), weight.new_empty(weight.shape if need_dw else (0,))


def _setup_context(ctx, inputs, output):
    x, weight, residual, _ = inputs
    y, h, rstd = output
    has_res = residual is not None
    # the backward needs the row that was normalized: h when the residual was fused in
    ctx.save_for_backward(h if has_res else x, weight, rstd)
    ctx.has_res = has_res
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(rstd)
    if not has_res:
        ctx.mark_non_differentiable(h)


def _backward(ctx, dy, dh, _drstd):
    xs, w, rstd = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0] or (ctx.has_res and ctx.needs_input_grad[2])
    need_dw = ctx.needs_input_grad[1]
    if dy is None and dh is None:
        return None, None, None, None
    dx, dw = torch.ops.qwenvl.rms_norm_backward(dy, dh if ctx.has_res else None, xs, w, rstd, need_dx, need_dw)
    dx = dx if need_dx else None
    dw = dw if need_dw else None
    return dx if ctx.needs_input_grad[0] else None, dw, dx if ctx.has_res and ctx.needs_input_grad[2] else None, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# public
# ---------------------------------------------------------------------------------------------------------------

def rms_norm(x, weight, eps=1e-6, residual=None):
    """RMSNorm over the last dim: `(x * rsqrt(mean(x^2) + eps))` in fp32, rounded to x's dtype, times `weight`.

    x: `[..., N]` float32 / float16 / bfloat16 (CUDA; float32/float16 under TRITON_INTERPRET=1), N <= 16384, any
    strides. weight: `[N]`, same dtype as x. eps: float.
    residual: optional, same shape and dtype as x. Then `h = x + residual` (rounded to x's dtype) is normalized and
    `(rms_norm(h), h)` is returned: the pre-norm block's residual add fused into its next norm.
    Returns `[..., N]` in x's dtype (or the pair). Differentiable in x, weight and residual.
    Raises UnsupportedInput (before any launch) for what it cannot serve.
    """
    name = "rms_norm"
    check_rows_input(name, x)
    check_param(name, "weight", weight, x)
    tensors = [x, weight]
    if residual is not None:
        check_tensor(name, "residual", residual, layout="or None")
        if residual.shape != x.shape:
            raise UnsupportedInput(
                f"{name}: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}; the fused add does "
                f"not broadcast, expand it first")
        if residual.dtype != x.dtype:
            raise UnsupportedInput(
                f"{name}: residual dtype {residual.dtype} differs from x dtype {x.dtype}; cast one to the other")
        tensors.append(residual)
    check_tensors(name, *tensors)
    check_hidden(name, x.shape[-1])
    check_device(name, x)
    y, h, _ = torch.ops.qwenvl.rms_norm(x, weight, residual, float(eps))
    return (y, h) if residual is not None else y
