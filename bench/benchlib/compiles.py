"""Triton compilations: how many variants each of our kernels has compiled (the recompile target counts these), and
whether this process is a warm-up process (`BENCH_WARM=1`: see `warm.py`; nothing is timed or recorded then)."""
from __future__ import annotations

import gc
import importlib
import os
import pkgutil


def warming() -> bool:
    """True in a warm-up process of gpu_check.sh: the cases run once to reveal what they compile, untimed."""
    return os.environ.get("BENCH_WARM", "0") == "1"


def kernel_modules() -> list:
    """Every module of `qwenvl_kernels.ops` that imports (a module that does not is someone else's failure)."""
    try:
        import qwenvl_kernels.ops as ops
    except Exception:
        return []
    mods = []
    for info in pkgutil.iter_modules(ops.__path__):
        try:
            mods.append(importlib.import_module(f"{ops.__name__}.{info.name}"))
        except Exception:
            continue
    return mods


def jit_function(obj):
    """The @triton.jit function under autotuners and heuristics (each wrapper keeps it as `.fn`), or None."""
    try:
        from triton.runtime.jit import JITFunction
    except Exception:
        return None
    for _ in range(5):
        if isinstance(obj, JITFunction):
            return obj
        obj = getattr(obj, "fn", None)
        if obj is None:
            return None
    return None


def jit_functions() -> dict:
    """Every @triton.jit function of our kernel modules, by `module.function`."""
    found = {}
    for mod in kernel_modules():
        short = mod.__name__.rsplit(".", 1)[-1]
        for attr, obj in vars(mod).items():
            fn = jit_function(obj)
            if fn is not None and getattr(fn, "__module__", mod.__name__) == mod.__name__:
                found[f"{short}.{getattr(fn, '__name__', attr)}"] = fn
    return found


def compiled_variants(fn) -> int:
    """Compiled binaries in a JITFunction's cache, across devices; tolerant of how Triton versions lay it out."""
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        total = 0
        for entry in caches.values():
            first = entry[0] if isinstance(entry, tuple) else entry
            total += len(first) if hasattr(first, "__len__") else 0
        return total
    cache = getattr(fn, "cache", None)
    if isinstance(cache, dict):
        return sum(len(v) if isinstance(v, dict) else 1 for v in cache.values())
    return 0


def compile_counts() -> dict | None:
    """{kernel: compiled variants} for our kernels, plus "<autotune>" entries: configurations chosen per autotuner
    key (a new key means a new tuning run). None under the interpreter, where nothing is compiled."""
    from .env import interpreting

    if interpreting():
        return None
    counts = {name: compiled_variants(fn) for name, fn in jit_functions().items()}
    try:
        from triton.runtime.autotuner import Autotuner

        for obj in gc.get_objects():
            if isinstance(obj, Autotuner):
                name = getattr(getattr(obj, "base_fn", None) or getattr(obj, "fn", None), "__name__", "?")
                key = f"<autotune>{name}"
                counts[key] = counts.get(key, 0) + len(getattr(obj, "cache", {}) or {})
    except Exception:
        pass
    return counts
