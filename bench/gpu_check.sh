#!/usr/bin/env bash
# One command for a lent CUDA machine with no network, on a fresh H200 or H100 with 16 cores:
#
#   BENCH_COMMIT=<sha> bash bench/gpu_check.sh        # pass the commit: the device copy may have no .git
#
# It ends in BENCH_BUDGET_S = 330 s (run it with timeout_s 360): with the machine's start (~2 min) a run costs ~7.5 of
# the session's 15 device-minutes, so a rerun after a fix still fits. BENCH_BUDGET_S=560 (timeout_s 600) gives the
# non-target cases and the torch.compile baselines the time to run too, but leaves no room for a rerun.
#
# Phases (seconds, at the default budget):
#   phase                        cap                        expected  what
#   0 names, card, versions      -                           ~5       nvidia-smi; one python for the run's names
#   1 install                    60, in the background       ~10      pip install -e . --no-deps (deps are there)
#   2 prepare                    60                          ~12      ceilings on the idle GPU: a 1 GiB copy and an
#                                                                     8192^3 bf16 matmul (the card's own numbers; an
#                                                                     H200 copied ~4.3 TB/s and ran ~790 TFLOP/s
#                                                                     here); the cases collected, target costs summed
#   3 warm-up || parity          what 4, 5 and 8 leave,      ~80      nothing timed, in parallel:
#                                in [60, 150] (~85)                   - warm-up (bench/warmup.py): 3 discovery
#                                                                       processes run our cases untimed and queue
#                                                                       every compile they would do, all autotune
#                                                                       candidates included; one compile worker per
#                                                                       core drains the queue into the shared
#                                                                       TRITON_CACHE_DIR, target cases first
#                                                                     - the CUDA tests, niced below the warm-up:
#                                                                       `pytest tests -m gpu`, over half the cores
#                                                                       with xdist, the first candidate of each
#                                                                       launch (QWENVL_AUTOTUNE=0)
#   4 targets, kernels           their costs + 17 (~119)     ~50      attention (decoder; ViT at head dim 104) vs
#                                                                     every SDPA backend, norms, fused CE, resampler
#                                                                     with its GEMM floor and the official module
#   5 targets, model             their costs + 17 (~95)      ~60      training step, generation b1/b8, recompiles
#   6 other cases                what is left                ~80      the other baselines and cases, kernels first
#   7 torch.compile baselines    what is left                -        (at BENCH_BUDGET_S=560)
#   8 report, chart, table       15 kept aside               ~8
# Why it fits. Compile time measured on one CPU process: flash attention 129 s, the resampler's 48 candidates 279 s,
# the norms 45 s, cross-entropy 27 s, ~4 s per configuration. With the specializations the cases add (batch 1, the
# decode lengths, CE over the shifted tokens; the model cases' lengths are multiples of 16 so they share the kernel
# cases' binaries), the target cases need ~250-350 configurations, ~1000-1400 CPU-seconds: 16 workers take ~60-90 s
# (the longest single compile ~10 s). After the warm-up a case's first call only loads binaries and autotunes on the
# GPU (~0.15 s per candidate; the choices are kept on disk, TRITON_CACHE_AUTOTUNING=1, and later tiers reuse them):
# its cost (`bench_cost` marks, summed by `prepare`) covers that and the timing. Every case is gated by
# benchlib/suite.py: it starts only if its cost fits before its tier's deadline less the costs of the target cases
# after it, and it is stopped at that point, so a target case is sure of its time. The targets run first, in two
# tiers of their own; the kernel tier may not take the model tier's reserved time.
#
# A phase that fails or runs out of time does not stop the later ones; each pytest process can only lose its own
# cases (a Triton kernel that poisons the CUDA context takes down one process, not the run). Results:
# bench/results/<date>-<gpu>-<commit>.json (rewritten after every case, copied to $OUT), a PNG chart, the logs as
# $OUT/logs.tar.gz (refreshed after every phase), and a short table printed last.
# Knobs: BENCH_BUDGET_S (330), BENCH_SKIP_INSTALL=1, BENCH_SKIP_PARITY=1, BENCH_PARITY_AUTOTUNE=1 (autotune in the
#        parity tests too), BENCH_WORKERS (compile workers, default: the cores), BENCH_ALLOW_CPU=1 (dry run of this
#        script on a machine without CUDA: toy sizes, the interpreter, nothing compiled, nothing written to bench/).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${BENCH_BUDGET_S:-330}
RESERVE=15                                   # seconds kept for the report, chart and copies at the end
STARTUP=12                                   # a pytest process's start on the GPU machine: imports, CUDA, collection
TAIL=5                                       # a pytest process's end: the last results and pytest-benchmark files
OUTDIR=${OUT:-}
unset TRITON_INTERPRET                       # compiled kernels here, never the interpreter
CORES=$(nproc 2>/dev/null || echo 2)

