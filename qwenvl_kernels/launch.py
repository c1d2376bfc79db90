"""What every kernel in `qwenvl_kernels.ops` shares: the launch helper, the output hook, input checks, constants.

Launching. Each ops module exports `CONFIGS: dict[str, list[triton.Config]]`, launch name -> the CUDA candidates of
that launch, and launches through one `Launcher(kernel, CONFIGS, key)` per kernel:

    _fwd = Launcher(_fwd_kernel, CONFIGS, key=["HEAD_DIM"])
    _fwd("fwd/d128", grid, *args, interpreter={"BLOCK_M": 32}, **constexprs)

- under the interpreter (TRITON_INTERPRET=1) it launches one fixed config: `interpreter` (block sizes chosen for
  the interpreter's cost model), else the first candidate's kwargs, with 4 warps (autotune cannot run there);
- on CUDA with one candidate, or with `AUTOTUNE` off, it launches the first candidate;
- otherwise a `triton.autotune` over the candidates, built on first use and cached per launch name. `key` names
  structural arguments only (head dim, hidden size, feature flags), never a sequence length or a batch size, so
  that a new length never retunes.
`grid` is a tuple or a function of the launch's meta-parameters (the chosen config's kwargs and the constexprs).

Outputs. Every buffer a kernel must overwrite completely is allocated with `empty`; with `POISON_OUTPUTS` on (the
tests' one switch) it is filled with NaN first, so an element a kernel skips cannot pass.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch


class UnsupportedInput(ValueError):
    """A kernel cannot serve this input (dtype, shape, device). Raised before any launch; "auto" falls back."""


LOG2E = 1.4426950408889634  # the kernels keep softmax statistics in log2 units (exp2 is the cheap exponential)
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 128
MAX_GRID_Y = 65535  # CUDA grid axes 1 and 2 allow this many programs
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# On CUDA: tune over a launch's candidates (True) or take the first one (False: no tuning time, e.g. short jobs
# and tests that only check numbers). QWENVL_AUTOTUNE=0 in the environment turns it off at import.
AUTOTUNE = os.environ.get("QWENVL_AUTOTUNE", "1") not in ("", "0")
# Tests turn this on: every kernel-allocated output is NaN until a kernel writes it.
POISON_OUTPUTS = False


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU in interpreter mode (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when the triton package can be imported (the "torch" backend works without it)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def tracing(*tensors) -> bool:
    """True while torch.compile traces (or the inputs are FakeTensors): tensor data cannot be read then."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return any(isinstance(t, torch.Tensor) and is_fake(t) for t in tensors)


def empty(shape, dtype, device) -> torch.Tensor:
    """A buffer a kernel overwrites completely (NaN-filled while POISON_OUTPUTS is on)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if POISON_OUTPUTS and t.is_floating_point() else t


# ---------------------------------------------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------------------------------------------

def _device_of(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


class Launcher:
    """Launches one @triton.jit kernel with the candidates `configs[name]` of a named launch (see module doc)."""

    def __init__(self, kernel, configs: dict, key, restore_value=None):
        self.kernel = kernel
        self.configs = configs
        self.key = list(key)
        self.restore_value = restore_value
        self._tuned = {}

    def __call__(self, name, grid, *args, interpreter=None, **constexprs):
        candidates = self.configs[name]
        if interpreting():
            meta = {**candidates[0].kwargs, "num_warps": 4, **(interpreter or {})}
            return self._run(grid, meta, args, constexprs)
        device = _device_of(args)
        guard = torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()
        with guard:
            if len(candidates) == 1 or not AUTOTUNE:
                return self._run(grid, candidates[0].all_kwargs(), args, constexprs)
            tuned = self._tuned.get(name)
            if tuned is None:
                import triton

                tuned = triton.autotune(configs=candidates, key=self.key, restore_value=self.restore_value)(
                    self.kernel)
                self._tuned[name] = tuned
            return tuned[grid](*args, **constexprs)

    def _run(self, grid, meta, args, constexprs):
        g = grid({**constexprs, **meta}) if callable(grid) else grid
        return self.kernel[g](*args, **constexprs, **meta)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def block_d(head_dim: int) -> int:
    """The head-dim block of the attention kernels: the next power of two, at least 16 (the smallest tl.dot)."""
    return max(16, next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs are the exactness path (IEEE fp32 products; tf32 would be ~1e-3 off the
    fp32 reference); 16-bit inputs ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_programs_hint(device: torch.device) -> int:
    """How many programs fill the device once (persistent grids); a small fixed number under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ---------------------------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------------------------

def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim has stride 1, else a contiguous copy: the kernels take any other strides, but a
    strided last dim would turn every tile load into a gather."""
    return t if t.stride(-1) == 1 else t.contiguous()


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """A [rows, n] view of t with unit stride along n (a copy only when no such view exists)."""
    if n > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    t2 = t.reshape(-1, n)
    if n > 1 and t2.stride(1) != 1:  # reshape may hand back an odd view; never seen, but never trust it
        t2 = t2.contiguous()
    return t2


def row_stride(t2: torch.Tensor) -> int:
    """The row stride of a [rows, n] view to pass to a kernel. A single row's stride is arbitrary (even 1 after a
    transpose); a fixed value keeps Triton's integer specialization (==1, %16) from compiling another variant."""
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


# ---------------------------------------------------------------------------------------------------------------
# validation: every message names the function, says what was wrong and what to do
# ---------------------------------------------------------------------------------------------------------------

