#!/usr/bin/env bash
# One call on a GPU machine: everything this package can learn there, most decisive first.
#
#   bench/gpu_check.sh [OUT_DIR] [--sanitize] [--plan]
#
# For a GPU machine without network: a CUDA torch, nvcc, ninja and pytest must be installed.
# The whole run fits one device call of 600 s: BUDGET_S (default 510 s; the other 90 s are the
# machine's start and the transfers) bounds it, each step has a limit and gets no more than
# what the steps before it left. The limits add up to 455 s: with the environment probe
# (~15 s) and the summary (RESERVE_S, 15 s) that leaves ~25 s of slack inside the budget, so
# no step is cut by design (tests/test_bench_micro.py checks the sum). A failing step never
# stops the next one, and the risky cases (each backend's smoke test, each micro-benchmark
# group) run in processes of their own, restarted after a crash or a poisoned CUDA context.
#
# Steps, in order (STEPS="build qualify bench8" runs a subset; --plan prints this plan):
#   step      limit  what it gives
#   build       90s  the CUDA extension (pip install -e . with DEPTHPRO_FAST_BUILD_CUDA=1,
#                    fallback setup.py build_ext --inplace); setup.py says which toolkit
#   qualify     40s  which implementation each op qualified with at the model's shapes
#                    (python -m depthpro_fast.qualification, bf16 and fp16, official, batch 1);
#                    FAILED "module missing" where the checkout has no such module
#   bench8      55s  the throughput result: batch 8, bf16, --backends auto, the fast engine's
#                    rows first (eager, CUDA graph), then fast auto and the reference eager
#   smoke       55s  every op of each backend (triton, cuda) and the fast engine vs the fp32
#                    reference, official size, bf16 and fp16 (python -m depthpro_fast.bench.smoke)
#   bench1      70s  batch 1 latency and accuracy: the reference (fp32 with TF32 off, bf16,
#                    fp16), fast auto (+ CUDA graph), the fast engine in bf16 / fp16 / fp8 (+ CUDA
#                    graph); no transformers / ONNX / TensorRT / torch.compile rows; the first
#                    call (cold / warm) of the fast engine + CUDA graph
#   micro       45s  the decision micro-benchmarks, one process per group (attention vs every
#                    SDPA backend, the ViT GEMMs, the decoder conv, split / merge vs a copy)
#   ablation    35s  what each fast-path option buys (python -m depthpro_fast.fast.ablation)
#   stages      20s  the per-stage breakdown of the bf16 eager rows (table in the summary)
#   tests       45s  pytest -m "gpu and not slow": the op kernels' files first, then the rest
#   sanitize   300s  only with --sanitize (or SANITIZE=1), outside the budget's plan:
#                    compute-sanitizer memcheck and racecheck over the GPU tests of SANITIZE_K
#
# Caches, in the scratch folder GPU_CHECK_WORK (default /tmp/depthpro_fast-gpu_check):
# Triton's (TRITON_CACHE_DIR, with TRITON_CACHE_AUTOTUNING=1) is kept across the steps, so a
# kernel compiles and autotunes once; the device cache (DEPTHPRO_FAST_DEVICE_CACHE: attention
# choices and other per-device decisions) starts empty in each run. A Triton cache compiled
# offline for sm_90 (the AOT step, exported by `python -m depthpro_fast.bench.triton_cache
# export`) is installed first when the folder GPU_CHECK_TRITON_CACHE (default
# build/triton-cache-sm90, carried with the tree) exists; the log says whether its key parts
# match this Triton, and the summary counts Triton's disk-cache hits and misses (compiles) per
# step. Without it, or on a mismatch, kernels compile here as before.
#
# Left out of the default run (say GPU_CHECK_COMPILE=1 / GPU_CHECK_FP32=1 to add them):
# torch.compile rows and variants (minutes of compilation), and fp32 Triton attention (an
# autotune sweep of its own; fp32 decides nothing on the GPU): fp32 smoke / micro attention
# cases and the fp32 cases of test_attention.py's test_gpu_matches_fp64.
#
# Output, at most 8 files, in OUT_DIR (the argument, else $OUT, else ./gpu_check_out):
#   summary.txt      read first: device, torch, Triton, CUDA, commit; the Triton cache; each
#                    step's state, time and Triton hits / misses; then every table
#   gpu_check.log    everything the steps printed
#   results/<date>-<device>-{qualify,b8,smoke,b1,micro,ablation}.json: device, versions and
#                    commit in each; copy them to bench/results/ and commit
# Exit status: 0 when every step that ran passed. In a copied working tree without .git, set
# DEPTHPRO_FAST_COMMIT=<the commit it was copied from> so that the results name it.
#
# Dry run on a CPU (tiny shapes, Triton's interpreter, pip --dry-run instead of the build, one
# timed run per row, each step's limit doubled; about 7 minutes on 2 cores):
#   GPU_CHECK_ALLOW_CPU=1 GPU_CHECK_CONFIG=tiny BUDGET_S=1200 bench/gpu_check.sh /tmp/gc_dry
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=""
SANITIZE=${SANITIZE:-0}
PLAN_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --sanitize) SANITIZE=1 ;;
    --plan) PLAN_ONLY=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
      exit 0 ;;
    -*) echo "gpu_check: unknown option $arg (accepted: OUT_DIR, --sanitize, --plan, --help)" >&2
      exit 2 ;;
    *) [ -n "$OUT_DIR" ] && { echo "gpu_check: one OUT_DIR only, got $OUT_DIR and $arg" >&2
         exit 2; }
       OUT_DIR=$arg ;;
  esac
