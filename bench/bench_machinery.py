"""The suite's own machinery, checked on any machine: time reserved for target cases, a case stopped at its limit,
the warm-up's compile queue and its discovery mode. No timing is asserted."""
import json
import os
import time
import types

import pytest
import torch

from benchlib import warm
from benchlib.env import OURS
from benchlib.suite import CaseOverTime, Suite

NODE = "bench/bench_x.py::test_x[a]"


def bare_suite(monkeypatch):
    """A suite that writes no file, running the case NODE, followed by two target cases of 10 s and 20 s (called
    in the test's body: pytest sets PYTEST_CURRENT_TEST itself before each phase)."""
    s = Suite(results_path=None)
    s.schedule = [("bench/bench_x.py::test_x[first]", 5.0, True), (NODE, 4.0, False),
                  ("bench/bench_x.py::test_x[t1]", 10.0, True), ("bench/bench_x.py::test_x[other]", 50.0, False),
                  ("bench/bench_x.py::test_x[t2]", 20.0, True)]
    monkeypatch.setenv("PYTEST_CURRENT_TEST", f"{NODE} (call)")
    return s


def test_later_targets_keep_their_time(monkeypatch):
    s = bare_suite(monkeypatch)
    assert s.cost_of(NODE) == 4.0 and s.reserved_after(NODE) == 30.0
    assert s.reserved_after("not scheduled") == 35.0
    s.deadline = time.time() + 40          # 40 s left: 30 reserved after this case, its 4 s fit
    s.gate("x", "torch")
    s.deadline = time.time() + 32          # 2 s free: the case would eat the targets' time
    with pytest.raises(pytest.skip.Exception, match="reserved for the target cases"):
        s.gate("x", "torch")
    row = s.data["cases"]["x"]["impls"]["torch"]
    assert row["status"] == "skipped" and "out of time" in row["reason"]


def test_a_case_is_stopped_at_its_limit(monkeypatch):
    s = bare_suite(monkeypatch)
    s.deadline = time.time() + 30.3        # 0.3 s free before the targets' 30 s
    t0 = time.time()
    bench = types.SimpleNamespace(has_error=False)   # pytest-benchmark's fixture: its JSON skips a failed case
    with pytest.raises(pytest.fail.Exception, match="stopped after"):
        with s.guarded("x", OURS, bench=bench):
            time.sleep(3)
    assert time.time() - t0 < 2 and bench.has_error
    assert s.data["cases"]["x"]["impls"][OURS]["status"] == "over_time"
    with pytest.raises(pytest.xfail.Exception):    # a baseline over its time: recorded, expected to fail
        s.deadline = time.time() + 30.2
        with s.guarded("x", "torch"):
            time.sleep(3)
    s.deadline = None                      # no deadline (CI): no limit
    with s.time_limit():
        time.sleep(0.05)
    assert issubclass(CaseOverTime, BaseException) and not issubclass(CaseOverTime, Exception)


def test_compile_queue_order_dedup_and_summary(tmp_path):
    q = str(tmp_path / "queue")
    for sub in ("seen", "claimed", "done"):
        os.makedirs(os.path.join(q, sub))
    assert warm.enqueue(q, "m", "late", "k1", "{}", priority=1)
    assert warm.enqueue(q, "m", "first", "k2", "{}", priority=0)
    assert not warm.enqueue(q, "m", "late", "k1", "{}", priority=0)      # queued once, whoever finds it again
    done = []

    def compile_unit(unit):
        if unit["name"] == "broken":
            raise RuntimeError("ptxas failed\nmore")
        done.append(unit["name"])

    assert warm.enqueue(q, "m", "broken", "k3", "{}", priority=2)
    open(os.path.join(q, "done", "all"), "w").close()
    log = str(tmp_path / "w0.jsonl")
    assert warm.compile_queue(q, time.time() + 30, log, compile_unit) == 2
    assert done == ["first", "late"]
    got = warm.summary(q, [log])
    assert (got["queued"], got["compiled"], got["failed"], got["left"]) == (3, 2, 1, 0)
    assert "ptxas failed" in got["failures"][0]["status"]
    assert json.loads(open(log).readline())["kernel"] == "m.first"


