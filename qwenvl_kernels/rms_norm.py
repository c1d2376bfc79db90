"""RMSNorm (the Qwen decoder's norm) with an optional fused residual add, forward and backward in Triton.

Anatomy: one program normalizes BLOCK_M whole rows held in registers (BLOCK_N = next power of two >= hidden, masked),
so statistics take a single pass in fp32. The backward recomputes the normalized row from the saved fp32 rstd and
reduces the weight gradient on a persistent grid: each program owns a fixed subset of rows, accumulates its partial
dW in fp32 registers, writes one row of a [G, N] buffer, and a single torch sum finishes it (no atomics).

`layer_norm.py` reuses the launch helpers below.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import UnsupportedInput, check_tensors, interpreting, next_power_of_2, num_programs_hint

MAX_HIDDEN = 16384

# The rows of a program tile together hold about this many elements. Under the interpreter every program costs
# a Python-level launch, so fewer, wider tiles are much faster there.
_TILE_ELEMS_CUDA = 4096
_TILE_ELEMS_INTERP = 16384


# ---------------------------------------------------------------------------------------------------------------
# launch helpers (shared with layer_norm.py)
# ---------------------------------------------------------------------------------------------------------------

def _block_sizes(N: int, M: int):
    """(BLOCK_M, BLOCK_N) for hidden N and M rows."""
    # a block of at least 16 lanes keeps every layout legal on the GPU for tiny hidden sizes (N = 1, 7)
    block_n = max(next_power_of_2(N), 16)
    if interpreting():
        block_m = max(1, min(_TILE_ELEMS_INTERP // block_n, next_power_of_2(M)))
    else:
        # not clipped by M: BLOCK_M is a constexpr, and tying it to the row count would recompile per length
        block_m = max(1, _TILE_ELEMS_CUDA // block_n)
    return block_m, block_n


def _default_warps(block_m: int, block_n: int) -> int:
    """About 16 fp32 elements per thread for the tile, between 1 and 16 warps."""
    return max(1, min(16, next_power_of_2(block_m * block_n) // 512))


def _warp_configs(block_m: int, block_n: int):
    w = _default_warps(block_m, block_n)
    return [triton.Config({}, num_warps=n) for n in sorted({max(1, w // 2), w, min(32, w * 2)})]


def _launcher(kernel, keys):
    """`launch(grid, *args, BLOCK_M=, BLOCK_N=, **flags)`: a fixed number of warps under the interpreter
    (autotune cannot run there); on CUDA an autotuner over num_warps only, keyed on `keys`: the hidden size and
    feature flags, never the row count, so changing sequence lengths do not retune."""
    tuned = {}

    def launch(grid, *args, BLOCK_M, BLOCK_N, **kwargs):
        if interpreting():
            return kernel[grid](*args, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4, **kwargs)
        fn = tuned.get((BLOCK_M, BLOCK_N))
        if fn is None:
            fn = triton.autotune(configs=_warp_configs(BLOCK_M, BLOCK_N), key=list(keys))(kernel)
            tuned[(BLOCK_M, BLOCK_N)] = fn
        return fn[grid](*args, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **kwargs)

    return launch


def _as_rows(t: torch.Tensor, N: int) -> torch.Tensor:
    """A [rows, N] view of t with unit stride along N (a copy only when no such view exists)."""
    if N > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    t2 = t.reshape(-1, N)
    if N > 1 and t2.stride(1) != 1:  # reshape may hand back an odd view; never seen, but never trust it
        t2 = t2.contiguous()
    return t2


def _row_stride(t2: torch.Tensor) -> int:
    # a single row's stride is arbitrary (even 1 after a transpose); a fixed value keeps Triton's integer
    # specialization (==1, %16) from compiling another variant for it
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def _persistent_grid(device: torch.device, num_blocks: int) -> int:
    """Programs of the backward's persistent grid: enough to fill the device (two per SM on CUDA, so one program's
    loads overlap another's reductions), never more than there are row blocks."""
    g = num_programs_hint(device)
    if device.type == "cuda":
        g *= 2
    return max(1, min(g, num_blocks))


def _check_hidden(name: str, N: int):
    if N > MAX_HIDDEN:
        raise UnsupportedInput(
            f"{name}: hidden size {N} > {MAX_HIDDEN}: one row must fit in one program's registers; "
            f"use kernels='torch' for this size"
        )


