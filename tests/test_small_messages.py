"""Small user-facing behaviours: what a folder yields, when a bad --config is said, and the
exporter's torchvision lines."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
from PIL import Image

from depthpro_fast import cli


def test_a_folder_yields_the_gifs_a_file_argument_reads(tmp_path):
    from depthpro_fast.commands.predict_inputs import collect_sources
    from depthpro_fast.io import load_image

    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "anim.gif")
    rgb, _ = load_image(tmp_path / "anim.gif")  # named: read (its first frame)
    assert rgb.shape == (4, 5, 3)
    sources, problems, _ = collect_sources([str(tmp_path)])
    assert [s.path.name for s in sources] == ["anim.gif"] and not problems
    sources, _, _ = collect_sources([str(tmp_path / "*.gif")])
    assert [s.path.name for s in sources] == ["anim.gif"]


def test_unknown_config_is_said_before_the_random_weights_note(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photo.jpg").write_bytes(b"")
    for argv in (["predict", "--random-weights", "--config", "huge", "photo.jpg"],
                 ["export", "--random-weights", "--config", "huge", "-o", "x.onnx"]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert "--config 'huge' is neither a preset" in err
        assert "MEANINGLESS" not in err and "random weights" not in err.lower().replace(
            "--random-weights", ""), err
        assert not (tmp_path / "x.onnx").exists()


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_onnx_export_drops_torchs_torchvision_lines_only():
    import torch.onnx._internal.exporter._registration as registration

    from depthpro_fast.exporters.to_onnx import REGISTRY_LOGGER, quiet_torchvision_notes

    assert registration.logger.name == REGISTRY_LOGGER  # the logger is still that one
    logger = logging.getLogger(REGISTRY_LOGGER)
    recorder = _Recorder()  # sees what every handler of the logger would print
    logger.addHandler(recorder)
    try:
        with quiet_torchvision_notes():
            logger.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
            registration._get_overload("torchvision::roi_align")  # torch's own call
            logger.warning("another registry warning")  # kept: only the torchvision lines go
        assert recorder.lines == ["another registry warning"]
        assert not logger.filters  # removed after the block
        if importlib.util.find_spec("torchvision") is None:  # outside the block torch says it
            registration._get_overload("torchvision::nms")
            assert recorder.lines[-1] == "torchvision is not installed. Skipping torchvision::nms"
    finally:
        logger.removeHandler(recorder)
