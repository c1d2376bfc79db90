"""What the bench files share to declare their cases: parametrization with marks (which (case, impl) pairs serve a
target, what each may cost in time), random inputs, and the helpers that put baselines in front of an input."""
from __future__ import annotations

import warnings
from typing import Callable

import pytest
import torch

from .env import DEVICE, DTYPE, ON_CUDA, Unavailable, first_line
from .targets import is_target
from .timing import drop_grads

def cost_mark(seconds: float):
    """The seconds a case may take on the GPU with a warm compile cache, its first call (loading the compiled
    kernels, autotuning) included. A CPU run (toy sizes, the interpreter; a deadline only in gpu_check.sh's dry run)
    scales it: the interpreter's model cases are the slow ones there too."""
    return pytest.mark.bench_cost(seconds if ON_CUDA else max(3.0, seconds / 2))


def params(cases, impls, costs: dict | None = None, default_cost: float = 3.0,
           case_name: Callable[[str], str] | None = None) -> list:
    """(case, impl) pairs in the given order (baselines before ours, torch.compile last: it is the slowest to set
    up), with ids that read as `case-impl`. Marks: `target` where a target uses the pair, `bench_cost(seconds)` from
    `costs` (impl -> seconds on the GPU, else `default_cost`), `compile_baseline` for torch.compile."""
    out = []
    for case in cases:
        key = case if isinstance(case, str) else "-".join(str(c) for c in case)
        name = case_name(key) if case_name else key
        for impl in impls:
            marks = [cost_mark((costs or {}).get(impl, default_cost))]
            if impl == "compile":
                marks.append(pytest.mark.compile_baseline)
            if is_target(name, impl):
                marks.append(pytest.mark.target)
            out.append(pytest.param(case, impl, id=f"{key.replace(' ', '-')}-{impl}", marks=marks))
    return out


def randn(*shape, dtype=None, scale=1.0, grad=False, device=None):
    t = torch.randn(*shape, device=device or DEVICE, dtype=torch.float32) * scale
    return t.to(dtype or DTYPE).requires_grad_(grad)


def probe(fn, *args, what: str = "", backward: bool = False):
    """Call a baseline once (with its backward when that is measured too); a backend that refuses the input (SDPA's
    "no available kernel", a shape a library does not support) becomes Unavailable, with the reasons torch gave as
    warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.set_grad_enabled(backward):
                out = fn(*args)
                if backward:
                    outs = out if isinstance(out, (tuple, list)) else (out,)
                    torch.autograd.backward([o.float().sum() for o in outs])
                    drop_grads(args)
        except (RuntimeError, NotImplementedError, ValueError, AssertionError) as e:
            why = "; ".join(str(w.message).split("\n")[0][:160] for w in caught[:3])
            raise Unavailable(f"{what or 'baseline'} refuses this input: {first_line(e, 200)}"
                              + (f" ({why})" if why else "")) from None


SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}


def sdpa(impl: str, **kw):
    """`fn(q, k, v)` running torch SDPA on one backend alone (`impl` a key of SDPA_BACKENDS), inputs [B, H, T, D]."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        raise Unavailable(f"torch.nn.attention.sdpa_kernel is missing in torch {torch.__version__}: {e}") from None
    backend = getattr(SDPBackend, SDPA_BACKENDS[impl], None)
    if backend is None:
        raise Unavailable(f"SDPBackend.{SDPA_BACKENDS[impl]} does not exist in torch {torch.__version__}")

    def call(q, k, v):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)

    return call


def cuda_only(impl: str) -> None:
    if not ON_CUDA:
        raise Unavailable(f"{impl} runs on CUDA only")
