"""The named targets, and how a run's rows become ratios (`derive`) and verdicts (`evaluate_target`).

Every target is a ratio measured within one run on one card: our path against a baseline or a floor timed beside
it, or against the card's own measured ceiling. A CPU run computes every ratio (that is what CI checks) and gives
no verdict ("n/a"). Implementations named "floor-..." are what the physics allows (the GEMMs a case cannot avoid,
run through cuBLAS), not competitors: they never count as the fastest baseline.
"""
from __future__ import annotations

from dataclasses import dataclass

OURS = "triton"


@dataclass
class Target:
    name: str
    case: str
    # "speedup_best" | "speedup" | "time_ratio" | "mem_ratio" | "abs_mem_ratio" | "mem_excess" | "frac_copy" |
    # "recompiles"
    kind: str
    op: str                # ">=" or "<="
    threshold: float
    baseline: str | None = None     # an impl name, or a prefix ending in "-" for the best of a family
    note: str = ""


TARGETS = [
    Target("attn_decoder_fwd_vs_best_sdpa", "attn_decoder fwd", "speedup_best", ">=", 1.0, "sdpa-",
           "decoder causal attention B4 T2048 32x128, forward"),
    Target("attn_decoder_fwdbwd_vs_best_sdpa", "attn_decoder fwd+bwd", "speedup_best", ">=", 1.0, "sdpa-",
           "decoder causal attention B4 T2048 32x128, forward + backward"),
    Target("attn_vit_fwdbwd_vs_best_sdpa", "attn_vit fwd+bwd", "speedup_best", ">=", 1.25, "sdpa-",
           "ViT attention B8 T1024 16x104 (head dim 104, no 128-wide padding), forward + backward, against the "
           "fastest SDPA backend that accepts it (flash, efficient, cuDNN, math)"),
    Target("resampler_fwdbwd_vs_gemm_floor", "resampler fwd+bwd", "time_ratio", "<=", 1.15, "floor-gemms",
           "adapter cross-attention B16, 256 queries x 1024 keys, 32x128: time over the summed cuBLAS time of its "
           "own projection GEMMs (96% of its FLOPs), timed in the same run"),
    Target("resampler_fwdbwd_vs_official_module", "resampler fwd+bwd", "speedup", ">=", 1.3, "mha-official",
           "same case against the official design: queries repeated per image, nn.MultiheadAttention as released"),
    Target("resampler_fwdbwd_attn_weight_memory", "resampler fwd+bwd", "mem_excess", "<=", 0.5, "floor-gemms",
           "same case: memory allocated beyond its GEMMs' buffers, in units of one B x heads x Nq x Nk attention-"
           "weight tensor (any materialized weights cost >= 1)"),
    Target("rms_norm_fwdbwd_copy_bw_fraction", "rms_norm fwd+bwd", "frac_copy", ">=", 0.85, None,
           "RMSNorm 8192x4096 fwd+bwd bytes/time over measured copy bandwidth"),
    Target("layer_norm_fwdbwd_copy_bw_fraction", "layer_norm fwd+bwd", "frac_copy", ">=", 0.85, None,
           "LayerNorm 8192x4096 fwd+bwd bytes/time over measured copy bandwidth"),
    Target("fused_ce_peak_mem_vs_unfused", "cross_entropy fwd+bwd", "mem_ratio", "<=", 0.25, "torch",
           "linear+CE 8192x4096x151936: memory allocated during fwd+bwd, fused / unfused"),
    Target("fused_ce_time_vs_unfused", "cross_entropy fwd+bwd", "time_ratio", "<=", 1.1, "torch",
           "linear+CE 8192x4096x151936: time fused / unfused"),
    Target("train_step_tokens_per_s_vs_torch", "train_step", "speedup", ">=", 1.3, "torch",
           "reduced-depth real-width model (ViT 8/48, decoder 4/32), B4, 1 image + 512 text tokens each"),
    Target("train_step_peak_mem_vs_torch", "train_step", "abs_mem_ratio", "<=", 0.75, "torch",
           "same step: peak memory allocated during the step (parameters, gradients and optimizer state included)"),
    Target("decode_tokens_per_s_vs_torch_b1", "generation_b1 decode", "speedup", ">=", 1.5, "torch",
           "generation after a one-image prefill, 128 new tokens, batch 1"),
    Target("decode_tokens_per_s_vs_torch_b8", "generation_b8 decode", "speedup", ">=", 1.5, "torch",
           "generation after a one-image prefill, 128 new tokens, batch 8"),
    Target("recompiles_bounded", "recompiles", "recompiles", "<=", 0, None,
           "new Triton compilations or autotune runs over lengths 1051..1100 once 1000..1050 ran (and <= 4 "
           "variants per kernel over the whole range)"),
]


