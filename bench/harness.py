"""The measuring machinery of bench/: device ceilings, timing, peak memory, the results file, the named targets.

Every bench module builds, per case and implementation, a zero-argument `step` (one iteration on rotated inputs)
and hands it to `Suite.run`, which times it, records it into the run's results (written to disk after every record,
so a run cut short keeps what it measured) and into pytest-benchmark's `extra_info`. Ratios between our path and the
baselines are recomputed whenever a case gains an entry, so they hold whatever order the tests run in.

On CUDA the time of a step is the median of CUDA-event intervals after a warm-up. Kernel cases ("kernel" mode) are
timed as device time: before every repetition an L2-sized buffer is overwritten (the cache cannot flatter the next
call) and the GPU is kept busy long enough that the host's launch work overlaps it. Module cases ("module" mode:
layers, the training step, generation) are timed as the user sees them, host gaps included.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import importlib
import importlib.util
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import shapes  # noqa: E402

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
# the interpreter refuses bf16 (its bf16 tl.dot is wrong): the CPU run measures fp32 at toy sizes
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
OURS = "triton"
SCHEMA = 1


class Unavailable(Exception):
    """A baseline that this environment cannot run (library missing, backend refuses the input): recorded, skipped."""


def _first_line(e: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    return f"{type(e).__name__}: {msg}"[:limit]


# --- environment --------------------------------------------------------------------------------------------------

def optional_module(name: str):
    """Import an optional baseline library or raise Unavailable with the reason (absent, or broken build)."""
    if importlib.util.find_spec(name.split(".")[0]) is None:
        raise Unavailable(f"{name.split('.')[0]} is not installed")
    try:
        return importlib.import_module(name)
    except Exception as e:  # an installed wheel built for another torch fails here, not at find_spec
        raise Unavailable(f"{name} does not import: {_first_line(e)}") from None


def library_versions() -> dict:
    out = {}
    for name in ("flash_attn", "liger_kernel"):
        try:
            mod = optional_module(name)
            out[name] = getattr(mod, "__version__", "installed")
        except Unavailable as e:
            out[name] = f"unavailable ({e})"
    return out


def device_info() -> dict:
    info = {"type": DEVICE.type, "torch": torch.__version__, "dtype": str(DTYPE).replace("torch.", "")}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    info["interpreter"] = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if ON_CUDA:
        p = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                    sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1),
                    l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1), cuda=torch.version.cuda)
    else:
        import platform

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


# --- timing -------------------------------------------------------------------------------------------------------

@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    reps: int
    first_call_s: float          # the first call: compilation, autotuning, allocation (excluded from the median)


class Timer:
    def __init__(self):
        self._flush = None
        self._clock_hz = None

    def _flush_buffer(self):
        if self._flush is None:
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) or (50 << 20)
            # several times L2, so every line the step will read is evicted; also ~100 us of GPU work
            self._flush = torch.empty(max(4 * l2, 256 << 20), dtype=torch.uint8, device="cuda")
        return self._flush

    def _cycles(self, seconds: float) -> int:
        if self._clock_hz is None:
            khz = getattr(torch.cuda.get_device_properties(0), "clock_rate", 0)
            self._clock_hz = khz * 1e3 if khz else 1.98e9
        return int(seconds * self._clock_hz)

    def time(self, step: Callable, mode: str = "kernel", target_s: float | None = None, min_reps=None,
             max_reps=None) -> Timing:
        if not ON_CUDA:
            # no compilation to wait out on the CPU (the interpreter runs the kernels as they are): one timed call
            return self._time_cpu(step, target_s or 0.0, min_reps or 1, max_reps or 1)
        t0 = time.perf_counter()
        step()
        sync()
        first = time.perf_counter() - t0
        kernel = mode == "kernel"
        target_s = target_s or (0.25 if kernel else 0.6)
        min_reps = min_reps or (10 if kernel else 3)
        max_reps = max_reps or (200 if kernel else 20)
        # estimate: device time and host enqueue time of one step, after a second warm-up call
        step()
        sync()
        t0 = time.perf_counter()
        step()
        host_s = time.perf_counter() - t0
        sync()
        wall_s = time.perf_counter() - t0
        reps = int(min(max(target_s / max(wall_s, 1e-6), min_reps), max_reps))
        sleep = 0
        if kernel and _has_sleep():
            # keep the GPU busy while the host launches the step, so launch work is not counted as kernel time
            sleep = self._cycles(min(max(host_s * 1.5 - 50e-6, 0.0), 2e-3))
        flush = self._flush_buffer() if kernel else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if kernel:
                flush.zero_()
                if sleep:
                    torch.cuda._sleep(sleep)
            starts[i].record()
            step()
            ends[i].record()
        torch.cuda.synchronize()
        return _summarize([s.elapsed_time(e) for s, e in zip(starts, ends)], first)

    @staticmethod
    def _time_cpu(step, target_s, min_reps, max_reps):
        times = []
        t_end = time.perf_counter() + target_s
        while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < t_end):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return _summarize(times, times[0] * 1e-3)


def _has_sleep() -> bool:
    return hasattr(torch.cuda, "_sleep")


def _summarize(times_ms, first_s) -> Timing:
    s = sorted(times_ms)
    q = lambda f: s[min(len(s) - 1, int(f * (len(s) - 1) + 0.5))]  # noqa: E731
    return Timing(median_ms=statistics.median(s), p20_ms=q(0.2), p80_ms=q(0.8), min_ms=s[0], reps=len(s),
                  first_call_s=first_s)


def peak_memory(step) -> tuple[int, int] | None:
    """(bytes allocated above what was live before the step, absolute peak) over one call; None off CUDA."""
    if not ON_CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak - base, peak


def rotation_count(bytes_per_set: float, limit_bytes: float = 4 << 30) -> int:
    """Input sets to cycle through so that one step's inputs were evicted from L2 by the others' (3 x L2 of data)."""
    if not ON_CUDA:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) or (50 << 20)
    n = math.ceil(3 * l2 / max(bytes_per_set, 1))
    return int(max(1, min(n, 8, limit_bytes // max(bytes_per_set, 1))))


def rotating_step(sets: list, fn: Callable, backward: bool, grad_seed: int = 1234):
    """A step that calls `fn(*inputs)` on the next input set; with `backward`, also back-propagates a fixed random
    gradient (prepared once per set, so no allocation or RNG work lands in the timed region) and drops the gradients,
    so a step holds nothing between calls."""
    grads = []
    g = torch.Generator(device=DEVICE).manual_seed(grad_seed)
    for args in sets:
        if not backward:
            grads.append(None)
            continue
        out = fn(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        grads.append([None if o.dim() == 0 else torch.randn(o.shape, generator=g, device=o.device).to(o.dtype)
                      for o in outs])
        torch.autograd.backward(list(outs), [x for x in grads[-1]] if any(x is not None for x in grads[-1]) else None)
        _drop_grads(args)
        del out, outs
    order = itertools.cycle(range(len(sets)))

    def step():
        i = next(order)
        args = sets[i]
        if not backward:
            with torch.no_grad():
                fn(*args)
            return
        out = fn(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        gs = grads[i]
        torch.autograd.backward(list(outs), gs if any(x is not None for x in gs) else None)
        _drop_grads(args)

    return step


def _drop_grads(args):
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            a.grad = None
        elif isinstance(a, torch.nn.Module):
            for p in a.parameters():
                p.grad = None


# --- baselines ----------------------------------------------------------------------------------------------------

SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION"}


def sdpa_backend(impl: str):
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        raise Unavailable(f"torch.nn.attention.sdpa_kernel is missing in torch {torch.__version__}: {e}") from None
    b = getattr(SDPBackend, SDPA_BACKENDS[impl], None)
    if b is None:
        raise Unavailable(f"SDPBackend.{SDPA_BACKENDS[impl]} does not exist in torch {torch.__version__}")
    return b, sdpa_kernel


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


def triton_available():
    try:
        import triton  # noqa: F401
    except Exception as e:
        raise Unavailable(f"triton does not import: {_first_line(e)}") from None
    if not ON_CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise Unavailable("no CUDA GPU and TRITON_INTERPRET is not set: the Triton path cannot run here")


def kernels(name: str):
    """The backend object ("torch" or "triton"), Unavailable when triton cannot run here."""
    if name == OURS:
        triton_available()
    from qwenvl_kernels import get_backend

    return get_backend(name)


def set_kernels(module: torch.nn.Module, name: str) -> None:
    """Point every submodule that calls kernels at the backend `name` (QwenVL has set_kernels; single layers don't)."""
    backend = kernels(name)
    if hasattr(module, "set_kernels"):
        module.set_kernels(name)
        return
    for m in module.modules():
        if hasattr(m, "kernels"):
            m.kernels = backend


def build_on_device(factory: Callable[[], torch.nn.Module], dtype=DTYPE) -> torch.nn.Module:
    """Build a module straight on the device (no host copy of billions of parameters), then cast: fp32 initializers
    (trunc_normal_, the sin-cos tables) run in fp32 and the result is stored in the bench dtype."""
    with torch.device(DEVICE):
        m = factory()
    return m.to(device=DEVICE, dtype=dtype)


def count_step_flops(fn: Callable, args: tuple, backward: bool) -> float | None:
    """FLOPs of one `fn(*args)` (and its backward) through the torch path, counted once (not via rotating_step,
    whose preparation pass would count the work twice)."""
    def once():
        with torch.set_grad_enabled(backward):
            out = fn(*args)
            if backward:
                outs = out if isinstance(out, (tuple, list)) else (out,)
                torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
                _drop_grads(args)

    return count_flops(once)


def count_flops(fn: Callable) -> float | None:
    """FLOPs of one call through the torch reference path (matrix products and attention as aten counts them)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())
    except Exception:
        return None


# --- Triton compilations ------------------------------------------------------------------------------------------

def _jit_functions():
    """Every @triton.jit function of our kernel modules, by qualified name (autotuners and heuristics unwrapped)."""
    try:
        from triton.runtime.jit import JITFunction
    except Exception:
        return {}
    from qwenvl_kernels.backend import KERNEL_MODULES

    found = {}
    for mod_name in sorted(set(KERNEL_MODULES.values())):
        try:
            mod = importlib.import_module(f"qwenvl_kernels.{mod_name}")
        except Exception:
            continue
        for attr, obj in vars(mod).items():
            seen = 0
            while obj is not None and not isinstance(obj, JITFunction) and hasattr(obj, "fn") and seen < 4:
                obj, seen = obj.fn, seen + 1
            if isinstance(obj, JITFunction):
                found[f"{mod_name}.{getattr(obj, '__name__', attr)}"] = obj
    return found


def _compiled_variants(fn) -> int:
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
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None
    counts = {name: _compiled_variants(fn) for name, fn in _jit_functions().items()}
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


# --- results and targets ------------------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    case: str
    kind: str              # "speedup_best" | "speedup" | "time_ratio" | "mem_ratio" | "frac_copy" | "recompiles"
    op: str                # ">=" or "<="
    threshold: float
    baseline: str | None = None     # an impl name, or a prefix ending in "-" for the best of a family
    note: str = ""


TARGETS = [
    Target("attn_decoder_fwd_vs_best_sdpa", "attn_decoder fwd", "speedup_best", ">=", 1.0, "sdpa-",
           "decoder causal attention B4 T2048 32x128, forward"),
    Target("attn_decoder_fwdbwd_vs_best_sdpa", "attn_decoder fwd+bwd", "speedup_best", ">=", 1.0, "sdpa-",
           "decoder causal attention B4 T2048 32x128, forward + backward"),
    Target("attn_vit_fwdbwd_vs_best_sdpa", "attn_vit fwd+bwd", "speedup_best", ">=", 1.1, "sdpa-",
           "ViT attention B8 T1024 16x104, forward + backward"),
    Target("resampler_fwdbwd_vs_official_module", "resampler fwd+bwd", "speedup", ">=", 3.0, "mha-official",
           "adapter cross-attention B16, 256 queries x 1024 keys, 32x128; official nn.MultiheadAttention design"),
    Target("rms_norm_fwdbwd_copy_bw_fraction", "rms_norm fwd+bwd", "frac_copy", ">=", 0.85, None,
           "RMSNorm 8192x4096 fwd+bwd bytes/time over measured copy bandwidth"),
    Target("layer_norm_fwdbwd_copy_bw_fraction", "layer_norm fwd+bwd", "frac_copy", ">=", 0.85, None,
           "LayerNorm 8192x4096 fwd+bwd bytes/time over measured copy bandwidth"),
    Target("fused_ce_peak_mem_vs_unfused", "cross_entropy fwd+bwd", "mem_ratio", "<=", 0.25, "torch",
           "linear+CE 8192x4096x151936: memory allocated during fwd+bwd, fused / unfused"),
    Target("fused_ce_time_vs_unfused", "cross_entropy fwd+bwd", "time_ratio", "<=", 1.1, "torch",
           "linear+CE 8192x4096x151936: time fused / unfused"),
    Target("train_step_tokens_per_s_vs_torch", "train_step", "speedup", ">=", 1.3, "torch",
           "reduced-depth real-width model (ViT 8/48, decoder 4/32), B4, 1 image + 512 text tokens each"),
    Target("train_step_peak_mem_vs_torch", "train_step", "abs_mem_ratio", "<=", 0.75, "torch",
           "same step: peak memory allocated during the step (parameters, gradients and optimizer state included)"),
    Target("decode_tokens_per_s_vs_torch_b1", "generation_b1 decode", "speedup", ">=", 1.5, "torch",
           "generation after a one-image prefill, 128 new tokens, batch 1"),
    Target("decode_tokens_per_s_vs_torch_b8", "generation_b8 decode", "speedup", ">=", 1.5, "torch",
           "generation after a one-image prefill, 128 new tokens, batch 8"),
    Target("recompiles_bounded", "recompiles", "recompiles", "<=", 0, None,
           "new Triton compilations or autotune runs over lengths 1051..1100 once 1000..1050 ran (and <= 4 "
           "variants per kernel over the whole range)"),
]


def _ok(row):
    return row is not None and row.get("status") == "ok"


def derive(case: dict) -> None:
    """Ratios of our row to every baseline of the case, in place (ratios > 1 mean ours is faster / smaller)."""
    impls = case.get("impls", {})
    ours = impls.get(OURS)
    for name, row in impls.items():
        row.pop("speedup_vs", None)
        row.pop("mem_ratio_vs", None)
        row.pop("best_baseline", None)
        row.pop("best_sdpa", None)
    if not _ok(ours) or not ours.get("median_ms"):
        return
    speed, mem = {}, {}
    for name, row in impls.items():
        if name == OURS or not _ok(row) or not row.get("median_ms"):
            continue
        speed[name] = row["median_ms"] / ours["median_ms"]
        if row.get("peak_mem_bytes") and ours.get("peak_mem_bytes") is not None:
            mem[name] = ours["peak_mem_bytes"] / row["peak_mem_bytes"]
    ours["speedup_vs"] = speed
    if mem:
        ours["mem_ratio_vs"] = mem
    if speed:
        best = min(speed, key=speed.get)
        ours["best_baseline"] = {"impl": best, "speedup": speed[best]}
        sdpa = {k: v for k, v in speed.items() if k.startswith("sdpa-")}
        if sdpa:
            b = min(sdpa, key=sdpa.get)
            ours["best_sdpa"] = {"impl": b, "speedup": sdpa[b]}


def evaluate_target(t: Target, data: dict) -> dict:
    """The target's value and pass/fail on this run's data ("n/a" off CUDA, "missing" when not measured)."""
    return _device_gate(_evaluate(t, data), data)


def _evaluate(t: Target, data: dict) -> dict:
    out = {"name": t.name, "case": t.case, "op": t.op, "threshold": t.threshold, "baseline": t.baseline,
           "note": t.note, "value": None, "status": "missing", "detail": ""}
    if t.kind == "recompiles":
        rc = data.get("recompiles")
        if not rc:
            out["detail"] = "not measured"
        elif rc.get("new_in_second_half") is None:
            out["detail"] = rc.get("note", "no compilation counts (interpreter)")
        else:
            out["value"] = rc["new_in_second_half"]
            ok = rc["new_in_second_half"] <= 0 and (rc.get("max_variants_per_kernel") or 0) <= 4
            out["status"] = "pass" if ok else "fail"
            out["detail"] = (f"{rc['new_in_second_half']} new in the second half, max "
                             f"{rc.get('max_variants_per_kernel')} variants/kernel over lengths {rc.get('lengths')}")
        return out
    case = data.get("cases", {}).get(t.case)
    ours = (case or {}).get("impls", {}).get(OURS)
    if not _ok(ours):
        out["detail"] = f"our path: {ours.get('status')} ({ours.get('reason', '')})" if ours else "not measured"
        return out
    value, detail = None, ""
    impls = case["impls"]
    if t.kind == "frac_copy":
        value = ours.get("frac_copy")
        detail = f"{ours.get('gbps', 0):.0f} GB/s"
    elif t.kind in ("speedup", "time_ratio", "mem_ratio", "abs_mem_ratio", "speedup_best"):
        if t.kind == "speedup_best":
            fam = {k: r for k, r in impls.items() if k.startswith(t.baseline) and _ok(r)}
            if not fam:
                out["detail"] = f"no {t.baseline}* baseline ran: " + "; ".join(
                    f"{k}: {r.get('reason', r.get('status'))}" for k, r in impls.items() if k.startswith(t.baseline))
                return out
            name = min(fam, key=lambda k: fam[k]["median_ms"])
        else:
            name = t.baseline
        base = impls.get(name)
        if not _ok(base):
            out["detail"] = f"baseline {name}: {base.get('status')} ({base.get('reason', '')})" if base else \
                f"baseline {name} not measured"
            return out
        if t.kind in ("speedup", "speedup_best"):
            value = base["median_ms"] / ours["median_ms"]
            detail = f"{name} {base['median_ms']:.3f} ms / ours {ours['median_ms']:.3f} ms"
        elif t.kind == "time_ratio":
            value = ours["median_ms"] / base["median_ms"]
            detail = f"ours {ours['median_ms']:.3f} ms / {name} {base['median_ms']:.3f} ms"
        else:
            key = "peak_mem_bytes" if t.kind == "mem_ratio" else "peak_abs_bytes"
            if not base.get(key) or ours.get(key) is None:
                out["detail"] = "no memory figures (measured on CUDA only)"
                return out
            value = ours[key] / base[key]
            detail = f"ours {ours[key] / 2**30:.2f} GiB / {name} {base[key] / 2**30:.2f} GiB"
    if value is None:
        out["detail"] = "no value"
        return out
    out["value"] = value
    out["detail"] = detail
    ok = value >= t.threshold if t.op == ">=" else value <= t.threshold
    out["status"] = "pass" if ok else "fail"
    return out


def _device_gate(out: dict, data: dict) -> dict:
    dev = data.get("device", {})
    if dev.get("type") != "cuda":
        # the CPU run computes every ratio (that is what it tests) but its numbers say nothing about the targets
        out["detail"] = f"{out['detail']} [cpu run: {out['status']} at toy sizes, not a verdict]"
        out["status"] = "n/a"
    elif "H100" not in dev.get("name", "") or dev.get("dtype") != "bfloat16":
        out["detail"] += f" [targets are stated for bf16 on an H100, this is {dev.get('name')}]"
    return out


class Results:
    """The run's results file: loaded when it already belongs to this run (several pytest processes make one run),
    rewritten atomically after every record, mirrored into BENCH_MIRROR_DIR."""

    def __init__(self, path: str | None, run_id: str, meta: dict, mirror_dir: str | None = None):
        self.path = path
        self.mirror_dir = mirror_dir
        self.extra_infos: dict = {}
        self.data = None
        if path and os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    old = json.load(f)
                if old.get("run_id") == run_id and old.get("schema") == SCHEMA:
                    self.data = old
            except (OSError, ValueError):
                pass
        if self.data is None:
            self.data = {"schema": SCHEMA, "run_id": run_id, "cases": {}, "targets": [], "recompiles": None,
                         "processes": []}
        self.data.update({k: v for k, v in meta.items() if k not in self.data or k in ("updated",)})
        self.data.setdefault("processes", []).append({"started": _now(), "argv": sys.argv[1:][:40]})

    def case(self, case: str, **meta) -> dict:
        c = self.data["cases"].setdefault(case, {"impls": {}})
        c.update({k: v for k, v in meta.items() if v is not None})
        return c

    def put(self, case: str, impl: str, row: dict, extra_info: dict | None = None, **meta) -> dict:
        c = self.case(case, **meta)
        c["impls"][impl] = row
        if extra_info is not None:
            self.extra_infos[(case, impl)] = extra_info
        self.refresh(case)
        return row

    def refresh(self, case: str) -> None:
        c = self.data["cases"][case]
        derive(c)
        for impl, row in c["impls"].items():
            ei = self.extra_infos.get((case, impl))
            if ei is not None:
                ei.update(_jsonable(row))
        self.data["targets"] = [evaluate_target(t, self.data) for t in TARGETS]
        self.save()

    def save(self) -> None:
        self.data["updated"] = _now()
        self.data["targets"] = [evaluate_target(t, self.data) for t in TARGETS]
        if not self.path:
            return
        text = json.dumps(_jsonable(self.data), indent=1, sort_keys=True)
        _atomic_write(self.path, text)
        if self.mirror_dir:
            try:
                _atomic_write(os.path.join(self.mirror_dir, os.path.basename(self.path)), text)
            except OSError:
                pass


def _atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.write("\n")
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return None if (math.isnan(x) or math.isinf(x)) else x
    if isinstance(x, (int, str, bool)) or x is None:
        return x
    return str(x)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --- the suite: one per pytest session ----------------------------------------------------------------------------

class Suite:
    def __init__(self, results_path: str | None, run_id: str | None = None, deadline: float | None = None,
                 mirror_dir: str | None = None):
        info = device_info()
        commit = git_commit()
        created = _now()
        self.run_id = run_id or f"{created}-{os.getpid()}"
        meta = {"created": created, "device": info, "commit": commit, "libraries": library_versions(),
                "spec": shapes.spec_for(info.get("name")) if ON_CUDA else None,
                "parity": os.environ.get("BENCH_PARITY") or None}   # gpu_check.sh: the parity tests' outcome
        self.results = Results(results_path, self.run_id, meta, mirror_dir)
        self.timer = Timer()
        self.deadline = deadline
        self.cuda_broken: str | None = None
        self.ceilings = self.results.data.get("ceilings")
        if not self.ceilings or self.ceilings.get("device") != info.get("name"):
            self.ceilings = measure_ceilings(self.timer)
            self.results.data["ceilings"] = self.ceilings
        self.results.save()

    @property
    def data(self):
        return self.results.data

    # -- gating --
    def gate(self, case: str, impl: str, cost_s: float = 0.0) -> None:
        """Skip (and record why) when the device context is lost or the run's time is up."""
        reason = None
        if self.cuda_broken:
            reason = f"CUDA context lost earlier ({self.cuda_broken}); rerun in a fresh process"
        elif self.deadline is not None and time.time() + cost_s > self.deadline:
            reason = f"out of time: the run's deadline leaves less than this case's ~{cost_s:.0f} s"
        if reason:
            self.results.put(case, impl, {"status": "skipped", "reason": reason})
            pytest.skip(reason)

    def after_error(self, e: BaseException) -> None:
        if not ON_CUDA:
            return
        if isinstance(e, torch.cuda.OutOfMemoryError):
            gc.collect()
            torch.cuda.empty_cache()
            return
        try:
            torch.cuda.synchronize()
        except Exception as e2:  # an illegal address or a trap poisons the context for every later case
            self.cuda_broken = _first_line(e2)

    @contextlib.contextmanager
    def guarded(self, case: str, impl: str, extra_info: dict | None = None, **meta):
        """Runs a block that sets up or measures (case, impl): Unavailable -> recorded skip; an error in our path ->
        recorded and re-raised (the test fails, the run goes on); an error in a baseline -> recorded, xfail."""
        try:
            yield
        except Unavailable as e:
            self.results.put(case, impl, {"status": "skipped", "reason": str(e)}, extra_info, **meta)
            pytest.skip(f"{case} / {impl}: {e}")
        except (pytest.skip.Exception, pytest.xfail.Exception, KeyboardInterrupt):
            raise
        except Exception as e:
            self.after_error(e)
            self.results.put(case, impl, {"status": "error", "reason": _first_line(e),
                                          "traceback": traceback.format_exc(limit=6)[-3000:]}, extra_info, **meta)
            if impl == OURS:
                raise
            pytest.xfail(f"baseline {impl} errored: {_first_line(e)}")

    # -- the common path --
    def run(self, bm, *, case: str, impl: str, setup: Callable[[], Callable], mode: str = "kernel",
            flops: float | None = None, nbytes: float | None = None, shape: dict | None = None, title: str = "",
            tokens: float | None = None, cost_s: float = 2.0, memory: bool = True, timer_kw: dict | None = None,
            extra: dict | None = None) -> dict:
        """Time `setup()`'s step for (case, impl) and record it; returns the row."""
        meta = dict(title=title or case, shape=shape, flops=flops, bytes=nbytes, mode=mode,
                    floor_ms=self.floor_ms(flops, nbytes))
        bm.group = case
        bm.extra_info.update({"case": case, "impl": impl})
        self.gate(case, impl, cost_s)
        with self.guarded(case, impl, bm.extra_info, **meta):
            step = setup()
            if ON_CUDA:
                timing = self.timer.time(step, mode, **(timer_kw or {}))
                mem = peak_memory(step) if memory else None
            else:
                # the interpreter is slow: one call serves pytest-benchmark and our record alike
                timing, mem = self.cpu_timing(bm, step), None
            row = self.row(timing, flops, nbytes, mem, tokens)
            row.update(extra or {})
            self.results.put(case, impl, row, bm.extra_info, **meta)
            if ON_CUDA:
                self.pedantic(bm, step, timing.median_ms)
        return row

    @staticmethod
    def cpu_timing(bm, step) -> Timing:
        times = []

        def timed():
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)

        bm.pedantic(timed, rounds=1, iterations=1, warmup_rounds=0)
        if not times:  # pytest-benchmark disabled and skipping the call: time it ourselves
            timed()
        return _summarize(times, times[0] * 1e-3)

    def pedantic(self, bm, step, median_ms: float, budget_s: float = 0.1) -> None:
        """pytest-benchmark's own statistics (host clock around synchronized calls): a few rounds, so the standard
        JSON and --benchmark-compare work; the figures that count are the CUDA-event ones in extra_info."""
        if ON_CUDA:
            least = 1 if median_ms > 50 else 3   # a training step or a generation: one more is enough
            rounds = int(min(max(budget_s / max(median_ms * 1e-3, 1e-6), least), 20))

            def target():
                step()
                torch.cuda.synchronize()
        else:
            rounds, target = 1, step
        bm.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0)

    def row(self, timing: Timing, flops, nbytes, mem, tokens=None) -> dict:
        t = timing.median_ms * 1e-3
        row = {"status": "ok", "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
               "min_ms": timing.min_ms, "reps": timing.reps, "first_call_s": round(timing.first_call_s, 3)}
        ceil = self.ceilings or {}
        if flops:
            row["tflops"] = flops / t / 1e12
            if ceil.get("matmul_tflops"):
                row["frac_matmul"] = row["tflops"] / ceil["matmul_tflops"]
        if nbytes:
            row["gbps"] = nbytes / t / 1e9
            if ceil.get("copy_gbps"):
                row["frac_copy"] = row["gbps"] / ceil["copy_gbps"]
        if mem is not None:
            row["peak_mem_bytes"], row["peak_abs_bytes"] = mem
        if tokens:
            row["tokens_per_s"] = tokens / t
        return row

    def floor_ms(self, flops, nbytes) -> float | None:
        ceil = self.ceilings or {}
        parts = []
        if flops and ceil.get("matmul_tflops"):
            parts.append(flops / (ceil["matmul_tflops"] * 1e12) * 1e3)
        if nbytes and ceil.get("copy_gbps"):
            parts.append(nbytes / (ceil["copy_gbps"] * 1e9) * 1e3)
        return max(parts) if parts else None

    def finish(self) -> None:
        for case in list(self.data["cases"]):
            self.results.refresh(case)
        self.results.save()


