"""Flash attention on the kernels of `flash_attention_kernels.py` (forward) and `flash_attention_bwd_kernels.py`:
launch configurations, custom ops, autograd, and the backend's two calls.

- `attention(q, k, v, causal=False, softmax_scale=None, seq_start=None)`: `reference.attention` (flash-attn 2
  layout, bottom-right causal, left padding through `seq_start`).
- `varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
  softmax_scale=None)`: packed sequences, `reference.varlen_attention`.
flash-attn 2's complete call signatures (flash_attn_func and its relatives) are in `flash_attn_interface.py`.

Custom ops: `qwenvl::flash_attn` -> (out, lse) and `qwenvl::flash_attn_backward` -> (dq, dk, dv), deterministic
(no atomics). lse is fp32 in log2 units (`m + log2(l)` of the scores scaled by softmax_scale * log2(e)), -inf for
a row that sees no key; [batch, heads, seqlen_q], or [heads, total_q] for packed sequences.

CONFIGS: "{kind}/d64", "{kind}/d128" (16-bit inputs, one head block of <= 64 or 128 columns), "{kind}/split" (16-bit,
a head dim split into 64 + 32 + 16 column blocks, e.g. the ViT's 104) and "{kind}/fp32" (one fixed config: fp32
is the exactness path, IEEE products on FMA units, not a speed path) for kind = "fwd", "dq", "dkdv"; "pre" (the
delta preprocess, fixed). BLOCK_M (query block) and BLOCK_N (key block) are in the kwargs;
`launch_constexprs(kind, head_dim, causal, has_seq_start, varlen, dtype, row_stride8)` gives the other constexprs
and `launch_name(kind, constexprs)` the key (the preprocess takes HEAD_DIM, BLOCK_D, VARLEN, ROW_STRIDE8).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..launch import (LOG2E, Launcher, UnsupportedInput, block_d, check_device, check_grid, check_head_dim, check_heads,
                      check_index, check_tensor, check_tensors, dot_precision, empty, softmax_scale_of, tracing)
from .flash_attention_bwd_kernels import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel
from .flash_attention_kernels import _attn_fwd_kernel


def _cfg(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# H100-minded candidates per launch for 16-bit inputs. BLOCK_M is the query block, BLOCK_N the key block. The
# forward wants a tall query block (128) so that every K/V tile is reused by many rows, with a 64-wide key block to
# keep the fp32 accumulator and P in registers; the dK/dV kernel holds two [BLOCK_N, BLOCK_D] fp32 accumulators plus
# K and V, hence wide key blocks and narrow query blocks, with 64 key rows per warpgroup (8 warps on 64 rows would
# make both warpgroups compute the same S and dP). Every candidate compiles for sm_90a to unserialized wgmma,
# without spills or narrow tile loads, under Triton 3.6 and 3.9 (bench/compile_check.py, the static gate).
_FP32 = [_cfg(32, 32, 8, 2)]
CONFIGS = {
    "fwd/d64": [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3)],
    "dq/d64": [_cfg(128, 64, 8, 3), _cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3)],
    "dkdv/d64": [_cfg(32, 128, 8, 3), _cfg(32, 64, 4, 3), _cfg(64, 128, 8, 2)],
    "fwd/d128": [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 2)],
    "dq/d128": [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 2), _cfg(128, 32, 8, 3)],
    "dkdv/d128": [_cfg(32, 128, 8, 2), _cfg(32, 128, 8, 3)],
    "fwd/split": [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3)],
    "dq/split": [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 32, 8, 3)],
    "dkdv/split": [_cfg(32, 128, 8, 2), _cfg(32, 128, 8, 3)],
    "fwd/fp32": _FP32, "dq/fp32": _FP32, "dkdv/fp32": _FP32,
    "pre": [triton.Config({"BLOCK_M": 64}, num_warps=4)],
}
# Block sizes under the interpreter: small, and M != N so that tests exercise blocks that straddle the causal
# diagonal in both directions. Tests may change these (they are read at every launch).
INTERPRETER_BLOCKS = {"fwd": (32, 16), "dq": (32, 16), "dkdv": (16, 32), "pre": 32}

# structural sizes and features only, never a sequence length (that would retune at every new length); the
# autotuner adds the dtypes of the tensor arguments to the key itself
_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "HAS_SEQ_START", "VARLEN", "ROW_STRIDE8", "DOT_PREC"]
_LAUNCHERS = {"fwd": Launcher(_attn_fwd_kernel, CONFIGS, _TUNE_KEY),
              "dq": Launcher(_attn_bwd_dq_kernel, CONFIGS, _TUNE_KEY),
              "dkdv": Launcher(_attn_bwd_dkdv_kernel, CONFIGS, _TUNE_KEY)}
_launch_pre = Launcher(_attn_bwd_preprocess_kernel, CONFIGS, key=[])


# Head dims that a power-of-two block would pad (80, 96, 104, ...) are split into column blocks (see the kernel
# notes), per kernel where the split compiles to clean wgmma (bench/compile_check.py, case "vit d104").
SPLIT_HEAD = {"fwd": True, "dq": True, "dkdv": True}


def head_blocks(head_dim: int, kind: str) -> tuple:
    """(BLOCK_D, BLOCK_D1, BLOCK_D2) of kernel `kind`: one block of next_power_of_2(head_dim) (at least 16), or the
    binary decomposition of head_dim rounded up to 16 into blocks of 64, 32, 16 (104 -> 64 + 32 + 16)."""
    full = block_d(head_dim)
    need = -(-head_dim // 16) * 16
    if not SPLIT_HEAD[kind] or need == full:
        return full, 0, 0
    blocks = [b for b in (64, 32, 16) if need & b]  # need < full <= 128: at most these three
    return tuple(blocks + [0] * (3 - len(blocks)))


def launch_constexprs(kind, head_dim, causal, has_seq_start, varlen, dtype, row_stride8) -> dict:
    """The constexprs of kernel `kind` ("fwd", "dq", "dkdv") besides BLOCK_M and BLOCK_N."""
    return {"HEAD_DIM": head_dim, **dict(zip(("BLOCK_D", "BLOCK_D1", "BLOCK_D2"), head_blocks(head_dim, kind))),
            "CAUSAL": bool(causal), "HAS_SEQ_START": has_seq_start, "VARLEN": varlen, "ROW_STRIDE8": row_stride8,
            "DOT_PREC": dot_precision(dtype)}


def launch_name(kind: str, consts: dict) -> str:
    """The CONFIGS entry of a launch of kernel `kind` with these constexprs."""
    if consts["DOT_PREC"] == "ieee":
        return f"{kind}/fp32"
    if consts["BLOCK_D1"]:
        return f"{kind}/split"
    return f"{kind}/d{64 if consts['BLOCK_D'] <= 64 else 128}"


def row_stride8(*tensors) -> bool:
    """Whether a row (sequence) stride is not a multiple of 16 elements: the kernels then round it (`_mult8`)."""
    return any(t.stride(-3) % 16 != 0 for t in tensors if t.shape[-3] > 1)


def tile_ready(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy of it unless its head dim has unit stride, every other stride (of a dim longer than
    1) is a multiple of 8 and it starts 16-byte aligned. The kernels tell the compiler that strides are multiples
    of 8 (`_mult8`), which is what lets every tile load be 16 bytes wide; a strided head dim would make every tile
    load a gather. The copy is O(seqlen x dim), next to attention's O(seqlen^2 x dim). While torch.compile traces,
    the address is unknown: the custom op checks it again when it runs."""
    ok = (t.stride(-1) == 1 and (tracing(t) or t.data_ptr() % 16 == 0)
          and all(s % 8 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1))
    return t if ok else t.contiguous()


