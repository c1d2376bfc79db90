#!/usr/bin/env python
"""The untimed phases of gpu_check.sh: measuring the card, planning the timed tiers, warming the compile cache.

    python bench/warmup.py prepare --results R.json --run-id ID --plan P.json --env P.env
        the card's ceilings (copy bandwidth, a large bf16 matmul) into the results file, while the GPU is idle;
        the bench cases collected into P.json (node id, cost, marks); in P.env, for the script, the seconds the
        target tiers reserve (the sum of their cases' costs)
    python bench/warmup.py warm --plan P.json --queue DIR --seconds S [--workers N] [--logs DIR]
        discovery processes run our path's cases untimed and queue what they would compile; a pool of N worker
        processes compiles the queue into the shared TRITON_CACHE_DIR (benchlib/warm.py says how), until done or S
    python bench/warmup.py worker --queue DIR --deadline EPOCH --log F.jsonl      (one worker of that pool)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [p for p in (HERE, ROOT) if p not in sys.path]
if not torch.cuda.is_available():  # as bench/conftest.py: the interpreter, decided before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
OURS = "triton"


def prepare(args) -> int:
    import pytest

    from benchlib import env
    from benchlib.suite import Suite

    suite = Suite(results_path=args.results, run_id=args.run_id, mirror_dir=os.environ.get("BENCH_MIRROR_DIR"))
    info, ceil = suite.data["device"], suite.ceilings
    spec = ceil.get("spec") or {}
    print(f"card: {info.get('name')} (capability {info.get('capability', '-')}, {info.get('sms', '-')} SMs, "
          f"{info.get('memory_gb', '-')} GiB, L2 {info.get('l2_mb', '-')} MB; {env.DTYPE})")
    sheet = (f" (datasheet {spec.get('name')}: {spec['copy_gbps'] / 1e3:.2f} TB/s, {spec['matmul_tflops']:.0f} "
             f"TFLOP/s)") if spec else ""
    print(f"ceilings measured: copy {ceil['copy_gbps'] / 1e3:.2f} TB/s, {ceil['matmul_dtype']} matmul "
          f"{ceil['matmul_shape']} in {ceil['matmul_ms']:.2f} ms = {ceil['matmul_tflops']:.1f} TFLOP/s{sheet}")
    os.environ["BENCH_PLAN"] = args.plan
    code = pytest.main([os.path.join(HERE), "--collect-only", "-q", "-p", "no:randomly", "-p", "no:benchmark"],
                       plugins=[])
    if code != 0 or not os.path.exists(args.plan):
        print(f"warmup.py: collecting the bench cases failed (pytest exit {code})", file=sys.stderr)
        return 2
    with open(args.plan, encoding="utf-8") as f:
        plan = json.load(f)
    lines = {"PLAN_TARGETS_KERNELS_S": sum(c["cost"] or 0 for c in plan if c["target"] and not c["model"]),
             "PLAN_TARGETS_MODEL_S": sum(c["cost"] or 0 for c in plan if c["target"] and c["model"]),
             "PLAN_CASES": len(plan), "PLAN_OURS": len(ours(plan))}
    with open(args.env, "w", encoding="utf-8") as f:
        f.writelines(f"{k}={int(round(v))}\n" for k, v in lines.items())
    print("plan: " + ", ".join(f"{k}={int(round(v))}" for k, v in lines.items()))
    return 0


def ours(plan: list) -> list:
    """Our path's cases: impl "triton", or a case of ours alone (no impl parameter, a cost declared)."""
    return [c for c in plan if c["impl"] == OURS or (c["impl"] is None and c["cost"] is not None)]


def discovery_groups(plan: list) -> list:
    """Node-id lists, one per discovery process: the kernel cases (targets first); the model-level target cases;
    the other model-level cases (each model-level process holds one model at a time)."""
    mine = ours(plan)
    kernels = [c["nodeid"] for c in sorted((c for c in mine if not c["model"]), key=lambda c: not c["target"])]
    model_targets = [c["nodeid"] for c in mine if c["model"] and c["target"]]
    model_rest = [c["nodeid"] for c in mine if c["model"] and not c["target"]]
    return [g for g in (kernels, model_targets, model_rest) if g]


