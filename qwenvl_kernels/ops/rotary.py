"""Rotary position embedding (GPT-NeoX rotate-half) on q and k in one fused Triton launch, with its backward.

The semantics are those of `reference.apply_rotary`. The rotation of each (x1, x2) pair by theta is orthogonal, so
the gradient of the input is the incoming gradient rotated by -theta: the backward is the forward kernel with the
sine negated. Registered as the custom ops `qwenvl::apply_rotary` and `qwenvl::apply_rotary_backward`.

CONFIGS: one launch, "rotary" (forward and backward, BACKWARD a constexpr): candidates over BLOCK_T (rows of
B * T per program), BLOCK_H (heads per program) and warps; memory-bound, so nothing else is tuned. The other
constexprs: D, HALF (rotary dims / 2), HAS_POS, BACKWARD, BLOCK_R = next_power_of_2(HALF), BLOCK_P =
next_power_of_2(max(D - 2 * HALF, 1)), HAS_PASS = D > 2 * HALF.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import triton
import triton.language as tl

from ..launch import Launcher, UnsupportedInput, check_device, check_tensors, empty, next_power_of_2, tracing

CONFIGS = {
    "rotary": [triton.Config({"BLOCK_T": bt, "BLOCK_H": bh}, num_warps=w)
               for bt, bh, w in ((1, 1, 1), (1, 2, 1), (1, 2, 2), (1, 4, 2), (1, 4, 4), (1, 8, 4), (1, 16, 4),
                                 (1, 16, 8), (2, 8, 4), (4, 4, 4), (4, 8, 8))],
}


@triton.jit
def _rotate_tile(x_ptr, o_ptr, x_rows, o_rows, row_ok, sxh, sxd, h0, NH, c, s,
                 D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_P: tl.constexpr, HAS_PASS: tl.constexpr):
    # BLOCK_T (b, t) rows x heads h0 .. h0 + BLOCK_H - 1 of one tensor, as [BLOCK_T, BLOCK_H, dims] tiles;
    # the output is contiguous [.., NH, D]
    h = h0 + tl.arange(0, BLOCK_H).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    rh = row_ok[:, None] & (h < NH)[None, :]
    m = rh[:, :, None] & (r < HALF)[None, None, :]
    xp = x_ptr + x_rows[:, None, None] + h[None, :, None] * sxh
    op = o_ptr + o_rows[:, None, None] + h[None, :, None] * D
    x1 = tl.load(xp + r[None, None, :] * sxd, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xp + (r[None, None, :] + HALF) * sxd, mask=m, other=0.0).to(tl.float32)
    cc = c[:, None, :]
    ss = s[:, None, :]
    o1 = x1 * cc - x2 * ss
    o2 = x2 * cc + x1 * ss
    tl.store(op + r[None, None, :], o1.to(o_ptr.dtype.element_ty), mask=m)
    tl.store(op + HALF + r[None, None, :], o2.to(o_ptr.dtype.element_ty), mask=m)
    if HAS_PASS:
        # dims past the rotary ones are copied: the outputs are new tensors
        p = 2 * HALF + tl.arange(0, BLOCK_P)
        pm = rh[:, :, None] & (p < D)[None, None, :]
        v = tl.load(xp + p[None, None, :] * sxd, mask=pm, other=0.0)
        tl.store(op + p[None, None, :], v.to(o_ptr.dtype.element_ty), mask=pm)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, oq_ptr, ok_ptr, cos_ptr, sin_ptr, pos_ptr,
                   T, H, HK, S, ROWS,
                   sqb, sqt, sqh, sqd, skb, skt, skh, skd,
                   scs, scr, sss, ssr, spb, spt,
                   D: tl.constexpr, HALF: tl.constexpr, HAS_POS: tl.constexpr, BACKWARD: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                   HAS_PASS: tl.constexpr):
    # grid: (blocks of BLOCK_T of the B * T rows, head tiles of q then head tiles of k)
    row = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    row_ok = row < ROWS
    tile = tl.program_id(1)
    b = row // T
    t = row - b * T
    if HAS_POS:
        pos = tl.load(pos_ptr + b * spb + t * spt, mask=row_ok, other=0).to(tl.int64)
        # negative positions count from the end of the table, as torch indexing does in the reference
        pos = tl.where(pos < 0, pos + S, pos)
    else:
        pos = t
    # the host validates positions; this guard keeps a skipped check (CUDA graph capture) from reading out of
    # bounds, and makes such rows NaN rather than silently wrong
    valid = (pos >= 0) & (pos < S)
    pos = tl.where(valid, pos, 0)
    r = tl.arange(0, BLOCK_R)
    rm = row_ok[:, None] & (r < HALF)[None, :]
    c = tl.load(cos_ptr + pos[:, None] * scs + r[None, :] * scr, mask=rm, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos[:, None] * sss + r[None, :] * ssr, mask=rm, other=0.0).to(tl.float32)
    c = tl.where(valid[:, None], c, float("nan"))
    s = tl.where(valid[:, None], s, float("nan"))
    if BACKWARD:
        s = -s
    n_q_tiles = tl.cdiv(H, BLOCK_H)
    if tile < n_q_tiles:
        _rotate_tile(q_ptr, oq_ptr, b * sqb + t * sqt, row * H * D, row_ok, sqh, sqd, tile * BLOCK_H, H, c, s,
                     D, HALF, BLOCK_H, BLOCK_R, BLOCK_P, HAS_PASS)
    else:
        _rotate_tile(k_ptr, ok_ptr, b * skb + t * skt, row * HK * D, row_ok, skh, skd, (tile - n_q_tiles) * BLOCK_H,
                     HK, c, s, D, HALF, BLOCK_H, BLOCK_R, BLOCK_P, HAS_PASS)


# keyed on the head counts and dims, never on B or T
_launch_rotary = Launcher(_rotary_kernel, CONFIGS, key=["H", "HK", "D", "HALF", "HAS_POS", "BACKWARD"])


def _launch(x, y, cos, sin, pos, backward):
    """Rotate x [B, T, H, D] and y [B, T, Hk, D] (either may be None) in one launch; new contiguous outputs (a
    0-element tensor for a missing side)."""
    ref = x if x is not None else y
    B, T, _, D = ref.shape
    H = x.shape[2] if x is not None else 0
    Hk = y.shape[2] if y is not None else 0
    ox = empty((B, T, H, D) if x is not None else (0,), ref.dtype, ref.device)
    oy = empty((B, T, Hk, D) if y is not None else (0,), ref.dtype, ref.device)
    if B * T == 0 or H + Hk == 0:
        return ox, oy
    # a missing side gets zero heads and borrows the other side's pointers: it is never touched
    xx, oxx = (x, ox) if x is not None else (y, oy)
    yy, oyy = (y, oy) if y is not None else (x, ox)
    half = cos.shape[1]
    if pos is None:
        pos_arg, spb, spt = cos, 0, 0
    elif pos.dim() == 1:
        pos_arg, spb, spt = pos, 0, pos.stride(0)
    else:
        pos_arg, spb, spt = pos, (pos.stride(0) if pos.shape[0] > 1 else 0), pos.stride(1)
    # few, wide programs under the interpreter: it pays per program and per operation, not per element
    interp = {"BLOCK_T": min(next_power_of_2(B * T), 64), "BLOCK_H": min(next_power_of_2(max(H, Hk)), 32)}
    def grid(m):
        return triton.cdiv(B * T, m["BLOCK_T"]), triton.cdiv(H, m["BLOCK_H"]) + triton.cdiv(Hk, m["BLOCK_H"])

    _launch_rotary(
        "rotary", grid, xx, yy, oxx, oyy, cos, sin, pos_arg, T, H, Hk, cos.shape[0], B * T,
        *xx.stride(), *yy.stride(), *cos.stride(), *sin.stride(), spb, spt,
        interpreter=interp, D=D, HALF=half, HAS_POS=pos is not None, BACKWARD=backward,
        BLOCK_R=next_power_of_2(half), BLOCK_P=next_power_of_2(max(D - 2 * half, 1)), HAS_PASS=D > 2 * half)
    return ox, oy


@torch.library.custom_op("qwenvl::apply_rotary", mutates_args=())
def _rotary_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               position_ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, cos, sin, position_ids, backward=False)


@_rotary_op.register_fake
def _(q, k, cos, sin, position_ids):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("qwenvl::apply_rotary_backward", mutates_args=())
def _rotary_backward_op(gq: Optional[torch.Tensor], gk: Optional[torch.Tensor], cos: torch.Tensor,
                        sin: torch.Tensor, position_ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients rotated by -theta (a 0-element tensor for a missing one). They are read through their strides
    (expanded or sliced ones included) and never written."""
    return _launch(gq, gk, cos, sin, position_ids, backward=True)


