"""Reading what the compiler made of a kernel: the ptxas report, the SASS (nvdisasm -g -c) and the TTGIR.

Pure text analysis (no Triton, no GPU), so that it can be tested on snippets:
- `ptxas_report(log)`: registers, spill bytes, stack frame, every C75xx message (ptxas prints some of them as
  `info`, not `warning`: all lines are read) and every warning;
- `parse_sass(text)` -> instructions (`nvdisasm -g -c`: each with its source line); `sass_report(instrs,
  tile_lines)`: HGMMA / HMMA counts and shapes, global loads by width (LDG, cp.async = LDGSTS, TMA = UTMALDG), the
  narrow ones among the loads of 16-bit tiles (the source lines where the TTGIR loads a 16-bit tensor), the
  HGMMA tile FLOPs one warpgroup executes;
- `ttgir_tile_load_lines(ttgir, threads)`: the source lines that load 16-bit tiles;
- `loops(instrs)`: the loops (backward branches);
- `loop_cost(instrs, loop, warpgroups)`: the cost model of one loop body (see bench/NOTES.md).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------------------------
# ptxas -v
# ---------------------------------------------------------------------------------------------------------------

_C75 = re.compile(r"\((C75\d\d)\)\s*(.*)")


def ptxas_report(log: str) -> dict:
    out = {"registers": None, "spill_stores": 0, "spill_loads": 0, "stack_frame": 0, "c75": [], "warnings": []}
    r = re.search(r"Used (\d+) registers", log)
    if r:
        out["registers"] = int(r.group(1))
    s = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if s:
        out["stack_frame"], out["spill_stores"], out["spill_loads"] = (int(x) for x in s.groups())
    for line in log.splitlines():
        m = _C75.search(line)
        if m:
            # "... in the function '_attn_fwd_kernel'": the code and the reason are what differ between kernels
            text = re.sub(r"\s+in the function '[^']*'", "", m.group(2)).strip()
            out["c75"].append(f"{m.group(1)}: {text}")
        elif "warning" in line.lower():
            out["warnings"].append(line.split(":", 1)[-1].strip())
    out["c75"] = sorted(set(out["c75"]))
    out["warnings"] = sorted(set(out["warnings"]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# SASS
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Instr:
    addr: int
    pred: str      # "@P0", "@!P1" or ""
    op: str        # the full opcode with its modifiers, e.g. "HGMMA.64x128x16.F32.BF16"
    operands: str
    line: tuple = ()  # (source file, line) from the line table, when the disassembler printed it
    labels: tuple = ()  # nvdisasm's labels (".L_x_2") placed at this instruction

    @property
    def base(self):
        return self.op.split(".", 1)[0]


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")


_SRC = re.compile(r'//## File "([^"]+)", line (\d+)')


def parse_sass(text: str) -> list[Instr]:
    out = []
    where = ()
    labels = []
    for raw in text.splitlines():
        s = _SRC.search(raw)
        if s:
            where = (s.group(1), int(s.group(2)))
            continue
        lab = re.match(r"^(\.L\w+):", raw)
        if lab:
            labels.append(lab.group(1))
            continue
        m = _LINE.search(raw)
        if m:
            out.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip(), where,
                             tuple(labels)))
            labels = []
    return out


def load_width(ins: Instr):
    """Bytes per thread of a global load (LDG, LDGSTS), or None for anything else."""
    if ins.base not in ("LDG", "LDGSTS"):
        return None
    mods = ins.op.split(".")[1:]
    for m, w in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if m in mods:
            return w
    return 4


_HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")


def hgmma_flops(ins: Instr) -> int:
    """FLOPs of one HGMMA issued by one warpgroup (m x n x k multiply-adds)."""
    m = _HGMMA.match(ins.op)
    return 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) if m else 0


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every loop: a branch back to an earlier instruction (the target is an
    address for cuobjdump, a label for nvdisasm)."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    index.update({lab: i for i, ins in enumerate(instrs) for lab in ins.labels})
    out = []
    for i, ins in enumerate(instrs):
        if ins.base == "BRA":
            t = re.search(r"(\.L\w+)|(0x[0-9a-f]+)", ins.operands)
            if t:
                target = index.get(t.group(1) or int(t.group(2), 16))
                if target is not None and target < i:  # not the kernel's final self-branch
                    out.append((target, i))
    return sorted(set(out))


def sass_report(instrs: list[Instr], tile_lines=frozenset()) -> dict:
    ops = [i.op for i in instrs]
    loads = {}
    narrow_tile = 0
    for ins in instrs:
        w = load_width(ins)
        if w is not None:
            key = f"{'cp.async' if ins.base == 'LDGSTS' else 'ldg'}{w * 8}"
            loads[key] = loads.get(key, 0) + 1
            if w < 16 and ins.line in tile_lines:
                narrow_tile += 1
    hgmma = [o for o in ops if o.startswith("HGMMA")]
    shapes = sorted({_HGMMA.match(o).group(0)[6:] for o in hgmma if _HGMMA.match(o)},
                    key=lambda s: [int(x) for x in s.split("x")])
    return {
        "instructions": len(instrs),
        "hgmma": len(hgmma),
        "hgmma_shapes": shapes,
        "hgmma_flops": sum(hgmma_flops(i) for i in instrs),
        "hmma": sum(o.startswith("HMMA") for o in ops),
        "tma_loads": sum(o.startswith("UTMALDG") for o in ops),
        "loads": loads,
        # loads (LDG or cp.async) narrower than 16 bytes on the source lines that load 16-bit tiles: a tile read
        # one, two or four elements at a time
        "narrow_tile_loads": narrow_tile,
        "local_memory": sum(o.startswith(("LDL", "STL")) for o in ops),
    }


# ---------------------------------------------------------------------------------------------------------------
# TTGIR: where the kernel loads 16-bit tiles
# ---------------------------------------------------------------------------------------------------------------


_LOCDEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$", re.M)
_TILE_LOAD = re.compile(r"(?:tt\.load|async_copy_global_to_local)\s.*?tensor<(\d+(?:x\d+)*)x!tt\.ptr<(?:bf16|f16)>"
                        r".*loc\((#loc\d*)\)\s*$", re.M)


def ttgir_tile_load_lines(text: str, threads: int) -> set:
    """(file, line) of every load of a 16-bit tensor (a tile or a row, not a single element) in the TTGIR that
    holds at least 8 elements per thread (16 bytes each; a smaller tile, such as one query row spread over 128
    threads, cannot be read 16 bytes at a time), through the location aliases (`loc("name"(#l))`,
    `callsite(#callee at #caller)`: the callee's line, as the line table of the SASS has it)."""
    defs = {m.group(1): m.group(2) for m in _LOCDEF.finditer(text)}

    def resolve(ref, depth=0):
        body = defs.get(ref, "")
        f = re.match(r'"([^"]+)":(\d+):\d+', body)
        if f:
            return (f.group(1), int(f.group(2)))
        inner = re.search(r"(#loc\d*)", body)
        return resolve(inner.group(1), depth + 1) if inner and depth < 50 else ()

    out = set()
    for m in _TILE_LOAD.finditer(text):
        if math.prod(int(x) for x in m.group(1).split("x")) >= 8 * threads:
            out.add(resolve(m.group(2)))
    return out - {()}


# ---------------------------------------------------------------------------------------------------------------
# cost model of a loop body
# ---------------------------------------------------------------------------------------------------------------

# H100 SXM per SM and clock: 4 sub-partitions, each issues one warp instruction per clock, owns a quarter of the
# tensor cores (a 64xNx16 HGMMA of one warpgroup keeps each of its four quarters busy N/2 clocks at the dense bf16
# rate, 1024 FLOP/clk per quarter) and a quarter of the 16 results/clk of the special-function unit (MUFU: one
# warp instruction = 8 clocks of its quarter).
MMA_FLOP_PER_CLK_QUARTER = 1024
MUFU_CLK_PER_WARP_INSTR = 8


def loop_cost(instrs: list[Instr], loop: tuple[int, int], warpgroups: int, useful_flops: int) -> dict:
    """Clocks one SM sub-partition spends per iteration of `loop` when the program's `warpgroups` all run it
    (one warp of each warpgroup sits on every sub-partition), by pipe:
      mma   = sum over HGMMA of n/2 clocks, per warpgroup (the tensor core of a quarter is shared);
      issue = every instruction of the body, one clock each, per warp;
      mufu  = MUFU instructions, 8 clocks each, per warp.
    The matmul ceiling would need `useful_flops` (the products the algorithm needs, unpadded, for the whole
    program) in useful_flops / (4 * 1024) clocks. Predicted fraction of that ceiling: `best` when the three pipes
    overlap perfectly (time = the busiest pipe), `serial` when nothing overlaps the tensor core (time = mma +
    issue of the non-HGMMA instructions; the loop's dependent chain S -> softmax -> PV in one warpgroup)."""
    body = instrs[loop[0]:loop[1] + 1]
    hg = [i for i in body if i.base == "HGMMA"]
    mma_clk = sum(hgmma_flops(i) // 4 // MMA_FLOP_PER_CLK_QUARTER for i in hg) * warpgroups
    issue = len(body) * warpgroups
    other = (len(body) - len(hg)) * warpgroups
    mufu = sum(i.base == "MUFU" for i in body) * MUFU_CLK_PER_WARP_INSTR * warpgroups
    ideal = useful_flops / (4 * MMA_FLOP_PER_CLK_QUARTER)
    busiest = max(mma_clk, issue, mufu)
    return {
        "instructions": len(body), "hgmma": len(hg), "mufu": sum(i.base == "MUFU" for i in body),
        "executed_flops": sum(hgmma_flops(i) for i in hg) * warpgroups, "useful_flops": useful_flops,
        "mma_clk": mma_clk, "issue_clk": issue, "mufu_clk": mufu,
        "bound": "mma" if busiest == mma_clk else "issue" if busiest == issue else "mufu",
        "best": ideal / busiest if busiest else 0.0,
        "serial": ideal / (mma_clk + other) if mma_clk + other else 0.0,
    }
