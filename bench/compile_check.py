"""The static sm_90 gate: compile every Triton kernel configuration the launchers can select, for Hopper, no GPU.

For every (kernel, configuration) in the kernel modules' `CONFIGS` at the Qwen-VL shapes (bench/static/cases.py),
in bf16 by default, this compiles for sm_90a with the installed Triton (its own ptxas), reads ptxas's report and
the SASS (cuobjdump --dump-sass), and FAILS (exit 1) on:
  serialized  any ptxas C75xx message (wgmma serialized, ...; ptxas prints them as `info`, every line is read)
  spills      any spill store or load
  narrow      a 16-bit tile (a tensor load in the TTGIR) loaded by loads narrower than 16 bytes (LDG.E.U16,
              cp.async of 4 or 8 bytes); traced through the line table of the cubin
  mma.sync    a 16-bit tl.dot that did not become wgmma (HMMA, or no HGMMA, in the SASS)
  redundant   HGMMA work in the main loop above the tile products of one step (padded head dim included)
  thin        a warpgroup's product tile below 64 rows x 32 (8 warps on 64 rows split the tile's columns
              between the warpgroups; a 16-wide score tile runs 64x16 wgmma)
  duplicate   two candidates of one launch that compile to the same program (autotuning times it twice)
  error       a compile error, a fixed config over the 227 KB of shared memory, or a launch of CONFIGS not compiled
An autotune candidate over shared memory is pruned by the autotuner at run time: reported, not a failure, unless
no candidate of its launch fits.

    python bench/compile_check.py                          # the gate: all kernels, bf16, a process per core
    python bench/compile_check.py --only flash_attention --match "vit" --jobs 2
    python bench/compile_check.py --keep /tmp/sass         # + each kernel's .ptx, .cubin, .sass, index.json
    python bench/compile_check.py --cost-model             # + the SASS cost model of the attention loops
    PYTHONPATH=/path/to/triton36 python bench/compile_check.py   # the same gate under another Triton

Writes bench/results/static-triton<version>.md (per-kernel summary) unless --no-summary or a subset is selected.
Run it without TRITON_INTERPRET (cleared here). Uses `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90,
32))`, the JIT's own argument binder (so the specialization is a real launch's), and the backend's `make_cubin`
(so ptxas runs with Triton's own flags; its log is captured). Works with Triton 3.6 to 3.9.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # must be unset before triton is imported: compile, never interpret

import argparse  # noqa: E402
import concurrent.futures as cf  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from static import cases as C  # noqa: E402
from static import report  # noqa: E402
from static import sass as S  # noqa: E402

SMEM_LIMIT = 232448  # bytes of shared memory one block may opt into on sm_90
ARCH = 90
CATEGORIES = ("serialized", "spills", "narrow", "mma.sync", "redundant", "thin", "duplicate", "error")


def _tool(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _bind(kernel, values):
    """Runtime arguments in the kernel's order: from a dict by parameter name, or a positional tuple."""
    import torch
    if isinstance(values, dict):
        names = [p.name for p in kernel.params if not p.is_constexpr]
        missing = [n for n in names if n not in values]
        if missing:
            raise KeyError(f"no value for parameter(s) {missing} of {kernel.__name__}")
        values = [values[n] for n in names]
    return [torch.empty(16, dtype=getattr(torch, v[1])) if isinstance(v, tuple) else v for v in values]


