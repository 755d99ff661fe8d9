#!/usr/bin/env bash
# One-call GPU validation: build the CUDA extension, run the GPU tests, time the official model.
#
#   bench/gpu_check.sh [OUT_DIR] [--sanitize]
#
# For a GPU machine with no network (everything it needs must already be installed: a CUDA
# torch, nvcc, ninja, pytest, pytest-benchmark; transformers is optional). Steps, in order of
# importance, each bounded by `timeout` and by an overall budget (BUDGET_S, default 540 s, so
# the whole script fits in one 10-minute call):
#
#   build    pip install --no-build-isolation --no-deps -e . with DEPTHPRO_FAST_BUILD_CUDA=1
#            (falls back to setup.py build_ext --inplace); TORCH_CUDA_ARCH_LIST = this GPU's
#   tests    python -m pytest -m gpu tests
#   bench1   depthpro-fast bench, official config, batch 1, every row, --stages
#   bench8   depthpro-fast bench, official config, batch 8, bf16 rows, no torch.compile / HF,
#            3 warm-up + 10 runs
#            (bench writes its JSON after every row, so a step cut by its time limit still
#            leaves the rows it measured, marked partial)
#   suites   the pytest-benchmark suites on the GPU: op benchmarks timed, whole model once
#   sanitize (only with --sanitize or SANITIZE=1) compute-sanitizer memcheck and racecheck
#            over the GPU kernel tests selected by SANITIZE_K (default: "cuda")
#
# STEPS="build tests bench1" runs a subset. Everything goes to OUT_DIR (default: $OUT, else
# ./gpu_check_out): gpu_check.log (all output), bench-b1.{json,txt}, bench-b8.{json,txt},
# pytest-bench.json, results/<date>-<device>-b{1,8}.json (ready to copy to bench/results/ and
# commit), summary.txt. Exit status: 0 when every step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=""
SANITIZE=${SANITIZE:-0}
for arg in "$@"; do
  case "$arg" in
    --sanitize) SANITIZE=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
      exit 0 ;;
    -*) echo "gpu_check: unknown option $arg" >&2; exit 2 ;;
    *) OUT_DIR=$arg ;;
  esac
done
OUT_DIR=${OUT_DIR:-${OUT:-./gpu_check_out}}
mkdir -p "$OUT_DIR/results"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
STEPS=${STEPS:-"build tests bench1 bench8 suites"}
[ "$SANITIZE" = "1" ] && STEPS="$STEPS sanitize"
SUMMARY=()
FAILED=0

log() { echo "[gpu_check $(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

# run_step NAME LIMIT_S COMMAND...: bounded by LIMIT_S and by what is left of the budget
run_step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt 30 ]; then
    log "skip $name: budget spent (${SECONDS}s of ${BUDGET_S}s)"
    SUMMARY+=("$name: skipped (budget)"); return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "start $name (at most ${limit}s): $*"
  local t0=$SECONDS rc
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0)) state="ok"
  if [ "$rc" -eq 124 ]; then state="TIMED OUT after ${limit}s"; FAILED=1
  elif [ "$rc" -ne 0 ]; then state="FAILED (exit $rc)"; FAILED=1; fi
  log "end $name: $state in ${took}s"
  SUMMARY+=("$name: $state, ${took}s")
  return 0
}

want() { [[ " $STEPS " == *" $1 "* ]]; }

# ---- environment ---------------------------------------------------------------------------
log "output folder: $OUT_DIR; steps: $STEPS; budget ${BUDGET_S}s"
command -v nvcc >/dev/null 2>&1 || export PATH="/usr/local/cuda/bin:$PATH"
{ nvidia-smi || true; nvcc --version || true; git log -1 --oneline 2>/dev/null || true; } \
  >> "$LOG" 2>&1
CONFIG=${GPU_CHECK_CONFIG:-official}  # (tiny + GPU_CHECK_ALLOW_CPU=1: a dry run of the script)
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
elif [ "${GPU_CHECK_ALLOW_CPU:-0}" != "1" ]; then
  log "no CUDA device visible to $PY's torch: nothing to check here"; exit 1
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, installed or not

