"""Warming Triton's compile cache before anything is timed (bench/warmup.py drives it for gpu_check.sh).

Compiling is CPU work and the GPU machine has 16 cores, while the timed tiers run one process at a time. So the
warm-up separates finding out what the benchmarks compile from compiling it:

- discovery (`install_discovery`, in pytest processes run with BENCH_WARM=1): our path's cases run once, untimed.
  Every Triton launch is stopped before it compiles, through Triton's `jit_cache_hook`: the exact specialization the
  launch would compile (signature, constexprs, options: Triton's own serialized form) is written as one file into
  a queue folder, and nothing is compiled or launched (outputs keep whatever their buffers held). An autotuned
  launch queues every candidate configuration: which one wins is known only when the timed tier tunes it.
- compiling (`compile_queue`, in a pool of worker processes): each worker claims queue files (an atomic rename),
  lowest priority number first (target cases first), and compiles each with `JITFunction.preload` into the
  TRITON_CACHE_DIR it shares with the timed tiers. A unit queued once is never queued again.
Under the interpreter nothing compiles: discovery runs the cases with every launch skipped (which checks that they
survive it) and the queue stays empty.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import time

from .compiles import jit_function
from .env import first_line, interpreting

_priority = [1]


def set_priority(priority: int) -> None:
    """The priority of what the running case queues (0: a target case, 1: the rest)."""
    _priority[0] = priority


def install_discovery(queue_dir: str) -> None:
    """Turn every Triton launch of this process into queued compile units (and no launch)."""
    for sub in ("", "seen", "claimed", "done"):
        os.makedirs(os.path.join(queue_dir, sub), exist_ok=True)
    if interpreting():
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = _skip_launch
        return
    from triton import knobs
    from triton.runtime.autotuner import Autotuner

    Autotuner.run = _every_candidate
    knobs.runtime.jit_cache_hook = lambda **hook: _queue_unit(queue_dir, **hook)


def _skip_launch(self, *args, **kwargs):
    return None


def _every_candidate(self, *args, **kwargs):
    """Autotuner.run while discovering: every (pruned) candidate goes through the JIT once, which queues it."""
    kwargs.pop("warmup", None)
    grid = kwargs.pop("grid", None)
    self.nargs = dict(zip(self.arg_names, args))
    try:
        configs = self.prune_configs(kwargs)
        for config in configs:
            self.fn.run(*args, **{**kwargs, **config.all_kwargs(), "grid": grid, "warmup": True})
        self.best_config = configs[0]
    finally:
        self.nargs = None
    return None


def unit_name(module: str, name: str, key: str) -> str:
    return hashlib.sha1(f"{module}:{name}:{key}".encode()).hexdigest()[:24]


def enqueue(queue_dir: str, module: str, name: str, key: str, data: str, label: str = "",
            priority: int | None = None) -> bool:
    """Queue one compile unit; False when some process queued it already."""
    digest = unit_name(module, name, key)
    try:
        os.close(os.open(os.path.join(queue_dir, "seen", digest), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    prio = _priority[0] if priority is None else priority
    path = os.path.join(queue_dir, f"{prio}-{digest}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"module": module, "name": name, "label": label, "data": data}, f)
    os.replace(path + ".tmp", path)
    return True


def _queue_unit(queue_dir: str, **hook) -> bool:
    """Triton's jit_cache_hook (called with key, repr, fn, compile, ...): queue the unit and tell Triton not to
    compile it here (True)."""
    info, fn = hook.get("compile"), hook.get("fn")
    data = info.get("specialization_data") if isinstance(info, dict) else None
    if data is None or fn is None:
        return False  # a Triton that does not describe the unit: let it compile here
    module = fn.module if isinstance(fn.module, str) else fn.module.__name__
    enqueue(queue_dir, module, fn.name, str(hook.get("key")), data, label=str(hook.get("repr", "")))
    return True


def find_jit(module: str, name: str):
    """The JITFunction `name` (a qualified name) of `module`, under whatever wrappers the module keeps it in."""
    mod = importlib.import_module(module)
    obj = mod
    for part in name.split("."):
        obj = getattr(obj, part, None)
    fn = jit_function(obj)
    if fn is not None:
        return fn
    for value in vars(mod).values():  # kept under another name
        fn = jit_function(value)
        if fn is not None and getattr(fn.fn, "__qualname__", None) == name:
            return fn
    raise LookupError(f"no @triton.jit function {name} in {module}")


def claim(queue_dir: str) -> str | None:
    """Take the queue file with the lowest priority number (an atomic rename); None when the queue is empty."""
    for name in sorted(f for f in os.listdir(queue_dir) if f.endswith(".json")):
        dst = os.path.join(queue_dir, "claimed", name)
        try:
            os.rename(os.path.join(queue_dir, name), dst)
        except FileNotFoundError:
            continue  # another worker took it
        return dst
    return None


def compile_queue(queue_dir: str, deadline: float, log_path: str, compile_unit=None) -> int:
    """Compile queued units until the queue is empty and discovery is over ("done/all" exists) or the deadline
    passes; one JSON line per unit in `log_path`. Returns the number compiled."""
    compile_unit = compile_unit or _preload
    compiled = 0
    with open(log_path, "a", encoding="utf-8") as log:
        while time.time() < deadline:
            path = claim(queue_dir)
            if path is None:
                if os.path.exists(os.path.join(queue_dir, "done", "all")) and claim_pending(queue_dir) == 0:
                    break
                time.sleep(0.2)
                continue
            with open(path, encoding="utf-8") as f:
                unit = json.load(f)
            t0 = time.perf_counter()
            try:
                compile_unit(unit)
                status = "ok"
                compiled += 1
            except Exception as e:
                status = first_line(e)
            log.write(json.dumps({"unit": os.path.basename(path), "kernel": f"{unit['module']}.{unit['name']}",
                                  "label": unit.get("label", "")[:300], "s": round(time.perf_counter() - t0, 2),
                                  "status": status}) + "\n")
            log.flush()
    return compiled


def claim_pending(queue_dir: str) -> int:
    return sum(1 for f in os.listdir(queue_dir) if f.endswith(".json"))


def _preload(unit: dict) -> None:
    find_jit(unit["module"], unit["name"]).preload(unit["data"])


def summary(queue_dir: str, logs: list) -> dict:
    """Units queued / compiled / failed / left, and the compile seconds, from the queue folder and worker logs."""
    rows = []
    for path in logs:
        try:
            with open(path, encoding="utf-8") as f:
                rows += [json.loads(line) for line in f if line.strip()]
        except OSError:
            continue
    seen = len(os.listdir(os.path.join(queue_dir, "seen"))) if os.path.isdir(os.path.join(queue_dir, "seen")) else 0
    failed = [r for r in rows if r["status"] != "ok"]
    return {"queued": seen, "compiled": len(rows) - len(failed), "failed": len(failed),
            "left": claim_pending(queue_dir) if os.path.isdir(queue_dir) else 0,
            "compile_s": round(sum(r["s"] for r in rows), 1),
            "slowest": sorted(rows, key=lambda r: -r["s"])[:3], "failures": failed[:5]}
