#!/usr/bin/env bash
# Creates (once) and prints the path of a venv that mirrors the GPU machine's Python stack:
# torch 2.11.0 (its CUDA 13.0 build, from the package registry) and Triton 3.6.0. It is kept
# outside the checkout, in $DEPTHPRO_FAST_CI_CACHE (default ~/.cache/depthpro_fast), so a warm CI
# run reuses it. A stamp file records what it holds; a venv whose stamp differs is rebuilt.
#   bash .ci/gpu_venv.sh        -> prints the venv's path on stdout (progress on stderr)
set -euo pipefail
TORCH_VERSION=${GPU_MIRROR_TORCH:-2.11.0}
TRITON_VERSION=${GPU_MIRROR_TRITON:-3.6.0}
CACHE=${DEPTHPRO_FAST_CI_CACHE:-$HOME/.cache/depthpro_fast}
VENV="$CACHE/gpu-mirror-torch$TORCH_VERSION-triton$TRITON_VERSION"
STAMP="$VENV/.depthpro_fast_stamp"
WANT="torch==$TORCH_VERSION triton==$TRITON_VERSION ninja pybind11 numpy pytest pytest-benchmark pillow safetensors tqdm"
PY=${PYTHON:-python3}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import torch, triton" 2>/dev/null; then
  echo "$VENV"
  exit 0
fi
echo "gpu venv: creating $VENV ($WANT); this downloads a CUDA torch once (several GB)" >&2
rm -rf "$VENV"
mkdir -p "$CACHE"
"$PY" -m venv "$VENV"
# PIP_CONSTRAINT is cleared: a machine-wide cap on torch must not pick another release here.
PIP_CONSTRAINT="" "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
  $WANT >&2
"$VENV/bin/python" - >&2 <<'PY'
import torch, triton
assert torch.version.cuda is not None, f"torch {torch.__version__} is not a CUDA build"
print(f"gpu venv: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
PY
echo "$WANT" > "$STAMP"
echo "$VENV"
