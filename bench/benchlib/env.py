"""Where the benchmarks run: the device and dtype, the library versions, the commit, and which paths can run here.

A path that cannot run in this environment (a library missing, no GPU for the Triton path) raises `Unavailable`;
the suite records it as skipped with the reason.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import re
import subprocess

import torch

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(BENCH)

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
# the interpreter refuses bf16 (its bf16 tl.dot is wrong): the CPU run measures fp32 at toy sizes
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
OURS = "triton"


class Unavailable(Exception):
    """A baseline that this environment cannot run (library missing, backend refuses the input): recorded, skipped."""


def first_line(e: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:limit]


def optional_module(name: str):
    """Import an optional baseline library or raise Unavailable with the reason (absent, or broken build)."""
    top = name.split(".")[0]
    if importlib.util.find_spec(top) is None:
        raise Unavailable(f"{top} is not installed")
    try:
        return importlib.import_module(name)
    except Exception as e:  # an installed wheel built for another torch fails here, not at find_spec
        raise Unavailable(f"{name} does not import: {first_line(e)}") from None


def library_versions() -> dict:
    out = {}
    for name in ("flash_attn", "liger_kernel"):
        try:
            out[name] = getattr(optional_module(name), "__version__", "installed")
        except Unavailable as e:
            out[name] = f"unavailable ({e})"
    return out


def device_info() -> dict:
    """The card as torch names it (never assumed: an H100 and an H200 differ in memory bandwidth and size)."""
    info = {"type": DEVICE.type, "torch": torch.__version__, "dtype": str(DTYPE).replace("torch.", "")}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    info["interpreter"] = interpreting()
    if ON_CUDA:
        p = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                    sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1),
                    l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1), cuda=torch.version.cuda)
    else:
        info.update(name=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)")
    return info


def gpu_slug(name: str) -> str:
    s = re.sub(r"^nvidia\s+", "", name.strip().lower())
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "gpu"


def git_commit() -> str:
    env = os.environ.get("BENCH_COMMIT")
    if env:
        return env
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


def sync():
    if ON_CUDA:
        torch.cuda.synchronize()


def interpreting() -> bool:
    from qwenvl_kernels import interpreting as _interpreting

    return _interpreting()


def require_triton() -> None:
    """Unavailable unless our Triton path can run here: triton imports, and a GPU or the interpreter runs it."""
    from qwenvl_kernels import triton_available

    if not triton_available():
        raise Unavailable("triton does not import: the Triton path cannot run here")
    if not ON_CUDA and not interpreting():
        raise Unavailable("no CUDA GPU and TRITON_INTERPRET is not set: the Triton path cannot run here")


def ours():
    """The package whose top-level functions are our kernels (`qwenvl_kernels.rms_norm`, `.flash_attn_func`...)."""
    require_triton()
    import qwenvl_kernels

    return qwenvl_kernels


def backend(name: str):
    """The backend object the model takes ("torch" or "triton"), Unavailable when triton cannot run here."""
    if name == OURS:
        require_triton()
    from qwenvl_kernels import get_backend

    return get_backend(name)


def compile_available(what: str = "kernel"):
    """torch.compile baselines run on CUDA only: on the CPU inductor's first C++ build alone takes over a minute, and
    the CPU run only checks that the tracking works. Whole-model compiles are opt-in: cold, they take minutes."""
    if not ON_CUDA and os.environ.get("BENCH_CPU_COMPILE", "0") != "1":
        raise Unavailable("torch.compile baseline is measured on CUDA only (set BENCH_CPU_COMPILE=1 to force)")
    if what == "model" and os.environ.get("BENCH_COMPILE_MODELS", "0") != "1":
        raise Unavailable("torch.compile of a whole model takes minutes cold, past the device budget; "
                          "set BENCH_COMPILE_MODELS=1 to measure it")
    if not hasattr(torch, "compile"):
        raise Unavailable("torch.compile is missing")
