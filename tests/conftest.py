"""Shared fixtures and helpers of the test suite."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
TINY_DIR = FIXTURES / "official_tiny"

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def find_nvcc() -> str | None:
    """$NVCC, else nvcc on PATH, else /usr/local/cuda/bin/nvcc; None when there is none.

    (The host-only CUDA checks in tests/cuda_host/ are built with it; no GPU needed.)"""
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def triton_usable() -> bool:
    """Triton kernels can run here: on a GPU, or on CPU under the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"


requires_triton = pytest.mark.skipif(not triton_usable(),
                                     reason="needs triton (GPU, or TRITON_INTERPRET=1 on CPU)")


@pytest.fixture(scope="session")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    return torch.load(TINY_DIR / "state_dict_fp16.pt", weights_only=True)


@pytest.fixture(scope="session")
def tiny_image() -> torch.Tensor:
    return torch.load(TINY_DIR / "image.pt", weights_only=True)


@pytest.fixture(scope="session")
def expected_estimated() -> dict:
    return torch.load(TINY_DIR / "expected_estimated_fpx.pt", weights_only=True)


@pytest.fixture(scope="session")
def expected_given() -> dict:
    return torch.load(TINY_DIR / "expected_given_fpx.pt", weights_only=True)


@pytest.fixture(scope="session")
def tiny_model():
    """The fixture-weight tiny model, reference backend, fp32 (shared: do not mutate)."""
    import depthpro_fast

    model, transform = depthpro_fast.load(TINY_DIR / "state_dict_fp16.pt",
                                          config=TINY_DIR / "config.json", device="cpu",
                                          backend="reference")
    return model, transform


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (or the max value for integer tensors) so unwritten elements show up."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)
