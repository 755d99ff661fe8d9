"""CPU check of the CUDA attention kernel's lane / fragment mappings (no GPU needed).

Compiles tests/cuda_host/attention_layout_check.cu with nvcc (it includes
kernels/attention_fwd.cu, so the kernel's own index helpers are used) and runs it on the CPU:
it emulates ldmatrix / mma.sync / shuffles / cp.async per the PTX ISA, replays the kernel's
per-warp computation and compares the output with a naive fp64 attention. See the header
comment of that file for what is and is not covered. Skipped when nvcc is not installed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import find_nvcc

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "cuda_host" / "attention_layout_check.cu"


NVCC = find_nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, /usr/local/cuda/bin)")
def test_attention_kernel_lane_mappings(tmp_path: Path) -> None:
    exe = tmp_path / "attention_layout_check"
    build = subprocess.run(
        [NVCC, "-std=c++17", "-O2", "-arch=sm_80", str(SOURCE), "-o", str(exe)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert build.returncode == 0, f"nvcc failed:\n{build.stdout}\n{build.stderr}"

    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (
        f"layout check failed (exit {run.returncode}):\n{run.stdout}\n{run.stderr}"
    )
    assert "all cases passed" in run.stdout, run.stdout
