"""The Qwen MLP gate `a * silu(b)` as one elementwise Triton pass, forward and backward.

The semantics are those of `reference.swiglu`; SiLU and the product run in fp32 and are rounded once, where the
reference rounds `silu(b)` to the input dtype before multiplying (agreement within the dtype's tolerance).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .utils import UnsupportedInput, check_tensors, interpreting


@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, o_ptr, N, BLOCK: tl.constexpr):
    # int64 block start: the MLP activations of long contexts pass 2^31 elements
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
    out = a * (b * tl.sigmoid(b))
    tl.store(o_ptr + offs, out.to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, a_ptr, b_ptr, da_ptr, db_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(b)
    da = g * (b * sig)
    # silu'(b) = sig(b) * (1 + b * (1 - sig(b)))
    db = g * a * (sig * (1.0 + b * (1.0 - sig)))
    tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=m)
    tl.store(db_ptr + offs, db.to(db_ptr.dtype.element_ty), mask=m)


def _launch_params(t):
    """(BLOCK, num_warps). A fixed choice, not autotuned: the only sizes are the element count (tuning on it would
    retune per sequence length, tuning without it would fit whatever size came first) and the dtype. 16 bytes per
    thread per load, two loads per thread, on CUDA; one wide block under the interpreter, which pays per program."""
    if t.device.type == "cuda" and not interpreting():
        return (4096 if t.element_size() <= 2 else 2048), 8
    return 4096, 4


def _new_output(shape, dtype, device):
    """Allocation of the outputs (a hook the tests replace to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _grid(n, block):
    return (triton.cdiv(n, block),)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        check_tensors("swiglu", a, b)
        if a.shape != b.shape:
            raise UnsupportedInput(
                f"swiglu: a {tuple(a.shape)} and b {tuple(b.shape)} must have one shape (no broadcasting); "
                f"expand them first"
            )
        # the kernels index flat memory: strided inputs (e.g. halves of a fused w1|w2 output) are copied once
        a_c, b_c = a.contiguous(), b.contiguous()
        out = _new_output(a.shape, a.dtype, a.device)
        n = a_c.numel()
        if n:
            block, warps = _launch_params(a_c)
            with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():
                _swiglu_fwd_kernel[_grid(n, block)](a_c, b_c, out, n, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(a_c, b_c)
        return out

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad
        if g is None or not (need_a or need_b):
            return None, None
        g = g.to(a.dtype).contiguous()  # a new tensor when it must change: the incoming gradient is only read
        da = _new_output(a.shape, a.dtype, a.device)
        db = _new_output(a.shape, a.dtype, a.device)
        n = a.numel()
        if n:
            block, warps = _launch_params(a)
            with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():
                _swiglu_bwd_kernel[_grid(n, block)](g, a, b, da, db, n, BLOCK=block, num_warps=warps)
        return (da if need_a else None), (db if need_b else None)


def swiglu(a, b):
    """`a * silu(b)` elementwise, differentiable in a and b; the model calls `swiglu(w1(x), w2(x))`.

    a, b: one shape (any), one dtype (float32 / float16 / bfloat16), one device; non-contiguous inputs are copied
    to contiguous ones first. SiLU and the product are computed in fp32 and cast back. Returns a new contiguous
    tensor of that shape and dtype.
    """
    return _SwiGLU.apply(a, b)
