"""The run's results file: `{"cases": {case: {"impls": {impl: row}}}, "targets": [...], "ceilings": ..., ...}`.

Several pytest processes of one gpu_check.sh run share one file (same run id): each loads it, adds its rows, and
rewrites it atomically after every record, so a run cut short keeps what it measured. A second copy goes to
BENCH_MIRROR_DIR (gpu_check.sh: $OUT, which comes back even when the command is stopped).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys

from .targets import TARGETS, derive, evaluate_target

SCHEMA = 1


class Results:
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
        # what an earlier process of the run could not know yet (the parity outcome, after `prepare`) is filled in
        self.data.update({k: v for k, v in meta.items() if self.data.get(k) is None or k == "updated"})
        self.data.setdefault("processes", []).append({"started": now(), "argv": sys.argv[1:][:40]})

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
        """Recompute the case's ratios, copy its rows into pytest-benchmark's extra_info, save."""
        c = self.data["cases"][case]
        derive(c)
        for impl, row in c["impls"].items():
            ei = self.extra_infos.get((case, impl))
            if ei is not None:
                ei.update(jsonable(row))
        self.save()

    def save(self) -> None:
        self.data["updated"] = now()
        self.data["targets"] = [evaluate_target(t, self.data) for t in TARGETS]
        if not self.path:
            return
        text = json.dumps(jsonable(self.data), indent=1, sort_keys=True)
        atomic_write(self.path, text)
        if self.mirror_dir:
            try:
                atomic_write(os.path.join(self.mirror_dir, os.path.basename(self.path)), text)
            except OSError:
                pass


def atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.write("\n")
    os.replace(tmp, path)


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float):
        return None if (math.isnan(x) or math.isinf(x)) else x
    if isinstance(x, (int, str, bool)) or x is None:
        return x
    return str(x)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