done
BUDGET_S=${BUDGET_S:-510}
case "$BUDGET_S" in ''|*[!0-9]*) echo "gpu_check: BUDGET_S must be seconds, got $BUDGET_S" >&2
  exit 2 ;; esac
RESERVE_S=15  # kept for the summary
ALL_STEPS="build qualify bench8 smoke bench1 micro ablation stages tests"
STEPS=${STEPS:-$ALL_STEPS}
[ "$SANITIZE" = "1" ] && STEPS="$STEPS sanitize"
for s in $STEPS; do
  case " $ALL_STEPS sanitize " in
    *" $s "*) ;; *) echo "gpu_check: unknown step $s in STEPS (accepted: $ALL_STEPS sanitize)" >&2
      exit 2 ;;
  esac
done
if [ "$PLAN_ONLY" = 1 ]; then  # the step plan, read from the run_step lines below
  awk -v steps=" $STEPS " -v budget="$BUDGET_S" -v reserve="$RESERVE_S" '
    /^[A-Z_]*=?[^ ]* *run_step [a-z0-9]+ [0-9]+ / {
      for (i = 1; i <= NF; i++) if ($i == "run_step") { name = $(i + 1); limit = $(i + 2) }
      if (index(steps, " " name " ")) { printf "%-9s %4ss\n", name, limit; total += limit }
    }
    END { printf "total     %4ss of a %ss budget (%ss kept for the summary)\n", total, budget,
          reserve }' "$0"
  exit 0