def _launch(kind, n_rows, n_bh, args, consts):
    """Launch kernel `kind` over (blocks of n_rows, n_bh). The row blocks are query blocks (BLOCK_M) for the
    forward and dQ kernels, key blocks (BLOCK_N) for dK/dV."""
    row_block = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    _LAUNCHERS[kind](launch_name(kind, consts),
                     lambda meta: (triton.cdiv(n_rows, meta[row_block]), n_bh), *args,
                     interpreter=dict(zip(("BLOCK_M", "BLOCK_N"), INTERPRETER_BLOCKS[kind])), **consts)


def _strides4(t, varlen):
    # varlen tensors are [1, total, heads, dim] views: batch entries are found through cu_seqlens, not a stride
    s = t.stride()
    return (0 if varlen else s[0], s[1], s[2], s[3])


def _geometry(q, k, cu_q, max_q, max_k):
    """(4-d views of q and k, number of sequences, longest query and key sequence)."""
    if cu_q is not None:
        return q[None], k[None], cu_q.shape[0] - 1, max_q, max_k
    return q, k, q.shape[0], q.shape[1], k.shape[1]


# --------------------------------------------------------------------------------------------------------------
# custom ops and autograd
# --------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("qwenvl::flash_attn", mutates_args=())
def _flash_attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_start: Optional[torch.Tensor],
                   cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int,
                   max_seqlen_k: int, softmax_scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) for validated inputs with a unit stride in the head dim: q [B, Tq, H, D], k/v [B, Tk, Hk, D],
    or packed [total, heads, D] with cu_seqlens (then max_seqlen_q/k bound the sequences)."""
    varlen = cu_seqlens_q is not None
    q, k, v = tile_ready(q), tile_ready(k), tile_ready(v)  # no copy for what fixed_length / packed prepared
    q4, k4, n_seq, max_q, max_k = _geometry(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    v4 = v[None] if varlen else v
    H, D = q4.shape[2], q4.shape[3]
    o = empty(q.shape, q.dtype, q.device)
    o4 = o[None] if varlen else o
    lse = empty((H, q4.shape[1]) if varlen else (n_seq, H, max_q), torch.float32, q.device)
    stride_l = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    if o.numel() > 0:
        dummy = q
        args = (q4, k4, v4, o4, lse, seq_start if seq_start is not None else dummy,
                cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy,
                *_strides4(q4, varlen), *_strides4(k4, varlen), *_strides4(v4, varlen), *_strides4(o4, varlen),
                *stride_l, max_q, max_k, H, H // k4.shape[2], softmax_scale * LOG2E)
        consts = launch_constexprs("fwd", D, causal, seq_start is not None, varlen, q.dtype,
                                   row_stride8(q4, k4, v4, o4))
        _launch("fwd", max_q, n_seq * H, args, consts)
    return o, lse


@_flash_attn_op.register_fake
def _(q, k, v, seq_start, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    if cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("qwenvl::flash_attn_backward", mutates_args=())
def _flash_attn_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                            lse: torch.Tensor, seq_start: Optional[torch.Tensor],
                            cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                            max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool, need_dq: bool,
                            need_dkv: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv); 0-element tensors for what is not needed."""
    varlen = cu_seqlens_q is not None
    q, k, v, out = tile_ready(q), tile_ready(k), tile_ready(v), tile_ready(out)
    q4, k4, n_seq, max_q, max_k = _geometry(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    v4, o4 = (v[None], out[None]) if varlen else (v, out)
    H, D = q4.shape[2], q4.shape[3]
    Hk = k4.shape[2]
    do4 = tile_ready(dout[None] if varlen else dout)  # a copy when needed: the incoming gradient is only read
    dq = empty(q.shape if need_dq else (0,), q.dtype, q.device)
    dk = empty(k.shape if need_dkv else (0,), k.dtype, k.device)
    dv = empty(v.shape if need_dkv else (0,), v.dtype, v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    stride_l = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    delta = empty(lse.shape, torch.float32, q.device)
    dummy = q
    ss = seq_start if seq_start is not None else dummy
    cq = cu_seqlens_q if varlen else dummy
    ck = cu_seqlens_k if varlen else dummy
    _launch_pre("pre", lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), n_seq * H),
                o4, do4, delta, cq, *_strides4(o4, varlen), *_strides4(do4, varlen), *stride_l, max_q, H,
                interpreter={"BLOCK_M": INTERPRETER_BLOCKS["pre"]}, HEAD_DIM=D, BLOCK_D=block_d(D), VARLEN=varlen,
                ROW_STRIDE8=row_stride8(o4, do4))
    outs = [t for t, need in ((dq, need_dq), (dk, need_dkv), (dv, need_dkv)) if need]
    stride8 = row_stride8(q4, k4, v4, do4, *(t[None] if varlen else t for t in outs))
    common = (*_strides4(q4, varlen), *_strides4(k4, varlen), *_strides4(v4, varlen), *_strides4(do4, varlen))
    qk_scale = softmax_scale * LOG2E
    if need_dq:
        dq4 = dq[None] if varlen else dq
        args = (q4, k4, v4, do4, dq4, lse, delta, ss, cq, ck, *common, *_strides4(dq4, varlen), *stride_l,
                max_q, max_k, H, H // Hk, qk_scale, softmax_scale)
        _launch("dq", max_q, n_seq * H, args,
                launch_constexprs("dq", D, causal, seq_start is not None, varlen, q.dtype, stride8))
    if need_dkv:
        dk4, dv4 = (dk[None], dv[None]) if varlen else (dk, dv)
        args = (q4, k4, v4, do4, dk4, dv4, lse, delta, ss, cq, ck, *common, *_strides4(dk4, varlen),
                *_strides4(dv4, varlen), *stride_l, max_q, max_k, Hk, H // Hk, qk_scale, softmax_scale)
        _launch("dkdv", max_k, n_seq * Hk, args,
                launch_constexprs("dkdv", D, causal, seq_start is not None, varlen, q.dtype, stride8))
    return dq, dk, dv


@_flash_attn_backward_op.register_fake
def _(dout, q, k, v, out, lse, seq_start, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      causal, need_dq, need_dkv):
    return (q.new_empty(q.shape if need_dq else (0,)), k.new_empty(k.shape if need_dkv else (0,)),
            v.new_empty(v.shape if need_dkv else (0,)))


def _setup_context(ctx, inputs, output):
    q, k, v, seq_start, cu_q, cu_k, max_q, max_k, scale, causal = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse
    ctx.save_for_backward(q, k, v, o, lse, seq_start, cu_q, cu_k)
    ctx.meta = (max_q, max_k, scale, causal)


def _backward(ctx, dout, _dlse):
    need_dq, need_dk, need_dv = ctx.needs_input_grad[:3]
    if dout is None or not (need_dq or need_dk or need_dv):
        return (None,) * 10
    q, k, v, o, lse, seq_start, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.qwenvl.flash_attn_backward(dout, q, k, v, o, lse, seq_start, cu_q, cu_k, *ctx.meta,
                                                      need_dq, need_dk or need_dv)
    return (dq if need_dq else None, dk if need_dk else None, dv if need_dv else None) + (None,) * 7


_flash_attn_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------------
# validation (shared with flash_attn_interface.py) and the backend's calls
# --------------------------------------------------------------------------------------------------------------

def check_qkv(name, q, k, v, rank, layout, dropout_p, softmax_scale) -> float:
    """q, k, v as the kernels serve them; returns the softmax scale."""
    for t, what in ((q, "q"), (k, "k"), (v, "v")):
        check_tensor(name, what, t, rank, layout)
    check_tensors(name, q, k, v)
    if dropout_p != 0.0:
        raise UnsupportedInput(f"{name}: dropout_p={dropout_p} is not implemented (Qwen-VL trains without "
                               f"attention dropout); pass dropout_p=0.0 or use kernels='torch'")
    if k.shape != v.shape:
        raise UnsupportedInput(f"{name}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    D = q.shape[-1]
    if k.shape[-1] != D:
        raise UnsupportedInput(f"{name}: q and k must have the same head_dim, got {D} and {k.shape[-1]}")
    check_head_dim(name, D)
    check_heads(name, q.shape[-2], k.shape[-2])
    scale = softmax_scale_of(name, softmax_scale, D)
    check_device(name, q)
    return scale


def _check_cu(name, cu, which, total, max_seqlen, device):
    """cu_seqlens as the kernels read them, and the longest sequence (max_seqlen, or read from cu_seqlens)."""
    check_index(name, which, cu, None, device, dtypes=(torch.int32,))
    if cu.dim() != 1 or cu.numel() < 1:
        raise UnsupportedInput(f"{name}: {which} must be 1-D [num_seqs + 1], got shape {tuple(cu.shape)}")
    if tracing(cu):
        # torch.compile traces with FakeTensors, whose values cannot be read: the host checks below are skipped
        # (the kernels read cu_seqlens as given), and the longest sequence must come from the caller
        if max_seqlen is None:
            raise UnsupportedInput(f"{name}: pass max_seqlen for {which} when compiling: it cannot be read from "
                                   f"cu_seqlens while tracing")
        return cu.contiguous(), int(max_seqlen)
    vals = cu.cpu()  # one small host copy: the checks below would otherwise be silent out-of-bounds reads
    if int(vals[0]) != 0:
        raise UnsupportedInput(f"{name}: {which} must start at 0, got {int(vals[0])}")
    lens = vals[1:] - vals[:-1]
    if (lens < 0).any():
        raise UnsupportedInput(f"{name}: {which} must be non-decreasing (cumulative sequence lengths)")
    if int(vals[-1]) != total:
        raise UnsupportedInput(f"{name}: {which}[-1] = {int(vals[-1])} must equal the number of packed tokens "
                               f"{total}")
    longest = int(lens.max()) if lens.numel() else 0
    if max_seqlen is None:
        return cu.contiguous(), longest
    max_seqlen = int(max_seqlen)
    if max_seqlen < longest:
        raise UnsupportedInput(f"{name}: max_seqlen for {which} is {max_seqlen} but a sequence has {longest} tokens")
    return cu.contiguous(), max_seqlen


def fixed_length(name, q, k, v, causal, softmax_scale, seq_start=None, dropout_p=0.0):
    """(out, lse in log2 units) of validated fixed-length attention."""
    scale = check_qkv(name, q, k, v, 4, "[batch, seqlen, heads, head_dim]", dropout_p, softmax_scale)
    B, H = q.shape[0], q.shape[2]
    if k.shape[0] != B:
        raise UnsupportedInput(f"{name}: q and k/v have different batch sizes ({B} and {k.shape[0]})")
    if seq_start is not None:
        if not isinstance(seq_start, torch.Tensor) or seq_start.dtype not in (torch.int32, torch.int64):
            raise UnsupportedInput(f"{name}: seq_start must be an int32 or int64 tensor [batch], got "
                                   f"{getattr(seq_start, 'dtype', type(seq_start).__name__)}")
        if seq_start.shape != (B,):
            raise UnsupportedInput(f"{name}: seq_start must have shape [batch] = [{B}], got {tuple(seq_start.shape)}")
        seq_start = seq_start.to(device=q.device).contiguous()
    check_grid(name, B * H)
    q, k, v = tile_ready(q), tile_ready(k), tile_ready(v)
    return torch.ops.qwenvl.flash_attn(q, k, v, seq_start, None, None, 0, 0, scale, bool(causal))


def packed(name, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
           dropout_p=0.0):
    """(out, lse in log2 units, [heads, total_q]) of validated packed-sequence attention."""
    scale = check_qkv(name, q, k, v, 3, "[total_tokens, heads, head_dim]", dropout_p, softmax_scale)
    cu_q, max_q = _check_cu(name, cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, q.device)
    cu_k, max_k = _check_cu(name, cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, q.device)
    if cu_q.shape[0] != cu_k.shape[0]:
        raise UnsupportedInput(f"{name}: cu_seqlens_q and cu_seqlens_k describe different numbers of sequences "
                               f"({cu_q.shape[0] - 1} and {cu_k.shape[0] - 1})")
    check_grid(name, (cu_q.shape[0] - 1) * q.shape[1])
    q, k, v = tile_ready(q), tile_ready(k), tile_ready(v)
    return torch.ops.qwenvl.flash_attn(q, k, v, None, cu_q, cu_k, max_q, max_k, scale, bool(causal))


def attention(q, k, v, causal=False, softmax_scale=None, seq_start=None):
    """Softmax attention with flash-attn 2 layout and semantics (`reference.attention`).

    q: [batch, seqlen_q, nheads, headdim]; k, v: [batch, seqlen_k, nheads_k, headdim]; one dtype among float16,
    bfloat16, float32, on one CUDA device (or the CPU under TRITON_INTERPRET=1). nheads must be a multiple of
    nheads_k (grouped-query attention), headdim a multiple of 8 and at most 128. Any strides.
    causal: query i sees keys j <= i + seqlen_k - seqlen_q (aligned to the bottom-right corner).
    softmax_scale: defaults to 1 / sqrt(headdim).
    seq_start: optional int32/int64 tensor [batch]: keys j < seq_start[b] are masked for batch entry b (left
    padding). A query row that sees no key outputs zeros and gets zero gradients.
    Returns [batch, seqlen_q, nheads, headdim] in q's dtype; differentiable in q, k and v.
    """
    return fixed_length("attention", q, k, v, causal, softmax_scale, seq_start)[0]


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                     softmax_scale=None):
    """Packed sequences that attend only to themselves (`reference.varlen_attention`): q [total_q, nheads,
    headdim], k/v [total_k, nheads_k, headdim] (dtypes, head dims and heads as in `attention`); cu_seqlens_q/k
    int32 [num_seqs + 1], non-decreasing from 0 to total_q / total_k (checked on the host: one small copy, skipped
    while torch.compile traces); max_seqlen_q/k: the longest sequence lengths (None: read from cu_seqlens).
    Causal is bottom-right aligned per sequence; a query of a sequence with no key outputs zeros.
    Returns [total_q, nheads, headdim]; differentiable in q, k and v."""
    return packed("varlen_attention", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                  softmax_scale)[0]