# ---- build ---------------------------------------------------------------------------------
build() {
  DEPTHPRO_FAST_BUILD_CUDA=1 "$PY" -m pip install --no-index --no-build-isolation --no-deps \
      --disable-pip-version-check -e . && return 0
  echo "pip install -e . failed; trying setup.py build_ext --inplace"
  DEPTHPRO_FAST_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace
}
export PY OUT_DIR CONFIG
export -f build
if want build; then
  run_step build 240 bash -c build
fi
"$PY" -m depthpro_fast.cli info 2>&1 | tee -a "$LOG"

# ---- tests ---------------------------------------------------------------------------------
if want tests; then
  run_step tests 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
fi

# ---- the official model, side by side ------------------------------------------------------
results_name() {  # results_name FILE SUFFIX -> <date>-<device>-SUFFIX.json
  "$PY" - "$1" "$2" <<'PY'
import json, sys
from depthpro_fast.benchmark import default_results_name
print(default_results_name(json.load(open(sys.argv[1]))["environment"], sys.argv[2]))
PY
}
bench() {  # bench TAG ARGS...: table to TAG.txt, JSON to TAG.json and results/
  local tag=$1; shift
  "$PY" -m depthpro_fast.cli bench --config "$CONFIG" "$@" --json "$OUT_DIR/$tag.json" \
    | tee "$OUT_DIR/$tag.txt"
  local rc=${PIPESTATUS[0]}
  if [ -f "$OUT_DIR/$tag.json" ]; then
    cp "$OUT_DIR/$tag.json" "$OUT_DIR/results/$(results_name "$OUT_DIR/$tag.json" "${tag#bench-}")"
  fi
  return "$rc"
}
export -f results_name bench
if want bench1; then
  run_step bench1 240 bash -c 'bench "$@"' _ bench-b1 --batch 1 --stages
fi
if want bench8; then
  run_step bench8 150 bash -c 'bench "$@"' _ bench-b8 --batch 8 --dtype bf16 --no-compile \
    --no-hf --warmup 3 --runs 10
fi

# ---- pytest-benchmark suites ---------------------------------------------------------------
suites() {
  "$PY" -m pytest -m gpu -q -p no:cacheprovider bench/bench_model.py || return $?
  "$PY" -m pytest -m gpu -q -p no:cacheprovider bench/bench_attention.py bench/bench_split.py \
    bench/bench_merge.py --benchmark-enable --benchmark-json "$OUT_DIR/pytest-bench.json" \
    --benchmark-columns=min,median,max,rounds --benchmark-sort=name
}
export -f suites
if want suites; then
  run_step suites 150 bash -c suites
fi

# ---- compute-sanitizer (optional) ----------------------------------------------------------
if want sanitize; then
  if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck; do
      run_step "sanitize-$tool" 150 compute-sanitizer --tool "$tool" --error-exitcode 3 \
        --target-processes all "$PY" -m pytest -m gpu -q -x -p no:cacheprovider tests \
        -k "${SANITIZE_K:-cuda}"
    done
  else
    log "compute-sanitizer not found: sanitize step skipped"
    SUMMARY+=("sanitize: skipped (no compute-sanitizer)")
  fi
fi

# ---- summary (last, so that it ends the output) --------------------------------------------
{
  echo
  for f in "$OUT_DIR"/bench-b1.txt "$OUT_DIR"/bench-b8.txt; do
    [ -f "$f" ] && { echo "=== $(basename "$f")"; cat "$f"; echo; }
  done
  echo "=== gpu_check summary (${SECONDS}s of ${BUDGET_S}s)"
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
  echo "results: $OUT_DIR/results/ (copy to bench/results/ and commit; then"
  echo "python bench/make_table.py --readme README.md)"
} | tee "$OUT_DIR/summary.txt" | tee -a "$LOG"
exit "$FAILED"
