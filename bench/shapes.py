"""What each benchmark case computes: its sizes at the Qwen-VL shapes (and the toy sizes of the CPU run), the FLOPs it
must do and the fewest bytes it must move (every input read once, every output written once).

Kept free of torch so that report.py, and the floor table of NOTES.md (`python bench/report.py --floors`), work on a
machine with no GPU stack. The measured cases divide these counts by their time; nothing here is measured.
"""
from __future__ import annotations

# Datasheet numbers, used only until a run has measured the device (H100 SXM: HBM3 3.35 TB/s, dense bf16 ~989 TF).
SPECS = {
    "H100 PCIe": {"copy_gbps": 2000.0, "matmul_tflops": 756.0},
    "H100 NVL": {"copy_gbps": 3900.0, "matmul_tflops": 835.0},
    "H100": {"copy_gbps": 3350.0, "matmul_tflops": 989.4},
    "H200": {"copy_gbps": 4800.0, "matmul_tflops": 989.4},
}
H100_SPEC = SPECS["H100"]


def spec_for(device_name: str | None) -> dict | None:
    """The datasheet ceilings of a device name as torch reports it, most specific match first, or None."""
    if not device_name:
        return None
    for key in SPECS:  # insertion order puts the PCIe/NVL variants before the bare "H100"
        if all(part in device_name for part in key.split()):
            return dict(SPECS[key], name=key)
    return None


# Sizes per case: "cuda" are the real Qwen-VL shapes the targets are stated at; "cpu" are toy sizes that keep the CPU
# run (torch paths and the Triton interpreter) within its time limit while exercising the same code.
CASES = {
    "rms_norm": {"cuda": dict(M=8192, N=4096), "cpu": dict(M=64, N=256)},
    "layer_norm": {"cuda": dict(M=8192, N=4096), "cpu": dict(M=64, N=256)},
    "layer_norm_vit": {"cuda": dict(M=8192, N=1664), "cpu": dict(M=64, N=48)},
    "rotary": {"cuda": dict(B=4, T=2048, H=32, D=128), "cpu": dict(B=1, T=16, H=2, D=32)},
    "swiglu": {"cuda": dict(M=8192, F=11008), "cpu": dict(M=64, F=128)},
    "attn_decoder": {"cuda": dict(B=4, T=2048, H=32, D=128, causal=True),
                     "cpu": dict(B=1, T=32, H=2, D=32, causal=True)},
    "attn_vit": {"cuda": dict(B=8, T=1024, H=16, D=104, causal=False),
                 "cpu": dict(B=1, T=32, H=2, D=24, causal=False)},
    "decode_b1": {"cuda": dict(B=1, L=2048, H=32, D=128), "cpu": dict(B=1, L=40, H=2, D=32)},
    "decode_b8": {"cuda": dict(B=8, L=2048, H=32, D=128), "cpu": dict(B=2, L=40, H=2, D=32)},
    "resampler": {"cuda": dict(B=16, Nq=256, Nk=1024, E=4096, heads=32),
                  "cpu": dict(B=2, Nq=16, Nk=32, E=64, heads=4)},
    "cross_entropy": {"cuda": dict(N=8192, H=4096, V=151936), "cpu": dict(N=32, H=64, V=512)},
}


def shape(case: str, on_cuda: bool) -> dict:
    return dict(CASES[case]["cuda" if on_cuda else "cpu"])


# --- FLOPs and bytes. `e` is the element size in bytes; `backward` adds the backward pass to the forward. ----------

def norm_cost(M, N, e, backward=False, bias=False):
    """Forward reads x, writes y; backward reads x and dy, writes dx (the statistics are recomputed or are M floats).
    Weight, bias and their gradients are N elements each: noise next to M x N."""
    params = N * e * (2 if bias else 1)
    fwd = 2 * M * N * e + params
    bwd = 3 * M * N * e + 2 * params
    flops = 4 * M * N + (6 * M * N if backward else 0)
    return flops, fwd + (bwd if backward else 0)