fi
OUT_DIR=${OUT_DIR:-${OUT:-./gpu_check_out}}
mkdir -p "$OUT_DIR/results" || { echo "gpu_check: cannot create $OUT_DIR/results" >&2; exit 2; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
RESULTS="$OUT_DIR/results"
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.txt"
: > "$LOG"
rm -f "$SUMMARY"
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET_END=$((START + BUDGET_S - RESERVE_S))
# scratch space outside OUT_DIR (it must hold at most 8 files): the caches, the tables
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/depthpro_fast-gpu_check}
mkdir -p "$WORK/triton-cache" && rm -f "$WORK"/*.txt "$WORK"/*.json
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/triton-cache} TRITON_CACHE_AUTOTUNING=1
# the device cache (attention choices, ...): this run's decisions only
if [ -z "${DEPTHPRO_FAST_DEVICE_CACHE:-}" ]; then
  rm -rf "$WORK/device-cache"; export DEPTHPRO_FAST_DEVICE_CACHE=$WORK/device-cache
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, always
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
STATES=()
FAILED=0

log() { echo "[gpu_check $(date +%H:%M:%S) +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
# seconds left to the current step (its own limit and the whole budget)
left() { local end=$STEP_END; [ "$BUDGET_END" -lt "$end" ] && end=$BUDGET_END
  echo $((end - $(date +%s))); }
# share W TOTAL: W / TOTAL of the step's time left (for the parts of a step)
share() { echo $(($(left) * $1 / $2)); }
# tmo SECONDS CMD...: CMD bounded by SECONDS (SIGINT first: our tools then save what they have)
tmo() { local s=$1; shift; [ "$s" -ge 5 ] || { echo "no time left for: $*"; return 124; }
  timeout --signal=INT --kill-after=10 "$s" "$@"; }

# isolated SECONDS CMD...: CMD (a tool that takes --resume and --time-limit) in its own process,
# restarted with --resume after a poisoned CUDA context (exit 3) or a death by a signal
isolated() {
  local limit=$1 end rc=0 attempt; shift
  end=$(($(date +%s) + limit))
  for attempt in 1 2 3 4; do
    local s=$((end - $(date +%s)))
    local more=(--time-limit $((s > 15 ? s - 10 : 1)))
    [ "$attempt" -gt 1 ] && more+=(--resume) && echo "restart $attempt after exit $rc: $*"
    tmo "$s" "$@" "${more[@]}"
    rc=$?
    case $rc in 3) continue ;; 124|130|137) return "$rc" ;; esac
    [ "$rc" -gt 128 ] && continue  # died by a signal (segfault, abort): go on after its case
    return "$rc"
  done
  return "$rc"
}

# counts FILE: "N ok, M skipped, K failed" of a results file
counts() {
  [ -f "$1" ] || { echo "no results file"; return; }
  "$PY" - "$1" <<'PY' 2>/dev/null || echo "unreadable results file"
import collections, json, sys
rows = json.load(open(sys.argv[1]))["rows"]
c = collections.Counter("failed" if "error" in r else r.get("status", "ok") for r in rows)
print(", ".join(f"{c[k]} {k}" for k in ("ok", "skipped", "failed", "running") if c[k]))
PY
}

# Triton's disk-cache lookups so far (the counting cache manager's log): "HITS MISSES"
TRITON_LOOKUPS="$WORK/triton-lookups.txt"
lookups() { local h=0 m=0; if [ -f "$TRITON_LOOKUPS" ]; then
  h=$(grep -c '^hit ' "$TRITON_LOOKUPS"); m=$(grep -c '^miss ' "$TRITON_LOOKUPS"); fi
  echo "$h $m"; }

# run_step NAME LIMIT FUNCTION: FUNCTION in a subshell, bounded by LIMIT and the budget
# (a step says why it failed, in a word or two, in $WORK/why-NAME)
run_step() {
  local name=$1 limit=$2 fn=$3 t0 rc state detail="" before after
  if [[ " $STEPS " != *" $name "* ]]; then return 0; fi
  local budget_left=$((BUDGET_END - $(date +%s)))
  if [ "$budget_left" -lt 20 ]; then
    log "skip $name: the budget is spent"
    STATES+=("$(printf '%-9s %-40s %6s' "$name" "skipped (budget spent)" "-")"); return 0
  fi
  limit=$((limit * SCALE))
  [ "$limit" -gt "$budget_left" ] && limit=$budget_left
  log "start $name (at most ${limit}s)"
  t0=$(date +%s)
  STEP_END=$((t0 + limit))
  before=$(lookups)
  rm -f "$WORK/why-$name"
  ( "$fn" ) 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local took=$(($(date +%s) - t0))
  case $rc in
    0) state="ok" ;;
    124|137) state="TIMED OUT (limit ${limit}s)"; FAILED=1 ;;
    *) state="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  [ "$rc" -ne 0 ] && [ -s "$WORK/why-$name" ] && state="FAILED ($(head -c 60 "$WORK/why-$name"))"
  [ -n "${STEP_JSON:-}" ] && detail=" [$(counts "$STEP_JSON")]"
  if [ -n "${STEP_TXT:-}" ] && [ -f "$STEP_TXT" ]; then  # pytest's closing lines
    detail=" [$(grep -E '^=* *[0-9]+ (passed|failed|skipped|deselected|errors?)' "$STEP_TXT" \
      | sed -E 's/=//g; s/^ +//; s/ in [0-9.]+s.*//' | paste -sd ';' -)]"
  fi
  after=$(lookups)
  local hits=$(( ${after% *} - ${before% *} )) misses=$(( ${after#* } - ${before#* } ))
  [ $((hits + misses)) -gt 0 ] && detail="$detail [Triton cache: $hits hit, $misses miss]"
  log "end $name: $state in ${took}s$detail"
  STATES+=("$(printf '%-9s %-40s %5ss  %s' "$name" "$state" "$took" "$detail")")
}

# ---- environment ---------------------------------------------------------------------------
GPU=1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$LOG"
then
  GPU=0
  if [ "${GPU_CHECK_ALLOW_CPU:-0}" != "1" ]; then
    log "no CUDA device visible to $PY's torch: nothing to check here (GPU_CHECK_ALLOW_CPU=1 "
    log "GPU_CHECK_CONFIG=tiny for a dry run of this script)"; exit 1
  fi
  export TRITON_INTERPRET=1  # the dry run: Triton kernels in the interpreter
fi
CONFIG=${GPU_CHECK_CONFIG:-official}
SIZE=tiny; [ "$CONFIG" = official ] && SIZE=official  # the ops' sizes in smoke and micro
if [ "$GPU" = 1 ]; then
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
fi
TORCH_CUDA=$("$PY" -c "import torch; print(torch.version.cuda or '')" 2>/dev/null)
if [ -f depthpro_fast/_cuda_toolkit.py ]; then  # the toolkit that really has the headers
  TOOLKIT=$("$PY" depthpro_fast/_cuda_toolkit.py $TORCH_CUDA 2>&1 | head -1)
else
  TOOLKIT="(depthpro_fast/_cuda_toolkit.py missing: setup.py finds the toolkit)"
fi
TOOLKIT_HOME=$(sed -n 's/^CUDA toolkit \([^ ]*\) .*/\1/p' <<<"$TOOLKIT")
[ -n "$TOOLKIT_HOME" ] && export PATH="$TOOLKIT_HOME/bin:$PATH"  # its nvcc, compute-sanitizer
NVCC=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([^,]*\),.*/\1/p')

PROBE=$("$PY" - <<'PY' 2>>"$LOG"
import torch
from depthpro_fast.bench.environment import default_results_name, environment

env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
print(default_results_name(env)[:-len(".json")])
if env["device_type"] == "cuda":
    print(f"{env['device']} (sm_{env['capability'].replace('.', '')}, {env['sm_count']} SMs, "
          f"{env['memory_gib']} GiB, driver {env.get('driver', '?')})")
else:
    print(f"CPU {env['cpu']} ({env['cpu_threads']} threads): a dry run, not a measurement")
print(f"torch {env['torch']} (CUDA {env['torch_cuda'] or 'none'}, cuDNN {env['cudnn']}), "
      f"Triton {env['triton'] or 'not installed'}, Python {env['python']}")
print(f"commit {(env['commit'] or 'unknown')[:12]}{' (modified)' if env.get('dirty') else ''}")
PY
)
if [ -z "$PROBE" ]; then
  log "the environment probe failed (see $LOG): results named by date only"
  PROBE="$(date -u +%F)-unknown"$'\n'"device ?"$'\n'"versions ?"$'\n'"commit ?"
fi
PREFIX=$(sed -n 1p <<<"$PROBE")
HEADER=$(sed -n '2,$p' <<<"$PROBE")
J_QUAL="$RESULTS/$PREFIX-qualify.json"; J_B8="$RESULTS/$PREFIX-b8.json"
J_SMOKE="$RESULTS/$PREFIX-smoke.json"; J_B1="$RESULTS/$PREFIX-b1.json"
J_MICRO="$RESULTS/$PREFIX-micro.json"; J_ABL="$RESULTS/$PREFIX-ablation.json"
J_STAGES="$WORK/stages.json"  # not returned (8 files at most): its table is in the summary
rm -f "$J_QUAL" "$J_B8" "$J_SMOKE" "$J_B1" "$J_MICRO" "$J_ABL"  # this run's files start empty
{ echo "$HEADER"; echo "CUDA toolkit: $TOOLKIT; nvcc ${NVCC:-not found}"; } | tee -a "$LOG"
log "output folder $OUT_DIR; steps: $STEPS; budget ${BUDGET_S}s; Triton cache $TRITON_CACHE_DIR;"
log "device cache $DEPTHPRO_FAST_DEVICE_CACHE"
{ nvidia-smi || true; } >>"$LOG" 2>&1

# ---- the Triton cache: a carried one compiled offline for sm_90, and the hit counter ---------
CARRIED=${GPU_CHECK_TRITON_CACHE:-build/triton-cache-sm90}
if [ "$GPU" = 1 ] && [ -d "$CARRIED" ]; then
  TRITON_CACHE_NOTE=$("$PY" -m depthpro_fast.bench.triton_cache install "$CARRIED" \
    "$TRITON_CACHE_DIR" 2>&1 | tail -4)
elif [ "$GPU" = 1 ]; then
  TRITON_CACHE_NOTE="no carried Triton cache ($CARRIED not found): kernels compile here"
else
  TRITON_CACHE_NOTE="dry run: Triton's interpreter compiles nothing (no cache to carry)"
fi
if "$PY" -c "import depthpro_fast.bench.triton_cache_counter" 2>>"$LOG"; then
  # each kernel compile lookup: a disk-cache hit or a miss (a compile), counted per step
  export TRITON_CACHE_MANAGER=depthpro_fast.bench.triton_cache_counter:CountingCacheManager
  export DEPTHPRO_FAST_TRITON_CACHE_LOG=$TRITON_LOOKUPS
else
  TRITON_CACHE_NOTE="$TRITON_CACHE_NOTE"$'\n'"(hits and misses not counted: the counting cache manager does not import)"
fi
echo "$TRITON_CACHE_NOTE" | tee -a "$LOG"

# the fp32 / torch.compile additions, and the dry run's smaller settings
DTYPES=(); [ "${GPU_CHECK_FP32:-0}" = 1 ] && DTYPES=(--dtype bf16 fp16 fp32)
NO_COMPILE=(--no-compile); [ "${GPU_CHECK_COMPILE:-0}" = 1 ] && NO_COMPILE=()
SLIM=(--backends auto --no-hf --no-onnxruntime)  # no transformers / ONNX / TensorRT rows
QUAL_ARGS=(--device cuda --dtype bf16 fp16 --config "$CONFIG" --batch 1)
B8_ARGS=(--batch 8 --dtype bf16 --engine-first --first-call none --warmup 3 --runs 10)
B1_ARGS=(--batch 1 --warmup 2 --runs 10)
ST_ARGS=(--batch 1 --dtype bf16 --no-cuda-graph --first-call none --stages --warmup 2 --runs 5)
ABL_ARGS=(--repeats 10 --warmup 2)
SCALE=1  # step limits x SCALE
if [ "$GPU" = 0 ]; then  # the dry run: one run per row, the CPU's dtype, twice the time
  QUAL_ARGS=(--device cpu --dtype fp32 --config "$CONFIG" --batch 1)
  B8_ARGS=(--batch 2 --dtype fp32 --engine-first --first-call none --warmup 0 --runs 1)
  B1_ARGS=(--batch 1 --warmup 0 --runs 1)
  ST_ARGS=(--batch 1 --dtype fp32 --no-cuda-graph --first-call none --stages --warmup 0
           --runs 1)
  ABL_ARGS=(--allow-cpu --dtype fp32 --repeats 1 --warmup 0 --inputs 1
            --variants reference fast)
  SCALE=2
fi

# ---- build ---------------------------------------------------------------------------------
ext_loaded() {
  "$PY" -c "import sys; from depthpro_fast import _ext; m = _ext.load()
print('extension:', 'depthpro_fast._C loaded' if m else _ext.unavailable_reason())
sys.exit(0 if m else 1)"
}
step_build() {
  if [ "$GPU" = 0 ]; then  # a dry run must not reinstall the package of this machine
    echo "no GPU: pip's --dry-run only, and no CUDA build asked for"
    DEPTHPRO_FAST_BUILD_CUDA=auto tmo "$(left)" "$PY" -m pip install --dry-run --no-index \
      --no-build-isolation --no-deps --disable-pip-version-check -e .
    return
  fi
  DEPTHPRO_FAST_BUILD_CUDA=1 tmo "$(left)" "$PY" -m pip install --no-index \
    --no-build-isolation --no-deps --disable-pip-version-check -e . && ext_loaded && return 0
  echo "pip install -e . failed or left no loadable extension: setup.py build_ext --inplace"
  DEPTHPRO_FAST_BUILD_CUDA=1 tmo "$(left)" "$PY" setup.py build_ext --inplace && ext_loaded
}
run_step build 90 step_build
EXTENSION=$(ext_loaded 2>&1 | tail -1)
echo "$EXTENSION" | tee -a "$LOG"

# ---- qualify: which implementation each op qualified with ----------------------------------
QUALIFY_MODULE=${GPU_CHECK_QUALIFY_MODULE:-depthpro_fast.qualification}
step_qualify() {
  if ! "$PY" -c "import importlib.util as u, sys
sys.exit(0 if u.find_spec(sys.argv[1]) else 1)" "$QUALIFY_MODULE"; then
    echo "module missing: $QUALIFY_MODULE is not in this checkout, so no op was qualified"
    echo "(the ops run as their backends choose without it)"
    echo "module missing" > "$WORK/why-qualify"
    return 1
  fi
  tmo "$(left)" "$PY" -m "$QUALIFY_MODULE" "${QUAL_ARGS[@]}" --json "$J_QUAL" \
    | tee "$WORK/qualify.txt"
  return "${PIPESTATUS[0]}"
}
run_step qualify 40 step_qualify

# bench_table TAG JSON ARGS...: the table to $WORK/bench-TAG.txt; when a row leaves the CUDA
# context unusable (exit 3) the rows after it were not run: once more without its backend
bench_table() {
  local tag=$1 json=$2 rc keep; shift 2
  local bench=("$PY" -m depthpro_fast.cli bench --config "$CONFIG" --json "$json" "$@")
  tmo "$(left)" "${bench[@]}" | tee "$WORK/bench-$tag.txt"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 3 ] || return "$rc"
  keep=$("$PY" - "$json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))["settings"]["poisoned_by"]
used = {c["backend"], *(c.get("ops") or {}).values()}
keep = "triton" if "cuda" in used else "cuda" if "triton" in used else ""
print(keep, f"first attempt: {c['name']} {c['dtype']} failed and left the CUDA context "
      f"unusable ({c['reason'][:200]}); this rerun times the {keep} backend only")
PY
) || return 3
  [ -n "${keep%% *}" ] || return 3
  echo "rerunning with --backends ${keep%% *} only"
  # (the last --backends counts: it replaces the step's --backends auto)
  tmo "$(left)" "${bench[@]}" --backends "${keep%% *}" --note "${keep#* }" \
    | tee "$WORK/bench-$tag.txt"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] && rc=3  # still a failure to read about
  return "$rc"
}

