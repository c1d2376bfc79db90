"""Ahead-of-time compile check of every Triton kernel in qwenvl_kernels for a CUDA target, no GPU needed.

Compiles each `@triton.jit` kernel down to a cubin (ptxas included) for the constexpr / dtype / launch-option
combinations its launcher uses on CUDA (the autotune configs, the fixed fp32 configs, the Qwen-VL shapes), with the
installed Triton, so that a Triton upgrade or downgrade that breaks a kernel shows up before a GPU is at hand.
The argument specialization (pointer dtypes, 16-divisibility of pointers and ints, do_not_specialize) is computed by
the JIT's own binder from arguments shaped like the launchers' (tiny CPU tensors stand in for pointers), so the
signature matches what a launch on the GPU would compile.

Per case it reports: compiled or the error; shared memory against the target's per-block limit; from a second
`ptxas -v` pass, registers, spill bytes and ptxas warnings (e.g. serialized wgmma); for tl.dot kernels, which MMA
instructions they got (wgmma, mma.sync, or plain FMA for fp32 "ieee" products). An autotune candidate over the
shared-memory limit is only noted (the autotuner skips it at run time, OutOfResources). Exit status 1 when a case
fails to compile, a fixed config exceeds shared memory, or no candidate of an autotuned launch fits.

    python bench/compile_check.py                        # all kernels, sm_90 (H100), a process per core
    python bench/compile_check.py --only rms_norm,swiglu --jobs 4 --json /tmp/cc.json
    python bench/compile_check.py --list                 # the cases, without compiling
    /path/to/other/venv/bin/python bench/compile_check.py   # the same check with another Triton version

Run it WITHOUT TRITON_INTERPRET (it is cleared here). Uses two semi-internal Triton functions present in 3.6 to
3.9 (`triton.runtime.jit.create_function_from_signature`, `JITFunction._pack_args`) and the public
`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(...), options=...)`.
About 20 minutes for the default set on 2 cores (--full: about three times as many cases); compiled kernels
land in Triton's cache (~/.triton/cache), so a second run is much faster.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # must be unset before triton is imported: compile, never interpret

import argparse  # noqa: E402
import concurrent.futures as cf  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LOG2E = 1.4426950408889634
# max dynamic shared memory per block (opt-in), bytes
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
DTYPES16 = ("float16", "bfloat16")
DTYPES = DTYPES16 + ("float32",)


def P(dtype):
    """A pointer argument of this torch dtype name."""
    return ("ptr", dtype)


@dataclass
class Case:
    module: str
    kernel: str
    label: str
    args: tuple
    consts: dict
    options: dict = field(default_factory=dict)   # num_warps, num_stages
    dot: bool = False                              # uses tl.dot: report which MMA instructions it got
    tuned: bool = False                            # one autotune candidate: may be pruned (out of shared memory)

    @property
    def name(self):
        return f"{self.module}.{self.kernel}[{self.label}]"

    @property
    def group(self):
        """The launch this case is a candidate config of: the name without the config tokens."""
        label = " ".join(t for t in self.label.split() if not re.fullmatch(r"[MNTwsHV]\d+", t))
        return f"{self.module}.{self.kernel}[{label}]"


def _mod(name):
    return importlib.import_module(f"qwenvl_kernels.ops.{name}")


def _cfg_opts(cfg):
    return dict(cfg.kwargs), {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


# ----------------------------------------------------------------------------------------------------------------
# the cases: one function per kernel file, mirroring its launch code
# ----------------------------------------------------------------------------------------------------------------

def cases_flash_attention(full):
    m = _mod("flash_attention")
    out = []
    B, T = 2, 2048

    def strides4(shape_bthd, row=None, varlen=False):
        b, t, h, d = shape_bthd
        row = row if row is not None else h * d
        return (0 if varlen else t * row, row, d, 1)

    # (label, H, D, causal, has_seq_start, varlen, layout): the model's calls (text.py, vision.py) plus their mixes
    setups = []
    for D in (64, 128, 104, 80):   # 128: Qwen-7B; 104: ViT-bigG (1664 / 16); 64, 80: other head sizes, the 64 bucket
        H = 16 if D == 104 else 32
        flags = [(False, False, False), (True, False, False), (True, True, False), (True, False, True)]
        for causal, ss, vl in flags:
            setups.append((D, H, causal, ss, vl))
    if not full:  # every flag mix at d=128 and d=64; the ViT's and d=80 only with their own flags
        setups = [s for s in setups if s[0] in (64, 128) or (s[2], s[3], s[4]) == (False, False, False)]

    for dtype in DTYPES:
        for D, H, causal, ss, vl in setups:
            block_d = max(16, 1 << (D - 1).bit_length())
            bucket = 64 if block_d <= 64 else 128
            consts = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=causal, HAS_SEQ_START=ss, VARLEN=vl,
                          DOT_PREC="ieee" if dtype == "float32" else "tf32")
            qs = strides4((B, T, H, D), varlen=vl)                 # q, k, o: contiguous (rotary outputs)
            vs = strides4((B, T, H, D), row=3 * H * D, varlen=vl)  # v: a slice of the fused qkv projection
            lse_s = (0, T) if vl else (H * T, T)
            flag = f"d{D}{' causal' if causal else ''}{' seq_start' if ss else ''}{' varlen' if vl else ''}"
            for kind in ("fwd", "dq", "dkdv"):
                name = f"{kind}/fp32" if dtype == "float32" else f"{kind}/d{bucket}"
                configs = [_cfg_opts(c) for c in m.CONFIGS[name]]
                if dtype != "float32":
                    if not full and D not in (64, 128):
                        configs = configs[:1]
                # seq_start, cu_seqlens_q, cu_seqlens_k; q stands in for each one that is off
                aux = (P("int32") if ss else P(dtype), P("int32") if vl else P(dtype), P("int32") if vl else P(dtype))
                if kind == "fwd":
                    args = (P(dtype), P(dtype), P(dtype), P(dtype), P("float32"), *aux,
                            *qs, *qs, *vs, *qs, *lse_s, T, T, H, 1, 0.125 * LOG2E)
                elif kind == "dq":
                    args = (P(dtype), P(dtype), P(dtype), P(dtype), P(dtype), P("float32"), P("float32"), *aux,
                            *qs, *qs, *vs, *qs, *qs, *lse_s, T, T, H, 1, 0.125 * LOG2E, 0.125)
                else:
                    args = (P(dtype), P(dtype), P(dtype), P(dtype), P(dtype), P(dtype), P("float32"),
                            P("float32"), *aux, *qs, *qs, *vs, *qs, *qs, *qs, *lse_s, T, T, H, 1,
                            0.125 * LOG2E, 0.125)
                kname = m._LAUNCHERS[kind].kernel.__name__
                for i, (blocks, opts) in enumerate(configs):
                    label = (f"{dtype} {flag} M{blocks['BLOCK_M']} N{blocks['BLOCK_N']} "
                             f"w{opts['num_warps']} s{opts['num_stages']}")
                    # the first config is also the fixed one (AUTOTUNE = False); fp32 has only a fixed one
                    out.append(Case("flash_attention", kname, label, args, {**consts, **blocks}, opts, dot=True,
                                    tuned=dtype != "float32" and i > 0))
            if not (causal or ss):  # the preprocess kernel depends on HEAD_DIM, BLOCK_D, VARLEN only
                pre_args = (P(dtype), P(dtype), P("float32"), aux[1], *qs, *qs, *lse_s, T, H)
                out.append(Case("flash_attention", "_attn_bwd_preprocess_kernel", f"{dtype} {flag}", pre_args,
                                dict(HEAD_DIM=D, BLOCK_D=block_d, VARLEN=vl, BLOCK_M=64), {"num_warps": 4}))
    return out


def cases_decode_attention(full):
    m = _mod("decode_attention")
    out = []
    B, S, D = 4, 4096, 128
    warps_stages = [(c.num_warps, c.num_stages) for c in m.CONFIGS["partial"]]
    # (Tq, group): Qwen-7B decode (1, 1), speculative/chunked (4, 1), (16, 1) (tl.dot path), GQA (1, 4), (4, 8)
    shapes = [(1, 1), (4, 1), (16, 1), (1, 4), (4, 8)]
    for dtype in DTYPES:
        for Tq, group in shapes:
            H = 32
            Hk = H // group
            rows = group * Tq
            use_dot = rows >= m._DOT_MIN_ROWS
            block_d = max(16, 1 << (D - 1).bit_length())
            if use_dot:
                bm = min(1 << (rows - 1).bit_length(), m._MAX_BLOCK_M)
                bn = 64
            else:
                bm = 1 << (rows - 1).bit_length() if rows > 1 else 1
                bn = max(16, min(64, 8192 // (bm * block_d)))
            n_mblocks = math.ceil(rows / bm)
            for split in (False, True):
                for has_starts in (False, True):
                    if not full and has_starts and not split:
                        continue
                    consts = dict(TQ=Tq, GROUP=group, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
                                  USE_DOT=use_dot, DOT_PRECISION="ieee" if dtype == "float32" else "tf32",
                                  HAS_STARTS=has_starts, SPLIT=split)
                    q_s = (Tq * H * D, H * D, D, 1)
                    kv_s = (S * Hk * D, Hk * D, D, 1)
                    mid = P("float32") if split else P(dtype)  # unsplit: `out` stands in for the scratch
                    args = (P(dtype), P(dtype), P(dtype), P(dtype), mid, mid, mid,
                            P("int32"), P("int32"), *q_s, *kv_s, *kv_s, *q_s, 1, 1,
                            S, Hk, n_mblocks, 8 if split else 1, 0.088 * LOG2E)
                    ws = warps_stages if full else [(4, 1), (8, 3)]
                    for w, s in ws:
                        label = (f"{dtype} Tq{Tq} g{group} {'dot' if use_dot else 'fma'}"
                                 f"{' split' if split else ''}{' starts' if has_starts else ''} w{w} s{s}")
                        out.append(Case("decode_attention", "_decode_partial_kernel", label, args, consts,
                                        {"num_warps": w, "num_stages": s},
                                        dot=use_dot, tuned=True))
        for splits in (2, 8, 64):
            o_s = (32 * D, 32 * D, D, 1)
            out.append(Case("decode_attention", "_decode_combine_kernel", f"{dtype} splits{splits}",
                            (P(dtype), P("float32"), P("float32"), P("float32"), *o_s, 1, 32, splits),
                            dict(HEAD_DIM=D, BLOCK_S=1 << (splits - 1).bit_length(), BLOCK_D=128),
                            {"num_warps": 4}))
    return out


def cases_resampler_attention(full):
    m = _mod("resampler_attention")
    out = []
    B, NQ, NK, E, H = 4, 256, 1024, 4096, 32
    D = E // H
    tuned = {which: [_cfg_opts(c) for c in m.CONFIGS[which]] for which in ("fwd", "dkv", "dq")}
    names = {"fwd": "_fwd_kernel", "dkv": "_bwd_dkv_kernel", "dq": "_bwd_dq_kernel"}
    for dtype in DTYPES:
        consts = dict(HEAD_DIM=D, BLOCK_D=D, DOT_PREC="ieee" if dtype == "float32" else "tf32")
        # q [NQ, E]; kxv [B, NK, 2E] (k_x and v are its halves); p_k [NK, E]; o / d_o [B, NQ, E]
        common = (E, NK * 2 * E, 2 * E, E, NQ * E, E)
        for which in ("fwd", "dkv", "dq"):
            if which == "fwd":
                args = (P(dtype), P(dtype), P(dtype), P(dtype), P(dtype), P("float32"),
                        E, NK * 2 * E, 2 * E, E, NQ * E, E, H, NQ, NK, 0.088 * LOG2E)
            elif which == "dkv":
                args = (P(dtype), P(dtype), P(dtype), P(dtype), P(dtype), P("float32"), P("float32"),
                        P(dtype), P(dtype), *common, NK * 2 * E, 2 * E, H, NQ, NK, 0.088 * LOG2E, 0.088)
            else:
                args = (P(dtype), P(dtype), P(dtype), P(dtype), P(dtype), P("float32"), P("float32"),
                        P("float32"), *common, NQ * E, E, B, H, NQ, NK, 2, 0.088 * LOG2E, 0.088)
            for blocks, opts in tuned[which]:
                if dtype == "float32" and not full and opts["num_warps"] != 4:
                    continue  # fp32 (FMA, not tensor cores) compiles slowly: half of the candidates
                out.append(Case("resampler_attention", names[which],
                                f"{dtype} M{blocks['BLOCK_M']} N{blocks['BLOCK_N']} w{opts['num_warps']} "
                                f"s{opts['num_stages']}", args, {**consts, **blocks}, opts, dot=True, tuned=True))
        out.append(Case("resampler_attention", "_delta_kernel", dtype,
                        (P(dtype), P(dtype), P("float32"), NQ * E, E, NQ * E, E, H, NQ),
                        dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_M=m.CONFIGS["delta"][0].kwargs["BLOCK_M"])))
    return out


def _norm_blocks(N):
    rn = _mod("rms_norm")
    block_n = max(1 << (N - 1).bit_length(), 16)
    block_m = max(1, rn._TILE_ELEMS_CUDA // block_n)
    warps = sorted({c.num_warps for c in rn.CONFIGS[f"fwd/n{block_n}"]})
    return block_m, block_n, warps


def cases_rms_norm(full):
    out = []
    M = 8192
    for dtype in DTYPES:
        for N in ((4096, 1664, 7) if full else (4096,)):
            bm, bn, warps = _norm_blocks(N)
            for w in warps:
                for res in (False, True):
                    out.append(Case("rms_norm", "_rms_norm_fwd_kernel", f"{dtype} hidden{N} res={res} w{w}",
                                    (P(dtype), P(dtype), P(dtype), P(dtype), P(dtype), P("float32"),
                                     M, N, N, N if res else 0, N, N, 1e-6),
                                    dict(HAS_RESIDUAL=res, BLOCK_M=bm, BLOCK_N=bn), {"num_warps": w}, tuned=True))
                for dh, dw in ((False, True), (True, True), (True, False)):
                    out.append(Case("rms_norm", "_rms_norm_bwd_kernel", f"{dtype} hidden{N} dh={dh} dw={dw} w{w}",
                                    (P(dtype), P(dtype), P(dtype), P("float32"), P(dtype), P(dtype), P("float32"),
                                     M, N, N, N, N if dh else 0, N, 4),
                                    dict(HAS_DH=dh, COMPUTE_DW=dw, BLOCK_M=bm, BLOCK_N=bn), {"num_warps": w},
                                    tuned=True))
    return out


def cases_layer_norm(full):
    out = []
    M = 8192
    for dtype in DTYPES:
        for N in (1664, 4096):  # ViT width, adapter width
            bm, bn, warps = _norm_blocks(N)
            for w in warps:
                out.append(Case("layer_norm", "_layer_norm_fwd_kernel", f"{dtype} hidden{N} w{w}",
                                (P(dtype), P(dtype), P(dtype), P(dtype), P("float32"), P("float32"),
                                 M, N, N, N, 1e-6),
                                dict(BLOCK_M=bm, BLOCK_N=bn), {"num_warps": w}, tuned=True))
                flags = [(True, True, True), (True, False, False), (False, True, True)]
                for dx, dw, db in (flags if full else flags[:2]):
                    out.append(Case("layer_norm", "_layer_norm_bwd_kernel", f"{dtype} hidden{N} dx={dx} dw={dw} "
                                    f"db={db} w{w}",
                                    (P(dtype), P(dtype), P(dtype), P("float32"), P("float32"), P(dtype),
                                     P("float32"), P("float32"), M, N, N, N, N if dx else 0, 4),
                                    dict(COMPUTE_DX=dx, COMPUTE_DW=dw, COMPUTE_DB=db, BLOCK_M=bm, BLOCK_N=bn),
                                    {"num_warps": w}, tuned=True))
    return out


def cases_rotary(full):
    m = _mod("rotary")
    out = []
    B, T, H, D = 2, 2048, 32, 128
    half = 64
    configs = [_cfg_opts(c) for c in m.CONFIGS["rotary"]]   # the autotune candidates, as the launcher has them

    def label(c):
        return " ".join(f"{k[-1]}{v}" for k, v in sorted(c[0].items())) + f" w{c[1]['num_warps']}"

    for dtype in DTYPES:
        for has_pos in (False, True):
            for backward in (False, True):
                if not full and has_pos != backward:
                    continue
                # forward: q, k are slices of the fused qkv projection [B, T, 3 * H * D]; backward: gradients
                s = (T * H * D, H * D, D, 1) if backward else (T * 3 * H * D, 3 * H * D, D, 1)
                pos = (P("int64"), T, 1) if has_pos else (P("float32"), 0, 0)  # no positions: cos stands in
                args = (P(dtype), P(dtype), P(dtype), P(dtype), P("float32"), P("float32"), pos[0],
                        T, H, H, 8192, B * T, *s, *s, half, 1, half, 1, *pos[1:])
                for c in configs:
                    out.append(Case("rotary", "_rotary_kernel", f"{dtype} pos={has_pos} bwd={backward} {label(c)}",
                                    args, dict(D=D, HALF=half, HAS_POS=has_pos, BACKWARD=backward, BLOCK_R=64,
                                               BLOCK_P=1, HAS_PASS=False, **c[0]), c[1], tuned=True))
        # a partial rotary dim (rotary_pct < 1): the pass-through copy
        s = (T * H * 96, H * 96, 96, 1)
        for c in (configs if full else configs[-3:]):
            out.append(Case("rotary", "_rotary_kernel", f"{dtype} partial D96 R64 {label(c)}",
                            (P(dtype), P(dtype), P(dtype), P(dtype), P("float32"), P("float32"), P("int64"),
                             T, H, H, 8192, B * T, *s, *s, 32, 1, 32, 1, T, 1),
                            dict(D=96, HALF=32, HAS_POS=True, BACKWARD=False, BLOCK_R=32, BLOCK_P=32, HAS_PASS=True,
                                 **c[0]), c[1], tuned=True))
    return out


def cases_swiglu(full):
    out = []
    for dtype in DTYPES:
        block = 4096 if dtype != "float32" else 2048
        n = 8192 * 11008
        out.append(Case("swiglu", "_swiglu_fwd_kernel", dtype, (P(dtype), P(dtype), P(dtype), n),
                        dict(BLOCK=block), {"num_warps": 8}))
        out.append(Case("swiglu", "_swiglu_bwd_kernel", dtype, (P(dtype),) * 5 + (n,),
                        dict(BLOCK=block), {"num_warps": 8}))
    return out


def cases_cross_entropy(full):
    m = _mod("cross_entropy")
    out = []
    V = 151936
    cfgs = m.CONFIGS["rows"]
    for dtype in DTYPES:
        for grad in (False, True):
            for c in cfgs:
                out.append(Case("cross_entropy", "_ce_rows_kernel",
                                f"{dtype} grad={grad} V{c.kwargs['BLOCK_V']} w{c.num_warps}",
                                (P(dtype), P("int64"), P("float32"), V, V, -100, 1.0 / 4096),
                                dict(COMPUTE_GRAD=grad, **c.kwargs), {"num_warps": c.num_warps}, tuned=True))
    return out


ALL = {
    "flash_attention": cases_flash_attention,
    "decode_attention": cases_decode_attention,
    "resampler_attention": cases_resampler_attention,
    "rms_norm": cases_rms_norm,
    "layer_norm": cases_layer_norm,
    "rotary": cases_rotary,
    "swiglu": cases_swiglu,
    "cross_entropy": cases_cross_entropy,
}


# ----------------------------------------------------------------------------------------------------------------
# compiling one case (in a worker process)
# ----------------------------------------------------------------------------------------------------------------

def compile_case(case: Case, arch: int, ptxas_info: bool):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    res = {"name": case.name, "group": case.group, "module": case.module, "kernel": case.kernel,
           "label": case.label, "tuned": case.tuned, "ok": False}
    t0 = time.time()
    try:
        kernel = getattr(_mod(case.module), case.kernel)
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        args = [torch.empty(16, dtype=getattr(torch, a[1])) if isinstance(a, tuple) and a[:1] == ("ptr",) else a
                for a in case.args]
        kwargs = {**case.consts, **case.options}
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, dict(kwargs, debug=False), bound, spec,
                                                                   opts)
        ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
        md = ck.metadata
        res.update(ok=True, shared=md.shared, num_warps=md.num_warps, num_stages=md.num_stages)
        limit = SMEM_LIMIT.get(arch)
        if limit is not None and md.shared > limit:
            # the launch would raise OutOfResources; the autotuner skips such a candidate
            res.update(ok=False, smem_over=True,
                       error=f"shared memory {md.shared} B > {limit} B per block on sm_{arch}")
        ptx = ck.asm.get("ptx", "")
        if case.dot:
            res["mma"] = ("wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx
                          else "fma")
        if ptxas_info:
            res.update(_ptxas_report(ptx, arch))
    except Exception as e:  # noqa: BLE001 - every failure is a result
        msg = f"{type(e).__name__}: {e}"
        res["error"] = msg if len(msg) < 4000 else msg[:2000] + "\n...\n" + msg[-1500:]
    res["seconds"] = round(time.time() - t0, 1)
    return res


def _ptxas_path(arch):
    # the ptxas Triton itself uses for this arch (3.9 takes its CUDA 13 one, "ptxas-blackwell", from sm_90 on)
    from triton.backends.nvidia import compiler as nv
    return nv.get_ptxas(arch).path


def _ptxas_report(ptx, arch):
    ptxas = _ptxas_path(arch)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        p = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
    log = p.stderr + p.stdout
    out = {}
    r = re.search(r"Used (\d+) registers", log)
    if r:
        out["registers"] = int(r.group(1))
    s = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if s:
        out["spill_stores"], out["spill_loads"] = int(s.group(1)), int(s.group(2))
    warns = sorted({line.split("warning :", 1)[1].strip() for line in log.splitlines() if "warning :" in line})
    if warns:
        out["ptxas_warnings"] = warns
    return out


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    ap.add_argument("--only", default="", help="comma-separated kernel files (default: all): " + ",".join(ALL))
    ap.add_argument("--match", default="", help="only cases whose name contains this")
    ap.add_argument("--full", action="store_true", help="every config for every flag mix and head dim (~3x longer)")
    ap.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 16)))
    ap.add_argument("--no-ptxas-info", action="store_true", help="skip the second ptxas -v pass (registers, spills)")
    ap.add_argument("--json", help="write every result here")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)

    import triton
    files = [f for f in a.only.split(",") if f] or list(ALL)
    cases = [c for f in files for c in ALL[f](a.full) if a.match in c.name]
    if a.list:
        for c in cases:
            print(c.name, c.options)
        print(f"{len(cases)} cases")
        return 0
    ptxas = _ptxas_path(a.arch)
    ver = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(f"triton {triton.__version__}, target cuda sm_{a.arch}, ptxas {ptxas} ({ver}), {len(cases)} cases, "
          f"{a.jobs} processes", flush=True)
    t0 = time.time()
    results = []
    ctx = __import__("multiprocessing").get_context("spawn")
    with cf.ProcessPoolExecutor(a.jobs, mp_context=ctx) as pool:
        futs = [pool.submit(compile_case, c, a.arch, not a.no_ptxas_info) for c in cases]
        for fut in cf.as_completed(futs):
            r = fut.result()
            results.append(r)
            if r["ok"]:
                extra = ""
                if "registers" in r:
                    extra += f" regs={r['registers']} spill={r.get('spill_stores', 0)}/{r.get('spill_loads', 0)}"
                if "mma" in r:
                    extra += f" mma={r['mma']}"
                if r.get("ptxas_warnings"):
                    extra += f" WARN: {'; '.join(r['ptxas_warnings'])}"
                print(f"ok   {r['name']} {r['seconds']}s smem={r['shared']}{extra}", flush=True)
            else:
                tag = "SKIP" if r["tuned"] and r.get("smem_over") else "FAIL"
                print(f"{tag} {r['name']}: {r['error'].splitlines()[0] if r['error'] else ''}", flush=True)
    results.sort(key=lambda r: r["name"])
    # an autotune candidate over the shared-memory limit is pruned at run time; it fails the check only when no
    # candidate of its launch fits
    groups = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    pruned = [r for r in results if r["tuned"] and r.get("smem_over")]
    fails = [r for r in results if not r["ok"] and r not in pruned]
    fails += [r for g in groups.values() if not any(x["ok"] for x in g) for r in g if r not in fails]
    print(f"\n== triton {triton.__version__} sm_{a.arch}: {sum(r['ok'] for r in results)} compiled, "
          f"{len(pruned)} autotune candidates over shared memory (pruned at run time), {len(fails)} failed, "
          f"{time.time() - t0:.0f}s ==")
    by_kernel = {}
    for r in results:
        k = f"{r['module']}.{r['kernel']}"
        dt = r["label"].split()[0]
        d = by_kernel.setdefault(k, {})
        ok, n = d.get(dt, (0, 0))
        d[dt] = (ok + r["ok"], n + 1)
    for k, d in by_kernel.items():
        print(f"  {k}: " + ", ".join(f"{dt} {ok}/{n}" for dt, (ok, n) in sorted(d.items())))
    for r in pruned:
        print(f"  pruned: {r['name']}: {r['error']}")
    for r in fails:
        print(f"\nFAIL {r['name']}\n{r['error']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": a.arch, "results": results}, f, indent=1)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
