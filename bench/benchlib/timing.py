"""Timing a step, its peak memory, the inputs it rotates over, the FLOPs it does, and the device's own ceilings.

On CUDA the time of a step is the median of CUDA-event intervals after a warm-up. Kernel cases ("kernel" mode) are
timed as device time: before every repetition an L2-sized buffer is overwritten (the cache cannot flatter the next
call) and the GPU is kept busy long enough that the host's launch work overlaps it. Module cases ("module" mode:
layers, the training step, generation) are timed as the user sees them, host gaps included.
"""
from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .compiles import warming
from .env import DEVICE, ON_CUDA, device_info, sync


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    reps: int
    first_call_s: float          # the first call: compilation, autotuning, allocation (excluded from the median)


def summarize(times_ms, first_s) -> Timing:
    s = sorted(times_ms)

    def q(f):
        return s[min(len(s) - 1, int(f * (len(s) - 1) + 0.5))]

    return Timing(median_ms=statistics.median(s), p20_ms=q(0.2), p80_ms=q(0.8), min_ms=s[0], reps=len(s),
                  first_call_s=first_s)


def _l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) or (50 << 20)


class Timer:
    def __init__(self):
        self._flush = None
        self._clock_hz = None

    def _flush_buffer(self):
        if self._flush is None:
            # several times L2, so every line the step will read is evicted; also ~100 us of GPU work
            self._flush = torch.empty(max(4 * _l2_bytes(), 256 << 20), dtype=torch.uint8, device="cuda")
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
            return time_cpu(step, target_s or 0.0, min_reps or 1, max_reps or 1)
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
        if kernel and hasattr(torch.cuda, "_sleep"):
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
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)], first)


def time_cpu(step, target_s=0.0, min_reps=1, max_reps=1) -> Timing:
    times = []
    t_end = time.perf_counter() + target_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times, times[0] * 1e-3)


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
    """Input sets to cycle through so that one step's inputs were evicted from L2 by the others' (3 x L2 of data).
    One set while warming (nothing is timed then)."""
    if not ON_CUDA or warming():
        return 1
    n = math.ceil(3 * _l2_bytes() / max(bytes_per_set, 1))
    return int(max(1, min(n, 8, limit_bytes // max(bytes_per_set, 1))))


def _outputs(out):
    return out if isinstance(out, (tuple, list)) else (out,)


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
        with torch.no_grad():
            outs = _outputs(fn(*args))
        grads.append([None if o.dim() == 0 else torch.randn(o.shape, generator=g, device=o.device).to(o.dtype)
                      for o in outs])
        del outs
    order = itertools.cycle(range(len(sets)))

    def step():
        i = next(order)
        args = sets[i]
        if not backward:
            with torch.no_grad():
                fn(*args)
            return
        outs = _outputs(fn(*args))
        gs = grads[i]
        torch.autograd.backward(list(outs), gs if any(x is not None for x in gs) else None)
        drop_grads(args)

    return step


def drop_grads(args):
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            a.grad = None
        elif isinstance(a, torch.nn.Module):
            for p in a.parameters():
                p.grad = None


def count_step_flops(fn: Callable, args: tuple, backward: bool) -> float | None:
    """FLOPs of one `fn(*args)` (and its backward) through the torch path, counted once (not via rotating_step,
    whose preparation pass would count the work twice). None while warming: nothing is reported then."""
    if warming():
        return None

    def once():
        with torch.set_grad_enabled(backward):
            outs = _outputs(fn(*args))
            if backward:
                torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
                drop_grads(args)

    return count_flops(once)


def count_flops(fn: Callable) -> float | None:
    """FLOPs of one call through the torch reference path (matrix products and attention as aten counts them)."""
    if warming():
        return None
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


def _copy_time(timer: Timer, g) -> tuple[int, Timing]:
    n = (1 << 30) // 2 if ON_CUDA else (16 << 20) // 4
    src = torch.randn(n, generator=g, device=DEVICE).to(torch.bfloat16 if ON_CUDA else torch.float32)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size(), timer.time(lambda: dst.copy_(src), "module",
                                                            target_s=0.3 if ON_CUDA else 0.1)


def _matmul_time(timer: Timer, g, n: int, dtype) -> Timing:
    a = torch.randn(n, n, generator=g, device=DEVICE).to(dtype)
    b = torch.randn(n, n, generator=g, device=DEVICE).to(dtype)
    c = torch.empty(n, n, device=DEVICE, dtype=dtype)
    return timer.time(lambda: torch.mm(a, b, out=c), "module", target_s=0.3 if ON_CUDA else 0.1)


def measure_ceilings(timer: Timer) -> dict:
    """The device's copy bandwidth (bytes read + written by a large device-to-device copy) and matrix rate (a large
    bf16 matmul), measured on random data. The CPU run measures small fp32 versions: the same code, tested."""
    import shapes

    g = torch.Generator(device=DEVICE).manual_seed(0)
    copy_bytes, copy_t = _copy_time(timer, g)
    n = 8192 if ON_CUDA else 256
    mm_dtype = torch.bfloat16 if ON_CUDA else torch.float32
    mm_t = _matmul_time(timer, g, n, mm_dtype)
    if ON_CUDA:
        torch.cuda.empty_cache()
    name = device_info().get("name")
    return {
        "device": name,
        "copy_gbps": copy_bytes / (copy_t.median_ms * 1e-3) / 1e9,
        "copy_bytes": copy_bytes,
        "copy_ms": copy_t.median_ms,
        "matmul_tflops": 2 * n**3 / (mm_t.median_ms * 1e-3) / 1e12,
        "matmul_shape": [n, n, n],
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
        "matmul_ms": mm_t.median_ms,
        "spec": shapes.spec_for(name) if ON_CUDA else None,
    }
