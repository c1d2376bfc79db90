"""The tracking itself, checked on any machine: target verdicts on a synthetic H200 run, the README rewrite and its
markers, the choice of the latest GPU results file, the chart, the compile-cache counting. No timing is asserted."""
import copy
import json
import os

import pytest

import report
from benchlib import compiles
from benchlib.results import SCHEMA
from benchlib.targets import TARGETS, derive, evaluate_target, is_target


def _row(ms, **kw):
    return dict(status="ok", median_ms=ms, **kw)


def synthetic_gpu_run() -> dict:
    """A results dict as an H200 run would write it: ours passes some targets and fails others."""
    cases = {
        "attn_decoder fwd": {"triton": _row(1.0), "sdpa-flash": _row(1.1), "sdpa-cudnn": _row(0.95),
                             "sdpa-efficient": {"status": "skipped", "reason": "refuses"}},
        "attn_decoder fwd+bwd": {"triton": _row(3.0), "sdpa-flash": _row(3.3)},
        "attn_vit fwd+bwd": {"triton": _row(2.0), "sdpa-flash": _row(2.6), "sdpa-math": _row(9.0)},
        "resampler fwd+bwd": {"triton": _row(1.0, peak_mem_bytes=1100 << 20), "mha-official": _row(3.5),
                              "torch": _row(2.0), "floor-gemms": _row(0.9, peak_mem_bytes=1000 << 20)},
        "rms_norm fwd+bwd": {"triton": _row(0.12, frac_copy=0.9, gbps=2700.0)},
        "layer_norm fwd+bwd": {"triton": _row(0.14, frac_copy=0.8, gbps=2400.0)},
        "cross_entropy fwd+bwd": {"triton": _row(50.0, peak_mem_bytes=2 << 30),
                                  "torch": _row(47.0, peak_mem_bytes=12 << 30)},
        "train_step": {"triton": _row(100.0, peak_abs_bytes=20 << 30), "torch": _row(140.0, peak_abs_bytes=30 << 30)},
        "generation_b1 decode": {"triton": _row(200.0), "torch": _row(400.0)},
        "generation_b8 decode": {"triton": {"status": "error", "reason": "RuntimeError: boom"}, "torch": _row(500.0)},
    }
    data = {"schema": SCHEMA, "run_id": "x", "created": "2030-01-02T03:04:05+00:00", "commit": "abc1234",
            "device": {"type": "cuda", "name": "NVIDIA H200", "capability": "9.0", "dtype": "bfloat16",
                       "torch": "2.11", "triton": "3.6"},
            "ceilings": {"copy_gbps": 4300.0, "matmul_tflops": 790.0, "matmul_dtype": "bfloat16"},
            "libraries": {"flash_attn": "unavailable (flash_attn is not installed)"},
            "cases": {name: {"impls": impls, "title": name} for name, impls in cases.items()},
            "recompiles": {"lengths": "1000..1100", "new_in_second_half": 0, "max_variants_per_kernel": 2}}
    data["cases"]["resampler fwd+bwd"]["attn_weight_bytes"] = 256 << 20
    for c in data["cases"].values():
        derive(c)
    data["targets"] = [evaluate_target(t, data) for t in TARGETS]
    return data


