"""pytest plumbing of the benchmark suite: the session's Suite (ceilings measured once, the results file, the
schedule of its cases), the pytest-benchmark fixture (or a stand-in when the plugin is absent), the targets printed
at the end, and the warm-up's discovery mode.

Settings, as options or environment variables (gpu_check.sh uses the variables, which every pytest process sees):
  --bench-results PATH / BENCH_RESULTS     results JSON (default on CUDA: bench/results/<date>-<gpu>-<commit>.json;
                                           on the CPU a temporary file, so CI never writes into the repository)
  --bench-run-id ID / BENCH_RUN_ID         several pytest processes with one id add to one results file
  --bench-deadline EPOCH / BENCH_DEADLINE  cases that would end past this time are skipped, with the reason recorded
  BENCH_MIRROR_DIR                         a second copy of the results file after every write (gpu_check: $OUT)
  BENCH_PLAN=PATH                          write the collected cases (node id, cost, marks) as JSON (warmup.py)
  BENCH_WARM=1, BENCH_WARM_QUEUE=DIR       a warm-up discovery process (benchlib/warm.py): untimed, queues compiles
"""
import datetime
import json
import os
import sys

# Triton reads TRITON_INTERPRET when it is imported: decide before anything imports triton.
try:
    import torch

    _CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _CUDA = False
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(_HERE), _HERE):  # `pytest bench` without `python -m` or an installed package
    if _p not in sys.path:
        sys.path.insert(0, _p)

import pytest  # noqa: E402

from benchlib.compiles import warming  # noqa: E402

_SUITE = None
_SCHEDULE: list = []   # [(node id, cost s, serves a target)] of this process, in run order


def pytest_addoption(parser):
    group = parser.getgroup("qwenvl-bench", "qwenvl-kernels benchmark suite")
    group.addoption("--bench-results", default=None, help="results JSON to write (and extend, for one run id)")
    group.addoption("--bench-run-id", default=None, help="id shared by the pytest processes of one run")
    group.addoption("--bench-deadline", default=None, type=float,
                    help="unix time after which remaining cases are skipped (recorded as out of time)")


def pytest_configure(config):
    config.addinivalue_line("markers", "compile_baseline: a torch.compile baseline (slow the first time)")
    config.addinivalue_line("markers", "model: a model-level case (vision tower, layers, training step, generation)")
    config.addinivalue_line("markers", "target: a case a target reads (our row, or the baseline it is compared with)")
    config.addinivalue_line("markers", "bench_cost(seconds): what the case may take on the GPU, first call included")
    # a case skipped as unavailable never reaches the benchmark fixture: that is expected, not worth a warning
    config.addinivalue_line("filterwarnings", "ignore:Benchmark fixture was not used")


def _setting(config, option, env, cast=str):
    value = config.getoption(option, default=None)
    if value is None:
        value = os.environ.get(env) or None
    return cast(value) if value is not None else None


def _describe(item) -> dict:
    callspec = getattr(item, "callspec", None)
    impl = callspec.params.get("impl") if callspec else None
    cost = item.get_closest_marker("bench_cost")
    return {"nodeid": item.nodeid, "file": item.nodeid.split("::")[0], "impl": impl,
            "cost": float(cost.args[0]) if cost else None, "target": item.get_closest_marker("target") is not None,
            "model": item.get_closest_marker("model") is not None,
            "compile_baseline": item.get_closest_marker("compile_baseline") is not None}


def pytest_collection_finish(session):
    """The schedule of this process (the suite gates each case on the target cases after it), and the plan file."""
    from benchlib.suite import DEFAULT_COST_S

    items = [_describe(item) for item in session.items]
    _SCHEDULE[:] = [(d["nodeid"], d["cost"] or DEFAULT_COST_S, d["target"]) for d in items]
    plan = os.environ.get("BENCH_PLAN")
    if plan:
        with open(plan, "w", encoding="utf-8") as f:
            json.dump(items, f, indent=1)


@pytest.fixture(scope="session")
def suite(request, tmp_path_factory):
    global _SUITE
    from benchlib import env
    from benchlib.suite import Suite

    config = request.config
    path = _setting(config, "--bench-results", "BENCH_RESULTS")
    if path is None:
        if env.ON_CUDA:
            date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
            name = f"{date}-{env.gpu_slug(torch.cuda.get_device_name(0))}-{env.git_commit()}.json"
            path = os.path.join(_HERE, "results", name)
        else:
            path = str(tmp_path_factory.mktemp("bench") / "results.json")
    _SUITE = Suite(
        results_path=path,
        run_id=_setting(config, "--bench-run-id", "BENCH_RUN_ID"),
        deadline=_setting(config, "--bench-deadline", "BENCH_DEADLINE", float),
        mirror_dir=os.environ.get("BENCH_MIRROR_DIR") or None,
        schedule=_SCHEDULE,
    )
    return _SUITE


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    if warming() and os.environ.get("BENCH_WARM_QUEUE"):
        from benchlib import warm

        warm.install_discovery(os.environ["BENCH_WARM_QUEUE"])


@pytest.fixture(autouse=True)
def _warm_priority(request):
    if warming():
        from benchlib import warm

        warm.set_priority(0 if request.node.get_closest_marker("target") else 1)
    yield


class _StandInBenchmark:
    """The parts of pytest-benchmark's fixture the suite uses, for runs without the plugin (-p no:benchmark)."""

    def __init__(self):
        self.extra_info = {}
        self.group = None

    def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        result = None
        for _ in range(max(1, rounds) * max(1, iterations)):
            result = target(*args, **(kwargs or {}))
        return result


@pytest.fixture
def bm(request):
    if request.config.pluginmanager.hasplugin("benchmark"):
        return request.getfixturevalue("benchmark")
    return _StandInBenchmark()


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    # toy-sized ops on a shared CPU: intra-op threads only add barrier waits (seen: 10 ms per tiny op under load)
    if _CUDA:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # before pytest-benchmark serializes its JSON, so every extra_info carries the final ratios
    if _SUITE is not None:
        try:
            _SUITE.finish()
        except Exception as e:  # a failing summary must not hide the test results
            print(f"\nbench: could not finish the results file: {e!r}", file=sys.stderr)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _SUITE is None or warming():
        return
    import report

    tr = terminalreporter
    tr.section("qwenvl-kernels targets")
    for line in report.target_lines(_SUITE.data):
        tr.write_line(line)
    if _SUITE.results.path:
        tr.write_line(f"results: {_SUITE.results.path}")