@_rotary_backward_op.register_fake
def _(gq, gk, cos, sin, position_ids):
    return tuple(g.new_empty(g.shape) if g is not None else cos.new_empty(0) for g in (gq, gk))


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, position_ids = inputs
    # as in the reference, an output whose input needs no gradient does not require one either
    for out, x in zip(output, (q, k)):
        if not x.requires_grad:
            ctx.mark_non_differentiable(out)
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.dtypes = q.dtype, k.dtype


def _backward(ctx, gq, gk):
    cos, sin, position_ids = ctx.saved_tensors
    need_q, need_k = ctx.needs_input_grad[:2]
    gq = gq.to(ctx.dtypes[0]) if (gq is not None and need_q) else None
    gk = gk.to(ctx.dtypes[1]) if (gk is not None and need_k) else None
    if gq is None and gk is None:
        return None, None, None, None, None
    dq, dk = torch.ops.qwenvl.apply_rotary_backward(gq, gk, cos, sin, position_ids)
    return (dq if gq is not None else None), (dk if gk is not None else None), None, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup_context)


# The last position_ids tensor whose range was checked on the host: the model passes one tensor to every layer,
# so a forward pays one device sync, not one per layer. A weak reference (the object stays alive, so its memory
# is not reused) plus its version counter (any in-place write bumps it) make the skip sound.
_checked = {"ref": None, "version": None, "size": None}