def test_target_verdicts_on_a_synthetic_h200_run():
    data = synthetic_gpu_run()
    got = {t["name"]: t for t in data["targets"]}
    assert set(got) == {t.name for t in TARGETS}
    expect = {
        "attn_decoder_fwd_vs_best_sdpa": ("fail", 0.95),        # the best SDPA backend (cuDNN) is faster
        "attn_decoder_fwdbwd_vs_best_sdpa": ("pass", 1.1),
        "attn_vit_fwdbwd_vs_best_sdpa": ("pass", 1.3),           # against flash, the fastest (math is slower)
        "resampler_fwdbwd_vs_gemm_floor": ("pass", 1 / 0.9),
        "resampler_fwdbwd_vs_official_module": ("pass", 3.5),
        "resampler_fwdbwd_attn_weight_memory": ("pass", 100 / 256),
        "rms_norm_fwdbwd_copy_bw_fraction": ("pass", 0.9),
        "layer_norm_fwdbwd_copy_bw_fraction": ("fail", 0.8),
        "fused_ce_peak_mem_vs_unfused": ("pass", 2 / 12),
        "fused_ce_time_vs_unfused": ("pass", 50 / 47),
        "train_step_tokens_per_s_vs_torch": ("pass", 1.4),
        "train_step_peak_mem_vs_torch": ("pass", 20 / 30),
        "decode_tokens_per_s_vs_torch_b1": ("pass", 2.0),
        "decode_tokens_per_s_vs_torch_b8": ("missing", None),    # our path errored: no verdict, and it says why
        "recompiles_bounded": ("pass", 0),
    }
    for name, (status, value) in expect.items():
        assert got[name]["status"] == status, (name, got[name])
        if value is not None:
            assert got[name]["value"] == pytest.approx(value), name
    assert "boom" in got["decode_tokens_per_s_vs_torch_b8"]["detail"]
    assert "stated for" not in got["attn_decoder_fwd_vs_best_sdpa"]["detail"]   # an H200 is a Hopper GPU
    ours = data["cases"]["attn_decoder fwd"]["impls"]["triton"]
    assert ours["best_sdpa"]["impl"] == "sdpa-cudnn"
    assert ours["speedup_vs"]["sdpa-flash"] == pytest.approx(1.1)
    resampler = data["cases"]["resampler fwd+bwd"]["impls"]["triton"]
    assert "floor-gemms" not in resampler["speedup_vs"] and resampler["best_baseline"]["impl"] == "torch"
    assert resampler["vs_floor"]["floor-gemms"] == pytest.approx(1 / 0.9)


def test_resampler_targets_fail_where_physics_says():
    data = synthetic_gpu_run()
    impls = data["cases"]["resampler fwd+bwd"]["impls"]
    impls["triton"] = _row(1.2, peak_mem_bytes=(1000 + 300) << 20)   # materialized weights would cost >= 256 MiB
    derive(data["cases"]["resampler fwd+bwd"])
    got = {t.name: evaluate_target(t, data) for t in TARGETS if t.case == "resampler fwd+bwd"}
    assert got["resampler_fwdbwd_vs_gemm_floor"]["status"] == "fail"          # 1.33x the GEMMs' time
    assert got["resampler_fwdbwd_attn_weight_memory"]["status"] == "fail"
    assert got["resampler_fwdbwd_attn_weight_memory"]["value"] == pytest.approx(300 / 256)
    assert got["resampler_fwdbwd_vs_official_module"]["value"] == pytest.approx(3.5 / 1.2)


def test_cpu_runs_never_give_verdicts_and_other_cards_are_named():
    data = synthetic_gpu_run()
    data["device"] = {"type": "cpu", "name": "cpu"}
    for t in (evaluate_target(t, data) for t in TARGETS):
        assert t["status"] == "n/a" and "cpu run" in t["detail"]
    data["device"] = {"type": "cuda", "name": "NVIDIA A100-SXM4-80GB", "capability": "8.0", "dtype": "bfloat16"}
    verdict = evaluate_target(TARGETS[0], data)
    assert verdict["status"] == "fail" and "A100" in verdict["detail"] and "Hopper" in verdict["detail"]


def test_which_cases_serve_targets():
    assert is_target("attn_vit fwd+bwd", "triton") and is_target("attn_vit fwd+bwd", "sdpa-math")
    assert not is_target("attn_vit fwd+bwd", "flash-attn") and not is_target("attn_vit fwd", "sdpa-flash")
    assert is_target("resampler fwd+bwd", "floor-gemms") and is_target("resampler fwd+bwd", "mha-official")
    assert not is_target("resampler fwd+bwd", "mha-fast") and not is_target("rms_norm fwd+bwd", "torch")
    assert is_target("generation_b8 decode", "torch") and is_target("recompiles", None)


