"""The static sm_90 gate's reading of ptxas reports, SASS and TTGIR (bench/static), on snippets of real output, and
its coverage of every kernel module's CONFIGS. No compiling here: CI runs `python bench/compile_check.py` itself."""
import pytest

from static import cases as C
from static import sass as S

PTXAS_SERIALIZED = """\
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma \
instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the \
function '_attn_fwd_kernel'
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_attn_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _attn_fwd_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 186 registers, used 1 barriers
"""

PTXAS_SPILLS = """\
ptxas info    : Function properties for _bwd_dq_kernel
    16 bytes stack frame, 60 bytes spill stores, 64 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size
"""

# nvdisasm -g -c: line-table comments, labels, a pipelined loop with HGMMA, narrow and wide loads
SASS = """\
\t//## File "/x/fa.py", line 120
        /*0b50*/                   IMAD.WIDE R18, R65, 0x2, R6 ;
\t//## File "/x/fa.py", line 189
        /*0b60*/                   LDG.E.U16 R20, desc[UR4][R18.64] ;
        /*0b70*/                   LDG.E.128 R24, desc[UR4][R18.64] ;
\t//## File "/x/fa.py", line 200
        /*0b80*/                   LDG.E R30, desc[UR4][R18.64] ;
.L_x_2:
\t//## File "/x/fa.py", line 121
        /*0b90*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR4][R18.64] ;
        /*0ba0*/                   LDGSTS.E.64 [R3+0x10], desc[UR4][R18.64] ;
        /*0bb0*/                   WARPGROUP.ARRIVE ;
        /*0bc0*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR8], RZ, !UPT ;
        /*0bd0*/                   HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR4].tnspB, R24, gsb0 ;
        /*0be0*/                   MUFU.EX2 R5, R5 ;
        /*0bf0*/               @P0 BRA `(.L_x_2) ;
        /*0c00*/                   EXIT ;
.L_x_3:
        /*0c10*/                   BRA `(.L_x_3);
"""

TTGIR = """\
#loc = loc("/x/fa.py":153:0)
#loc34 = loc("/x/fa.py":189:8)
#loc60 = loc("/x/fa.py":203:70)
#loc224 = loc("/x/fa.py":121:12)
    %q = tt.load %p, %m, %c : tensor<128x128x!tt.ptr<bf16>, #blocked> loc(#loc198)
    %k = ttg.async_copy_global_to_local %kp, %b mask %m other %c : tensor<64x128x!tt.ptr<bf16>, #blocked> -> \
<64x128xbf16, #shared, #smem, mutable> loc(#loc300)
    %l = tt.load %lp : tensor<128x!tt.ptr<f32>, #blocked1> loc(#loc60)
    %one = tt.load %sp : tensor<128x!tt.ptr<bf16>, #blocked1> loc(#loc60)
#loc198 = loc("q"(#loc34))
#loc300 = loc(callsite(#loc224 at #loc60))
"""


def test_ptxas_reads_c75xx_info_lines_and_spills():
    r = S.ptxas_report(PTXAS_SERIALIZED)
    assert r["registers"] == 186 and r["spill_stores"] == r["spill_loads"] == 0
    assert len(r["c75"]) == 1 and r["c75"][0].startswith("C7515: Potential Performance Loss: wgmma")
    assert "_attn_fwd_kernel" not in r["c75"][0]
    r = S.ptxas_report(PTXAS_SPILLS)
    assert (r["registers"], r["stack_frame"], r["spill_stores"], r["spill_loads"]) == (255, 16, 60, 64)
    assert r["c75"] == []


def test_sass_instructions_lines_and_loops():
    ins = S.parse_sass(SASS)
    assert [i.base for i in ins][:3] == ["IMAD", "LDG", "LDG"]
    assert ins[1].line == ("/x/fa.py", 189) and ins[4].line == ("/x/fa.py", 121)
    assert ins[10].pred == "@P0" and ins[4].labels == (".L_x_2",)
    assert S.loops(ins) == [(4, 10)]  # the final self-branch is no loop
    assert [S.load_width(i) for i in ins[1:6]] == [2, 16, 4, 16, 8]


def test_sass_report_counts_narrow_tile_loads_by_source_line():
    ins = S.parse_sass(SASS)
    tiles = S.ttgir_tile_load_lines(TTGIR, threads=256)
    # the q tile (line 189, through a name alias) and the K copy (line 121, through an inlined call site); not the
    # fp32 row nor the 128-element 16-bit row, which holds under 8 elements per thread of 256
    assert tiles == {("/x/fa.py", 189), ("/x/fa.py", 121)}
    r = S.sass_report(ins, tiles)
    assert r["hgmma"] == 2 and r["hgmma_shapes"] == ["64x64x16", "64x128x16"] and r["hmma"] == 0
    assert r["loads"] == {"ldg16": 1, "ldg128": 1, "ldg32": 1, "cp.async128": 1, "cp.async64": 1}
    assert r["narrow_tile_loads"] == 2  # the U16 load of q and the 8-byte copy of K
    assert S.sass_report(ins, set())["narrow_tile_loads"] == 0


def test_loop_cost_model():
    ins = S.parse_sass(SASS)
    c = S.loop_cost(ins, (4, 10), warpgroups=2, useful_flops=2 * 64 * 192 * 16)
    # 64x64x16 = 32 clk, 64x128x16 = 64 clk per quarter and warpgroup; 7 instructions per warp; one MUFU
    assert (c["hgmma"], c["instructions"], c["mufu"]) == (2, 7, 1)
    assert (c["mma_clk"], c["issue_clk"], c["mufu_clk"]) == (192, 14, 16)
    assert c["bound"] == "mma"
    assert c["executed_flops"] == 2 * c["useful_flops"]
    assert c["best"] == pytest.approx(0.5) and c["serial"] == pytest.approx(96 / (192 + 10))


def test_cases_cover_every_config():
    cases = [c for build in C.BUILDERS.values() for c in build(["bfloat16"])]
    assert C.uncovered(cases, list(C.BUILDERS), ["bfloat16"]) == []
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "two cases with one name"
    vit = [c for c in cases if c.shape == "vit d104"]
    assert vit and all(c.values["stride_qh"] == 312 for c in vit)
