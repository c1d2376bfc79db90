"""What the static gate compiles: every (kernel, configuration) the launchers can select at the Qwen-VL shapes.

The configurations come from each kernel module's `CONFIGS` (launch name -> candidates); this file only knows the
shapes and the flags the model launches them with, and which launch each kernel call belongs to. Runtime arguments
are given by parameter name (`values`) and bound in the kernel's own order, so a reordered signature cannot
silently shift them; integer values are the real ones (Triton specializes integers on divisibility by 16 and on
== 1, pointers on 16-byte alignment, so they decide the compiled code).

Shapes (Qwen-VL): decoder attention B2 T2048 32 heads x 128, causal, alone, with left padding (seq_start) and
packed (varlen), q/k the rotary outputs, v a slice of the fused qkv projection; ViT attention B8 T1024 16 heads x
104 read straight out of its qkv projection (head stride 312, token stride 4992); the adapter B4, 256 queries x 1024
keys, 32 heads x 128; decode B4 cache 4096, 32 heads x 128, one new token (the elementwise path) and 16 (the
tl.dot path), with and without split keys and left padding; norms at 4096 and 1664, rotary, SwiGLU, fused CE.
"""
from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field

import torch

LOG2E = 1.4426950408889634


@dataclass
class Case:
    module: str            # "flash_attention"
    kernel: str            # "_attn_fwd_kernel"
    launch: str            # the CONFIGS key, "fwd/d128"
    shape: str             # "decoder d128 causal"
    dtype: str             # "bfloat16"
    values: dict           # runtime arguments by parameter name; ("ptr", dtype) for a tensor
    consts: dict           # constexpr arguments (flags, block sizes from the config)
    options: dict          # num_warps, num_stages
    dot: bool = False      # has tl.dot: must become wgmma
    dots_per_step: int = 0  # tile products per loop step (cost model): rows x step x HEAD_DIM each
    rows_key: str = ""      # the constexpr of the program's rows ("BLOCK_M"), and of the loop step
    step_key: str = ""
    config: dict = field(default_factory=dict)
    candidate: int = 0      # its index in CONFIGS[launch] (0: the default)

    @property
    def config_label(self):
        c = self.config
        blocks = " ".join(f"{k.replace('BLOCK_', '')[:1]}{v}" for k, v in c.items() if k.startswith("BLOCK"))
        return " ".join(x for x in (blocks, f"w{c.get('num_warps')}",
                                    f"s{c['num_stages']}" if "num_stages" in c else "") if x)

    @property
    def name(self):
        return f"{self.module}.{self.kernel}[{self.shape} {self.dtype} {self.config_label}]"

    def useful_flops(self, padded=False):
        """FLOPs one loop step of one program needs (the head dim, or padded: the head blocks), or 0 without a cost
        model."""
        if not self.dots_per_step:
            return 0
        d = self.consts["HEAD_DIM"]
        if padded:
            d = sum(self.consts.get(k, 0) for k in ("BLOCK_D", "BLOCK_D1", "BLOCK_D2"))
        return self.dots_per_step * 2 * self.consts[self.rows_key] * self.consts[self.step_key] * d


def mod(name):
    """A kernel module, qwenvl_kernels/ops/<name>.py."""
    return importlib.import_module(f"qwenvl_kernels.ops.{name}")


def P(dtype):
    return ("ptr", dtype)


def strides(prefix, s, dims="bthd"):
    return {f"stride_{prefix}{d}": v for d, v in zip(dims, s)}


def split_config(cfg):
    """triton.Config -> (constexpr kwargs, launch options, flat dict for the report)."""
    opts = {"num_warps": cfg.num_warps}
    if getattr(cfg, "num_stages", None) is not None:
        opts["num_stages"] = cfg.num_stages
    return dict(cfg.kwargs), opts, {**cfg.kwargs, **opts}


def _cases(module, kernel, launch, shape, dtype, values, consts, **kw):
    out = []
    for i, cfg in enumerate(mod(module).CONFIGS[launch]):
        blocks, opts, flat = split_config(cfg)
        out.append(Case(module, kernel, launch, shape, dtype, values, {**consts, **blocks}, opts, config=flat,
                        candidate=i, **kw))
    return out


# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------