# ---- bench8: the throughput result, the fast engine's rows first ---------------------------
step_bench8() { bench_table b8 "$J_B8" "${B8_ARGS[@]}" "${SLIM[@]}" --no-compile; }
STEP_JSON=$J_B8 run_step bench8 55 step_bench8

# ---- smoke: every op of each backend, and the fast engine, vs the fp32 reference -----------
step_smoke() {
  local rc=0 smoke=("$PY" -m depthpro_fast.bench.smoke --size "$SIZE" --json "$J_SMOKE"
                    "${DTYPES[@]}")
  isolated "$(share 3 5)" "${smoke[@]}" --ops triton || rc=1
  isolated "$(share 1 3)" "${smoke[@]}" --ops cuda || rc=1
  isolated "$(left)" "${smoke[@]}" --engine --config "$CONFIG" || rc=1
  return $rc
}
STEP_JSON=$J_SMOKE run_step smoke 55 step_smoke

# ---- bench1: latency, accuracy (fp32 reference with TF32 off), first call ------------------
step_bench1() { bench_table b1 "$J_B1" "${B1_ARGS[@]}" "${SLIM[@]}" "${NO_COMPILE[@]}"; }
STEP_JSON=$J_B1 run_step bench1 70 step_bench1

# ---- micro: one process per group; attention gets twice the share --------------------------
step_micro() {
  local rc=0 micro=("$PY" -m depthpro_fast.bench.micro --size "$SIZE" --json "$J_MICRO"
                    "${DTYPES[@]}")
  isolated "$(share 2 5)" "${micro[@]}" --group attention || rc=1
  isolated "$(share 1 3)" "${micro[@]}" --group gemm || rc=1
  isolated "$(share 1 2)" "${micro[@]}" --group conv || rc=1
  isolated "$(left)" "${micro[@]}" --group patches || rc=1
  return $rc
}
STEP_JSON=$J_MICRO run_step micro 45 step_micro

