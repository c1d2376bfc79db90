"""The Qwen MLP gate `a * silu(b)` as one elementwise Triton pass, forward and backward.

The semantics are those of `reference.swiglu`; SiLU and the product run in fp32 and are rounded once, where the
reference rounds `silu(b)` to the input dtype before multiplying (agreement within the dtype's tolerance).
Registered as the custom ops `qwenvl::swiglu` and `qwenvl::swiglu_backward`.

CONFIGS: "fwd/16bit", "fwd/32bit", "bwd/16bit", "bwd/32bit" (by element size), one fixed config each, not
autotuned: the only sizes are the element count (tuning on it would retune per sequence length, tuning without it
would fit whatever size came first) and the dtype. 16 bytes per thread per load, two loads per thread. The only
constexpr, BLOCK, is in the config's kwargs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import Launcher, UnsupportedInput, check_device, check_tensors, empty

CONFIGS = {f"{kind}/{bits}": [triton.Config({"BLOCK": block}, num_warps=8)]
           for kind in ("fwd", "bwd") for bits, block in (("16bit", 4096), ("32bit", 2048))}
# one wide block under the interpreter, which pays per program
_INTERPRETER = {"BLOCK": 4096}


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


_launch_fwd = Launcher(_swiglu_fwd_kernel, CONFIGS, key=[])
_launch_bwd = Launcher(_swiglu_bwd_kernel, CONFIGS, key=[])


def _name(kind, t):
    return f"{kind}/{'16bit' if t.element_size() <= 2 else '32bit'}"


def _grid(n):
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


@torch.library.custom_op("qwenvl::swiglu", mutates_args=())
def _swiglu_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # the kernels index flat memory: strided inputs (e.g. halves of a fused w1|w2 output) are copied first
    a_c, b_c = a.contiguous(), b.contiguous()
    out = empty(a.shape, a.dtype, a.device)
    n = a_c.numel()
    if n:
        _launch_fwd(_name("fwd", a), _grid(n), a_c, b_c, out, n, interpreter=_INTERPRETER)
    return out


@_swiglu_op.register_fake
def _(a, b):
    return a.new_empty(a.shape)


@torch.library.custom_op("qwenvl::swiglu_backward", mutates_args=())
def _swiglu_backward_op(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # new tensors where a layout or dtype must change: the incoming gradient is only read
    g, a, b = g.to(a.dtype).contiguous(), a.contiguous(), b.contiguous()
    da = empty(a.shape, a.dtype, a.device)
    db = empty(a.shape, a.dtype, a.device)
    n = a.numel()
    if n:
        _launch_bwd(_name("bwd", a), _grid(n), g, a, b, da, db, n, interpreter=_INTERPRETER)
    return da, db


@_swiglu_backward_op.register_fake
def _(g, a, b):
    return a.new_empty(a.shape), a.new_empty(a.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, g):
    a, b = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad
    if not (need_a or need_b):
        return None, None
    da, db = torch.ops.qwenvl.swiglu_backward(g, a, b)
    return (da if need_a else None), (db if need_b else None)


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(a, b):
    """`a * silu(b)` elementwise, differentiable in a and b; the model calls `swiglu(w1(x), w2(x))`.

    a, b: one shape (any), one dtype (float32 / float16 / bfloat16), one device; non-contiguous inputs are copied
    to contiguous ones first. SiLU and the product are computed in fp32 and cast back. Returns a new contiguous
    tensor of that shape and dtype.
    """
    check_tensors("swiglu", a, b)
    if a.shape != b.shape:
        raise UnsupportedInput(
            f"swiglu: a {tuple(a.shape)} and b {tuple(b.shape)} must have one shape (no broadcasting); "
            f"expand them first"
        )
    check_device("swiglu", a)
    return torch.ops.qwenvl.swiglu(a, b)