def check_tensor(name: str, what: str, t, ndim: int | None = None, layout: str = "") -> None:
    """`t` is a tensor (with `ndim` dims, described by `layout`, when given)."""
    if not isinstance(t, torch.Tensor):
        raise UnsupportedInput(f"{name}: {what} must be a tensor{' ' + layout if layout else ''}, "
                               f"got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise UnsupportedInput(f"{name}: {what} must have {ndim} dims {layout}, got shape {tuple(t.shape)}")


def check_tensors(name: str, *tensors: torch.Tensor, dtypes=SUPPORTED_DTYPES) -> None:
    """All tensors on one device, with one floating dtype from `dtypes`. (Whether this machine can run them is
    `check_device`'s question, asked after the arguments are known to fit together.)"""
    t0 = tensors[0]
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise UnsupportedInput(f"{name}: expected tensors, got {type(t).__name__}")
        if t.device != t0.device:
            raise UnsupportedInput(f"{name}: inputs are on different devices ({t0.device} and {t.device}); "
                                   f"move them to one")
        if t.dtype != t0.dtype:
            raise UnsupportedInput(f"{name}: inputs have different dtypes ({t0.dtype} and {t.dtype}); "
                                   f"cast them to one")
    if t0.dtype not in dtypes:
        raise UnsupportedInput(f"{name}: dtype {t0.dtype} is not supported; use one of {[str(d) for d in dtypes]}")


def check_device(name: str, t0: torch.Tensor) -> None:
    """The kernels can run on t0's device and dtype here: CUDA, or the CPU under the interpreter (no bf16 there)."""
    if t0.device.type == "cpu" and not interpreting():
        raise UnsupportedInput(
            f"{name}: the Triton kernels run on CUDA tensors; on the CPU set TRITON_INTERPRET=1 before importing "
            f"triton (slow, for testing) or use kernels='torch'"
        )
    if t0.device.type not in ("cpu", "cuda"):
        raise UnsupportedInput(f"{name}: device {t0.device} is not supported by the Triton kernels")
    if t0.device.type == "cpu" and t0.dtype == torch.bfloat16:
        # the interpreter's bf16 tl.dot is wrong and its bf16 arithmetic slow: refuse rather than be silently wrong
        raise UnsupportedInput(f"{name}: bfloat16 is not supported under the Triton interpreter; use float32 or "
                               f"float16")


def check_index(name: str, what: str, t, shape, device: torch.device, dtypes=(torch.int32, torch.int64),
                hint: str = "") -> None:
    """An integer tensor on `device`, of `shape` unless that is None (sequence starts, lengths, positions)."""
    allowed = " or ".join(str(d).replace("torch.", "") for d in dtypes)
    if not isinstance(t, torch.Tensor):
        of_shape = f" of shape {list(shape)}" if shape is not None else ""
        raise UnsupportedInput(f"{name}: {what} must be an {allowed} tensor{of_shape}, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise UnsupportedInput(f"{name}: {what} has dtype {t.dtype}; pass an {allowed} tensor"
                               f"{' (.to(torch.int32))' if dtypes == (torch.int32,) else ''}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise UnsupportedInput(f"{name}: {what} has shape {tuple(t.shape)}; expected {list(shape)}{hint}")
    if t.device != device:
        raise UnsupportedInput(f"{name}: {what} is on {t.device} but q is on {device}; move it to {device}")


def check_param(name: str, what: str, p, x: torch.Tensor) -> None:
    """A per-feature parameter (norm weight or bias): [N] for x [..., N], in x's dtype."""
    n = x.shape[-1]
    if not isinstance(p, torch.Tensor):
        raise UnsupportedInput(f"{name}: {what} must be a tensor of shape [{n}], got {type(p).__name__}")
    if p.dim() != 1 or p.shape[0] != n:
        raise UnsupportedInput(
            f"{name}: {what} has shape {tuple(p.shape)}, expected [{n}] (the last dim of x {tuple(x.shape)})")
    if p.dtype != x.dtype:
        raise UnsupportedInput(
            f"{name}: {what} dtype {p.dtype} differs from x dtype {x.dtype}; cast the module (or x) so they match")


def check_head_dim(name: str, head_dim: int, multiple_of: int = 8) -> None:
    if head_dim < 1 or head_dim > MAX_HEAD_DIM or head_dim % multiple_of:
        need = f"a multiple of {multiple_of} and " if multiple_of > 1 else ""
        raise UnsupportedInput(f"{name}: head_dim {head_dim} is not supported: it must be {need}at most "
                               f"{MAX_HEAD_DIM} (and at least 1); pad the head dim or use kernels='torch'")


def check_heads(name: str, heads: int, kv_heads: int) -> None:
    if kv_heads == 0 or heads % kv_heads:
        raise UnsupportedInput(f"{name}: the number of query heads ({heads}) must be a multiple of the number of "
                               f"key/value heads ({kv_heads})")


def check_grid(name: str, programs: int) -> None:
    if programs > MAX_GRID_Y:
        raise UnsupportedInput(f"{name}: batch x heads = {programs} exceeds the {MAX_GRID_Y} programs a CUDA grid "
                               f"axis allows; split the batch")


def softmax_scale_of(name: str, softmax_scale, head_dim: int) -> float:
    """The attention scale as a float: 1 / sqrt(head_dim) by default. It must be positive: the kernels take the row
    max of the unscaled scores and apply the scale inside exp2's FFMA (one instruction per score saved)."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    try:
        scale = float(softmax_scale)
    except (TypeError, ValueError):
        raise UnsupportedInput(f"{name}: softmax_scale must be a number or None, got {softmax_scale!r}") from None
    if not scale > 0.0:
        raise UnsupportedInput(f"{name}: softmax_scale must be positive, got {scale}; use kernels='torch' for a "
                               f"zero or negative scale")
    return scale
