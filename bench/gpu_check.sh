#!/usr/bin/env bash
# One command for a lent CUDA machine with no network (about 9 minutes of the 15-minute device budget):
#   1. install the project without dependencies (torch, triton, pytest, pytest-benchmark are already there)
#   2. the GPU parity tests (bf16, real shapes: the @needs_cuda cases of tests/)
#   3. the benchmark suite at the Qwen-VL shapes, most important first: the targets' kernels, then the model-level
#      targets, then the other cases, then the torch.compile baselines with whatever time is left
#   4. bench/results/<date>-<gpu>-<commit>.json (rewritten after every case, copied to $OUT), a PNG chart,
#      and a short table printed last
# A phase that fails or runs out of time does not stop the later ones; each pytest process can only lose its own
# cases (a Triton kernel that poisons the CUDA context takes down one process, not the run).
#
#   BENCH_COMMIT=<sha> bash bench/gpu_check.sh        # pass the commit: the device copy may have no .git
# Knobs: BENCH_BUDGET_S (default 530, the whole script), BENCH_PARITY_S (default 150), BENCH_SKIP_INSTALL=1,
#        BENCH_SKIP_PARITY=1, BENCH_ALLOW_CPU=1 (dry run of this script on a machine without CUDA, toy sizes).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${BENCH_BUDGET_S:-530}
RESERVE=25                                   # seconds kept for the report, chart and copies at the end
OUTDIR=${OUT:-}
unset TRITON_INTERPRET                       # compiled kernels here, never the interpreter

left() { echo $((T0 + BUDGET - $(date +%s))); }
say() { echo "[gpu_check +$(($(date +%s) - T0))s] $*"; }
summary=()