def flash_attention(dtypes):
    m = mod("flash_attention")
    out = []
    # (label, B, T, H, D, causal, seq_start, varlen, q/k strides, v strides, o strides)
    def contig(B, T, H, D):
        return (T * H * D, H * D, D, 1)
    dec = (2, 2048, 32, 128)
    vit = (8, 1024, 16, 104)
    setups = [
        ("decoder d128 causal", *dec, True, False, False, contig(*dec), (2048 * 12288, 12288, 128, 1)),
        ("decoder d128 causal seq_start", *dec, True, True, False, contig(*dec), (2048 * 12288, 12288, 128, 1)),
        ("decoder d128 causal varlen", *dec, True, False, True, contig(*dec), (0, 12288, 128, 1)),
        ("vit d104", *vit, False, False, False, (1024 * 4992, 4992, 312, 1), (1024 * 4992, 4992, 312, 1)),
        # no Qwen-VL head is 64 wide: the d64 launches, at one library shape
        ("d64", 2, 2048, 32, 64, False, False, False, contig(2, 2048, 32, 64), contig(2, 2048, 32, 64)),
    ]
    for dtype in dtypes:
        for label, B, T, H, D, causal, ss, vl, qs, vs, in setups:
            if vl:
                qs = (0,) + qs[1:]
            os_ = (0 if vl else T * H * D, H * D, D, 1)
            block_d = max(16, 1 << (D - 1).bit_length())
            consts = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=causal, HAS_SEQ_START=ss, VARLEN=vl,
                          ROW_STRIDE8=any(s[1] % 16 for s in (qs, vs, os_)),
                          DOT_PREC="ieee" if dtype == "float32" else "tf32")
            aux = {"SEQ_START": P("int32") if ss else P(dtype), "CU_Q": P("int32") if vl else P(dtype),
                   "CU_K": P("int32") if vl else P(dtype)}
            lse = {"stride_lb": 0 if vl else H * T, "stride_lh": T}
            common = {**aux, **lse, "LSE": P("float32"), "DELTA": P("float32"), "seqlen_q": T, "seqlen_k": T,
                      "group": 1, "qk_scale": D ** -0.5 * LOG2E, "sm_scale": D ** -0.5,
                      **{k: P(dtype) for k in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")},
                      **strides("q", qs), **strides("k", qs), **strides("v", vs), **strides("o", os_),
                      **strides("do", os_), **strides("dq", os_), **strides("dk", os_), **strides("dv", os_)}
            for kind in ("fwd", "dq", "dkdv"):
                kc = dict(consts, **dict(zip(("BLOCK_D", "BLOCK_D1", "BLOCK_D2"), m.head_blocks(D, kind))))
                launch = m.launch_name(kind, kc)
                values = dict(common, n_heads=H, n_kv_heads=H)
                rows, step = ("BLOCK_N", "BLOCK_M") if kind == "dkdv" else ("BLOCK_M", "BLOCK_N")
                out += _cases("flash_attention", {"fwd": "_attn_fwd_kernel", "dq": "_attn_bwd_dq_kernel", "dkdv": "_attn_bwd_dkdv_kernel"}[kind], launch, label, dtype, values, kc,
                              dot=True, dots_per_step={"fwd": 2, "dq": 3, "dkdv": 4}[kind], rows_key=rows,
                              step_key=step)
            if not causal:  # the delta kernel depends on HEAD_DIM, BLOCK_D, VARLEN only
                out += _cases("flash_attention", "_attn_bwd_preprocess_kernel", "pre", label, dtype,
                              dict(common, n_heads=H, seqlen_q=T),
                              dict(HEAD_DIM=D, BLOCK_D=block_d, VARLEN=vl, ROW_STRIDE8=os_[1] % 16 != 0))
    return out


def resampler_attention(dtypes):
    m = mod("resampler_attention")
    B, NQ, NK, E, H = 4, 256, 1024, 4096, 32
    D = E // H
    out = []
    for dtype in dtypes:
        consts = dict(HEAD_DIM=D, BLOCK_D=D, DOT_PREC="ieee" if dtype == "float32" else "tf32")
        # q [NQ, E]; kxv [B, NK, 2E] (k_x and v are its halves); p_k [NK, E]; o / d_o [B, NQ, E]; dK|dV [B, NK, 2E]
        values = {**{k: P(dtype) for k in ("Q", "KX", "V", "PK", "O", "DO", "DK", "DV")},
                  "LSE": P("float32"), "DELTA": P("float32"), "DQ": P("float32"),
                  "stride_qm": E, "stride_kb": NK * 2 * E, "stride_kn": 2 * E, "stride_pn": E,
                  "stride_ob": NQ * E, "stride_om": E, "stride_dob": NQ * E, "stride_dom": E,
                  "stride_gb": NK * 2 * E, "stride_gn": 2 * E, "stride_dqs": NQ * E, "stride_dqm": E,
                  "B": B, "H": H, "NQ": NQ, "NK": NK, "SPLIT": 2, "qk_scale": D ** -0.5 * LOG2E,
                  "sm_scale": D ** -0.5}
        label = f"adapter B{B} {NQ}x{NK} d{D}"
        for launch, kernel, n, rows, step in (("fwd", "_fwd_kernel", 2, "BLOCK_M", "BLOCK_N"),
                                              ("dkv", "_bwd_dkv_kernel", 4, "BLOCK_N", "BLOCK_M"),
                                              ("dq", "_bwd_dq_kernel", 3, "BLOCK_M", "BLOCK_N")):
            out += _cases("resampler_attention", kernel, launch, label, dtype, values, consts, dot=True,
                          dots_per_step=n, rows_key=rows, step_key=step)
        out += _cases("resampler_attention", "_delta_kernel", "delta", label, dtype, values,
                      dict(HEAD_DIM=D, BLOCK_D=D))
    return out


def decode_attention(dtypes):
    m = mod("decode_attention")
    B, S, H, D = 4, 4096, 32, 128
    out = []
    for dtype in dtypes:
        for tq in (1, 16):
            rows = tq  # group 1: Qwen-7B has as many KV heads as query heads
            base = m.launch_constexprs(tq, 1, D, getattr(torch, dtype))
            use_dot, bm = base["USE_DOT"], base["BLOCK_M"]
            for split in (False, True):
                for starts in (False, True):
                    consts = dict(base, HAS_STARTS=starts, SPLIT=split)
                    mid = P("float32") if split else P(dtype)  # unsplit: `out` stands in for the scratch
                    values = {"Q": P(dtype), "K": P(dtype), "V": P(dtype), "Out": P(dtype), "MidAcc": mid,
                              "MidM": mid, "MidL": mid, "SeqLens": P("int32"), "Starts": P("int32"),
                              **strides("q", (tq * H * D, H * D, D, 1)), **strides("o", (tq * H * D, H * D, D, 1)),
                              **strides("k", (S * H * D, H * D, D, 1), "bnhd"),
                              **strides("v", (S * H * D, H * D, D, 1), "bnhd"),
                              "stride_len": 1, "stride_start": 1, "S": S, "Hk": H,
                              "n_mblocks": math.ceil(rows / bm), "num_splits": 8 if split else 1,
                              "qk_scale": D ** -0.5 * LOG2E}
                    label = (f"decode Tq{tq} {'dot' if use_dot else 'fma'}{' split' if split else ''}"
                             f"{' starts' if starts else ''}")
                    launch = "partial/dot" if use_dot else "partial/fma"
                    out += _cases("decode_attention", "_decode_partial_kernel", launch, label, dtype, values,
                                  consts, dot=use_dot, dots_per_step=2 if use_dot else 0, rows_key="BLOCK_M",
                                  step_key="BLOCK_N")
        values = {"Out": P(dtype), "MidAcc": P("float32"), "MidM": P("float32"), "MidL": P("float32"),
                  **strides("o", (H * D, H * D, D, 1)), "TQ": 1, "H": H, "num_splits": 8}
        out += _cases("decode_attention", "_decode_combine_kernel", "combine", "decode splits8", dtype, values,
                      dict(HEAD_DIM=D, BLOCK_S=8, BLOCK_D=128))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the memory-bound kernels (positional arguments: their signatures are not touched by the attention work)
# ---------------------------------------------------------------------------------------------------------------

def rms_norm(dtypes):
    out, M, N = [], 8192, 4096
    fwd, bwd = f"fwd/n{N}", f"bwd/n{N}"
    for dtype in dtypes:
        for res in (False, True):
            out += _cases("rms_norm", "_rms_norm_fwd_kernel", fwd, f"hidden{N} residual={res}", dtype,
                          (P(dtype), P(dtype), P(dtype), P(dtype), P(dtype), P("float32"),
                           M, N, N, N if res else 0, N, N, 1e-6), dict(HAS_RESIDUAL=res))
        for dh, dw in ((False, True), (True, True), (True, False)):
            out += _cases("rms_norm", "_rms_norm_bwd_kernel", bwd, f"hidden{N} dh={dh} dw={dw}", dtype,
                          (P(dtype), P(dtype), P(dtype), P("float32"), P(dtype), P(dtype), P("float32"),
                           M, N, N, N, N if dh else 0, N, 4), dict(HAS_DH=dh, COMPUTE_DW=dw))
    return out


def layer_norm(dtypes):
    out, M = [], 8192
    for dtype in dtypes:
        for N in (1664, 4096):  # ViT width, adapter width
            bn = max(16, 1 << (N - 1).bit_length())
            out += _cases("layer_norm", "_layer_norm_fwd_kernel", f"fwd/n{bn}",
                          f"hidden{N}", dtype,
                          (P(dtype), P(dtype), P(dtype), P(dtype), P("float32"), P("float32"), M, N, N, N, 1e-6),
                          {})
            for dx, dw, db in ((True, True, True), (True, False, False)):
                out += _cases("layer_norm", "_layer_norm_bwd_kernel",
                              f"bwd/n{bn}", f"hidden{N} dx={dx} dw={dw}",
                              dtype, (P(dtype), P(dtype), P(dtype), P("float32"), P("float32"), P(dtype),
                                      P("float32"), P("float32"), M, N, N, N, N if dx else 0, 4),
                              dict(COMPUTE_DX=dx, COMPUTE_DW=dw, COMPUTE_DB=db))
    return out


def rotary(dtypes):
    out = []
    B, T, H, D, half = 2, 2048, 32, 128, 64
    for dtype in dtypes:
        for backward in (False, True):
            # forward: q, k are slices of the fused qkv projection [B, T, 3 * H * D]; backward: gradients
            s = (T * H * D, H * D, D, 1) if backward else (T * 3 * H * D, 3 * H * D, D, 1)
            args = (P(dtype), P(dtype), P(dtype), P(dtype), P("float32"), P("float32"), P("int64"),
                    T, H, H, 8192, B * T, *s, *s, half, 1, half, 1, T, 1)
            out += _cases("rotary", "_rotary_kernel", "rotary", f"d{D} positions bwd={backward}", dtype, args,
                          dict(D=D, HALF=half, HAS_POS=True, BACKWARD=backward, BLOCK_R=64, BLOCK_P=1,
                               HAS_PASS=False))
    return out


def swiglu(dtypes):
    out, n = [], 8192 * 11008
    for dtype in dtypes:
        width = "32bit" if dtype == "float32" else "16bit"
        out += _cases("swiglu", "_swiglu_fwd_kernel", f"fwd/{width}",
                      "8192x11008", dtype, (P(dtype), P(dtype), P(dtype), n), {})
        out += _cases("swiglu", "_swiglu_bwd_kernel", f"bwd/{width}",
                      "8192x11008", dtype, (P(dtype),) * 5 + (n,), {})
    return out


def cross_entropy(dtypes):
    out, V = [], 151936
    for dtype in dtypes:
        for grad in (False, True):
            out += _cases("cross_entropy", "_ce_rows_kernel", "rows", f"V{V} grad={grad}", dtype,
                          (P(dtype), P("int64"), P("float32"), V, V, -100, 1.0 / 4096), dict(COMPUTE_GRAD=grad))
    return out


BUILDERS = {f.__name__: f for f in (flash_attention, decode_attention, resampler_attention, rms_norm, layer_norm,
                                    rotary, swiglu, cross_entropy)}


# The norms' CONFIGS hold one entry per power-of-two row width, for any hidden size: the gate compiles the widths
# Qwen-VL launches (4096 and 1664, in a 2048-wide block), not every entry.
WIDTH_TABLES = ("rms_norm", "layer_norm")


def uncovered(cases, modules, dtypes):
    """CONFIGS entries of these modules that no case compiles: a launch the gate does not see is a failure (fp32
    launches count only when float32 is checked)."""
    seen = {(c.module, c.launch) for c in cases}
    missing = []
    for name in modules:
        if name in WIDTH_TABLES:
            continue
        for launch in mod(name).CONFIGS:
            if "float32" not in dtypes and re.search(r"fp32|32bit", launch):
                continue
            if (name, launch) not in seen:
                missing.append(f"{name}.CONFIGS[{launch!r}]")
    return missing