def test_a_warm_up_process_launches_nothing(tmp_path, monkeypatch):
    """Discovery mode under the interpreter: the kernel is not run (its poisoned output stays NaN), nothing fails."""
    triton = pytest.importorskip("triton")
    from benchlib.env import interpreting, ours

    if not interpreting():
        pytest.skip("on CUDA the discovery hook is exercised by gpu_check.sh's warm-up")
    from triton.runtime.interpreter import InterpretedFunction

    import qwenvl_kernels.launch as launch

    monkeypatch.setattr(InterpretedFunction, "run", InterpretedFunction.run)   # restored after the test
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    warm.install_discovery(str(tmp_path / "queue"))
    x = torch.randn(4, 32)
    out = ours().rms_norm(x, torch.ones(32), 1e-6)
    assert torch.isnan(out).all() and triton is not None


FAKE_HOPPER = r'''
import json, os, sys, time
import torch, triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class FakeHopper:  # what the JIT asks of a driver before it launches: enough to specialize and compile for sm_90
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self): return torch.device("cpu")


driver.set_active(FakeHopper())
sys.path.insert(0, sys.argv[1])
from benchlib import compiles, warm

kernels = compiles.jit_functions()
for name, fn in kernels.items():
    assert warm.find_jit(fn.__module__, fn.fn.__qualname__) is fn, name

import twice
q = sys.argv[2]
warm.install_discovery(q)
x, y = torch.randn(1000), torch.empty(1000)
twice.plain[(8,)](x, y, 1000, BLOCK=128)
for n in (1000, 1024):
    twice.tuned[lambda m: (triton.cdiv(n, m["BLOCK"]),)](x, y, n)
queued = len([f for f in os.listdir(q) if f.endswith(".json")])
triton.knobs.runtime.jit_cache_hook = None
open(os.path.join(q, "done", "all"), "w").close()
compiled = warm.compile_queue(q, time.time() + 120, os.path.join(q, "log.jsonl"))
before = set(os.listdir(os.environ["TRITON_CACHE_DIR"]))
twice.plain.run(x, y, 1024, BLOCK=256, num_warps=8, grid=(4,), warmup=True)   # as the timed tier will: a cache hit
hits = len(set(os.listdir(os.environ["TRITON_CACHE_DIR"])) - before) == 0
print(json.dumps({"kernels": len(kernels), "queued": queued, "compiled": compiled, "hits": hits}))
'''

TWICE = '''
import triton
import triton.language as tl


@triton.jit
def plain(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)


tuned = triton.autotune([triton.Config({"BLOCK": 128}, num_warps=4), triton.Config({"BLOCK": 256}, num_warps=8)],
                        key=["n"])(plain)
'''


def test_warm_up_queues_and_compiles_for_hopper_without_a_gpu(tmp_path):
    """The CUDA path of the warm-up, on a CPU with a stand-in driver for an sm_90 device: Triton's compile hook
    queues every launch (an autotuned one: every candidate, for each specialization) and launches nothing; the
    compile worker builds the queue with Triton's compiler (ptxas for sm_90a) into the cache that a later launch
    finds; every @triton.jit function of our kernel modules can be found again by module and name."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    (tmp_path / "twice.py").write_text(TWICE)
    (tmp_path / "main.py").write_text(FAKE_HOPPER)
    q = tmp_path / "queue"
    for sub in ("seen", "claimed", "done"):
        os.makedirs(q / sub)
    bench = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=os.pathsep.join([str(tmp_path), bench]))
    done = subprocess.run([sys.executable, str(tmp_path / "main.py"), bench, str(q)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["kernels"] >= 10 and got["hits"]
    assert got["queued"] == got["compiled"] >= 3    # the plain launch and 2 candidates x 2 length classes, deduped


def test_processes_of_one_run_share_the_results_file(tmp_path):
    from benchlib.results import Results

    path = str(tmp_path / "run.json")
    first = Results(path, "run-1", {"device": {"name": "NVIDIA H200"}, "parity": None})
    first.put("x", "torch", {"status": "ok", "median_ms": 2.0})
    later = Results(path, "run-1", {"device": {"name": "other"}, "parity": "rc 0, 12 passed"})
    assert later.data["parity"] == "rc 0, 12 passed"            # known only after the first process wrote the file
    assert later.data["device"]["name"] == "NVIDIA H200" and "x" in later.data["cases"]
    assert len(later.data["processes"]) == 2
    assert "x" not in Results(path, "run-2", {}).data["cases"]  # another run starts afresh
