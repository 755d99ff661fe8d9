"""The CUDA toolkit finder of setup.py (depthpro_fast/_cuda_toolkit.py), on fake toolkits."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from depthpro_fast import _cuda_toolkit as tk


def _toolkit(root: Path, version: int = 13000, header: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho nvcc\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    (root / "include").mkdir()
    (root / "include" / "cuda.h").write_text(f"#define CUDA_VERSION {version}\n")
    if header:
        (root / "include" / "cuda_runtime_api.h").write_text("")
    return root


def _wrapper(bin_dir: Path, target: Path) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    w = bin_dir / "nvcc"
    w.write_text(f'#!/bin/sh\nexec {target}/bin/nvcc "$@"\n')
    w.chmod(w.stat().st_mode | stat.S_IEXEC)
    return w


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    # no system toolkit may leak into these cases
    monkeypatch.setattr(tk, "_candidates", _without_system(tk._candidates))
    return monkeypatch


def _without_system(candidates):
    def only_tmp(torch_cuda):
        return [(p, via) for p, via in candidates(torch_cuda)
                if not p.startswith(("/usr/local/cuda", "/opt/cuda"))]
    return only_tmp


def test_wrapper_nvcc_outside_the_toolkit_is_followed(tmp_path, clean_env):
    """The development machines' case: /usr/local/bin/nvcc is a script that execs the real one;
    torch would guess CUDA_HOME=/usr/local (no headers there)."""
    real = _toolkit(tmp_path / "cuda-13.0")
    wrapper = _wrapper(tmp_path / "local" / "bin", real)
    clean_env.setenv("PATH", str(wrapper.parent))
    found = tk.find_toolkit("13.0")
    assert found.home == str(real)
    assert found.version == "13.0"
    assert "wrapper" in found.found_via
    assert any("no include/cuda_runtime_api.h" in r for r in found.rejected)


def test_cuda_home_without_headers_is_rejected_with_the_reason(tmp_path, clean_env):
    bad = _toolkit(tmp_path / "broken", header=False)
    good = _toolkit(tmp_path / "good", version=12080)
    clean_env.setenv("CUDA_HOME", str(bad))
    clean_env.setenv("CUDA_PATH", str(good))
    found = tk.find_toolkit(None)
    assert found.home == str(good) and found.version == "12.8"
    assert found.found_via == "$CUDA_PATH"
    assert found.rejected == [f"{bad} ($CUDA_HOME): no include/cuda_runtime_api.h"]


def test_symlinked_nvcc_resolves_to_its_toolkit(tmp_path, clean_env):
    real = _toolkit(tmp_path / "cuda")
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    os.symlink(real / "bin" / "nvcc", link_dir / "nvcc")
    clean_env.setenv("PATH", str(link_dir))
    assert tk.find_toolkit(None).home == str(real)


def test_nothing_found_says_what_was_tried(tmp_path, clean_env):
    wrapper = _wrapper(tmp_path / "bin", tmp_path / "missing")
    clean_env.setenv("PATH", str(wrapper.parent))
    found = tk.find_toolkit(None)
    assert found.home is None
    text = found.describe()
    assert "no CUDA toolkit with include/cuda_runtime_api.h found" in text
    assert str(tmp_path / "missing") in text and "not a folder" in text


def test_versioned_folders_prefer_torch_major(monkeypatch):
    monkeypatch.setattr(tk.glob, "glob", lambda pattern: (
        ["/usr/local/cuda-12.8", "/usr/local/cuda-13.0", "/usr/local/cuda-11.8"]
        if pattern == "/usr/local/cuda-*" else []))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", "")
    order = [p for p, via in tk._candidates("12.6") if via == "a versioned toolkit folder"]
    assert order == ["/usr/local/cuda-12.8", "/usr/local/cuda-13.0", "/usr/local/cuda-11.8"]
    order = [p for p, via in tk._candidates(None) if via == "a versioned toolkit folder"]
    assert order[0] == "/usr/local/cuda-13.0"