def is_floor(impl: str) -> bool:
    return impl.startswith("floor-")


def _matches(baseline: str | None, impl: str) -> bool:
    if baseline is None:
        return False
    return impl.startswith(baseline) if baseline.endswith("-") else impl == baseline


def is_target(case: str, impl: str | None) -> bool:
    """Whether (case, impl) is measured for a target: our row, or a baseline or floor a target compares it with."""
    for t in TARGETS:
        if t.case == case and (impl in (None, OURS) or _matches(t.baseline, impl)):
            return True
    return False


def _ok(row):
    return row is not None and row.get("status") == "ok"


def derive(case: dict) -> None:
    """Ratios of our row to every baseline of the case, in place (ratios > 1 mean ours is faster / smaller); the
    floors get `vs_floor` (our time over the floor's, >= 1)."""
    impls = case.get("impls", {})
    ours = impls.get(OURS)
    for row in impls.values():
        for key in ("speedup_vs", "mem_ratio_vs", "best_baseline", "best_sdpa", "vs_floor"):
            row.pop(key, None)
    if not _ok(ours) or not ours.get("median_ms"):
        return
    speed, mem, floor = {}, {}, {}
    for name, row in impls.items():
        if name == OURS or not _ok(row) or not row.get("median_ms"):
            continue
        if is_floor(name):
            floor[name] = ours["median_ms"] / row["median_ms"]
            continue
        speed[name] = row["median_ms"] / ours["median_ms"]
        if row.get("peak_mem_bytes") and ours.get("peak_mem_bytes") is not None:
            mem[name] = ours["peak_mem_bytes"] / row["peak_mem_bytes"]
    ours["speedup_vs"] = speed
    if mem:
        ours["mem_ratio_vs"] = mem
    if floor:
        ours["vs_floor"] = floor
    if speed:
        best = min(speed, key=speed.get)
        ours["best_baseline"] = {"impl": best, "speedup": speed[best]}
        sdpa = {k: v for k, v in speed.items() if k.startswith("sdpa-")}
        if sdpa:
            b = min(sdpa, key=sdpa.get)
            ours["best_sdpa"] = {"impl": b, "speedup": sdpa[b]}


def evaluate_target(t: Target, data: dict) -> dict:
    """The target's value and pass/fail on this run's data ("n/a" off CUDA, "missing" when not measured)."""
    return _device_gate(_evaluate(t, data), data)


def _recompiles(out: dict, rc: dict | None) -> dict:
    if not rc:
        out["detail"] = "not measured"
    elif rc.get("new_in_second_half") is None:
        out["detail"] = rc.get("note", "no compilation counts (interpreter)")
    else:
        out["value"] = rc["new_in_second_half"]
        ok = rc["new_in_second_half"] <= 0 and (rc.get("max_variants_per_kernel") or 0) <= 4
        out["status"] = "pass" if ok else "fail"
        out["detail"] = (f"{rc['new_in_second_half']} new in the second half, max "
                         f"{rc.get('max_variants_per_kernel')} variants/kernel over lengths {rc.get('lengths')}")
    return out