def warm_up(args) -> int:
    from benchlib import warm

    t0 = time.time()
    deadline = t0 + args.seconds
    with open(args.plan, encoding="utf-8") as f:
        plan = json.load(f)
    q = os.path.abspath(args.queue)
    os.makedirs(args.logs, exist_ok=True)
    for sub in ("", "seen", "claimed", "done"):
        os.makedirs(os.path.join(q, sub), exist_ok=True)
    env = dict(os.environ, BENCH_WARM="1", BENCH_WARM_QUEUE=q, PYTHONUNBUFFERED="1")
    for k in ("BENCH_DEADLINE", "BENCH_RESULTS", "TRITON_CACHE_AUTOTUNING"):
        env.pop(k, None)
    groups = discovery_groups(plan)
    finders = []
    for i, nodes in enumerate(groups):
        log = open(os.path.join(args.logs, f"warm-discover-{i}.log"), "w")
        finders.append((subprocess.Popen([sys.executable, "-m", "pytest", *nodes, "-q", "-p", "no:randomly", "-p",
                                          "no:benchmark", "-p", "no:cacheprovider"],
                                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    logs = [os.path.join(args.logs, f"warm-worker-{i}.jsonl") for i in range(args.workers)]
    workers = [subprocess.Popen([sys.executable, __file__, "worker", "--queue", q, "--deadline", str(deadline),
                                 "--log", path], cwd=ROOT, env=env) for path in logs]
    print(f"warm-up: {sum(map(len, groups))} cases of ours in {len(groups)} discovery processes, "
          f"{args.workers} compile workers, {args.seconds:.0f} s at most", flush=True)
    outcomes = [_wait(p, deadline) for p, _ in finders]
    for _, log in finders:
        log.close()
    open(os.path.join(q, "done", "all"), "w").close()
    for p in workers:
        _wait(p, deadline + 5)
    s = warm.summary(q, logs)
    s.update(seconds=round(time.time() - t0, 1), discovery=outcomes)
    with open(os.path.join(args.logs, "warm-summary.json"), "w", encoding="utf-8") as f:
        json.dump(s, f, indent=1)
    slow = "; ".join(f"{r['kernel']} {r['s']} s" for r in s["slowest"])
    print(f"warm-up: {s['queued']} units queued, {s['compiled']} compiled ({s['compile_s']} s of compile time), "
          f"{s['failed']} failed, {s['left']} left; discovery exits {outcomes}; {s['seconds']} s"
          + (f"; slowest: {slow}" if slow else ""))
    for r in s["failures"]:
        print(f"warm-up: FAILED {r['kernel']}: {r['status']}")
    return 0 if all(o == 0 for o in outcomes) and not s["failed"] and not s["left"] else 1


def _wait(proc, deadline: float):
    """The process's exit code, or "stopped" after terminating it at the deadline."""
    try:
        return proc.wait(timeout=max(deadline - time.time(), 0.1))
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        return "stopped"


def worker(args) -> int:
    from benchlib import warm

    warm.compile_queue(args.queue, args.deadline, args.log)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--results", required=True)
    a.add_argument("--run-id", required=True)
    a.add_argument("--plan", required=True)
    a.add_argument("--env", required=True)
    a = sub.add_parser("warm")
    a.add_argument("--plan", required=True)
    a.add_argument("--queue", required=True)
    a.add_argument("--seconds", type=float, required=True)
    a.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    a.add_argument("--logs", default=".")
    a = sub.add_parser("worker")
    a.add_argument("--queue", required=True)
    a.add_argument("--deadline", type=float, required=True)
    a.add_argument("--log", required=True)
    args = p.parse_args(argv)
    return {"prepare": prepare, "warm": warm_up, "worker": worker}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
