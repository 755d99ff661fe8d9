#!/usr/bin/env bash
# Installs depthpro_fast (editable) with a torch that fits this machine.
#
#   ./install.sh          the package
#   ./install.sh dev      the package and the test / benchmark tools (ONNX, OpenVINO included)
#   ./install.sh export   the package and the ONNX export tools (onnx, onnxscript, onnxruntime)
#   ./install.sh openvino the package and OpenVINO (export --format openvino, bench --openvino)
#   ./install.sh video    the package and PyAV, for video files in `depthpro-fast predict`
#   ./install.sh --help   this text
#
# On a machine without an NVIDIA GPU it installs PyTorch's CPU build so that pip never downloads
# several GB of CUDA wheels: from a wheelhouse pip is configured with (find-links), else from the
# index named by $DEPTHPRO_FAST_TORCH_INDEX (PyTorch's CPU wheel index, as its "Get started"
# page gives it), else whatever pip's own configuration offers (with a warning). No index is
# named here: pip's configuration and that variable decide. It also installs Triton >= 3.7 for
# the kernel tests under TRITON_INTERPRET=1. On a GPU machine it keeps (or installs) a CUDA
# torch and builds the CUDA extension when nvcc is found.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
case "${1:-}" in
  "") EXTRA="" ;;
  dev | export | openvino | video) EXTRA="[$1]" ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "install.sh: unknown argument '$1'; accepted: nothing (the package), dev, export," \
          "openvino, video, --help" >&2; exit 2 ;;
esac
if [ $# -gt 1 ]; then
  echo "install.sh: one argument at most (dev, export, openvino or video), got: $*" >&2; exit 2
fi
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if has_gpu; then
    pip_install "torch>=2.4"
  elif pip_install --no-index --no-deps "torch>=2.4" 2>/dev/null; then
    pip_install "torch>=2.4"  # the CPU wheel came from the local wheelhouse; now its deps
  elif [ -n "${DEPTHPRO_FAST_TORCH_INDEX:-}" ]; then
    pip_install "torch>=2.4" --extra-index-url "$DEPTHPRO_FAST_TORCH_INDEX"
  else
    echo "install.sh: no GPU, no local torch wheel and no DEPTHPRO_FAST_TORCH_INDEX: pip may" \
         "pick a CUDA build of torch (several GB). Set DEPTHPRO_FAST_TORCH_INDEX to PyTorch's" \
         "CPU wheel index to get the CPU build." >&2
    pip_install "torch>=2.4"
  fi
fi

if has_gpu; then
  # build the CUDA extension against the installed torch (needs nvcc; skipped with a reason if not)
  pip_install --no-build-isolation -e ".$EXTRA"
else
  "$PY" -c "import triton, sys; sys.exit(tuple(map(int, triton.__version__.split('.')[:2])) < (3, 7))" \
    >/dev/null 2>&1 || pip_install "triton>=3.7"
  DEPTHPRO_FAST_BUILD_CUDA=${DEPTHPRO_FAST_BUILD_CUDA:-0} pip_install -e ".$EXTRA"
fi

"$PY" - <<'PY'
import torch
from depthpro_fast import _ext
why = _ext.unavailable_reason()
print(f"depthpro_fast installed (torch {torch.__version__}): "
      + ("CUDA extension built" if why is None else f"pure-Python install, no CUDA extension ({why})"))
PY
