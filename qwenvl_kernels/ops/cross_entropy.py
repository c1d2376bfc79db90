"""Fused LM head + cross-entropy: `linear_cross_entropy(hidden, weight, labels)` without the `[N, V]` logits.

Semantics are those of `qwenvl_kernels.reference.linear_cross_entropy`: logits `hidden @ weight.T` in the input
dtype (cuBLAS, fp32 accumulation), softmax statistics in fp32, "mean" divides by the number of labels that are not
`ignore_index` (loss 0 and zero gradients when there are none), "sum" does not divide.

How it works. The tokens are cut into chunks of C rows. For each chunk:
  1. `logits = hidden[chunk] @ W.T` (cuBLAS) into one reusable buffer `[C, V]` in the input dtype. The input dtype
     is what the reference rounds its logits to (`F.linear(...).float()`), so the statistics see the same numbers,
     and it halves the buffer and the kernel's traffic for bf16 / fp16.
  2. A Triton kernel, one program per row, streams the row in blocks of V: online max and sum of exponentials in
     fp32, the row's loss `lse - logit[label]`, then a second pass that overwrites the logits IN PLACE with their
     gradient `(softmax - onehot(label)) * scale` (scale = 1/count for "mean", 1 for "sum", 0 for ignored rows),
     rounded to the input dtype like the reference's gradient is.
  3. `dhidden[chunk] = dlogits @ W` and `dW += dlogits.T @ hidden[chunk]` (cuBLAS). dW accumulates in fp32 for
     fp16 / bf16 inputs: one fp32-output GEMM per chunk where torch offers it on the device (`out_dtype`,
     checked once by a probe), else per slice of the vocabulary through a bounded temporary.
The gradients are therefore computed during the forward (the backward of a scalar loss only scales them); the
backward multiplies them by the incoming `grad_output` (any value: loss * 0.5, gradient-accumulation scaling)
without touching it. When neither input requires grad, the gradient pass of step 2 and step 3 are skipped.

Memory model (N tokens, V vocabulary, H hidden, b = bytes of the input dtype), beyond the inputs themselves:
  fused (this module): one logits chunk C*V*b (C chosen so it is <= 256 MiB on CUDA, <= 8 MiB on the CPU;
      Qwen-VL bf16: C = 832 rows, 253 MB), dhidden N*H*b, dW V*H*4 (fp32: 2.49 GB for Qwen-VL), per-row losses
      N*4; the backward then allocates the weight gradient V*H*b (1.24 GB) and dhidden's scaled copy N*H*b. Only
      the N*H terms grow with N. Without the out_dtype GEMM, add a <= 64 MiB temporary per vocabulary slice; the
      first CUDA call per (V, dtype) autotunes the row kernel on a clone of the chunk (restore_value, since the
      kernel writes in place). Qwen-VL, 4096 tokens, bf16: ~4 GB at the peak, flat in N.
      fp32 dW costs 1.24 GB more than accumulating in bf16 and buys one rounding instead of one per chunk.
  unfused (reference): the logits N*V*b, their fp32 copy N*V*4 and the log-softmax N*V*4 (saved for the backward)
      live together in the forward; the backward adds the log-prob gradient and the logit gradient N*V*4 each and
      the cast N*V*b. One fp32 [N, V] is 2.49 GB for 4096 Qwen-VL tokens; ~3 of them are live at the peak (~8 GB),
      growing linearly with N.
  tests/test_cross_entropy.py measures both peaks on the CPU with the profiler's allocator events (fused: exactly
  the terms above; unfused: ~3.2 fp32 [N, V]) and, on CUDA, at the Qwen-VL size.

Costs and limits: one small host sync per call (the label range check and the token count, read together).
In fp16 the logit gradients are formed before `grad_output` is known, so a loss scaler's factor cannot lift
probabilities * 1/count that flush to zero in fp16 (the reference rounds the same quantity at grad_output = 1);
bf16 (the training dtype of Qwen-VL) has fp32's range and is not affected. No double backward.

Registered as the custom ops `qwenvl::linear_cross_entropy` (loss and the gradients of step 2-3) and
`qwenvl::linear_cross_entropy_backward` (their scaling by grad_output).

CONFIGS: one launch, "rows": the row kernel's candidates over BLOCK_V (in the kwargs) and warps, keyed on V. The
other constexpr: COMPUTE_GRAD. The kernel rewrites the logits in place, so the autotuner restores them around
every trial (restore_value).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..launch import Launcher, UnsupportedInput, check_device, check_tensor, check_tensors, empty, next_power_of_2

CONFIGS = {"rows": [triton.Config({"BLOCK_V": bv}, num_warps=w) for bv in (1024, 2048, 4096) for w in (4, 8, 16)]}

# bound on one logits chunk (rows * V * element size); the GPU budget keeps the dW GEMM of each chunk large enough
# that re-reading the fp32 dW per chunk stays a small share of its time
_CHUNK_BYTES_CUDA = 256 << 20
_CHUNK_BYTES_CPU = 8 << 20
# bound on the temporary of the sliced dW accumulation (only without an fp32-output GEMM)
_DW_SLICE_BYTES = 64 << 20
# the interpreter's fixed block: small enough that the test vocabulary 1000 spans two blocks (the last one partial),
# large enough to keep the interpreter's per-block cost down
_INTERPRET_BLOCK_V = 512


@triton.jit
def _ce_rows_kernel(
    logits_ptr, labels_ptr, loss_ptr,
    stride_row, V, ignore_index, grad_scale,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    cols = tl.arange(0, BLOCK_V)

    # every block starts below V, so it holds at least one finite logit and m is finite after the first block
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    # ignored rows read a harmless in-range logit and contribute nothing
    target = tl.where(valid, label, 0)
    x_target = tl.load(base + target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_target, 0.0))

    if COMPUTE_GRAD:
        scale = tl.where(valid, grad_scale, 0.0)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            g = tl.where(offs == target, p - 1.0, p) * scale
            tl.store(base + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)


# keyed on V (and, implicitly, the dtypes); the kernel rewrites the logits in place, so every benchmarking run must
# start from the same logits: restore_value saves and restores the chunk around each trial
_launch_rows = Launcher(_ce_rows_kernel, CONFIGS, key=["V", "COMPUTE_GRAD"], restore_value=["logits_ptr"])


def _rows(logits, labels, losses, ignore_index, grad_scale, compute_grad):
    n, V = logits.shape
    _launch_rows("rows", (n,), logits, labels, losses, logits.stride(0), V, ignore_index, grad_scale,
                 interpreter={"BLOCK_V": min(_INTERPRET_BLOCK_V, next_power_of_2(V))}, COMPUTE_GRAD=compute_grad)


_FP32_OUT_GEMM: dict = {}


def _fp32_out_gemm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `addmm(C32, A, B, out_dtype=float32, out=C32)` accumulates fp16/bf16 products into fp32 in place here.

    A tiny probe, once per (device, dtype): the overload is recent and CUDA-only, and its in-place aliasing is what
    we rely on, so we check the result rather than the version number.
    """
    key = (str(device), dtype)
    if key not in _FP32_OUT_GEMM:
        ok = False
        if device.type == "cuda":
            try:
                g = torch.Generator(device=device).manual_seed(0)
                a = torch.randn(16, 48, device=device, generator=g).to(dtype)
                b = torch.randn(16, 24, device=device, generator=g).to(dtype)
                c = torch.randn(48, 24, device=device, generator=g)
                want = c + 0.5 * (a.float().t() @ b.float())
                torch.addmm(c, a.t(), b, out_dtype=torch.float32, alpha=0.5, out=c)
                ok = c.dtype == torch.float32 and torch.allclose(c, want, rtol=1e-2, atol=1e-2)
            except Exception:  # an absent overload or an unsupported dtype: use the sliced path
                ok = False
        _FP32_OUT_GEMM[key] = ok
    return _FP32_OUT_GEMM[key]


