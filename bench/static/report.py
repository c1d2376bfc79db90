"""Printing the gate's results: one line per compiled case, the counts, the markdown summary, the cost table."""
from __future__ import annotations

import datetime


def loads_label(s):
    """How the kernel reads global memory: the load kinds and widths in bits, e.g. "cp.async128 x48, ldg128 x8"."""
    if not s["loads"]:
        return "-"
    return ", ".join(f"{k} x{n}" for k, n in sorted(s["loads"].items()))


def redundancy(r):
    c = r.get("cost")
    return c["executed_flops"] / c["useful_flops"] if c and c["useful_flops"] else None


def line(r):
    if not r["ok"]:
        return f"FAIL {r['name']}: {r['error'].splitlines()[0]}"
    p, s = r["ptxas"], r["sass"]
    tag = "FAIL" if r["verdicts"] else "ok  "
    mma = f" hgmma={s['hgmma']}" if s["hgmma"] else ""
    mma += f" hmma={s['hmma']}" if s["hmma"] else ""
    extra = f" [{', '.join(r['verdicts'])}]" if r["verdicts"] else ""
    c75 = f" {'; '.join(p['c75'])}" if p["c75"] else ""
    return (f"{tag} {r['name']} {r['seconds']}s regs={p['registers']} spill={p['spill_stores']}/{p['spill_loads']} "
            f"smem={r['shared']}{mma} loads: {loads_label(s)}{extra}{c75}")


def counts(results, categories):
    out = {c: 0 for c in categories}
    for r in results:
        for v in r["verdicts"]:
            out[v] = out.get(v, 0) + 1
    return out


def footer(version, results, counts, missing, wall):
    failed = [r for r in results if r["verdicts"]]
    pruned = sum(bool(r.get("pruned")) for r in results)
    lines = [f"\n== triton {version} sm_90a: {len(results)} configurations, {len(failed)} failing, {pruned} pruned "
             f"(over shared memory), {wall:.0f} s =="]
    lines.append("   " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lines += [f"   not compiled: {m}" for m in missing]
    lines += [f"FAIL {r['name']}: {', '.join(r['verdicts'])}" + (f"\n     {r['error']}" if "error" in r else "")
              for r in failed]
    return "\n".join(lines)


def _row(r):
    if not r["ok"]:
        return f"| {r['shape']} | {_cfg(r)} | compile error | | | | | | | FAIL: error |"
    p, s = r["ptxas"], r["sass"]
    red = redundancy(r)
    mma = (f"{s['hgmma']} HGMMA {'/'.join(s['hgmma_shapes'])}" if s["hgmma"] else
           f"{s['hmma']} HMMA" if s["hmma"] else "-")
    verdict = "pruned (smem)" if r.get("pruned") and not r["verdicts"] else (
        "FAIL: " + ", ".join(r["verdicts"]) if r["verdicts"] else "ok")
    return (f"| {r['shape']} | {_cfg(r)} | {p['registers']} | {p['spill_stores']}/{p['spill_loads']} | "
            f"{r['shared'] // 1024} KB | {mma} | {'' if red is None else f'{red:.2f}'} | "
            f"{'yes: ' + ', '.join(c.split(':')[0] for c in p['c75']) if p['c75'] else 'no'} | {loads_label(s)} | "
            f"{verdict} |")


def _cfg(r):
    c = r["config"]
    blocks = " ".join(f"{k[6:]}={v}" for k, v in c.items() if k.startswith("BLOCK"))
    return " ".join(x for x in (blocks, f"w{c.get('num_warps')}",
                                f"s{c['num_stages']}" if "num_stages" in c else "") if x)


def markdown(version, ptxas, results, counts, missing, jobs, wall):
    kernels = {}
    for r in results:
        kernels.setdefault(f"{r['module']}.{r['kernel']}", []).append(r)
    out = [f"# Static sm_90a check, triton {version}",
           "",
           "Compile-level evidence, no GPU: every (kernel, configuration) the launchers can select at the Qwen-VL "
           "shapes, compiled for sm_90a (H100/H200) by `python bench/compile_check.py` "
           f"(ptxas {ptxas}; {datetime.date.today().isoformat()}; {jobs} processes, {wall:.0f} s).",
           "",
           f"**{len(results)} configurations; gate "
           f"{'PASSES' if not any(counts.values()) else 'FAILS'}**: "
           + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".",
           "",
           "Columns: registers per thread; spill stores/loads (bytes); shared memory; the HGMMA (wgmma) "
           "instructions in the SASS and their tile shapes (HMMA = mma.sync); MMA work = HGMMA FLOPs one step of the "
           "main loop executes (x warpgroups) over the FLOPs of that step's products at the real head dim (1.23 for "
           "head_dim 104 in a 128-wide block, 1.08 split as 64+32+16); "
           "serialized = a ptxas C75xx message; global loads by kind and width in bits (cp.async = LDGSTS, "
           "ldg = LDG; ldg16 is a 16-bit element loaded alone).", ""]
    out += [f"Not compiled (a launch of CONFIGS no case covers): {m}" for m in missing]
    for k, rs in kernels.items():
        out += [f"## {k}", "",
                "| case | config | regs | spill | smem | MMA | MMA work | serialized | global loads | verdict |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        out += [_row(r) for r in rs]
        out.append("")
    cost = cost_table(results)
    if cost:
        out += ["## Cost model of the attention loops (first config of each launch)", "", cost, ""]
    return "\n".join(out)


def cost_table(results):
    """The steady-state loop of the default (first) config of every attention launch: see bench/NOTES.md."""
    rows = []
    seen = set()
    for r in results:
        c = r.get("cost")
        key = (r["module"], r["kernel"], r["shape"], r["dtype"])
        if not c or key in seen or r["candidate"] != 0:
            continue
        seen.add(key)
        rows.append(f"| {r['module']}.{r['kernel']} | {r['shape']} | {_cfg(r)} | {c['hgmma']} / {c['instructions']}"
                    f" | {c['mufu']} | {c['mma_clk']} / {c['issue_clk']} / {c['mufu_clk']} | {c['bound']} | "
                    f"{c['executed_flops'] / c['useful_flops']:.2f} | {c['serial']:.2f} - {c['best']:.2f} |")
    if not rows:
        return ""
    head = ["| kernel | case | config | HGMMA / instructions in the loop | MUFU | clk: mma / issue / mufu | bound | "
            "MMA work (executed / needed) | predicted fraction of the matmul ceiling (serial - overlapped) |",
            "|---|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + rows)
