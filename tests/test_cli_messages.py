"""Messages name options the way the user wrote them: ``--config`` on the command line,
``config=`` from Python; warnings on the command line are one plain line."""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
import pytest

import depthpro_fast
from depthpro_fast import cli
from depthpro_fast.download import download
from tests.conftest import TINY_DIR

# Python spellings that must never reach a command-line user
PYTHON_SPELLINGS = re.compile(r"\b(checkpoint|config|expected_sha256|expected_size|device|dtype|"
                              r"backend|f_px|url|use_fov)=|expected_sha256|expected_size")


@pytest.fixture
def no_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEPTHPRO_CHECKPOINT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "photo.jpg").write_bytes(b"")  # never read: every case fails before
    return tmp_path


def run_cli(argv, capsys) -> str:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, wanted", [
    (["predict", "photo.jpg"], ["--checkpoint PATH", "--random-weights --config tiny",
                                "depthpro-fast download"]),
    (["predict", "--config", "huge", "photo.jpg"], ["--config 'huge' is neither a preset"]),
    (["predict", "--checkpoint", str(TINY_DIR / "state_dict_fp16.pt"), "photo.jpg"],
     ["preset 'tiny'", "pass --config tiny"]),
    (["predict", "--device", "cuda:7", "--random-weights", "--config", "tiny", "photo.jpg"],
     ["--device 'cuda:7'"]),
    (["predict", "--device", "gpu", "--random-weights", "--config", "tiny", "photo.jpg"],
     ["invalid --device 'gpu'"]),
    (["download", "--sha256", "abc", "--dest", "d"], ["--sha256 must be 64 hex digits"]),
    (["download", "--size", "-5", "--dest", "d"], ["--size must be a non-negative integer"]),
    (["download", "--url", "ftp://example.com/x.pt", "--dest", "d"], ["--url must be an http"]),
    (["demo", "--config", "huge"], ["--config 'huge'"]),
])
def test_command_line_errors_use_command_line_spellings(no_checkpoint, capsys, argv, wanted):
    import torch

    if "cuda:7" in argv and torch.cuda.is_available():
        pytest.skip("CUDA present")
    err = run_cli(argv, capsys)
    for text in wanted:
        assert text in err, (text, err)
    assert not PYTHON_SPELLINGS.search(err), err


def test_python_errors_keep_python_spellings(no_checkpoint):
    with pytest.raises(FileNotFoundError) as e:
        depthpro_fast.load("auto", config="tiny", device="cpu")
    assert "checkpoint=PATH" in str(e.value) and "checkpoint=None" in str(e.value)
    assert "--" not in str(e.value).replace("depthpro-fast download", "")
    with pytest.raises(ValueError, match="config 'huge'"):
        depthpro_fast.load(None, config="huge")
    with pytest.raises(ValueError, match="pass config='tiny'"):
        depthpro_fast.load(TINY_DIR / "state_dict_fp16.pt", device="cpu")
    with pytest.raises(ValueError, match="^expected_sha256 must be 64 hex digits"):
        download(dest=no_checkpoint / "d", expected_sha256="abc")


def test_spelling_is_restored_after_a_command(no_checkpoint, capsys):
    run_cli(["predict", "--config", "huge", "photo.jpg"], capsys)
    with pytest.raises(ValueError, match="^config 'huge'"):
        depthpro_fast.load(None, config="huge")


def test_command_line_warnings_are_one_plain_line(capsys, monkeypatch):
    from depthpro_fast.commands import info

    def noisy_run(args):
        warnings.warn("something to know", RuntimeWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(info, "run", noisy_run)
    assert cli.main(["info"]) == 0
    err = capsys.readouterr().err
    assert err == "depthpro-fast info: warning: something to know\n"


def test_demo_end_to_end_and_its_output_checks(tmp_path, capsys):
    out = tmp_path / "d" / "demo.npz"
    assert cli.main(["demo", "--size", "48x64", "--out", str(out)]) == 0
    assert "random weights" in capsys.readouterr().out
    with np.load(out) as z:
        assert z["depth"].shape == (48, 64) and bool(z["random_weights"])
        assert z["fov_deg"] == z["fov_deg_estimated"]  # estimated focal length: the same
        # predict's dtypes, and the usual file mode (not a temporary file's 0600)
        assert all(z[k].dtype == np.float32 for k in ("focallength_px", "fov_deg",
                                                       "fov_deg_estimated"))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert cli.main(["demo", "--out", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert cli.main(["demo", "--out", str(tmp_path / "f" / "demo.npz")]) == 1
    line = capsys.readouterr().err
    assert "folder of --out" in line and "is a file, not a folder" in line