def compile_case(case: C.Case, keep: str | None):
    """Compile one case; returns its result record (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    res = {"name": case.name, "module": case.module, "kernel": case.kernel, "launch": case.launch,
           "shape": case.shape, "dtype": case.dtype, "config": case.config,
           "candidates": len(C.mod(case.module).CONFIGS[case.launch]), "candidate": case.candidate, "ok": False}
    t0 = time.time()
    try:
        kernel = getattr(C.mod(case.module), case.kernel)
        target = GPUTarget("cuda", ARCH, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        # constexprs the kernel does not declare are left out (a case builder may serve several kernel versions)
        declared = {p.name for p in kernel.params if p.is_constexpr}
        kwargs = {**{k: v for k, v in case.consts.items() if k in declared}, **case.options}
        bound, spec, opts = binder(*_bind(kernel, case.values), **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, dict(kwargs, debug=False), bound, spec,
                                                                   opts)
        ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
        ptx, ttgir = ck.asm["ptx"], ck.asm.get("ttgir", "")
        # ptxas once more, exactly as Triton runs it, to read its report (a cached kernel never ran it here)
        buf = io.StringIO()
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        try:
            with contextlib.redirect_stdout(buf):
                cubin = backend.make_cubin(ptx, {}, backend.parse_options(options.__dict__), ARCH)
        finally:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG")
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            # nvdisasm (cuobjdump's disassembler) with the line table: narrow loads are traced to their source
            sass = subprocess.run([_tool("nvdisasm"), "-g", "-c", path], capture_output=True, text=True,
                                  check=True).stdout
        instrs = S.parse_sass(sass)
        res["program"] = hashlib.sha1("\n".join(f"{i.pred} {i.op} {i.operands}" for i in instrs).encode()).hexdigest()
        res.update(ok=True, shared=ck.metadata.shared, num_warps=ck.metadata.num_warps,
                   ptxas=S.ptxas_report(buf.getvalue()),
                   sass=S.sass_report(instrs, S.ttgir_tile_load_lines(ttgir, 32 * ck.metadata.num_warps)))
        if case.dots_per_step:
            res["tile"] = {"rows": case.consts[case.rows_key], "step": case.consts[case.step_key]}
            if res["sass"]["hgmma"]:
                res["cost"] = _cost(case, instrs, ck.metadata.num_warps)
        if keep:
            res["files"] = _keep(keep, case, ptx, cubin, sass)
    except Exception as e:  # noqa: BLE001 - every failure is a result
        msg = f"{type(e).__name__}: {e}"
        res["error"] = msg if len(msg) < 3000 else msg[:1500] + "\n...\n" + msg[-1200:]
    res["seconds"] = round(time.time() - t0, 1)
    return res


def _cost(case, instrs, num_warps):
    """The cost model of the program's steady-state loop: among the innermost loops with HGMMA, the cheapest (the
    unmasked key loop; the masked ones run once or twice per program)."""
    hg_loops = [lp for lp in S.loops(instrs) if any(i.base == "HGMMA" for i in instrs[lp[0]:lp[1] + 1])]
    inner = [lp for lp in hg_loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in hg_loops)]
    if not inner:
        return None
    main = min(inner, key=lambda lp: lp[1] - lp[0])
    out = S.loop_cost(instrs, main, max(1, num_warps // 4), case.useful_flops())
    out["padded_flops"] = case.useful_flops(padded=True)
    out["loops"] = len(inner)
    return out


def _keep(root, case, ptx, cubin, sass):
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", case.name).strip("_")
    d = os.path.join(root, case.module)
    os.makedirs(d, exist_ok=True)
    files = {}
    for ext, data in (("ptx", ptx), ("cubin", cubin), ("sass", sass)):
        rel = os.path.join(case.module, f"{stem}.{ext}")
        with open(os.path.join(root, rel), "wb" if ext == "cubin" else "w") as f:
            f.write(data)
        files[ext] = rel
    return files


def verdicts(r):
    """The gate's failure categories of one result (a pruned autotune candidate has none)."""
    if not r["ok"]:
        return ["error"]
    out = []
    p, s = r["ptxas"], r["sass"]
    if p["c75"]:
        out.append("serialized")
    if p["spill_stores"] or p["spill_loads"]:
        out.append("spills")
    if s["narrow_tile_loads"]:
        out.append("narrow")
    if r.get("dot") and r["dtype"] != "float32" and (s["hmma"] or not s["hgmma"]):
        out.append("mma.sync")
    c = r.get("cost")
    if c and c["executed_flops"] > 1.01 * c["padded_flops"]:
        out.append("redundant")
    if r.get("tile") and (r["tile"]["rows"] < 64 * max(1, r["num_warps"] // 4) or r["tile"]["step"] < 32):
        out.append("thin")
    if r["shared"] > SMEM_LIMIT:
        out.append("smem")
    return out


def run(cases, jobs, keep):
    results = []
    ctx = __import__("multiprocessing").get_context("spawn")
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        futs = {pool.submit(compile_case, c, keep): c for c in cases}
        for fut in cf.as_completed(futs):
            r = fut.result()
            r["dot"] = futs[fut].dot
            r["verdicts"] = verdicts(r)
            results.append(r)
            print(report.line(r), flush=True)
    return sorted(results, key=lambda r: r["name"])


def settle(results, cases, modules, dtypes):
    """Final verdicts: a candidate over shared memory fails only when no candidate of its launch fits; a launch of
    CONFIGS that no case compiles fails."""
    by_launch = {}
    for r in results:
        by_launch.setdefault((r["module"], r["kernel"], r["launch"], r["shape"], r["dtype"]), []).append(r)
    for group in by_launch.values():
        seen = {}
        for r in sorted(group, key=lambda r: r["candidate"]):
            if r["ok"] and r["program"] in seen:  # autotuning would time one program twice
                r["verdicts"].append("duplicate")
                r["same_as"] = seen[r["program"]]
            seen.setdefault(r.get("program"), r["name"])
        fits = [r for r in group if r["ok"] and r["shared"] <= SMEM_LIMIT]
        for r in group:
            if "smem" in r["verdicts"]:
                r["verdicts"].remove("smem")
                r["pruned"] = True
                if r["candidates"] == 1 or not fits:
                    r["verdicts"].append("error")
            if r.get("pruned"):  # never launched: its other findings do not count
                r["verdicts"] = [v for v in r["verdicts"] if v == "error"]
    return C.uncovered(cases, modules, dtypes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated kernel modules (default: all): " + ",".join(C.BUILDERS))
    ap.add_argument("--match", default="", help="only cases whose name contains this (a regular expression)")
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16,float16,float32")
    ap.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 16)))
    ap.add_argument("--keep", metavar="DIR", help="write .ptx, .cubin, .sass per kernel and DIR/index.json")
    ap.add_argument("--json", metavar="PATH", help="write every result record here")
    ap.add_argument("--summary", metavar="PATH", help="the markdown summary (default: bench/results/static-"
                    "triton<version>.md for a full run, none for a subset)")
    ap.add_argument("--no-summary", action="store_true", help="write no markdown summary (CI)")
    ap.add_argument("--cost-model", action="store_true", help="print the SASS cost model of the attention loops")
    ap.add_argument("--list", action="store_true", help="list the cases, compile nothing")
    a = ap.parse_args(argv)

    import triton
    modules = [m for m in a.only.split(",") if m] or list(C.BUILDERS)
    dtypes = [d for d in a.dtypes.split(",") if d]
    cases = [c for m in modules for c in C.BUILDERS[m](dtypes) if re.search(a.match, c.name)]
    if a.list:
        for c in cases:
            print(c.name)
        print(f"{len(cases)} cases")
        return 0
    ptxas = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True).stdout.strip()
    ptxas = ptxas.splitlines()[-1] if ptxas else "?"
    print(f"triton {triton.__version__}, sm_{ARCH}a, ptxas {ptxas}, {len(cases)} cases, {a.jobs} processes",
          flush=True)
    if a.keep:
        os.makedirs(a.keep, exist_ok=True)
    t0 = time.time()
    results = run(cases, a.jobs, a.keep)
    missing = settle(results, cases, modules, dtypes)
    if a.match:  # a subset: launches it leaves out are not missing
        missing = []
    wall = time.time() - t0
    counts = report.counts(results, CATEGORIES)
    if missing:
        counts["error"] += len(missing)
    print(report.footer(triton.__version__, results, counts, missing, wall))
    if a.cost_model:
        print(report.cost_table(results))
    if a.keep:
        index = [{"kernel": f"{r['module']}.{r['kernel']}", "case": r["shape"], "config": r["config"],
                  "dtype": r["dtype"], "ptx": r["files"]["ptx"], "cubin": r["files"]["cubin"],
                  "sass": r["files"]["sass"]} for r in results if r.get("files")]
        with open(os.path.join(a.keep, "index.json"), "w") as f:
            json.dump(index, f, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "ptxas": ptxas, "wall_s": round(wall), "counts": counts,
                       "missing": missing, "results": results}, f, indent=1)
    summary = a.summary or (None if (a.only or a.match or a.no_summary) else
                            os.path.join(HERE, "results", f"static-triton{triton.__version__}.md"))
    if summary:
        with open(summary, "w") as f:
            f.write(report.markdown(triton.__version__, ptxas, results, counts, missing, a.jobs, wall))
        print(f"summary: {os.path.relpath(summary)}")
    return 1 if any(counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
