#!/usr/bin/env bash
# The GPU build, proven on a machine without a GPU, with the GPU machine's own Python stack
# (torch 2.11.0 CUDA 13.0 build + Triton 3.6.0, in the venv .ci/gpu_venv.sh keeps outside the
# checkout):
#
#   triton-aot   every Triton kernel the model launches compiled ahead of time for sm_90, for
#                every autotune config (python -m depthpro_fast.triton.aot): compile errors,
#                registers, spills, shared memory, wgmma
#   extension    depthpro_fast._C built by setup.py with ninja, TORCH_CUDA_ARCH_LIST=9.0, in a
#                mirror of the sources under the cache (so the checkout never holds a _C that
#                the CPU torch cannot load; unchanged files keep their mtimes, so a warm run's
#                ninja build is a no-op)
#   offline      in that venv: tests/test_extension_offline.py (the library loads and links, its
#                ops are registered, their fakes match the C++ allocations, torch.export traces
#                through them) and tests/test_compile_trace.py (torch.compile fullgraph traces
#                the dispatch on torch 2.11)
#
# Every step runs even when an earlier one failed; the exit status is 1 when any failed.
# Measured on 2 cores: cold (first) run 5.6 min (venv 1.8, Triton compiles 2, extension 1.4,
# tests 0.4); warm 1.5 min (the Triton capture is most of it). Cache: $DEPTHPRO_FAST_CI_CACHE (~/.cache/depthpro_fast).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${DEPTHPRO_FAST_CI_CACHE:-$HOME/.cache/depthpro_fast}
STEPS=${GPU_BUILD_STEPS:-"triton-aot extension offline"}
status=0

VENV=$(bash .ci/gpu_venv.sh) || { echo "gpu build check: could not make the GPU-mirror venv"; exit 1; }
PY="$VENV/bin/python"
mkdir -p "$CACHE"

want() { [[ " $STEPS " == *" $1 "* ]]; }
step() {  # step NAME COMMAND...: run, time, remember failures, go on
  local name=$1; shift
  local t0=$SECONDS
  echo "gpu build check: $name ..."
  "$@"
  local rc=$?
  echo "gpu build check: $name $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - t0))s"
  [ $rc -eq 0 ] || status=1
  return 0
}

aot() {
  env -u TRITON_INTERPRET PYTHONPATH="$ROOT" TRITON_CACHE_DIR="$CACHE/triton-sm90-cache" \
    "$PY" -m depthpro_fast.triton.aot --json "$CACHE/triton-aot-last.json"
}

SRC="$CACHE/extension-src"
sync_sources() {  # copy tracked + untracked-not-ignored files; only changed ones are rewritten
  "$PY" - "$ROOT" "$SRC" <<'PY'
import filecmp, os, shutil, subprocess, sys
root, dst = sys.argv[1:3]
files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       cwd=root, check=True, capture_output=True).stdout.decode().split("\0")
files = {f for f in files if f and os.path.isfile(os.path.join(root, f))}
for f in sorted(files):
    s, d = os.path.join(root, f), os.path.join(dst, f)
    if not (os.path.isfile(d) and filecmp.cmp(s, d, shallow=False)):
        os.makedirs(os.path.dirname(d), exist_ok=True)
        shutil.copyfile(s, d)
for base, dirs, names in os.walk(dst):  # drop files the checkout no longer has
    dirs[:] = [x for x in dirs if x not in ("build", "__pycache__", ".pytest_cache")]
    for n in names:
        rel = os.path.relpath(os.path.join(base, n), dst)
        if rel not in files and not n.endswith(".so"):
            os.remove(os.path.join(base, n))
PY
}
build_extension() {
  sync_sources || return 1
  local log="$CACHE/extension-build.log" rc
  (cd "$SRC" && env -u CUDA_HOME -u CUDA_PATH TORCH_CUDA_ARCH_LIST=9.0 DEPTHPRO_FAST_BUILD_CUDA=1 \
     MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py build_ext --inplace \
     --build-temp "$CACHE/extension-build") > "$log" 2>&1
  rc=$?
  grep "depthpro_fast setup:" "$log"  # which toolkit, which archs
  grep -E "^\[[0-9]+/[0-9]+\]" "$log" | tail -n 20  # ninja's steps (none: nothing changed)
  if [ $rc -ne 0 ]; then echo "--- build log tail ($log):"; tail -n 60 "$log"; return $rc; fi
  ls "$SRC"/depthpro_fast/_C*.so >/dev/null 2>&1 || { echo "no depthpro_fast/_C*.so was built"; return 1; }
}
offline_tests() {
  (cd "$SRC" && DEPTHPRO_FAST_REQUIRE_EXTENSION=1 "$PY" -m pytest -q -p no:cacheprovider \
     tests/test_extension_offline.py tests/test_compile_trace.py)
}

want triton-aot && step triton-aot aot
want extension && step extension build_extension
want offline && step offline offline_tests
exit $status