# --- the device and the names of this run ---------------------------------------------------------------------
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv,noheader 2>/dev/null | sed 's/^/[gpu] /' || say "nvidia-smi not available"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"     # imports work even if the editable install fails
IDS=$(python - <<'EOF'
import datetime, os, sys
sys.path.insert(0, "bench")
import torch
if not torch.cuda.is_available() and os.environ.get("BENCH_ALLOW_CPU") != "1":
    sys.exit("gpu_check: no CUDA device visible to torch " + torch.__version__)
import harness
gpu = harness.gpu_slug(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu"
date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
commit = harness.git_commit()
print(f"{date}-{gpu}-{commit} {commit} {int(torch.cuda.is_available())}")
EOF
) || { say "cannot start: $IDS"; exit 3; }
read -r NAME COMMIT HAS_CUDA <<<"$IDS"
RUN_ID="$NAME-$(date +%s)"
if [ -n "$OUTDIR" ]; then LOGS="$OUTDIR"; else LOGS="/tmp/qwenvl-bench-$RUN_ID"; fi
mkdir -p "$LOGS" bench/results
RESULTS="bench/results/$NAME.json"
[ "$HAS_CUDA" = "1" ] || RESULTS="$LOGS/$NAME.json"      # a CPU dry run never writes into the repository
BMARGS=()
python -c "import pytest_benchmark" 2>/dev/null && BMARGS=(--benchmark-columns=min,median,max,rounds --benchmark-sort=name)
say "run $RUN_ID -> $RESULTS (logs in $LOGS)"
python -c "import torch, triton; print('[env] torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
for lib in flash_attn liger_kernel; do
    python -c "import $lib; print('[env] $lib', getattr($lib, '__version__', 'installed'))" 2>/dev/null \
        || echo "[env] $lib: not importable (its baselines are skipped, with the reason recorded)"
done

# --- 1. install ------------------------------------------------------------------------------------------------
if [ "${BENCH_SKIP_INSTALL:-0}" != "1" ]; then
    if timeout 120 python -m pip install --no-deps --no-build-isolation -q -e . >"$LOGS/install.log" 2>&1; then
        summary+=("install: ok")
    else
        summary+=("install: FAILED (see install.log; running from the source tree through PYTHONPATH)")
    fi
    say "${summary[-1]}"
fi

# --- 2. parity tests -------------------------------------------------------------------------------------------
if [ "${BENCH_SKIP_PARITY:-0}" != "1" ]; then
    limit=${BENCH_PARITY_S:-150}
    t=$(date +%s)
    timeout -s INT -k 10 "$limit" python -m pytest tests -x -q -p no:randomly >"$LOGS/parity.log" 2>&1
    rc=$?
    tail_line=$(grep -E "passed|failed|error" "$LOGS/parity.log" | tail -1)
    [ $rc -eq 124 ] && tail_line="stopped after ${limit}s: $tail_line"
    summary+=("parity tests (rc $rc, $(($(date +%s) - t))s): $tail_line")
    export BENCH_PARITY="python -m pytest tests -x: rc $rc, $tail_line"
    say "${summary[-1]}"
    [ $rc -ne 0 ] && grep -E "^(FAILED|ERROR)|Error" "$LOGS/parity.log" | head -5 | sed 's/^/[parity] /'
fi

# --- 3. benchmarks, in tiers -----------------------------------------------------------------------------------
export BENCH_RESULTS="$RESULTS" BENCH_RUN_ID="$RUN_ID" BENCH_MIRROR_DIR="$OUTDIR"
export BENCH_COMMIT="$COMMIT"
tier() {  # tier <label> <at most this many seconds> <pytest -m expression> <files...>
    local label=$1 cap=$2 marks=$3
    shift 3
    local budget=$(($(left) - RESERVE))
    [ "$budget" -gt "$cap" ] && budget=$cap     # a stuck tier (an autotuning storm) cannot eat the later ones
    # cases that would end past this are skipped (and recorded so); 10 s left for pytest to write its files
    export BENCH_DEADLINE=$(($(date +%s) + budget - 10))
    if [ "$budget" -lt 20 ]; then
        summary+=("$label: not run (out of time)")
        say "${summary[-1]}"
        return
    fi
    local t=$(date +%s)
    local json=()
    [ ${#BMARGS[@]} -gt 0 ] && json=(--benchmark-json="$LOGS/pytest-benchmark-$label.json" "${BMARGS[@]}")
    timeout -s INT -k 15 "$budget" python -m pytest "$@" -q -p no:randomly -m "$marks" -rfEs "${json[@]}" \
        >"$LOGS/bench-$label.log" 2>&1
    local rc=$?
    local line
    line=$(grep -E "passed|failed|error|skipped|deselected|no tests ran" "$LOGS/bench-$label.log" | tail -1)
    [ $rc -eq 124 ] && line="stopped at the time limit: $line"
    summary+=("$label (rc $rc, $(($(date +%s) - t))s): $line")
    say "${summary[-1]}"
}
B=bench
tier kernels-targets 210 "not compile_baseline" $B/bench_attention.py $B/bench_norms.py \
    $B/bench_cross_entropy.py $B/bench_resampler.py
tier model-targets 150 "not compile_baseline" $B/bench_train_step.py $B/bench_generation.py $B/bench_recompiles.py
tier others 150 "not compile_baseline" $B/bench_decode_attention.py $B/bench_rotary.py $B/bench_swiglu.py \
    $B/bench_decoder_layer.py $B/bench_adapter.py $B/bench_vision.py
tier compile-baselines 600 "compile_baseline" $B/bench_attention.py $B/bench_norms.py $B/bench_cross_entropy.py \
    $B/bench_resampler.py $B/bench_swiglu.py $B/bench_rotary.py $B/bench_decoder_layer.py $B/bench_adapter.py

# --- 4. results, chart, table ----------------------------------------------------------------------------------
if [ ! -f "$RESULTS" ]; then
    say "no results file was written: see $LOGS/bench-*.log"
    printf '%s\n' "${summary[@]}"
    exit 1
fi
CHART="${RESULTS%.json}.png"
python bench/report.py --results "$RESULTS" --no-readme --chart "$CHART" >"$LOGS/chart.log" 2>&1 \
    || say "chart failed: $(tail -1 "$LOGS/chart.log")"
if [ -n "$OUTDIR" ]; then
    cp -f "$RESULTS" "$CHART" "$OUTDIR/" 2>/dev/null
fi
echo
echo "== phases"
printf '  %s\n' "${summary[@]}"
echo "== results: $RESULTS${OUTDIR:+ (copy in $OUTDIR)}; chart $CHART; logs $LOGS"
echo "   here: copy the JSON (and PNG) into bench/results/, then python bench/report.py rewrites the README table"
echo
python bench/report.py --results "$RESULTS" --no-readme --print
