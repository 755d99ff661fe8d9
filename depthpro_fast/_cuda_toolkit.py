"""Find the CUDA toolkit to build the extension with: the one that really has the headers.

torch's own guess (``CUDA_HOME``, else the folder above the first ``nvcc`` on PATH) goes wrong
when ``nvcc`` on PATH is a wrapper script outside the toolkit (``/usr/local/bin/nvcc`` that
``exec``\\ s ``/usr/local/cuda-13.0/bin/nvcc``): it then takes ``/usr/local`` and the build dies on
``cuda_runtime_api.h``. Here a candidate counts only when it has ``bin/nvcc`` and
``include/cuda_runtime_api.h``. Candidates, in order: ``$CUDA_HOME``, ``$CUDA_PATH``, the folder
above ``nvcc`` on PATH (symlinks resolved), toolkits named inside an ``nvcc`` wrapper script,
``/usr/local/cuda``, then ``/usr/local/cuda-X.Y`` (the version matching torch's CUDA first, then
newest first).

Standalone on purpose (no package imports): ``setup.py`` loads it by path before torch's
``cpp_extension`` reads ``CUDA_HOME``, and ``python depthpro_fast/_cuda_toolkit.py`` prints what
it finds (``bench/gpu_check.sh`` does that).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from dataclasses import dataclass, field

HEADER = os.path.join("include", "cuda_runtime_api.h")


@dataclass
class Toolkit:
    """The chosen toolkit (``home`` None when none qualifies) and what was looked at."""

    home: str | None
    version: str | None = None
    found_via: str | None = None
    rejected: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.home is None:
            tried = "; ".join(self.rejected) or "no candidates"
            return f"no CUDA toolkit with {HEADER} found (looked at: {tried})"
        return (f"CUDA toolkit {self.home} (CUDA {self.version or '?'}, found via "
                f"{self.found_via})")


def toolkit_version(home: str) -> str | None:
    """'13.0' from include/cuda.h's CUDA_VERSION (13000), or None."""
    try:
        with open(os.path.join(home, "include", "cuda.h"), encoding="utf-8",
                  errors="replace") as f:
            m = re.search(r"#define\s+CUDA_VERSION\s+(\d+)", f.read())
    except OSError:
        return None
    if not m:
        return None
    v = int(m.group(1))
    return f"{v // 1000}.{(v % 1000) // 10}"


def _problem(home: str) -> str | None:
    if not os.path.isdir(home):
        return "not a folder"
    if not os.path.isfile(os.path.join(home, HEADER)):
        return f"no {HEADER}"
    nvcc = os.path.join(home, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
        return "no bin/nvcc"
    return None


def _wrapper_targets(nvcc: str) -> list[str]:
    """Toolkit folders named in an nvcc wrapper script (``exec /opt/cuda-X/bin/nvcc "$@"``)."""
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return []
    if not head.startswith(b"#!"):
        return []
    text = head.decode("utf-8", errors="replace")
    return re.findall(r"(/[^\s'\"]+)/bin/nvcc\b", text)


def _candidates(torch_cuda: str | None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            out.append((os.environ[var], f"${var}"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        out.append((os.path.dirname(os.path.dirname(real)), f"nvcc on PATH ({nvcc})"))
        out += [(t, f"the nvcc wrapper {nvcc}") for t in _wrapper_targets(real)]
    out.append(("/usr/local/cuda", "the default /usr/local/cuda"))

    def rank(path: str) -> tuple[int, list[int]]:
        nums = [int(x) for x in re.findall(r"\d+", os.path.basename(path))]
        same_major = bool(torch_cuda and nums and str(nums[0]) == torch_cuda.split(".")[0])
        return (0 if same_major else 1, [-n for n in nums])

    versioned = sorted(glob.glob("/usr/local/cuda-*") + glob.glob("/opt/cuda*"), key=rank)
    out += [(p, "a versioned toolkit folder") for p in versioned]
    return out


def find_toolkit(torch_cuda: str | None = None) -> Toolkit:
    """The first candidate with nvcc and the runtime headers (see the module docstring)."""
    rejected: list[str] = []
    seen: set[str] = set()
    for home, via in _candidates(torch_cuda):
        key = os.path.realpath(home)
        if key in seen:
            continue
        seen.add(key)
        why = _problem(home)
        if why is None:
            return Toolkit(os.path.abspath(home), toolkit_version(home), via, rejected)
        rejected.append(f"{home} ({via}): {why}")
    return Toolkit(None, rejected=rejected)


if __name__ == "__main__":
    tk = find_toolkit(sys.argv[1] if len(sys.argv) > 1 else None)
    print(tk.describe())
    for line in tk.rejected:
        print(f"  rejected: {line}")
    sys.exit(0 if tk.home else 1)