left() { echo $((T0 + BUDGET - $(date +%s))); }
say() { echo "[gpu_check +$(($(date +%s) - T0))s] $*"; }
clamp() { local v=$1; [ "$v" -lt "$2" ] && v=$2; [ "$v" -gt "$3" ] && v=$3; echo "$v"; }
summary=()

# --- 0. the device and the names of this run --------------------------------------------------------------------
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv,noheader 2>/dev/null | sed 's/^/[gpu] /' || say "nvidia-smi not available"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"     # imports work even if the editable install fails
IDS=$(python - <<'EOF'
import datetime, os, sys
sys.path.insert(0, "bench")
import torch
if not torch.cuda.is_available() and os.environ.get("BENCH_ALLOW_CPU") != "1":
    sys.exit("gpu_check: no CUDA device visible to torch " + torch.__version__)
from benchlib import env
gpu = env.gpu_slug(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu"
date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
commit = env.git_commit()
versions = [f"torch {torch.__version__} cuda {torch.version.cuda}"]
for lib in ("triton", "flash_attn", "liger_kernel", "xdist"):
    try:
        versions.append(f"{lib} {getattr(__import__(lib), '__version__', 'installed')}")
    except Exception:
        versions.append(f"{lib} not importable")
print(f"{date}-{gpu}-{commit} {commit} {int(torch.cuda.is_available())} {int('xdist not' not in versions[-1])}")
print("[env] " + ", ".join(versions), file=sys.stderr)
EOF
) || { say "cannot start: $IDS"; exit 3; }
read -r NAME COMMIT HAS_CUDA HAS_XDIST <<<"$IDS"
RUN_ID="$NAME-$(date +%s)"
WORK="/tmp/qwenvl-bench-$RUN_ID"
LOGS="$WORK/logs"            # $OUT brings back 8 files at most: the logs travel as one archive, refreshed per phase
mkdir -p "$LOGS" bench/results
pack_logs() { [ -n "$OUTDIR" ] && tar -czf "$OUTDIR/logs.tar.gz.tmp" -C "$WORK" logs 2>/dev/null \
    && mv -f "$OUTDIR/logs.tar.gz.tmp" "$OUTDIR/logs.tar.gz"; return 0; }
RESULTS="bench/results/$NAME.json"
[ "$HAS_CUDA" = "1" ] || RESULTS="$LOGS/$NAME.json"      # a CPU dry run never writes into the repository
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/triton-cache}   # one compile cache for every process of the run
BMARGS=()
python -c "import pytest_benchmark" 2>/dev/null \
    && BMARGS=(--benchmark-columns=min,median,max,rounds --benchmark-sort=name)
say "run $RUN_ID on $CORES cores -> $RESULTS (logs in $LOGS)"

# --- 1. install (in the background: the processes below import the source tree through PYTHONPATH) ----------------
if [ "${BENCH_SKIP_INSTALL:-0}" != "1" ]; then
    ( timeout 60 python -m pip install --no-deps --no-build-isolation -q -e . >"$LOGS/install.log" 2>&1
      echo $? >"$WORK/install.rc" ) &
    INSTALL_PID=$!
fi

# --- 2. the card's ceilings, the plan ----------------------------------------------------------------------------
export BENCH_RESULTS="$RESULTS" BENCH_RUN_ID="$RUN_ID" BENCH_MIRROR_DIR="$OUTDIR" BENCH_COMMIT="$COMMIT"
PLAN_TARGETS_KERNELS_S=102 PLAN_TARGETS_MODEL_S=78           # what the plan says, unless it cannot be made
timeout -k 5 60 python bench/warmup.py prepare --results "$RESULTS" --run-id "$RUN_ID" --plan "$WORK/plan.json" \
    --env "$WORK/plan.env" >"$LOGS/prepare.log" 2>&1 || say "prepare failed: $(tail -2 "$LOGS/prepare.log")"
grep -E "^(card|ceilings measured|plan):" "$LOGS/prepare.log" | sed 's/^/[prepare] /'
# shellcheck disable=SC1091
[ -f "$WORK/plan.env" ] && . "$WORK/plan.env"
R_KERNELS=$((PLAN_TARGETS_KERNELS_S + STARTUP + TAIL))
R_MODEL=$((PLAN_TARGETS_MODEL_S + STARTUP + TAIL))

# --- 3. parity tests || compile-cache warm-up (nothing timed) ------------------------------------------------------
W=$(clamp $(($(left) - R_KERNELS - R_MODEL - RESERVE)) 60 150)
say "parity tests and warm-up in parallel, ${W}s at most; then ${R_KERNELS}s + ${R_MODEL}s reserved for the targets"
if [ "${BENCH_SKIP_PARITY:-0}" != "1" ]; then
    XDIST=()
    [ "$HAS_XDIST" = "1" ] && [ "$CORES" -ge 4 ] && XDIST=(-n $((CORES / 2)))
    TUNE=0
    [ "${BENCH_PARITY_AUTOTUNE:-0}" = "1" ] && TUNE=1
    ( t=$(date +%s)
      env QWENVL_AUTOTUNE=$TUNE timeout -s INT -k 10 "$W" nice -n 10 python -m pytest tests -m gpu -q -p no:randomly \
          "${XDIST[@]}" >"$LOGS/parity.log" 2>&1
      echo "$? $(($(date +%s) - t))" >"$WORK/parity.rc" ) &
    PARITY_PID=$!
