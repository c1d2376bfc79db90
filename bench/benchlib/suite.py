"""The suite: one per pytest process. It gates each case on the time left, times it, and records it.

Time. gpu_check.sh gives each pytest process a deadline. Every case has a cost (seconds it may need on the GPU,
declared where it is parametrized) and the process knows its schedule (its cases in run order, which of them serve
a target). A case starts only if its cost fits before the deadline minus the costs of the target cases after it,
and it is stopped (recorded as over time) when it reaches that point: a target case is sure of its reserved time
whatever ran before it.
"""
from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
import time
import traceback
from typing import Callable

import pytest
import torch

import shapes

from .compiles import warming
from .env import OURS, ON_CUDA, Unavailable, device_info, first_line, git_commit, library_versions, sync
from .results import Results, now
from .timing import Timer, Timing, measure_ceilings, peak_memory, summarize

DEFAULT_COST_S = 3.0


class CaseOverTime(BaseException):
    """Raised in a case that reached the time reserved for the cases after it (a BaseException, so that no
    `except Exception` in the measured code swallows it)."""


def current_test() -> str:
    """The node id of the running test (pytest publishes it in the environment)."""
    return os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]


class Suite:
    def __init__(self, results_path: str | None, run_id: str | None = None, deadline: float | None = None,
                 mirror_dir: str | None = None, schedule: list | None = None):
        info = device_info()
        created = now()
        self.run_id = run_id or f"{created}-{os.getpid()}"
        meta = {"created": created, "device": info, "commit": git_commit(), "libraries": library_versions(),
                "spec": shapes.spec_for(info.get("name")) if ON_CUDA else None,
                "parity": os.environ.get("BENCH_PARITY") or None}   # gpu_check.sh: the parity tests' outcome
        self.results = Results(None if warming() else results_path, self.run_id, meta, mirror_dir)
        self.timer = Timer()
        self.deadline = deadline
        self.schedule = list(schedule or [])      # [(node id, cost s, serves a target)] in run order
        self.cuda_broken: str | None = None
        self.ceilings = self.results.data.get("ceilings")
        if not warming() and (not self.ceilings or self.ceilings.get("device") != info.get("name")):
            self.ceilings = measure_ceilings(self.timer)
            self.results.data["ceilings"] = self.ceilings
        self.results.save()

    @property
    def data(self):
        return self.results.data

    # -- time --
    def cost_of(self, node: str) -> float:
        for n, cost, _ in self.schedule:
            if n == node:
                return cost
        return DEFAULT_COST_S

    def reserved_after(self, node: str) -> float:
        """Seconds reserved for the target cases scheduled after `node` (all of them if `node` is not listed)."""
        names = [n for n, _, _ in self.schedule]
        start = names.index(node) + 1 if node in names else 0
        return sum(cost for _, cost, target in self.schedule[start:] if target)

    def free_s(self, node: str) -> float | None:
        """Seconds this case may use: up to the deadline, less what the later target cases have reserved."""
        if self.deadline is None:
            return None
        return self.deadline - self.reserved_after(node) - time.time()

    def gate(self, case: str, impl: str, cost_s: float | None = None) -> None:
        """Skip (and record why) when the device context is lost or this case's cost does not fit its time."""
        node = current_test()
        cost = cost_s if cost_s is not None else self.cost_of(node)
        free = self.free_s(node)
        reason = None
        if self.cuda_broken:
            reason = f"CUDA context lost earlier ({self.cuda_broken}); rerun in a fresh process"
        elif free is not None and cost > free:
            reason = (f"out of time: this case needs ~{cost:.0f} s, {max(free, 0):.0f} s are left before the time "
                      f"reserved for the target cases after it")
        if reason:
            self.results.put(case, impl, {"status": "skipped", "reason": reason})
            pytest.skip(reason)

    @contextlib.contextmanager
    def time_limit(self):
        """Raise CaseOverTime in this case when it reaches the time reserved for the later target cases."""
        free = self.free_s(current_test())
        if free is None or threading.current_thread() is not threading.main_thread() or \
                not hasattr(signal, "setitimer"):
            yield
            return

        def over(signum, frame):
            raise CaseOverTime(f"stopped after {free:.0f} s: the rest of the run's time is reserved for the "
                               f"target cases after this one")

        previous = signal.signal(signal.SIGALRM, over)
        signal.setitimer(signal.ITIMER_REAL, max(free, 0.01))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    # -- errors --
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
            self.cuda_broken = first_line(e2)

    @contextlib.contextmanager
    def guarded(self, case: str, impl: str, extra_info: dict | None = None, bench=None, **meta):
        """Runs a block that sets up or measures (case, impl) within its time: Unavailable -> recorded skip; an error
        or running over time in our path -> recorded, the test fails (the run goes on); in a baseline -> xfail.
        `bench`, the pytest-benchmark fixture, is marked as failed then (its JSON leaves out a half-measured case)."""
        try:
            with self.time_limit():
                yield
        except Unavailable as e:
            self.results.put(case, impl, {"status": "skipped", "reason": str(e)}, extra_info, **meta)
            pytest.skip(f"{case} / {impl}: {e}")
        except (pytest.skip.Exception, pytest.xfail.Exception, pytest.fail.Exception, KeyboardInterrupt):
            raise
        except (Exception, CaseOverTime) as e:
            self.after_error(e)
            if bench is not None:
                bench.has_error = True
            over = isinstance(e, CaseOverTime)
            why = str(e) if over else first_line(e)
            self.results.put(case, impl, {"status": "over_time" if over else "error", "reason": why,
                                          "traceback": traceback.format_exc(limit=6)[-3000:]}, extra_info, **meta)
            if impl != OURS:
                pytest.xfail(f"baseline {impl}: {why}")
            if over:
                pytest.fail(f"{case} / {impl}: {why}", pytrace=False)
            raise

    # -- the common path --
    def run(self, bm, *, case: str, impl: str, setup: Callable[[], Callable], mode: str = "kernel",
            flops: float | None = None, nbytes: float | None = None, shape: dict | None = None, title: str = "",
            tokens: float | None = None, memory: bool = True, timer_kw: dict | None = None,
            extra: dict | None = None, case_meta: dict | None = None) -> dict:
        """Time `setup()`'s step for (case, impl) and record it; returns the row. While warming: one untimed step."""
        meta = dict(title=title or case, shape=shape, flops=flops, bytes=nbytes, mode=mode,
                    floor_ms=self.floor_ms(flops, nbytes), **(case_meta or {}))
        bm.group = case
        bm.extra_info.update({"case": case, "impl": impl})
        self.gate(case, impl)
        with self.guarded(case, impl, bm.extra_info, bench=bm, **meta):
            step = setup()
            if warming():
                step()
                sync()
                return {}
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
        return summarize(times, times[0] * 1e-3)

    @staticmethod
    def pedantic(bm, step, median_ms: float, budget_s: float = 0.1) -> None:
        """pytest-benchmark's own statistics (host clock around synchronized calls): a few rounds, so the standard
        JSON and --benchmark-compare work; the figures that count are the CUDA-event ones in extra_info."""
        least = 1 if median_ms > 50 else 3   # a training step or a generation: one more is enough
        rounds = int(min(max(budget_s / max(median_ms * 1e-3, 1e-6), least), 20))

        def target():
            step()
            torch.cuda.synchronize()

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

    def add_rate(self, case: str, impl: str, flops) -> None:
        """FLOPs known only after setup (counted on the built module): store them on the case and the row's rate."""
        c = self.data["cases"].get(case)
        if not flops or not c:
            return
        c["flops"] = flops
        row = c["impls"].get(impl, {})
        if row.get("status") == "ok" and row.get("median_ms"):
            row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
            if self.ceilings and self.ceilings.get("matmul_tflops"):
                row["frac_matmul"] = row["tflops"] / self.ceilings["matmul_tflops"]
        self.results.refresh(case)

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