# --- ceilings -----------------------------------------------------------------------------------------------------

def measure_ceilings(timer: Timer) -> dict:
    """The device's copy bandwidth (bytes read + written by a large device-to-device copy) and matrix rate (a large
    bf16 matmul), measured on random data. The CPU run measures small fp32 versions: the same code, tested."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    n_copy = (1 << 30) // 2 if ON_CUDA else (16 << 20) // 4
    copy_dtype = torch.bfloat16 if ON_CUDA else torch.float32
    src = torch.randn(n_copy, generator=g, device=DEVICE).to(copy_dtype)
    dst = torch.empty_like(src)
    copy_t = timer.time(lambda: dst.copy_(src), "module", target_s=0.3 if ON_CUDA else 0.1)
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst
    n = 8192 if ON_CUDA else 256
    mm_dtype = torch.bfloat16 if ON_CUDA else torch.float32
    a = torch.randn(n, n, generator=g, device=DEVICE).to(mm_dtype)
    b = torch.randn(n, n, generator=g, device=DEVICE).to(mm_dtype)
    c = torch.empty(n, n, device=DEVICE, dtype=mm_dtype)
    mm_t = timer.time(lambda: torch.mm(a, b, out=c), "module", target_s=0.3 if ON_CUDA else 0.1)
    del a, b, c
    if ON_CUDA:
        torch.cuda.empty_cache()
    info = device_info()
    return {
        "device": info.get("name"),
        "copy_gbps": copy_bytes / (copy_t.median_ms * 1e-3) / 1e9,
        "copy_bytes": copy_bytes,
        "copy_ms": copy_t.median_ms,
        "matmul_tflops": 2 * n**3 / (mm_t.median_ms * 1e-3) / 1e12,
        "matmul_shape": [n, n, n],
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
        "matmul_ms": mm_t.median_ms,
        "spec": shapes.spec_for(info.get("name")) if ON_CUDA else None,
    }


# --- parametrization ----------------------------------------------------------------------------------------------

def params(cases, impls) -> list:
    """(case, impl) pairs in the given order (baselines before ours, torch.compile last: it is the slowest to set
    up), with ids that read as `case-impl` and the compile_baseline mark where it applies."""
    out = []
    for case in cases:
        key = case if isinstance(case, str) else "-".join(str(c) for c in case)
        for impl in impls:
            marks = [pytest.mark.compile_baseline] if impl == "compile" else []
            out.append(pytest.param(case, impl, id=f"{key.replace(' ', '-')}-{impl}", marks=marks))
    return out


def randn(*shape, dtype=None, scale=1.0, grad=False, device=None):
    t = torch.randn(*shape, device=device or DEVICE, dtype=torch.float32) * scale
    return t.to(dtype or DTYPE).requires_grad_(grad)


def probe(fn, *args, what: str = "", backward: bool = False):
    """Call a baseline once (with its backward when that is measured too); a backend that refuses the input (SDPA's
    "no available kernel", a shape a library does not support) becomes Unavailable, with the reasons torch gave as
    warnings."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.set_grad_enabled(backward):
                out = fn(*args)
                if backward:
                    outs = out if isinstance(out, (tuple, list)) else (out,)
                    torch.autograd.backward([o.float().sum() for o in outs])
                    _drop_grads(args)
        except (RuntimeError, NotImplementedError, ValueError, AssertionError) as e:
            why = "; ".join(str(w.message).split("\n")[0][:160] for w in caught[:3])
            raise Unavailable(f"{what or 'baseline'} refuses this input: {_first_line(e, 200)}"
                              + (f" ({why})" if why else "")) from None