def rotary_cost(B, T, H, D, e, backward=False, Hk=None):
    Hk = Hk or H
    elems = B * T * (H + Hk) * D
    tables = 2 * T * (D // 2) * 4
    one = 2 * elems * e + tables          # q and k in, q and k out; the same again backward on the gradients
    return 3 * elems * (2 if backward else 1), one * (2 if backward else 1)


def swiglu_cost(M, F, e, backward=False):
    fwd = 3 * M * F * e                   # a, b in; out
    bwd = 5 * M * F * e                   # g, a, b in; da, db out
    return 5 * M * F * (3 if backward else 1), fwd + (bwd if backward else 0)


def attention_cost(B, T, H, D, e, causal, backward=False, Tk=None, Hk=None):
    """Forward: QK^T and PV, 2 x 2 x T x Tk x D per head (half of it under a causal mask); backward: 2.5 x forward
    (five matrix products against two). Bytes: q, k, v, o; backward reads q, k, v, o, do and writes dq, dk, dv."""
    Tk = Tk or T
    Hk = Hk or H
    pairs = T * Tk
    if causal:
        pairs = T * Tk - T * (T - 1) / 2 if Tk == T else pairs / 2
    fwd_flops = 4 * B * H * pairs * D
    q = B * T * H * D * e
    kv = 2 * B * Tk * Hk * D * e
    fwd_bytes = 2 * q + kv
    if not backward:
        return fwd_flops, fwd_bytes
    bwd_bytes = 3 * q + kv + q + kv + B * H * T * 4   # q, o, do, k, v in; dq, dk, dv out; lse
    return 3.5 * fwd_flops, fwd_bytes + bwd_bytes


def decode_cost(B, L, H, D, e, Hk=None, Tq=1):
    """One new token per row against L cached positions: the cache is read once, everything else is noise."""
    Hk = Hk or H
    return 4 * B * H * Tq * L * D, 2 * B * L * Hk * D * e + 2 * B * Tq * H * D * e


def resampler_cost(B, Nq, Nk, E, heads, e, backward=False):
    """The adapter's cross-attention with its projections, counted once for the shared queries (the official module
    recomputes them per image; that is its extra work, not the floor)."""
    proj = 2 * E * E * (Nq + 2 * B * Nk + B * Nq)        # q (shared), k and v (per image), out (per image)
    attn = 4 * B * Nq * Nk * E
    fwd_flops = proj + attn
    weights = (4 * E * E + 4 * E) * e
    acts = (2 * Nq * E + 2 * B * Nk * E + Nk * E + B * Nq * E) * e   # query, pos_q, kv, pos_k, out
    if not backward:
        return fwd_flops, weights + acts
    # backward: gradients of query, kv and every weight; reads the inputs again and the output gradient
    return 3 * fwd_flops, 3 * weights + 2 * acts + (Nq * E + B * Nk * E + B * Nq * E) * e


def resampler_gemms(s: dict, backward=False) -> list[tuple[str, int, int, int, str]]:
    """The projection GEMMs the resampler cannot avoid, as its fused path runs them through cuBLAS (see
    qwenvl_kernels/ops/resampler_attention.py): (what, M, N, K, layout), an [M, K] x [K, N] product each, with the
    operands stored as that path stores them ("nt": x W^T with W [N, K]; "nn": x W; "tn": x^T y, x [K, M]).
    Their summed time is the case's floor: the attention core between them is about 4% of the FLOPs."""
    B, Nq, Nk, E = s["B"], s["Nq"], s["Nk"], s["E"]
    gemms = [("Q = (query + pos_q) Wq^T", Nq, E, E, "nt"),
             ("K_x | V = kv [Wk; Wv]^T", B * Nk, 2 * E, E, "nt"),
             ("P_k = pos_k Wk^T", Nk, E, E, "nt"),
             ("out = O Wo^T", B * Nq, E, E, "nt")]
    if backward:
        gemms += [("dO = dout Wo", B * Nq, E, E, "nn"),
                  ("dWo = dout^T O", E, E, B * Nq, "tn"),
                  ("d(query) = dQ Wq", Nq, E, E, "nn"),
                  ("dWq = dQ^T (query + pos_q)", E, E, Nq, "tn"),
                  ("d(kv) = [dK | dV] [Wk; Wv]", B * Nk, E, 2 * E, "nn"),
                  ("[dWk; dWv] = [dK | dV]^T kv", 2 * E, E, B * Nk, "tn"),
                  ("dWk += dP_k^T pos_k", E, E, Nk, "tn")]
    return gemms


def cross_entropy_cost(N, H, V, e, backward=False):
    """The LM head and the loss: N x H x V multiply-adds forward; backward dH = dlogits W and dW = dlogits^T h.
    Bytes: h and W in (dW and dh out backward); a fused kernel never writes the N x V logits."""
    fwd_flops = 2 * N * H * V
    fwd_bytes = (N * H + V * H) * e + N * 8
    if not backward:
        return fwd_flops, fwd_bytes
    return 3 * fwd_flops, fwd_bytes + (N * H + V * H) * e + (V * H) * e


def cost(case: str, s: dict, e: int, backward=False):
    """(FLOPs, bytes) of one case's shape dict."""
    if case in ("rms_norm", "layer_norm", "layer_norm_vit"):
        return norm_cost(s["M"], s["N"], e, backward, bias=case != "rms_norm")
    if case == "rotary":
        return rotary_cost(s["B"], s["T"], s["H"], s["D"], e, backward)
    if case == "swiglu":
        return swiglu_cost(s["M"], s["F"], e, backward)
    if case in ("attn_decoder", "attn_vit"):
        return attention_cost(s["B"], s["T"], s["H"], s["D"], e, s["causal"], backward)
    if case in ("decode_b1", "decode_b8"):
        return decode_cost(s["B"], s["L"], s["H"], s["D"], e)
    if case == "resampler":
        return resampler_cost(s["B"], s["Nq"], s["Nk"], s["E"], s["heads"], e, backward)
    if case == "cross_entropy":
        return cross_entropy_cost(s["N"], s["H"], s["V"], e, backward)
    raise KeyError(case)


# The floor table of NOTES.md: each kernel at the Qwen-VL shapes in bf16.
FLOOR_ROWS = [
    ("RMSNorm 8192x4096", "rms_norm", False), ("RMSNorm 8192x4096", "rms_norm", True),
    ("LayerNorm 8192x4096", "layer_norm", False), ("LayerNorm 8192x4096", "layer_norm", True),
    ("LayerNorm 8192x1664 (ViT)", "layer_norm_vit", True),
    ("Rotary q,k B4 T2048 32x128", "rotary", False), ("Rotary q,k B4 T2048 32x128", "rotary", True),
    ("SwiGLU 8192x11008", "swiglu", False), ("SwiGLU 8192x11008", "swiglu", True),
    ("Attention causal B4 T2048 32x128", "attn_decoder", False),
    ("Attention causal B4 T2048 32x128", "attn_decoder", True),
    ("Attention ViT B8 T1024 16x104", "attn_vit", False), ("Attention ViT B8 T1024 16x104", "attn_vit", True),
    ("Decode attention B1 L2048 32x128", "decode_b1", False), ("Decode attention B8 L2048 32x128", "decode_b8", False),
    ("Resampler B16 256q x 1024k, 4096/32", "resampler", False),
    ("Resampler B16 256q x 1024k, 4096/32", "resampler", True),
    ("Linear+CE 8192x4096x151936", "cross_entropy", False), ("Linear+CE 8192x4096x151936", "cross_entropy", True),
]


def floor_table(spec: dict = H100_SPEC, e: int = 2) -> list[dict]:
    rows = []
    for title, case, backward in FLOOR_ROWS:
        flops, nbytes = cost(case, shape(case, True), e, backward)
        t_flops = flops / (spec["matmul_tflops"] * 1e12) * 1e6
        t_bytes = nbytes / (spec["copy_gbps"] * 1e9) * 1e6
        rows.append(dict(kernel=title, mode="fwd+bwd" if backward else "fwd", gflop=flops / 1e9, mb=nbytes / 1e6,
                         us_flops=t_flops, us_bytes=t_bytes, floor_us=max(t_flops, t_bytes),
                         bound="compute" if t_flops > t_bytes else "memory"))
    return rows