# ---- ablation -------------------------------------------------------------------------------
step_ablation() {
  tmo "$(left)" "$PY" -m depthpro_fast.fast.ablation --config "$CONFIG" "${NO_COMPILE[@]}" \
    "${ABL_ARGS[@]}" --json "$J_ABL" | tee "$WORK/ablation.txt"
  return "${PIPESTATUS[0]}"
}
STEP_JSON=$J_ABL run_step ablation 35 step_ablation

# ---- stages: the per-stage breakdown of the eager rows --------------------------------------
step_stages() { bench_table stages "$J_STAGES" "${ST_ARGS[@]}" "${SLIM[@]}" --no-compile; }
run_step stages 20 step_stages

# ---- tests: op kernels' files first, each part its own process ------------------------------
step_tests() {
  local rc=0 quick=(tests/test_split_patches.py tests/test_merge_patches.py
                    tests/test_fused_epilogues.py tests/test_attention.py)
  local pytest=("$PY" -m pytest -q -p no:cacheprovider -m "gpu and not slow")
  [ "${GPU_CHECK_FP32:-0}" = 1 ] || pytest+=(-k "not (test_gpu_matches_fp64 and float32)")
  tmo "$(share 2 3)" "${pytest[@]}" "${quick[@]}" 2>&1 | tee "$WORK/tests.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  tmo "$(left)" "${pytest[@]}" tests "${quick[@]/#/--ignore=}" 2>&1 | tee -a "$WORK/tests.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  return $rc
}
STEP_TXT=$WORK/tests.txt run_step tests 45 step_tests

# ---- sanitize (only when asked): what is left, at most 150 s per tool -----------------------
step_sanitize() {
  local rc=0 tool
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; return 1; }
  for tool in memcheck racecheck; do
    local limit; limit=$(left); [ "$tool" = memcheck ] && limit=$(share 1 2)
    tmo "$limit" compute-sanitizer --tool "$tool" --error-exitcode 3 \
      --target-processes all "$PY" -m pytest -m gpu -q -x -p no:cacheprovider tests \
      -k "${SANITIZE_K:-cuda}" || rc=1
  done
  return $rc
}
SANITIZE_LIMIT=300  # (not in the budget's plan: only with --sanitize)
run_step sanitize "$SANITIZE_LIMIT" step_sanitize