# --- models -------------------------------------------------------------------------------------------------------

class Lazy:
    """Build something expensive once, on first use inside a test (so a failure is recorded against that case);
    a failed build is remembered and re-raised, not retried by every later case."""

    def __init__(self, build: Callable):
        self._build = build
        self._value = None
        self._error: BaseException | None = None

    def __call__(self):
        if self._error is not None:
            raise RuntimeError(f"setup failed earlier: {_first_line(self._error)}")
        if self._value is None:
            try:
                self._value = self._build()
            except BaseException as e:
                self._error = e
                raise
        return self._value

    def release(self):
        self._value = None
        gc.collect()
        if ON_CUDA:
            torch.cuda.empty_cache()


def model_config():
    """The reduced-depth, real-width model of the targets on CUDA (ViT 8 of 48 layers, decoder 4 of 32); the "tiny"
    preset on the CPU."""
    from qwenvl.config import QwenVLConfig

    if ON_CUDA:
        return QwenVLConfig.from_name("qwen-vl").replace(text=dict(num_hidden_layers=4), vision=dict(layers=8))
    return cpu_config()


def cpu_config():
    """The "tiny" preset shrunk further for the Triton interpreter: 4x4 patches and 16 queries (every code path of
    the real model kept: interpolated position tables, kv_proj, multi-head adapter, NTK/log-n)."""
    from qwenvl.config import QwenVLConfig

    return QwenVLConfig.from_name("tiny").replace(vision=dict(image_size=56, n_queries=16))