def _check_positions(pos, S):
    if pos.numel() == 0 or tracing(pos):
        return  # a traced tensor has no values to read; the kernel turns out-of-table rows into NaN instead
    tracked = not pos.is_inference()  # inference tensors keep no version counter: check them every time
    if tracked and _checked["ref"] is not None and _checked["ref"]() is pos and _checked["version"] == pos._version \
            and _checked["size"] == S:
        return
    if pos.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # no sync possible while capturing; the kernel turns out-of-table rows into NaN instead
    lo, hi = torch.stack(torch.aminmax(pos)).tolist()
    if lo < -S or hi >= S:
        raise UnsupportedInput(
            f"apply_rotary: position_ids range over [{lo}, {hi}] but the cos/sin tables have {S} rows; "
            f"build the tables for at least {hi + 1} positions"
        )
    if tracked:
        _checked.update(ref=weakref.ref(pos), version=pos._version, size=S)


def _validate(q, k, cos, sin, position_ids):
    check_tensors("apply_rotary", q, k)
    if q.dim() != 4 or k.dim() != 4:
        raise UnsupportedInput(
            f"apply_rotary: q and k must be [batch, seqlen, heads, head_dim], got shapes {tuple(q.shape)} and "
            f"{tuple(k.shape)}"
        )
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise UnsupportedInput(
            f"apply_rotary: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, seqlen and head_dim "
            f"(only the number of heads may differ)"
        )
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise UnsupportedInput(f"apply_rotary: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise UnsupportedInput(f"apply_rotary: the {name} table must be float32 (rotary runs in fp32), got "
                                   f"{t.dtype}; build it in fp32")
        if t.device != q.device:
            raise UnsupportedInput(f"apply_rotary: the {name} table is on {t.device} but q is on {q.device}; move it")
        if t.dim() != 2:
            raise UnsupportedInput(f"apply_rotary: the {name} table must be 2-D [positions, rotary_dim / 2], got "
                                   f"shape {tuple(t.shape)}")
    if cos.shape != sin.shape:
        raise UnsupportedInput(f"apply_rotary: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    S, half = cos.shape
    if half < 1 or 2 * half > D:
        raise UnsupportedInput(
            f"apply_rotary: the tables give {2 * half} rotary dims but head_dim is {D}; they must have between 1 "
            f"and head_dim / 2 = {D // 2} columns"
        )
    if position_ids is None:
        if T > S:
            raise UnsupportedInput(
                f"apply_rotary: seqlen {T} is longer than the cos/sin tables ({S} positions); build longer tables"
            )
        check_device("apply_rotary", q)
        return
    if not isinstance(position_ids, torch.Tensor):
        raise UnsupportedInput(f"apply_rotary: position_ids must be a tensor, got {type(position_ids).__name__}")
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise UnsupportedInput(f"apply_rotary: position_ids must be int32 or int64, got {position_ids.dtype}; cast "
                               f"with .long()")
    if position_ids.device != q.device:
        raise UnsupportedInput(f"apply_rotary: position_ids are on {position_ids.device} but q is on {q.device}; "
                               f"move them")
    shape = tuple(position_ids.shape)
    if not (shape == (T,) or (len(shape) == 2 and shape[1] == T and shape[0] in (1, B))):
        raise UnsupportedInput(
            f"apply_rotary: position_ids must be [seqlen] = ({T},) or [batch, seqlen] = ({B}, {T}), got {shape}"
        )
    check_device("apply_rotary", q)
    _check_positions(position_ids, S)


def apply_rotary(q, k, cos, sin, position_ids=None):
    """GPT-NeoX (rotate-half) rotary embedding of q and k in one launch; differentiable in q and k.

    q: `[B, T, H, D]`, k: `[B, T, Hk, D]`, float32 / float16 / bfloat16 (one dtype), any strides (slices of a
    packed qkv projection are read in place). cos, sin: float32 `[S, R/2]` tables, cos(p * inv_freq) for positions
    0..S-1; the first R <= D dims of each head are rotated (halves [0, R/2) and [R/2, R)), the rest pass through.
    position_ids: None (0..T-1), int32/int64 `[T]` or `[B, T]` (`[1, T]` broadcasts), each in [-S, S) (negatives
    count from the end of the table, as torch indexing). Computed in fp32, cast back. Returns new contiguous
    `(q_rot, k_rot)` of the input shapes and dtype.

    Raises `UnsupportedInput` for inputs it cannot serve, a position outside the tables included (checked on the
    host: one device sync per new position_ids tensor; skipped under CUDA graph capture and torch.compile tracing,
    where such rows give NaN).
    """
    _validate(q, k, cos, sin, position_ids)
    return torch.ops.qwenvl.apply_rotary(q, k, cos, sin, position_ids)