def test_recompile_verdicts():
    data = synthetic_gpu_run()
    target = next(t for t in TARGETS if t.kind == "recompiles")
    data["recompiles"] = {"lengths": "1000..1100", "new_in_second_half": 3, "max_variants_per_kernel": 2}
    assert evaluate_target(target, data)["status"] == "fail"
    data["recompiles"] = {"lengths": "1000..1100", "new_in_second_half": 0, "max_variants_per_kernel": 9}
    assert evaluate_target(target, data)["status"] == "fail"
    data["recompiles"] = None
    assert evaluate_target(target, data)["status"] == "missing"


def test_compiled_variant_counting():
    class Cache3:                                    # Triton >= 3.2: device -> (kernel cache, key cache, ...)
        device_caches = {0: ({"a": 1, "b": 2}, {}, None, None, None), 1: ({"c": 3}, {}, None, None, None)}

    class CacheOld:                                  # older: cache[device][key]
        cache = {0: {"a": 1}}

    assert compiles.compiled_variants(Cache3()) == 3
    assert compiles.compiled_variants(CacheOld()) == 1
    assert compiles.compiled_variants(object()) == 0


def test_report_outputs(suite, tmp_path):
    for data in (synthetic_gpu_run(), suite.data):
        md = report.markdown(data)
        assert "| target |" in md and "| case |" in md and data["device"]["name"] in md
        assert "targets:" in report.text_table(data)
    png = report.chart(synthetic_gpu_run(), str(tmp_path / "chart.png"))
    assert os.path.getsize(png) > 1000
    assert report.markdown(None) == report.NO_RUN


def test_readme_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.START}\nold table\n{report.END}\nafter\n", encoding="utf-8")
    assert report.update_readme(str(readme), "NEW") is True
    assert readme.read_text(encoding="utf-8") == f"# x\n\nbefore\n{report.START}\nNEW\n{report.END}\nafter\n"
    assert report.update_readme(str(readme), "NEW") is False
    readme.write_text("# no markers\n", encoding="utf-8")
    with pytest.raises(report.ReportError, match="bench:start"):
        report.update_readme(str(readme), "NEW")
    readme.write_text(f"{report.END}\n{report.START}\n", encoding="utf-8")
    with pytest.raises(report.ReportError):
        report.update_readme(str(readme), "NEW")


def test_latest_gpu_results_and_cli(tmp_path, capsys):
    old, new = synthetic_gpu_run(), synthetic_gpu_run()
    new["updated"] = "2031-01-01T00:00:00+00:00"
    cpu = copy.deepcopy(new)
    cpu["device"] = {"type": "cpu", "name": "cpu"}
    cpu["updated"] = "2032-01-01T00:00:00+00:00"
    for name, d in (("a.json", old), ("b.json", new), ("c.json", cpu)):
        (tmp_path / name).write_text(json.dumps(d), encoding="utf-8")
    (tmp_path / "junk.json").write_text("{", encoding="utf-8")
    assert os.path.basename(report.latest(str(tmp_path))) == "b.json"
    assert report.latest(str(tmp_path / "empty")) is None

    readme = tmp_path / "README.md"
    readme.write_text(f"{report.START}\n{report.END}\n", encoding="utf-8")
    assert report.main(["--results", str(tmp_path / "b.json"), "--readme", str(readme), "--print"]) == 0
    assert "attn_decoder_fwd_vs_best_sdpa" in readme.read_text(encoding="utf-8")
    assert "targets:" in capsys.readouterr().out
    readme.write_text("no markers\n", encoding="utf-8")
    assert report.main(["--results", str(tmp_path / "b.json"), "--readme", str(readme)]) == 2
    assert "bench:start" in capsys.readouterr().err
    assert report.main(["--floors"]) == 0
    assert "RMSNorm 8192x4096" in capsys.readouterr().out
