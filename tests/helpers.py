"""Shared test tools: parity by relative RMS error and max-abs error, poisoned outputs, devices and dtypes."""
from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# CUDA-only tests: tests/conftest.py skips them without CUDA; `pytest -m gpu` selects them
needs_cuda = pytest.mark.gpu

# (relative RMS, max-abs relative to the reference's max magnitude) per dtype
TOLERANCES = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 2e-2),
              torch.bfloat16: (2e-2, 5e-2)}

# dtypes the kernels are checked in: bf16 needs a GPU (the interpreter's bf16 tl.dot is wrong): its cases are gpu
TEST_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda, id="torch.bfloat16")]


def assert_close(out, ref, dtype=None, name="output", rel_rms=None, max_abs=None):
    """Pass when ‖out − ref‖/‖ref‖ <= rel_rms and max|out − ref| <= max_abs · max|ref|; a NaN never passes."""
    dtype = dtype or out.dtype
    tol_rms, tol_max = TOLERANCES[dtype]
    rel_rms = tol_rms if rel_rms is None else rel_rms
    max_abs = tol_max if max_abs is None else max_abs
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o, r = out.double(), ref.double()
    assert torch.isfinite(o).all(), f"{name}: non-finite values in the output"
    err = (o - r).norm() / r.norm().clamp_min(1e-30)
    assert err <= rel_rms, f"{name}: relative RMS error {err:.3e} > {rel_rms:.1e}"
    scale = r.abs().max().clamp_min(1e-30)
    worst = (o - r).abs().max() / scale
    assert worst <= max_abs, f"{name}: max-abs error {worst:.3e} (relative to max |ref|) > {max_abs:.1e}"


def non_contiguous(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The same values as t, laid out with a stride gap (a slice of a wider tensor)."""
    shape = list(t.shape)
    shape[dim] *= 2
    wide = torch.empty(shape, dtype=t.dtype, device=t.device)
    idx = [slice(None)] * t.dim()
    idx[dim] = slice(0, None, 2)
    wide[tuple(idx)] = t
    out = wide[tuple(idx)]
    assert not out.is_contiguous()
    return out