def init_params_(module: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Random weights for a part built on its own (QwenVL initializes itself; its towers alone start empty): norms'
    weights one, biases zero, matrices N(0, std). Fixed tables (requires_grad False) are left as built."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            leaf_name = name.rsplit(".", 1)[-1]
            if p.dim() == 1 and leaf_name == "weight":
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, std)
    return module


def vl_batch(cfg, batch: int, n_text: int, labels: bool = True, seed: int = 0):
    """`batch` rows of one image span (<img>, n_queries pads, </img>) then `n_text` random text ids; labels ignore
    the span; pixel values `[batch, 3, S, S]`."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = cfg.vision
    n = v.n_queries
    top = min(cfg.text.vocab_size, v.image_start_id)
    ids = torch.randint(0, top, (batch, n + 2 + n_text), generator=g)
    ids[:, 0] = v.image_start_id
    ids[:, 1:1 + n] = v.image_pad_id
    ids[:, 1 + n] = v.image_end_id
    lab = ids.clone()
    lab[:, :n + 2] = -100
    pixels = torch.randn(batch, 3, v.image_size, v.image_size, generator=g)
    return ids.to(DEVICE), (lab.to(DEVICE) if labels else None), pixels.to(DEVICE, DTYPE)


def make_optimizer(params):
    params = [p for p in params if p.requires_grad]
    if ON_CUDA:
        try:
            return torch.optim.AdamW(params, lr=1e-5, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, lr=1e-5, foreach=ON_CUDA)


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def add_rate(suite, case: str, impl: str, flops) -> None:
    """FLOPs known only after setup (counted on the built module): store them on the case and the row's rate."""
    c = suite.data["cases"].get(case)
    if not flops or not c:
        return
    c["flops"] = flops
    row = c["impls"].get(impl, {})
    if row.get("status") == "ok" and row.get("median_ms"):
        row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
        if suite.ceilings and suite.ceilings.get("matmul_tflops"):
            row["frac_matmul"] = row["tflops"] / suite.ceilings["matmul_tflops"]
    suite.results.refresh(case)