# ---- summary (written last; the file to read first) -----------------------------------------
section() { [ -s "$2" ] && { echo; echo "=== $1"; cat "$2"; }; }
TOTAL_LOOKUPS=$(lookups)
{
  echo "gpu_check $(date -u +%FT%TZ): $(($(date +%s) - START)) s of a ${BUDGET_S} s budget"
  echo "$HEADER"
  echo "CUDA toolkit: $TOOLKIT; nvcc ${NVCC:-not found}; $EXTENSION"
  echo "$TRITON_CACHE_NOTE"
  echo "Triton cache over the run: ${TOTAL_LOOKUPS% *} hits, ${TOTAL_LOOKUPS#* } misses (compiled)"
  echo
  printf '%-9s %-40s %6s  %s\n' step state time "results (rows)"
  for line in "${STATES[@]}"; do echo "$line"; done
  echo
  echo "left out: torch.compile rows / variants (GPU_CHECK_COMPILE=1 adds them), fp32 Triton"
  echo "attention (fp32 decides nothing on a GPU; GPU_CHECK_FP32=1 adds it)"
  echo "results: $RESULTS/ (copy to bench/results/ and commit; then"
  echo "python bench/make_table.py --readme README.md)"
  section "qualification: the implementation each op qualified with" "$WORK/qualify.txt"
  section "bench, batch 8 (the fast engine's rows first)" "$WORK/bench-b8.txt"
  [ -f "$J_SMOKE" ] && { echo; echo "=== smoke test"
    "$PY" -m depthpro_fast.bench.smoke --show "$J_SMOKE" 2>&1; }
  section "bench, batch 1" "$WORK/bench-b1.txt"
  [ -f "$J_MICRO" ] && { echo; echo "=== micro-benchmarks"
    "$PY" -m depthpro_fast.bench.micro --show "$J_MICRO" 2>&1; }
  section "ablation" "$WORK/ablation.txt"
  section "stages, batch 1" "$WORK/bench-stages.txt"
  [ -s "$WORK/tests.txt" ] && { echo; echo "=== GPU tests (failures and totals)"
    grep -E "^(FAILED|ERROR)|passed|failed|skipped|no tests ran|error" "$WORK/tests.txt" \
      | grep -v "^SKIPPED" | tail -40; }
} > "$SUMMARY" 2>&1
cat "$SUMMARY" >> "$LOG"
sed -n '1,/^left out/p' "$SUMMARY"
echo "summary: $SUMMARY"
exit "$FAILED"