def _accumulate_dw(dw, dlogits, h):
    """dw [V, H] += dlogits.T [V, n] @ h [n, H], with dw possibly fp32 while the operands are fp16 / bf16."""
    if dw.dtype == dlogits.dtype:
        dw.addmm_(dlogits.t(), h)
    elif _fp32_out_gemm_works(dw.device, dlogits.dtype):
        torch.addmm(dw, dlogits.t(), h, out_dtype=torch.float32, out=dw)
    else:
        # one input-dtype GEMM per vocabulary slice (fp32 accumulation inside cuBLAS), added into the fp32 dW:
        # a bounded temporary instead of a second [V, H] tensor
        V, H = dw.shape
        rows = max(1, _DW_SLICE_BYTES // (H * dlogits.element_size()))
        for v0 in range(0, V, rows):
            v1 = min(V, v0 + rows)
            dw[v0:v1].add_(torch.mm(dlogits[:, v0:v1].t(), h))


def _gemm_ready(t: torch.Tensor) -> torch.Tensor:
    # cuBLAS takes row- or column-major operands with any leading stride; anything else gets one copy
    if t.stride(-1) == 1 or t.stride(0) == 1:
        return t
    return t.contiguous()


def _chunk_rows(N: int, V: int, elem: int, device: torch.device) -> int:
    budget = _CHUNK_BYTES_CUDA if device.type == "cuda" else _CHUNK_BYTES_CPU
    rows = max(1, budget // (V * elem))
    if rows > 64:
        rows -= rows % 64  # whole tensor-core tiles for the GEMMs
    return max(1, min(rows, N))


def _validate(hidden, weight, labels, ignore_index, reduction, chunk_size):
    name = "linear_cross_entropy"
    if reduction not in ("mean", "sum"):
        raise UnsupportedInput(f"{name}: reduction must be 'mean' or 'sum', got {reduction!r}")
    check_tensors(name, hidden, weight)
    check_tensor(name, "labels", labels)
    if hidden.dim() != 2 or weight.dim() != 2:
        raise UnsupportedInput(
            f"{name}: expected hidden [N, H] and weight [V, H], got shapes {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}; flatten the tokens first (hidden.reshape(-1, H), labels.reshape(-1))"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise UnsupportedInput(
            f"{name}: hidden size mismatch: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)} "
            f"(weight is the LM head [V, H])"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise UnsupportedInput(f"{name}: empty weight {tuple(weight.shape)}")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise UnsupportedInput(
            f"{name}: labels must be [N] = [{hidden.shape[0]}] (one per hidden row, already shifted), "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise UnsupportedInput(f"{name}: labels must be int64 (or int32), got {labels.dtype}")
    if labels.device != hidden.device:
        raise UnsupportedInput(f"{name}: labels are on {labels.device} but hidden is on {hidden.device}; move them")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise UnsupportedInput(f"{name}: ignore_index must be an int, got {ignore_index!r}")
    if not -(2 ** 63) <= ignore_index < 2 ** 63:
        raise UnsupportedInput(f"{name}: ignore_index {ignore_index} does not fit in int64")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise UnsupportedInput(f"{name}: chunk_size must be a positive int or None, got {chunk_size!r}")
    check_device(name, hidden)


@torch.library.custom_op("qwenvl::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                             reduction: str, chunk_size: Optional[int], need_dh: bool,
                             need_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dloss/dhidden, dloss/dweight in fp32), the gradients at grad_output = 1 (0-element when not needed)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dtype, device = hidden.dtype, hidden.device
    labels = labels.to(torch.int64).contiguous()

    # one host sync for both: the number of counted tokens and the number of labels outside [0, V)
    counted = labels != ignore_index
    bad = counted & ((labels < 0) | (labels >= V))
    count, n_bad = torch.stack((counted.sum(), bad.sum())).tolist()
    if n_bad:
        first = labels[bad][0].item()
        raise ValueError(
            f"linear_cross_entropy: {n_bad} label(s) outside [0, {V}) that are not ignore_index={ignore_index} "
            f"(first: {first}); labels index the vocabulary of the LM head (weight [V, H])"
        )

    h = _gemm_ready(hidden)
    w = _gemm_ready(weight)
    compute_grad = need_dh or need_dw
    grad_scale = 1.0 / max(count, 1) if reduction == "mean" else 1.0

    C = chunk_size if chunk_size is not None else _chunk_rows(N, V, hidden.element_size(), device)
    C = max(1, min(C, N))
    buf = empty((C if N else 0, V), dtype, device)
    losses = empty(N, torch.float32, device)
    dh = empty((N, H) if need_dh else (0,), dtype, device)
    dw = torch.zeros((V, H) if need_dw else (0,), dtype=torch.float32, device=device)

    for s in range(0, N, C):
        e = min(N, s + C)
        logits = buf[: e - s]
        torch.mm(h[s:e], w.t(), out=logits)
        _rows(logits, labels[s:e], losses[s:e], ignore_index, grad_scale, compute_grad)
        if need_dh:
            torch.mm(logits, w, out=dh[s:e])
        if need_dw:
            _accumulate_dw(dw, logits, h[s:e])
    del buf

    loss = losses.sum()
    if reduction == "mean":
        loss = loss / max(count, 1)
    return loss, dh, dw


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, ignore_index, reduction, chunk_size, need_dh, need_dw):
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(hidden.shape if need_dh else (0,)),
            weight.new_empty(weight.shape if need_dw else (0,), dtype=torch.float32))


@torch.library.custom_op("qwenvl::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(grad_output: torch.Tensor, dh: torch.Tensor, dw: torch.Tensor,
                                      weight_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's gradients times grad_output (a scalar, never written to)."""
    g = grad_output.reshape(())
    grad_hidden = dh * g
    # scale in fp32 and round once into the weight dtype, without an fp32 temporary of [V, H]
    grad_weight = torch.empty(dw.shape, dtype=weight_dtype, device=dw.device)
    torch.mul(dw, g.to(dw.dtype), out=grad_weight)
    return grad_hidden, grad_weight


@_linear_cross_entropy_backward_op.register_fake
def _(grad_output, dh, dw, weight_dtype):
    return torch.empty_like(dh), dw.new_empty(dw.shape, dtype=weight_dtype)


def _setup_context(ctx, inputs, output):
    _, dh, dw = output
    ctx.save_for_backward(dh, dw)
    ctx.mark_non_differentiable(dh, dw)
    ctx.set_materialize_grads(False)  # no zero-filled [N, H] and [V, H] gradients for the saved gradients
    ctx.weight_dtype = inputs[1].dtype
    ctx.needs = inputs[6], inputs[7]


def _backward(ctx, grad_output, _ddh, _ddw):
    if grad_output is None:
        return (None,) * 8
    dh, dw = ctx.saved_tensors
    grad_hidden, grad_weight = torch.ops.qwenvl.linear_cross_entropy_backward(grad_output, dh, dw, ctx.weight_dtype)
    need_dh, need_dw = ctx.needs
    return ((grad_hidden if need_dh and ctx.needs_input_grad[0] else None),
            (grad_weight if need_dw and ctx.needs_input_grad[1] else None)) + (None,) * 6


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", *, chunk_size=None):
    """The LM head and the next-token loss fused: `cross_entropy(hidden @ weight.T, labels)`, never holding [N, V].

    hidden: `[N, H]` fp32 / fp16 / bf16 (any strides; e.g. the flattened, shifted decoder output).
    weight: `[V, H]`, same dtype and device (the LM head; V = 151936, H = 4096 for Qwen-VL).
    labels: `[N]` int64 (or int32), already shifted; `ignore_index` entries are skipped, any other label must lie
        in [0, V) (checked on the host: ValueError).
    reduction: "mean" (sum over counted tokens / their count; 0 with zero gradients when none is counted) or "sum"
        (for gradient accumulation that divides by the true token count itself).
    chunk_size: keyword-only override of the rows per logits chunk (tests); by default sized to the memory budget.
    Returns a 0-dim fp32 loss; gradients flow to hidden and weight (computed during the forward, see module doc).
    Raises UnsupportedInput (before any launch) for shapes, dtypes, devices or a reduction it cannot serve.
    """
    _validate(hidden, weight, labels, ignore_index, reduction, chunk_size)
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    return torch.ops.qwenvl.linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, chunk_size,
                                                 need_dh, need_dw)[0]
