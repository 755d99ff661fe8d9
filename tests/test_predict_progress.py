"""``predict``'s progress: an image counts when its outputs are written; loading and the first
forward show as steps with their elapsed time."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

from depthpro_fast import cli
from depthpro_fast.commands import predict_run
from depthpro_fast.commands.predict_inputs import Source, assign_names
from depthpro_fast.commands.predict_progress import Progress
from depthpro_fast.inference import Transform
from tests import test_predict_cli
from tests.test_io import noisy_rgb
from tests.test_predict_cli import FakeDepthPro

fake_model = test_predict_cli.fake_model  # the stand-in network's fixture


class FakeBar:
    """Records what a tqdm bar would show."""

    def __init__(self):
        self.n = 0
        self.postfixes: list[str] = []
        self.lines: list[str] = []
        self.closed = False

    def update(self, k=1):
        self.n += k

    def set_postfix_str(self, text="", refresh=True):
        self.postfixes.append(text)

    def write(self, text, file=None):
        self.lines.append(text)

    def close(self):
        self.closed = True


def test_an_image_counts_when_its_outputs_are_written_not_after_the_next_forward(tmp_path):
    """The second forward waits until the bar shows the first image: before the count moved
    to the writer thread, the count was taken only after that forward returned (it timed out
    here and the bar stayed one image behind)."""
    from pathlib import PurePosixPath

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(noisy_rgb(10, 12, seed=i)).save(paths[-1])
    named = assign_names([Source(p, PurePosixPath(p.name)) for p in paths])
    progress = Progress(2, bar=FakeBar(), enabled=False)
    seen_during_second_forward = []
    model = FakeDepthPro()
    real_forward = model.forward

    def forward(x, need_fov=True):
        if model.calls:  # the second image: is the first one counted while we compute?
            counted = threading.Event()
            for _ in range(200):
                if progress.done == 1:
                    counted.set()
                    break
                threading.Event().wait(0.025)
            seen_during_second_forward.append(counted.is_set())
        return real_forward(x, need_fov)

    model.forward = forward
    summary = predict_run.predict_sources(named, model, Transform(), tmp_path / "out",
                                          formats=["npz"], progress=progress)
    assert summary.written == 2 and progress.done == 2 and progress.bar.n == 2
    assert seen_during_second_forward == [True]


def test_a_failed_image_counts_once(tmp_path):
    from pathlib import PurePosixPath

    good, bad = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(noisy_rgb(10, 12)).save(good)
    bad.write_bytes(b"not a png")
    named = assign_names([Source(p, PurePosixPath(p.name)) for p in (good, bad)])
    progress = Progress(2, bar=FakeBar(), enabled=False)
    summary = predict_run.predict_sources(named, FakeDepthPro(), Transform(), tmp_path / "out",
                                          formats=["npz"], progress=progress)
    assert len(summary.failed) == 1 and summary.written == 1 and progress.bar.n == 2


def test_step_shows_elapsed_time_and_leaves_a_line():
    now = [100.0]
    ticked = threading.Event()
    bar = FakeBar()
    real = bar.set_postfix_str

    def set_postfix_str(text="", refresh=True):
        real(text, refresh)
        if len(bar.postfixes) >= 2:
            ticked.set()

    bar.set_postfix_str = set_postfix_str
    progress = Progress(3, bar=bar, clock=lambda: now[0], tick=0.01)
    with progress.step("loading the model"):
        assert bar.postfixes[0] == "loading the model 0 s"
        now[0] = 107.4
        assert ticked.wait(5)  # the ticker refreshes while the step runs
    assert "loading the model 7 s" in bar.postfixes
    assert bar.postfixes[-1] == ""  # cleared when the step ends
    assert bar.lines == ["loading the model: 7.4 s"]
    assert progress.steps == [("loading the model", pytest.approx(7.4))]
    quiet = Progress(1, bar=FakeBar(), enabled=False)
    with quiet.step("x"):
        pass
    assert quiet.bar.postfixes == [] and quiet.bar.lines == [] and quiet.steps[0][0] == "x"


def test_the_command_shows_loading_and_warm_up_steps(tmp_path, fake_model, capsys):
    Image.fromarray(noisy_rgb(10, 12)).save(tmp_path / "a.png")
    assert cli.main(["predict", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"),
                     "--random-weights", "--config", "tiny", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "loading the model (random weights (seed 0), config tiny, " in err
    assert "first forward (1 image, with warm-up): " in err
    assert "1/1" in err  # the bar reached the count
