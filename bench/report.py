#!/usr/bin/env python
"""Turn a benchmark results file into the README's performance table, a short text table, or a chart.

    python bench/report.py                       # README.md between <!-- bench:start --> and <!-- bench:end -->,
                                                 # from the latest GPU run in bench/results/ ("no GPU run yet" if none)
    python bench/report.py --print --no-readme   # the short table on stdout
    python bench/report.py --results F.json --chart out.png
    python bench/report.py --floors [--card H200] # the floor table of NOTES.md (a card's datasheet ceilings)

Needs only the standard library (matplotlib for --chart): it runs where the results were copied, not on the GPU.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
OURS = "triton"
# what the README says until a GPU run exists (bash bench/gpu_check.sh, then this script)
NO_RUN = "no GPU run yet"


class ReportError(Exception):
    pass


# --- loading ------------------------------------------------------------------------------------------------------

def load(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot read results file {path}: {e}") from None
    if "cases" not in data or "device" not in data:
        raise ReportError(f"{path} is not a bench results file (no 'cases' / 'device')")
    return data


def latest(results_dir: str = os.path.join(HERE, "results")) -> str | None:
    """The newest results file of a GPU run (by its recorded time; CPU runs never count)."""
    best, best_key = None, None
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        try:
            data = load(path)
        except ReportError:
            continue
        if data.get("device", {}).get("type") != "cuda":
            continue
        key = (data.get("updated") or data.get("created") or "", os.path.basename(path))
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


# --- formatting ---------------------------------------------------------------------------------------------------

def _ms(x):
    if x is None:
        return "-"
    return f"{x * 1e3:.0f} us" if x < 0.1 else f"{x:.3f} ms" if x < 10 else f"{x:.1f} ms"


def _fmt_value(t: dict) -> str:
    v = t.get("value")
    if v is None:
        return "-"
    if t["name"].endswith("attn_weight_memory"):
        return f"{v:.2f}x attn weights"
    if "fraction" in t["name"]:
        return f"{100 * v:.0f}% of copy bw"
    if t["name"].startswith("recompiles"):
        return f"{int(v)} new"
    return f"{v:.2f}x"


def _goal(t: dict) -> str:
    thr = t["threshold"]
    if "fraction" in t["name"]:
        return f"{t['op']} {100 * thr:.0f}%"
    if t["name"].startswith("recompiles"):
        return "0 new"
    if t["name"].endswith("attn_weight_memory"):
        return f"{t['op']} {thr:g}x attn weights"
    return f"{t['op']} {thr:g}x"


def header(data: dict) -> str:
    dev = data.get("device", {})
    ceil = data.get("ceilings") or {}
    date = (data.get("created") or "")[:10]
    libs = data.get("libraries") or {}
    parts = [f"Measured on **{dev.get('name', '?')}**, {date}, commit `{data.get('commit', '?')}`",
             f"{dev.get('dtype', '?')}, torch {dev.get('torch', '?')}, triton {dev.get('triton', '?')}"]
    line = " (".join(parts) + ")."
    if ceil:
        line += (f" Ceilings measured in the same run: copy {ceil.get('copy_gbps', 0) / 1e3:.2f} TB/s, "
                 f"{ceil.get('matmul_dtype', 'bf16')} matmul {ceil.get('matmul_tflops', 0):.0f} TFLOP/s.")
    missing = [k for k, v in libs.items() if isinstance(v, str) and v.startswith("unavailable")]
    if missing:
        line += f" Not importable there: {', '.join(missing)}."
    if data.get("parity"):
        line += f" GPU parity tests: {data['parity']}."
    return line


def case_rows(data: dict) -> list[dict]:
    rows = []
    for name, case in data.get("cases", {}).items():
        if name == "recompiles":  # a count, not a time: it is reported as its target
            continue
        impls = case.get("impls", {})
        ours = impls.get(OURS, {})
        row = {"case": name, "title": case.get("title", name), "ours_ms": None, "status": ours.get("status", "-"),
               "best": None, "best_ms": None, "speedup": None, "ceiling": "-"}
        if ours.get("status") == "ok":
            row["ours_ms"] = ours.get("median_ms")
            fc, fm = ours.get("frac_copy"), ours.get("frac_matmul")
            if fc is not None or fm is not None:
                row["ceiling"] = (f"{100 * fm:.0f}% matmul" if (fm or 0) >= (fc or 0) else f"{100 * fc:.0f}% copy")
            elif ours.get("tokens_per_s"):
                row["ceiling"] = f"{ours['tokens_per_s']:.0f} tok/s"
        ok = {k: r for k, r in impls.items()
              if k != OURS and not k.startswith("floor-") and r.get("status") == "ok" and r.get("median_ms")}
        if ok:
            best = min(ok, key=lambda k: ok[k]["median_ms"])
            row["best"], row["best_ms"] = best, ok[best]["median_ms"]
            if row["ours_ms"]:
                row["speedup"] = row["best_ms"] / row["ours_ms"]
        rows.append(row)
    return rows


def target_lines(data: dict) -> list[str]:
    out = []
    for t in data.get("targets", []):
        out.append(f"{t['status'].upper():8s} {t['name']:38s} {_fmt_value(t):>18s}  (goal {_goal(t)})  {t['detail']}")
    return out


def markdown(data: dict | None) -> str:
    if data is None:
        return NO_RUN
    lines = [header(data), "", "| target | measured | goal | status |", "|---|---|---|---|"]
    for t in data.get("targets", []):
        lines.append(f"| {t['name']} | {_fmt_value(t)} | {_goal(t)} | {t['status']} |")
    lines += ["", "| case | ours (Triton) | fastest baseline | speedup | of ceiling |", "|---|---|---|---|---|"]
    for r in case_rows(data):
        ours = _ms(r["ours_ms"]) if r["ours_ms"] else r["status"]
        best = f"{r['best']} {_ms(r['best_ms'])}" if r["best"] else "-"
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        lines.append(f"| {r['case']} | {ours} | {best} | {sp} | {r['ceiling']} |")
    return "\n".join(lines)


def text_table(data: dict) -> str:
    lines = [header(data).replace("**", ""), ""]
    lines.append(f"{'case':26s} {'ours':>11s} {'fastest baseline':>28s} {'speedup':>8s}  of ceiling")
    for r in case_rows(data):
        ours = _ms(r["ours_ms"]) if r["ours_ms"] else r["status"]
        best = f"{r['best']} {_ms(r['best_ms'])}" if r["best"] else "-"
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        lines.append(f"{r['case'][:26]:26s} {ours:>11s} {best[:28]:>28s} {sp:>8s}  {r['ceiling']}")
    lines += ["", "targets:"] + target_lines(data)
    return "\n".join(lines)


# --- README -------------------------------------------------------------------------------------------------------

def update_readme(readme: str, block: str) -> bool:
    """Replace what lies between the marker lines; True when the file changed. Missing markers are an error."""
    try:
        with open(readme, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ReportError(f"cannot read {readme}: {e}") from None
    lines = text.splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if ln.strip() == START]
    ends = [i for i, ln in enumerate(lines) if ln.strip() == END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ReportError(
            f"{readme} needs exactly one line '{START}' and, after it, one line '{END}' around the performance "
            f"table (found {len(starts)} start and {len(ends)} end marker lines); add them where the table goes")
    new = "".join(lines[: starts[0] + 1]) + block.rstrip("\n") + "\n" + "".join(lines[ends[0]:])
    if new == text:
        return False
    with open(readme, "w", encoding="utf-8") as f:
        f.write(new)
    return True


# --- chart --------------------------------------------------------------------------------------------------------

def chart(data: dict, png: str) -> str:
    """Speedup of our path over each baseline, per case (log scale; right of 1 is faster than the baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for name, case in data.get("cases", {}).items():
        sp = case.get("impls", {}).get(OURS, {}).get("speedup_vs") or {}
        if sp:
            rows.append((name, sp))
    baselines = sorted({b for _, sp in rows for b in sp})
    height = max(2.5, 0.28 * sum(len(sp) for _, sp in rows) + 0.4 * len(rows) + 1)
    fig, ax = plt.subplots(figsize=(9, height))
    colors = {b: plt.cm.tab10(i % 10) for i, b in enumerate(baselines)}
    y, ticks, labels, used = 0.0, [], [], set()
    for name, sp in reversed(rows):
        start = y
        for b in sorted(sp):
            ax.barh(y, sp[b], height=0.8, color=colors[b], label=b if b not in used else None)
            used.add(b)
            y += 1
        ticks.append((start + y - 1) / 2)
        labels.append(name)
        y += 0.8
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("speedup of the Triton path over the baseline (baseline time / ours)")
    dev = data.get("device", {})
    ax.set_title(f"{dev.get('name', '?')}  {(data.get('created') or '')[:10]}  {data.get('commit', '')}", fontsize=9)
    if rows:
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no case with both our path and a baseline measured", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# --- floors -------------------------------------------------------------------------------------------------------

def floors_markdown(card: str = "H100") -> str:
    sys.path.insert(0, HERE)
    import shapes

    if card not in shapes.SPECS:
        raise ReportError(f"no datasheet for card {card!r}: one of {', '.join(shapes.SPECS)}")
    spec = shapes.SPECS[card]
    lines = [f"Datasheet {card} ceilings: {spec['copy_gbps'] / 1e3:.2f} TB/s, {spec['matmul_tflops']:.0f} dense "
             f"bf16 TFLOP/s; bf16 elements.", "",
             "| kernel | pass | GFLOP | MB moved | at matmul rate | at copy rate | floor | bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in shapes.floor_table(spec):
        lines.append(f"| {r['kernel']} | {r['mode']} | {r['gflop']:.1f} | {r['mb']:.1f} | {r['us_flops']:.1f} us | "
                     f"{r['us_bytes']:.1f} us | **{r['floor_us']:.1f} us** | {r['bound']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", help="results JSON (default: the latest GPU run in bench/results/)")
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"), help="README to rewrite between the markers")
    p.add_argument("--no-readme", action="store_true", help="leave the README alone")
    p.add_argument("--print", dest="print_table", action="store_true", help="print the short table")
    p.add_argument("--chart", help="write a PNG chart of our kernels against the baselines")
    p.add_argument("--floors", action="store_true", help="print the floor table of NOTES.md and exit")
    p.add_argument("--card", default="H100", help="the datasheet the floor table uses (H100, H200, ...)")
    args = p.parse_args(argv)
    try:
        if args.floors:
            print(floors_markdown(args.card))
            return 0
        path = args.results or latest()
        data = load(path) if path else None
        if args.chart:
            if data is None:
                raise ReportError("no results file to chart")
            print(f"chart: {chart(data, args.chart)}")
        if args.print_table:
            print(text_table(data) if data else NO_RUN)
        if not args.no_readme:
            changed = update_readme(args.readme, markdown(data))
            print(f"{args.readme}: {'updated' if changed else 'already up to date'} "
                  f"({'from ' + os.path.relpath(path, ROOT) if path else 'no GPU run yet'})")
    except ReportError as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
