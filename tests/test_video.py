"""``depthpro-fast predict CLIP``: depth frames, preview video, clip focal length, resume, Ctrl-C.

Clips are made here with PyAV (a still scene with a little noise per frame, a few frames of
40 x 32), and the network is the cheap stand-in of the predict tests (the real ``infer``
post-processing, a forward that costs nothing, a FOV estimate that follows the frame's content,
so that the per-frame focal length varies as it does with a real network).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from depthpro_fast import cli, video, video_io
from depthpro_fast.commands import predict_inputs
from depthpro_fast.inference import Transform
from tests.test_predict_cli import FakeDepthPro

av = pytest.importorskip("av", reason="PyAV is not installed (pip install "
                                      "'depthpro-fast[video]'): the video tests need it")

FPS = Fraction(12, 1)


def make_clip(path: Path, frames: int = 6, width: int = 40, height: int = 32,
              fps: Fraction = FPS, codec: str = "libx264", seed: int = 0) -> list[np.ndarray]:
    """A still scene (a gradient and a bright square) with noise per frame; returns the
    frames as decoded back from the file (the codec is lossy)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    scene = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    scene[height // 4:height // 2, width // 4:width // 2] = 230
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            img = np.clip(scene + rng.normal(0, 6, scene.shape), 0, 255).astype(np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return [rgb for _, rgb in video_io.iter_frames(path)]


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    model = FakeDepthPro()
    monkeypatch.setattr("depthpro_fast.api.load",
                        lambda checkpoint, **kw: (model, Transform("cpu", torch.float32)))
    return model


def run(clip: Path, out: Path, *extra: str) -> int:
    return cli.main(["predict", str(clip), "-o", str(out), "--quiet", "--random-weights",
                     "--config", "tiny", *extra])


def frame_mm(path: Path) -> tuple[np.ndarray, dict]:
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")
        return np.asarray(im).astype(np.int64), dict(im.info)


def mm(depth: torch.Tensor) -> np.ndarray:
    return np.clip(np.rint(depth.numpy().astype(np.float64) * 1000), 0, 65535).astype(np.int64)


def tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")]


def test_clip_frames_match_infer_with_the_fixed_focal(tmp_path, fake_model, capsys):
    clip = tmp_path / "walk.mp4"
    rgbs = make_clip(clip)
    out = tmp_path / "out"
    assert run(clip, out, "--batch-size", "4") == 0
    text = capsys.readouterr().out
    assert "walk.mp4: 6 frames: 6 written, 0 skipped (done before)" in text and "frames/s" in text
    folder = out / "walk"
    record = json.loads((folder / "clip.json").read_text())
    assert record["complete"] is True and record["frames"] == 6 and record["fps"] == "12/1"
    assert record["random_weights"] is True
    focal = record["focal"]
    # the clip's focal length: the median of the estimates of the sampled frames (all 6 here)
    transform = Transform()
    estimates = [float(fake_model.infer(transform(rgb))["focallength_px"]) for rgb in rgbs]
    assert len(set(estimates)) > 1  # the per-frame estimate does vary
    assert focal["mode"] == "constant" and focal["source"] == "clip median"
    assert focal["samples"]["frames"] == list(range(6))
    assert focal["samples"]["focallength_px"] == pytest.approx(estimates, rel=1e-6)
    assert focal["focallength_px"] == np.float32(statistics.median(estimates))
    f = focal["focallength_px"]
    assert sorted(p.name for p in (folder / "depth_mm").iterdir()) == [
        f"{i:06d}.png" for i in range(6)]
    for i, rgb in enumerate(rgbs):
        got, info = frame_mm(folder / "depth_mm" / f"{i:06d}.png")
        want = mm(fake_model.infer(transform(rgb), f_px=f)["depth"])
        assert got.shape == (32, 40)
        assert np.abs(got - want).max() <= 1  # batched network vs one image: float rounding
        assert float(info["focallength_px"]) == f and info["frame"] == str(i)
        assert info["focallength_source"] == "clip median"
    with av.open(str(folder / "depth_preview.mp4")) as c:
        s = c.streams.video[0]
        assert s.average_rate == FPS
        n = sum(1 for _ in c.decode(s))
    assert n == 6
    assert tmp_files(out) == []


def test_per_frame_focal_flag_keeps_the_estimate_of_each_frame(tmp_path, fake_model, capsys):
    clip = tmp_path / "walk.mkv"
    rgbs = make_clip(clip, frames=4, codec="mpeg4")  # no frame count in a Matroska header
    out = tmp_path / "out"
    assert run(clip, out, "--per-frame-focal") == 0
    assert "focal length per frame" in capsys.readouterr().out
    transform = Transform()
    focal = json.loads((out / "walk" / "clip.json").read_text())["focal"]
    assert focal["mode"] == "per-frame" and "samples" not in focal
    for i, rgb in enumerate(rgbs):
        want = fake_model.infer(transform(rgb))
        got, info = frame_mm(out / "walk" / "depth_mm" / f"{i:06d}.png")
        assert float(info["focallength_px"]) == pytest.approx(float(want["focallength_px"]),
                                                              rel=1e-6)
        assert np.abs(got - mm(want["depth"])).max() <= 1
        assert focal["per_frame_focallength_px"][i] == float(info["focallength_px"])
    assert len(set(focal["per_frame_focallength_px"])) > 1


def test_given_focal_length_is_used_for_every_frame(tmp_path, fake_model):
    clip = tmp_path / "c.webm"
    make_clip(clip, frames=3, codec="libvpx-vp9")
    summary = video.predict_video(fake_model, clip, tmp_path / "c",
                                  video.VideoOptions(f_px=55.0, progress=False))
    assert summary.complete and summary.error is None and summary.written == 3
    assert summary.focallength_px == 55.0 and summary.focal_source == "given"
    assert summary.as_dict()["frames"] == 3
    for i in range(3):
        assert frame_mm(tmp_path / "c" / "depth_mm" / f"{i:06d}.png")[1]["focallength_px"] \
            == "55.0"
    with pytest.raises(ValueError, match="exclude each other"):
        video.predict_video(fake_model, clip, tmp_path / "d",
                            video.VideoOptions(f_px=55.0, per_frame_focal=True))


def test_rerun_computes_only_the_missing_frames(tmp_path, fake_model, capsys):
    clip = tmp_path / "walk.mp4"
    make_clip(clip, frames=6)
    out = tmp_path / "out"
    assert run(clip, out) == 0
    folder = out / "walk"
    record = json.loads((folder / "clip.json").read_text())
    before = {i: frame_mm(folder / "depth_mm" / f"{i:06d}.png")[0] for i in range(6)}
    # a run killed mid-way: frames 2 and 5 never written, a half frame in its temporary, no
    # preview, clip.json not yet complete
    for i in (2, 5):
        (folder / "depth_mm" / f"{i:06d}.png").unlink()
    (folder / "depth_mm" / ".000005.png.0123456789ab.tmp").write_bytes(b"\x89PNG half")
    (folder / "depth_preview.mp4").unlink()
    (folder / "clip.json").write_text(json.dumps({**record, "complete": False}))
    capsys.readouterr()
    fake_model.calls.clear()
    assert run(clip, out) == 0
    assert fake_model.calls == [1, 1]  # two frames, no focal re-estimate
    assert "6 frames: 2 written, 4 skipped (done before)" in capsys.readouterr().out
    assert json.loads((folder / "clip.json").read_text())["focal"] == record["focal"]
    for i in range(6):
        np.testing.assert_array_equal(frame_mm(folder / "depth_mm" / f"{i:06d}.png")[0],
                                      before[i])
    assert (folder / "depth_preview.mp4").is_file() and tmp_files(out) == []
    # all done: nothing to do, the model is not loaded
    fake_model.calls.clear()
    assert run(clip, out) == 0
    assert "nothing left to do" in capsys.readouterr().out and fake_model.calls == []


def test_frames_made_with_other_focal_options_are_not_mixed(tmp_path, fake_model, capsys):
    clip = tmp_path / "walk.mp4"
    make_clip(clip, frames=3)
    out = tmp_path / "out"
    assert run(clip, out) == 0
    (out / "walk" / "depth_mm" / "000001.png").unlink()
    capsys.readouterr()
    assert run(clip, out, "--per-frame-focal") == 1
    text = capsys.readouterr().out
    assert "holds 2 frames made with one focal length per clip" in text
    assert "asks for a focal length estimated per frame" in text and "--overwrite" in text
    assert run(clip, out, "--per-frame-focal", "--overwrite") == 0
    assert "3 written" in capsys.readouterr().out


def test_unreadable_clip_is_a_clear_failure(tmp_path, fake_model, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 50)
    good = tmp_path / "fine.mp4"
    make_clip(good, frames=2)
    assert cli.main(["predict", str(tmp_path), "-o", str(tmp_path / "out"), "--quiet",
                     "--random-weights", "--config", "tiny"]) == 1
    text = capsys.readouterr().out
    assert "failed: " in text and "cannot read" in text and "broken.mp4 as a video" in text
    assert "fine.mp4: 2 frames: 2 written" in text
    with pytest.raises(video_io.VideoError, match="has no video stream|cannot read"):
        video_io.probe(tmp_path / "out" / "fine" / "clip.json")


def test_missing_pyav_is_said_before_the_model_loads(tmp_path, fake_model, monkeypatch,
                                                     capsys):
    clip = tmp_path / "walk.mp4"
    make_clip(clip, frames=1)
    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    assert run(clip, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "video input needs PyAV" in err and "./install.sh video" in err
    assert "pip install -e '.[video]'" in err
    assert fake_model.calls == []


def test_ctrl_c_keeps_the_computed_frames_and_a_rerun_finishes(tmp_path, fake_model,
                                                               monkeypatch, capsys):
    clip = tmp_path / "walk.mp4"
    make_clip(clip, frames=5)
    out = tmp_path / "out"
    real_forward = fake_model.forward

    def forward(x, need_fov=True):
        if len(fake_model.calls) == 5 + 2:  # 5 focal samples, 2 frames, then Ctrl-C
            raise KeyboardInterrupt
        return real_forward(x, need_fov)

    monkeypatch.setattr(fake_model, "forward", forward)
    assert run(clip, out) == 130
    text = capsys.readouterr().out
    assert "interrupted: " in text and "5 frames: 2 written" in text
    assert "a rerun with the same arguments continues" in text
    assert sorted(p.name for p in (out / "walk" / "depth_mm").iterdir()) == [
        "000000.png", "000001.png"]
    assert not (out / "walk" / "depth_preview.mp4").exists() and tmp_files(out) == []
    monkeypatch.setattr(fake_model, "forward", real_forward)
    assert run(clip, out) == 0
    assert "5 frames: 3 written, 2 skipped" in capsys.readouterr().out


def test_folders_take_clips_but_not_previews(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "b.MOV").write_bytes(b"x")
    (tmp_path / "depth_preview.mp4").write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"x")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "c.png")
    sources, problems, _ = predict_inputs.collect_sources([str(tmp_path)])
    assert [s.rel.name for s in sources] == ["a.mp4", "b.MOV", "c.png"] and problems == []


def test_sample_indices_and_rotation():
    assert video.sample_indices(100, 8) == [6, 18, 31, 43, 56, 68, 81, 93]
    assert video.sample_indices(3, 8) == [0, 1, 2]
    assert video.sample_indices(0, 8) == []
    a = np.arange(6).reshape(2, 3)[..., None]
    # a phone held upright: the display matrix turns the stored frame by -90 (clockwise 90)
    np.testing.assert_array_equal(video_io.upright(a, -90)[..., 0], [[3, 0], [4, 1], [5, 2]])
    np.testing.assert_array_equal(video_io.upright(a, 90)[..., 0], [[2, 5], [1, 4], [0, 3]])
    assert video_io.upright(a, 0) is a


def test_preview_of_an_odd_size_keeps_the_rate(tmp_path):
    writer = video_io.PreviewWriter(tmp_path / "p.mp4", Fraction(30000, 1001), 33, 21)
    for i in range(3):
        writer.write(np.full((21, 33, 3), 40 * i, np.uint8))
    assert not (tmp_path / "p.mp4").exists()  # atomic: only a hidden temporary so far
    writer.close()
    with av.open(str(tmp_path / "p.mp4")) as c:
        s = c.streams.video[0]
        assert s.average_rate == Fraction(30000, 1001) and (s.width, s.height) == (34, 22)
        assert sum(1 for _ in c.decode(s)) == 3
    assert os.listdir(tmp_path) == ["p.mp4"]


def test_second_ctrl_c_abandons_the_pending_frames_without_a_partial_file(
        tmp_path, fake_model, monkeypatch, capsys):
    import signal
    import threading
    import time

    from depthpro_fast import outputs
    from depthpro_fast.commands import predict_run

    clip = tmp_path / "walk.mp4"
    make_clip(clip, frames=3)
    out = tmp_path / "out"
    release, released = threading.Event(), threading.Event()

    def slow_write(path, depth, *, text):  # frame 0 stays in its atomic write until released
        try:
            with outputs.atomic_write(path) as f:
                f.write(b"\x89PNG half a frame")
                release.wait(30)
        finally:
            released.set()

    real_forward = fake_model.forward

    def forward(x, need_fov=True):
        if len(fake_model.calls) == 3 + 1:  # 3 focal samples, frame 0, then Ctrl-C
            raise KeyboardInterrupt
        return real_forward(x, need_fov)

    notices = []
    real_announce = predict_run.announce

    def announce(bar, text):
        notices.append(text)
        real_announce(bar, text)
        if "interrupted" in text:  # the user presses Ctrl-C again while the frame is written
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()

    monkeypatch.setattr(video_io, "write_depth_frame", slow_write)
    monkeypatch.setattr(fake_model, "forward", forward)
    monkeypatch.setattr(predict_run, "announce", announce)
    t0 = time.perf_counter()
    try:
        assert run(clip, out) == 130
        assert time.perf_counter() - t0 < 20  # not held by the blocked write
        assert notices == [
            "walk.mp4: interrupted: finishing the 1 frame already computed (Ctrl-C again to "
            "abort; no partial file is left)",
            "walk.mp4: aborted: 1 computed frame not written (a rerun computes them)"]
        assert "3 frames: 0 written" in capsys.readouterr().out
        assert tmp_files(out) == []
    finally:
        release.set()
    assert released.wait(10)
    time.sleep(0.2)
    assert list((out / "walk" / "depth_mm").iterdir()) == [] and tmp_files(out) == []


def test_frames_made_with_other_weights_are_recomputed_and_record_what_made_them(
        tmp_path, fake_model, capsys):
    """A clip predicted with random weights of one seed is recomputed, not kept, when the
    weights change (as predict's images are); clip.json and every frame carry the record."""
    clip = tmp_path / "walk.mp4"
    make_clip(clip, frames=3)
    out = tmp_path / "out"
    assert run(clip, out, "--seed", "1") == 0
    folder = out / "walk"
    record = json.loads((folder / "clip.json").read_text())
    assert record["provenance"]["weights"] == "random" and record["provenance"]["seed"] == 1
    info = frame_mm(folder / "depth_mm" / "000000.png")[1]
    assert json.loads(info["depthpro_fast"])["seed"] == 1
    capsys.readouterr()
    fake_model.calls.clear()
    assert run(clip, out, "--seed", "1") == 0  # the same recipe: nothing to do
    assert "nothing left to do" in capsys.readouterr().out and fake_model.calls == []
    (folder / "depth_mm" / "000002.png").unlink()  # incomplete, and made with another seed
    assert run(clip, out, "--seed", "2") == 0
    text = capsys.readouterr().out
    assert "3 written (recomputed: the frames on disk were made with random weights of seed 1" \
        in text
    assert json.loads((folder / "clip.json").read_text())["provenance"]["seed"] == 2
    assert run(clip, out, "--seed", "2") == 0
    assert "nothing left to do" in capsys.readouterr().out
    # a complete clip of seed 2 is recomputed for seed 3 too
    assert run(clip, out, "--seed", "3") == 0
    assert "3 written (recomputed" in capsys.readouterr().out