fi
timeout -k 10 $((W + 5)) python bench/warmup.py warm --plan "$WORK/plan.json" --queue "$WORK/queue" --seconds "$W" \
    --workers "${BENCH_WORKERS:-$CORES}" --logs "$LOGS" >"$LOGS/warmup.log" 2>&1
rc=$?
summary+=("warm-up (rc $rc): $(grep -E "^warm-up: [0-9]+ units" "$LOGS/warmup.log" | tail -1 | cut -c10-)")
say "${summary[-1]}"
grep -E "^warm-up: FAILED" "$LOGS/warmup.log" | head -3 | sed 's/^/[warm-up] /'
if [ -n "${PARITY_PID:-}" ]; then
    wait "$PARITY_PID"
    prc=1 pt=?
    [ -f "$WORK/parity.rc" ] && read -r prc pt <"$WORK/parity.rc"
    tail_line=$(grep -E "passed|failed|error|skipped|deselected|no tests ran" "$LOGS/parity.log" | tail -1)
    [ "$prc" -eq 124 ] && tail_line="stopped after ${W}s: $tail_line"
    summary+=("parity tests (rc $prc, ${pt}s, QWENVL_AUTOTUNE=$TUNE): $tail_line")
    export BENCH_PARITY="python -m pytest tests -m gpu: rc $prc, $tail_line"
    say "${summary[-1]}"
    [ "$prc" -ne 0 ] && grep -E "^(FAILED|ERROR)|Error" "$LOGS/parity.log" | head -5 | sed 's/^/[parity] /'
fi
if [ -n "${INSTALL_PID:-}" ]; then
    wait "$INSTALL_PID"
    irc=1
    [ -f "$WORK/install.rc" ] && read -r irc <"$WORK/install.rc"
    if [ "$irc" = "0" ]; then summary+=("install: ok"); else
        summary+=("install: FAILED (rc $irc, see install.log; the run used the source tree through PYTHONPATH)"); fi
    say "${summary[-1]}"
fi
pack_logs

# --- 4-7. the timed tiers ------------------------------------------------------------------------------------------
export TRITON_CACHE_AUTOTUNING=1             # autotune timings kept on disk: a later tier reuses them
tier() {  # tier <label> <at most this many seconds> <pytest -m expression> <files...>
    local label=$1 cap=$2 marks=$3
    shift 3
    local budget=$(($(left) - RESERVE))
    [ "$budget" -gt "$cap" ] && budget=$cap
    if [ "$budget" -lt 20 ]; then
        summary+=("$label: not run (out of time)")
        say "${summary[-1]}"
        return
    fi
    # cases that would end past this are skipped (and recorded so), then pytest writes its files
    export BENCH_DEADLINE=$(($(date +%s) + budget - TAIL))
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
    pack_logs
}
B=bench
KERNEL_FILES=($B/bench_attention.py $B/bench_norms.py $B/bench_cross_entropy.py $B/bench_resampler.py
              $B/bench_decode_attention.py $B/bench_rotary.py $B/bench_swiglu.py)
MODEL_FILES=($B/bench_train_step.py $B/bench_generation.py $B/bench_recompiles.py $B/bench_decoder_layer.py
             $B/bench_adapter.py $B/bench_vision.py $B/bench_chat.py)
# the kernel targets may not use the model targets' reserved time
tier targets-kernels $(clamp $(($(left) - R_MODEL - RESERVE)) 20 $R_KERNELS) "target and not model" "${KERNEL_FILES[@]}"
tier targets-model $R_MODEL "target and model" "${MODEL_FILES[@]}"
tier others 100000 "not target and not compile_baseline" "${KERNEL_FILES[@]}" "${MODEL_FILES[@]}"
tier compile-baselines 100000 "compile_baseline" "${KERNEL_FILES[@]}" "${MODEL_FILES[@]}"

# --- 8. results, chart, table ----------------------------------------------------------------------------------
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
pack_logs
echo
echo "== phases"
printf '  %s\n' "${summary[@]}"
echo "== results: $RESULTS${OUTDIR:+ (copies in $OUTDIR, with logs.tar.gz)}; chart $CHART; logs $LOGS"
echo "   here: copy the JSON (and PNG) into bench/results/, then python bench/report.py rewrites the README table"
echo
python bench/report.py --results "$RESULTS" --no-readme --print