def _check_param(name: str, what: str, p, x: torch.Tensor):
    N = x.shape[-1]
    if not isinstance(p, torch.Tensor):
        raise UnsupportedInput(f"{name}: {what} must be a tensor of shape [{N}], got {type(p).__name__}")
    if p.dim() != 1 or p.shape[0] != N:
        raise UnsupportedInput(
            f"{name}: {what} has shape {tuple(p.shape)}, expected [{N}] (the last dim of x {tuple(x.shape)})")
    if p.dtype != x.dtype:
        raise UnsupportedInput(
            f"{name}: {what} dtype {p.dtype} differs from x dtype {x.dtype}; cast the module (or x) so they match")


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


_launch_fwd = _launcher(_rms_norm_fwd_kernel, ["N", "HAS_RESIDUAL"])
_launch_bwd = _launcher(_rms_norm_bwd_kernel, ["N", "HAS_DH", "COMPUTE_DW"])


# ---------------------------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------------------------

class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        N = x.shape[-1]
        x2 = _as_rows(x, N)
        M = x2.shape[0]
        w = weight.contiguous()
        has_res = residual is not None
        r2 = _as_rows(residual, N) if has_res else None

        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if has_res else None
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        y2 = y.view(-1, N)
        h2 = h.view(-1, N) if has_res else None

        if M > 0 and N > 0:
            block_m, block_n = _block_sizes(N, M)
            grid = (triton.cdiv(M, block_m),)
            _launch_fwd(
                grid, x2, r2 if has_res else x2, w, y2, h2 if has_res else y2, rstd,
                M, N, _row_stride(x2), _row_stride(r2) if has_res else 0, N, N, float(eps),
                HAS_RESIDUAL=has_res, BLOCK_M=block_m, BLOCK_N=block_n,
            )

        # the backward needs the row that was normalized: h when the residual was fused in
        ctx.save_for_backward(h2 if has_res else x2, w, rstd)
        ctx.has_res = has_res
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)
        if has_res:
            return y, h
        return y

    @staticmethod
    def backward(ctx, dy, dh=None):
        xs, w, rstd = ctx.saved_tensors
        M, N = xs.shape
        need_dx = ctx.needs_input_grad[0] or (ctx.has_res and ctx.needs_input_grad[2])
        need_dw = ctx.needs_input_grad[1]
        dx = dw = None

        if dy is None:
            # only h was used downstream: its gradient passes straight to x and residual
            if need_dx and dh is not None:
                dx = dh.to(dtype=xs.dtype, memory_format=torch.contiguous_format, copy=True)
            if need_dw:
                dw = torch.zeros_like(w)
        elif M == 0 or N == 0:
            dx = torch.zeros(ctx.x_shape, dtype=xs.dtype, device=xs.device) if need_dx else None
            if need_dx and dh is not None:
                dx = dx + dh
            dw = torch.zeros_like(w) if need_dw else None
        else:
            dy2 = _as_rows(dy, N)
            has_dh = dh is not None
            dh2 = _as_rows(dh, N) if has_dh else None
            # a fresh buffer: never write into the incoming gradient (autograd may share it elsewhere)
            dx = torch.empty(ctx.x_shape, dtype=xs.dtype, device=xs.device)
            dx2 = dx.view(-1, N)
            block_m, block_n = _block_sizes(N, M)
            num_blocks = triton.cdiv(M, block_m)
            G = _persistent_grid(xs.device, num_blocks)
            dw_part = torch.empty((G, N) if need_dw else (1, 1), dtype=torch.float32, device=xs.device)
            _launch_bwd(
                (G,), dy2, xs, w, rstd, dh2 if has_dh else dy2, dx2, dw_part,
                M, N, _row_stride(dy2), _row_stride(xs), _row_stride(dh2) if has_dh else 0, N,
                triton.cdiv(num_blocks, G),
                HAS_DH=has_dh, COMPUTE_DW=need_dw, BLOCK_M=block_m, BLOCK_N=block_n,
            )
            if need_dw:
                dw = dw_part.sum(0).to(w.dtype)
            if not need_dx:
                dx = None

        if ctx.has_res:
            return dx, dw, dx, None
        return dx, dw, None, None


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
    if not isinstance(x, torch.Tensor):
        raise UnsupportedInput(f"{name}: x must be a tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise UnsupportedInput(f"{name}: x must have at least one dim [..., hidden], got a scalar")
    _check_param(name, "weight", weight, x)
    tensors = [x, weight]
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise UnsupportedInput(f"{name}: residual must be a tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise UnsupportedInput(
                f"{name}: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}; the fused add does "
                f"not broadcast, expand it first")
        if residual.dtype != x.dtype:
            raise UnsupportedInput(
                f"{name}: residual dtype {residual.dtype} differs from x dtype {x.dtype}; cast one to the other")
        tensors.append(residual)
    check_tensors(name, *tensors)
    _check_hidden(name, x.shape[-1])
    return _RMSNormFunction.apply(x, weight, residual, eps)