def _baseline(t: Target, impls: dict):
    """(name, row) of the baseline the target compares with, or (None, reason)."""
    if t.kind == "speedup_best":
        fam = {k: r for k, r in impls.items() if _matches(t.baseline, k) and _ok(r)}
        if not fam:
            return None, f"no {t.baseline}* baseline ran: " + "; ".join(
                f"{k}: {r.get('reason', r.get('status'))}" for k, r in impls.items() if _matches(t.baseline, k))
        name = min(fam, key=lambda k: fam[k]["median_ms"])
    else:
        name = t.baseline
    base = impls.get(name)
    if not _ok(base):
        return None, (f"baseline {name}: {base.get('status')} ({base.get('reason', '')})" if base else
                      f"baseline {name} not measured")
    return name, base


def _value(t: Target, case: dict, ours: dict, name: str, base: dict):
    """(value, detail) of a target that compares our row with `base`."""
    mine, theirs = ours["median_ms"], base["median_ms"]
    if t.kind in ("speedup", "speedup_best"):
        return theirs / mine, f"{name} {theirs:.3f} ms / ours {mine:.3f} ms"
    if t.kind == "time_ratio":
        return mine / theirs, f"ours {mine:.3f} ms / {name} {theirs:.3f} ms"
    key = "peak_abs_bytes" if t.kind == "abs_mem_ratio" else "peak_mem_bytes"
    if base.get(key) is None or ours.get(key) is None:
        return None, "no memory figures (measured on CUDA only)"
    if t.kind == "mem_excess":
        unit = case.get("attn_weight_bytes")
        if not unit:
            return None, "the case does not record the size of its attention weights"
        excess = ours[key] - base[key]
        return excess / unit, (f"ours {ours[key] / 2**20:.0f} MiB - {name} {base[key] / 2**20:.0f} MiB over "
                               f"{unit / 2**20:.0f} MiB of attention weights")
    if not base[key]:
        return None, f"{name} allocated nothing"
    return ours[key] / base[key], f"ours {ours[key] / 2**30:.2f} GiB / {name} {base[key] / 2**30:.2f} GiB"


def _evaluate(t: Target, data: dict) -> dict:
    out = {"name": t.name, "case": t.case, "op": t.op, "threshold": t.threshold, "baseline": t.baseline,
           "note": t.note, "value": None, "status": "missing", "detail": ""}
    if t.kind == "recompiles":
        return _recompiles(out, data.get("recompiles"))
    case = data.get("cases", {}).get(t.case)
    ours = (case or {}).get("impls", {}).get(OURS)
    if not _ok(ours):
        out["detail"] = f"our path: {ours.get('status')} ({ours.get('reason', '')})" if ours else "not measured"
        return out
    if t.kind == "frac_copy":
        value, detail = ours.get("frac_copy"), f"{ours.get('gbps', 0):.0f} GB/s"
    else:
        name, base = _baseline(t, case["impls"])
        if name is None:
            out["detail"] = base
            return out
        value, detail = _value(t, case, ours, name, base)
    out["detail"] = detail
    if value is None:
        out["detail"] = detail or "no value"
        return out
    out["value"] = value
    ok = value >= t.threshold if t.op == ">=" else value <= t.threshold
    out["status"] = "pass" if ok else "fail"
    return out


def _device_gate(out: dict, data: dict) -> dict:
    dev = data.get("device", {})
    if dev.get("type") != "cuda":
        # the CPU run computes every ratio (that is what it tests) but its numbers say nothing about the targets
        out["detail"] = f"{out['detail']} [cpu run: {out['status']} at toy sizes, not a verdict]"
        out["status"] = "n/a"
    elif not str(dev.get("capability", "")).startswith("9.") or dev.get("dtype") != "bfloat16":
        out["detail"] += (f" [targets are stated for bf16 on a Hopper GPU (H100, H200); this is {dev.get('name')}, "
                          f"capability {dev.get('capability')}, {dev.get('dtype')}]")
    return out
