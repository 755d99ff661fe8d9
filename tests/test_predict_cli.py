"""``depthpro-fast predict``: inputs and names, batching, outputs, skip / overwrite, failures.

Most runs use a cheap stand-in network (same ``infer`` post-processing, a forward that costs
nothing) to exercise the command's logic; one run uses the tiny fixture model end to end and
compares the files with ``model.infer``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from depthpro_fast import cli, outputs
from depthpro_fast.commands import predict, predict_run
from depthpro_fast.inference import Transform
from depthpro_fast.io import load_image
from tests.conftest import TINY_DIR
from tests.test_io import exif_with, noisy_rgb, smooth_rgb
from tests.test_outputs import read_ply


class FakeDepthPro(torch.nn.Module):
    """Stands in for DepthPro: content-dependent outputs, ~free forward, the real ``infer``."""

    backend = "reference"

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.calls: list[int] = []  # batch size of each forward

    def forward(self, x, need_fov: bool = True):  # DepthPro.forward's signature
        assert x.shape[1:] == (3, 1536, 1536)
        self.calls.append(x.shape[0])
        cid = (x.mean(1, keepdim=True) + 1.5) * self.scale
        fov = 40.0 + 10.0 * (x.mean(dim=(1, 2, 3)) + 1.0).reshape(-1, 1, 1, 1)
        return cid, fov

    @torch.no_grad()
    def infer(self, x, f_px=None):
        from depthpro_fast.inference import infer

        return infer(self, x, f_px)


def dummy_checkpoint(monkeypatch, folder: Path) -> Path:
    """A file for ``--checkpoint some.pt`` and for ``auto`` ($DEPTHPRO_CHECKPOINT): the stand-in
    load never reads it, but the outputs record its fingerprint."""
    path = folder / "some.pt"
    path.write_bytes(b"stand-in weights")
    monkeypatch.setenv("DEPTHPRO_CHECKPOINT", str(path))
    return path


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a mistaken default -o lands in the test's folder
    dummy_checkpoint(monkeypatch, tmp_path)
    model = FakeDepthPro()
    loads = []

    def fake_load(checkpoint, **kwargs):
        loads.append((checkpoint, kwargs))
        return model, Transform("cpu", torch.float32)

    monkeypatch.setattr("depthpro_fast.api.load", fake_load)
    model.loads = loads
    return model


def make_tree(root: Path) -> dict[str, Path]:
    """A folder of mixed images: EXIF focal + rotation, a name collision, sub-folders, a corrupt
    file, and files that must be ignored."""
    (root / "sub" / "deeper").mkdir(parents=True)
    files = {
        "a.jpg": root / "a.jpg",
        "a.png": root / "a.png",
        "gray16": root / "sub" / "gray16.png",
        "deep": root / "sub" / "deeper" / "x.webp",
        "broken": root / "broken.jpg",
    }
    Image.fromarray(smooth_rgb(24, 36)).save(files["a.jpg"], quality=95,
                                             exif=exif_with(6, f35=28))
    Image.fromarray(noisy_rgb(20, 30, seed=1)).save(files["a.png"])
    g16 = (np.arange(18 * 26).reshape(18, 26) * 137 % 65536).astype(np.uint16)
    Image.fromarray(g16).save(files["gray16"])
    Image.fromarray(noisy_rgb(16, 16, seed=2)).save(files["deep"], lossless=True)
    files["broken"].write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(noisy_rgb(8, 8)).save(root / ".hidden.png")
    return files


def tmp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------
# inputs, names, options
# ----------------------------------------------------------------------------------------------


def test_collect_sources_and_unique_names(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    make_tree(root)
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(noisy_rgb(8, 8)).save(other / "a.png")  # same relative path as in/a.png
    Image.fromarray(noisy_rgb(8, 8)).save(other / "kept.color.png")  # looks like our output
    out = root / "results"  # the output folder inside the input folder is not an input
    out.mkdir()
    Image.fromarray(noisy_rgb(8, 8)).save(out / "old.png")

    sources, problems, left_out = predict.collect_sources(
        [str(root), str(other), str(root / "a.png"), str(tmp_path / "nope")], recursive=True,
        outdir=out)
    assert left_out == {}
    rels = sorted(str(s.rel) for s in sources)
    assert rels == ["a.jpg", "a.png", "a.png", "broken.jpg", "sub/deeper/x.webp",
                    "sub/gray16.png"]  # in/a.png given twice is taken once
    assert problems == [(str(tmp_path / "nope"), "no such file or folder")]
    names = dict((str(s.path), n) for s, n in predict.assign_names(sources))
    assert names[str(root / "a.jpg")] == "a.jpg"  # a.jpg / a.png collide on "a"
    assert {names[str(root / "a.png")], names[str(other / "a.png")]} == {"a.png", "a.png~2"}
    assert names[str(root / "sub" / "gray16.png")] == "sub/gray16"
    assert names[str(root / "broken.jpg")] == "broken"
    assert len(set(names.values())) == len(names)

    flat, _, left_out = predict.collect_sources([str(root)], recursive=False, outdir=out)
    assert sorted(str(s.rel) for s in flat) == ["a.jpg", "a.png", "broken.jpg"]
    assert left_out == {str(root): 1}  # sub/ (results/ is the output folder: not counted)

    globbed, problems, _ = predict.collect_sources([str(root / "sub" / "*.png"),
                                                    str(root / "**" / "*.webp"),
                                                    str(root / "*.gif")])
    assert sorted(str(s.rel) for s in globbed) == ["gray16.png", "sub/deeper/x.webp"]
    assert problems == [(str(root / "*.gif"), "no image matches this pattern")]

    paths = predict.output_paths(tmp_path / "o", "sub/gray16", ["npz", "png16", "color", "ply"])
    assert paths == {"npz": tmp_path / "o" / "sub" / "gray16.npz",
                     "png16": tmp_path / "o" / "sub" / "gray16.depth_mm.png",
                     "color": tmp_path / "o" / "sub" / "gray16.color.png",
                     "ply": tmp_path / "o" / "sub" / "gray16.ply"}


def test_parse_save():
    assert predict.parse_save("npz,color") == ["npz", "color"]
    assert predict.parse_save(" PLY , npz,ply") == ["ply", "npz"]
    assert predict.parse_save("all") == list(outputs.FORMATS)
    with pytest.raises(ValueError, match="jpeg"):
        predict.parse_save("npz,jpeg")


def test_bad_options_exit_cleanly(tmp_path, capsys):
    for extra in (["--save", "exr"], ["--f-px", "-3"], ["--batch-size", "0"],
                  ["--ply-stride", "0"]):
        assert cli.main(["predict", str(tmp_path), "-o", str(tmp_path / "o"), *extra]) == 1
        assert "error" in capsys.readouterr().err
    # nothing to do at all: a clear error
    assert cli.main(["predict", str(tmp_path), "-o", str(tmp_path / "o")]) == 1
    assert "no images found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# batching (stand-in network)
# ----------------------------------------------------------------------------------------------


def test_infer_batch_equals_infer_per_image():
    model = FakeDepthPro()
    transform = Transform()
    images = [transform(noisy_rgb(20, 30, seed=3)),
              transform(torch.rand(3, 1536, 1536)),  # no resize at all
              transform(noisy_rgb(33, 17, seed=4))]
    f_pxs = [None, 900.0, 25.0]
    batched = predict.infer_batch(model, images, f_pxs)
    assert model.calls == [3]
    for x, f, got in zip(images, f_pxs, batched, strict=True):
        want = model.infer(x, f_px=f)
        assert got["depth"].shape == want["depth"].shape == x.shape[1:]
        for key in ("depth", "focallength_px", "fov_deg"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# the command (stand-in network)
# ----------------------------------------------------------------------------------------------


def test_folder_run_corrupt_file_skip_and_overwrite(tmp_path, fake_model, capsys):
    root = tmp_path / "in"
    root.mkdir()
    files = make_tree(root)
    out = tmp_path / "out"
    args = ["predict", str(root), "-o", str(out), "--recursive", "--save", "all",
            "--batch-size", "2", "--quiet", "--checkpoint", "some.pt", "--config", "tiny"]

    assert cli.main(args) == 1  # one file failed
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "corrupt" in captured.err
    assert "5 images: 4 written, 0 skipped (made the same way), 1 failed" in captured.out
    assert fake_model.loads[0][0] == "some.pt" and fake_model.loads[0][1]["config"] == "tiny"
    # --dtype auto on a CPU (fast path): bf16-mixed where it has bf16 arithmetic (AVX512_BF16
    # / AMX), else fp32
    from depthpro_fast.cpu import cpu_default_precision

    assert fake_model.loads[0][1]["dtype"] == cpu_default_precision(True)
    assert sorted(fake_model.calls) == [2, 2]  # 4 readable images in batches of 2

    expected = ["a.jpg", "a.png", "sub/gray16", "sub/deeper/x"]
    for name in expected:
        for suffix in outputs.FORMATS.values():
            assert (out / (name + suffix)).is_file(), name + suffix
    assert not list(out.glob("broken*"))
    assert tmp_files(out) == []
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert len(written) == 4 * len(outputs.FORMATS)

    # values: the npz equals infer on the loaded image with the EXIF focal length
    rgb, f_exif = load_image(files["a.jpg"])
    assert rgb.shape == (36, 24, 3)  # EXIF orientation 6 applied
    assert f_exif == pytest.approx(28 * math.hypot(24, 36) / math.hypot(36, 24))
    want = fake_model.infer(Transform()(rgb), f_px=f_exif)
    with np.load(out / "a.jpg.npz") as z:
        assert z["depth"].shape == (36, 24) and z["image_size"].tolist() == [36, 24]
        np.testing.assert_allclose(z["depth"], want["depth"].numpy(), rtol=1e-6)
        assert float(z["focallength_px"]) == pytest.approx(f_exif, rel=1e-6)
        assert str(z["focallength_source"]) == "exif"
    with np.load(out / "a.png.npz") as z:
        assert str(z["focallength_source"]) == "estimated"
    with Image.open(out / "a.jpg.color.png") as im:
        assert im.size == (24, 36)  # same size as the (upright) input
    header, rows = read_ply(out / "sub" / "gray16.ply")
    assert header["count"] == 18 * 26

    # rerun: everything done is skipped, untouched; the broken file fails again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    fake_model.calls.clear()
    assert cli.main(args) == 1
    assert "4 skipped" in capsys.readouterr().out
    assert fake_model.calls == []
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

    # a missing output makes the image run again; --overwrite runs everything
    (out / "a.png.color.png").unlink()
    assert cli.main(["predict", str(files["a.png"])] + args[2:]) == 0
    assert "1 written" in capsys.readouterr().out
    assert cli.main(["predict", str(files["a.jpg"]), "-o", str(out), "--save", "npz",
                     "--overwrite", "--f-px", "100", "--quiet"]) == 0
    with np.load(out / "a.npz") as z:  # given alone, the file is not in a collision
        assert float(z["focallength_px"]) == 100.0
        assert str(z["focallength_source"]) == "given"
    assert cli.main(["predict", str(files["a.jpg"]), "-o", str(out), "--save", "npz",
                     "--overwrite", "--ignore-exif", "--quiet"]) == 0
    with np.load(out / "a.npz") as z:
        assert str(z["focallength_source"]) == "estimated"


def test_missing_argument_is_a_failure_but_others_run(tmp_path, fake_model, capsys):
    img = tmp_path / "ok.png"
    Image.fromarray(noisy_rgb(10, 12)).save(img)
    rc = cli.main(["predict", str(img), str(tmp_path / "missing.jpg"), "-o",
                   str(tmp_path / "out"), "--quiet"])
    assert rc == 1
    captured = capsys.readouterr()
    assert "missing.jpg: no such file or folder" in captured.err
    assert (tmp_path / "out" / "ok.npz").is_file() and (tmp_path / "out" / "ok.color.png").is_file()


def test_fast_flag_loads_the_fast_path(tmp_path, fake_model):
    img = tmp_path / "ok.png"
    Image.fromarray(noisy_rgb(10, 12)).save(img)
    # on a CPU the default is the fast path; --no-fast is the reference path
    for i, (extra, expected) in enumerate((([], True), (["--no-fast"], False),
                                           (["--fast"], True))):
        fake_model.loads.clear()
        rc = cli.main(["predict", str(img), "-o", str(tmp_path / f"out{i}"), "--quiet",
                       *extra])
        assert rc == 0
        assert [kw["fast"] for _, kw in fake_model.loads] == [expected]


def test_failed_write_is_reported_and_leaves_no_partial_file(tmp_path, fake_model, monkeypatch,
                                                             capsys):
    for i in range(3):
        Image.fromarray(noisy_rgb(10, 12, seed=i)).save(tmp_path / f"img{i}.png")
    real = outputs.write_ply

    def flaky_write_ply(path, *args, **kwargs):
        if "img1" in str(path):
            with outputs.atomic_write(path) as f:
                f.write(b"ply\npartial")
                raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(outputs, "write_ply", flaky_write_ply)
    out = tmp_path / "out"
    assert cli.main(["predict", str(tmp_path), "-o", str(out), "--save", "npz,ply",
                     "--quiet"]) == 1
    assert "img1.png" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["img0.npz", "img0.ply", "img1.npz",
                                                    "img2.npz", "img2.ply"]
    # img1 is incomplete (no ply), so the next run computes it again
    monkeypatch.setattr(outputs, "write_ply", real)
    assert cli.main(["predict", str(tmp_path), "-o", str(out), "--save", "npz,ply",
                     "--quiet"]) == 0
    assert "1 written, 2 skipped" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# errors before the model loads; an honest summary
# ----------------------------------------------------------------------------------------------


def two_photos(root: Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.fromarray(noisy_rgb(10, 12, seed=i)).save(root / f"p{i}.png")
    return [str(root / "p0.png"), str(root / "p1.png")]


def only_error(err: str) -> str:
    """The one error line of a run that stopped before any work."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case", ["is a file", "under a file", "not writable", "read-only",
                                  "cannot be created"])
def test_unusable_output_folder_is_refused_before_the_model(tmp_path, fake_model, monkeypatch,
                                                           capsys, case):
    photos = two_photos(tmp_path / "in")
    (tmp_path / "a_file").write_text("x")
    out, expected = {
        "is a file": (tmp_path / "a_file", "it is a file, not a folder"),
        "under a file": (tmp_path / "a_file" / "out", "a_file is a file, not a folder"),
        "not writable": (tmp_path / "ro", "cannot write to output folder (-o)"),
        "read-only": (tmp_path / "ro", "the file system is read-only"),
        "cannot be created": (tmp_path / "ro" / "new" / "deeper", "creating a folder in"),
    }[case]
    (tmp_path / "ro").mkdir()
    if case in ("not writable", "read-only", "cannot be created"):
        import errno
        import tempfile

        real = tempfile.mkdtemp
        code = errno.EROFS if case == "read-only" else errno.EACCES

        def refusing_mkdtemp(*args, dir=None, **kwargs):  # root ignores chmod: simulate it
            if Path(dir) == tmp_path / "ro":
                raise OSError(code, os.strerror(code))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkdtemp", refusing_mkdtemp)
    assert cli.main(["predict", *photos, "-o", str(out), "--quiet"]) == 1
    line = only_error(capsys.readouterr().err)
    assert expected in line and str(out) in line, line
    if case == "not writable":
        assert line.endswith("permission denied")
    assert fake_model.loads == [] and fake_model.calls == []  # no model, no image
    assert sorted(p.name for p in (tmp_path / "ro").iterdir()) == []  # nothing created


def test_unavailable_backend_is_refused_before_the_model(tmp_path, fake_model, capsys):
    from depthpro_fast import backends

    photos = two_photos(tmp_path / "in")
    ok, why = backends.backend_status("cuda", torch.device("cpu"))
    assert not ok
    assert cli.main(["predict", *photos, "-o", str(tmp_path / "out"), "--quiet", "--device",
                     "cpu", "--backend", "cuda"]) == 1
    line = only_error(capsys.readouterr().err)
    assert f"backend 'cuda' cannot run on cpu: {why}" in line and "--backend auto" in line
    assert fake_model.loads == [] and not (tmp_path / "out").exists()


def test_missing_paths_alone_are_nothing_to_do(tmp_path, fake_model, capsys):
    rc = cli.main(["predict", str(tmp_path / "missing.jpg"), str(tmp_path / "*.png"), "-o",
                   str(tmp_path / "out")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "missing.jpg: no such file or folder" in err
    assert "*.png: no image matches this pattern" in err
    assert ("no images found: none of the 2 paths given is or matches an image (see above); "
            "nothing to do") in err
    assert fake_model.loads == []


def test_summary_counts_images_not_missing_paths(tmp_path, fake_model, capsys):
    photos = two_photos(tmp_path / "in")
    rc = cli.main(["predict", photos[0], str(tmp_path / "missing.jpg"), str(tmp_path / "*.gif"),
                   "-o", str(tmp_path / "out"), "--quiet"])
    assert rc == 1  # a path that matched nothing is still a mistake worth an exit code
    out = capsys.readouterr().out
    assert "1 image: 1 written, 0 skipped (made the same way), 0 failed, in " in out
    assert "2 arguments matched no image" in out
    assert "missing.jpg: no such file or folder" in out  # listed under "no image:"
    seconds, rate = (float(v) for v in re.search(r"in ([\d.]+) s \(([\d.]+) images/s\)",
                                                 out).groups())
    # one image over the run's time (both printed rounded), not 3 "images" over ~0 s
    assert 1 / (seconds + 0.05) - 0.005 <= rate
    assert seconds < 0.05 or rate <= 1 / (seconds - 0.05) + 0.005


def test_nothing_left_to_do_does_not_load_the_model(tmp_path, fake_model, capsys):
    photos = two_photos(tmp_path / "in")
    out = tmp_path / "out"
    assert cli.main(["predict", *photos, "-o", str(out), "--quiet"]) == 0
    assert len(fake_model.loads) == 1
    capsys.readouterr()
    assert cli.main(["predict", *photos, "-o", str(out), "--quiet"]) == 0
    assert len(fake_model.loads) == 1  # not loaded again
    text = capsys.readouterr().out
    assert "nothing left to do (--overwrite recomputes), model not loaded" in text
    assert "2 images: 0 written, 2 skipped (made the same way), 0 failed" in text
    assert "images/s" not in text
    # a folder that became read-only is no obstacle when nothing needs writing
    assert cli.main(["predict", *photos, "-o", str(out), "--quiet", "--overwrite"]) == 0
    assert len(fake_model.loads) == 2


def test_folder_without_recursive_says_what_it_left_out(tmp_path, fake_model, capsys):
    root = tmp_path / "in"
    two_photos(root)
    for sub in ("2023", "2024", ".cache"):
        two_photos(root / sub)
    out = root / "out"  # inside the input folder: the output folder is not counted
    assert cli.main(["predict", str(root), "-o", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    note = f"2 sub-folders of {root} not searched (-r / --recursive takes them)"
    assert note in captured.err and note in captured.out
    assert "2 images: 2 written" in captured.out
    assert cli.main(["predict", str(root), "-o", str(out), "--quiet", "-r"]) == 0
    captured = capsys.readouterr()
    assert "not searched" not in captured.err + captured.out
    assert "6 images: 4 written, 2 skipped" in captured.out
    # only sub-folders: the "no images" error says where they are
    empty_top = tmp_path / "top"
    two_photos(empty_top / "sub")
    assert cli.main(["predict", str(empty_top), "-o", str(tmp_path / "o2")]) == 1
    line = only_error(capsys.readouterr().err)
    assert "no images found" in line and "1 sub-folder of" in line and "takes it" in line


# ----------------------------------------------------------------------------------------------
# one FOV rule in the files, with and without --fast
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_models():
    """A small random model (reference modules) and its fast-path copy."""
    import copy

    import depthpro_fast
    from tests.model_helpers import MICRO

    torch.manual_seed(12)
    model, _ = depthpro_fast.load(None, config=MICRO, device="cpu", backend="reference")
    return model, copy.deepcopy(model).prepare_fast(True)


def test_fov_rule_in_files_is_the_same_with_and_without_fast(tmp_path, monkeypatch,
                                                             micro_models, capsys):
    model, fast = micro_models
    dummy_checkpoint(monkeypatch, tmp_path)
    monkeypatch.setattr("depthpro_fast.api.load",
                        lambda checkpoint, **kw: (fast if kw["fast"] else model, Transform()))
    photo = tmp_path / "photo.jpg"  # 600 px wide, EXIF 50 mm (35 mm equivalent) = 833.3 px
    Image.fromarray(smooth_rgb(400, 600)).save(photo, quality=95, exif=exif_with(f35=50))
    f_exif = load_image(photo)[1]
    assert f_exif == pytest.approx(833.3, abs=0.1)
    runs = {}
    for use_fast in (False, True):
        for extra in ((), ("--f-px", "1000"), ("--ignore-exif",)):
            out = tmp_path / f"out-{use_fast}-{'-'.join(extra)}"
            argv = ["predict", str(photo), "-o", str(out), "--save", "npz,ply", "--quiet",
                    *extra, "--fast" if use_fast else "--no-fast"]
            assert cli.main(argv) == 0, capsys.readouterr().err
            with np.load(out / "photo.npz") as z:
                runs[use_fast, extra] = {k: z[k].item() for k in z.files if z[k].ndim == 0}
            header, _ = read_ply(out / "photo.ply")
            comment = next(line for line in header["lines"] if "focal_length_px" in line).split()
            assert float(comment[comment.index("fov_deg") + 1]) == pytest.approx(
                runs[use_fast, extra]["fov_deg"], abs=1e-5)

    def fov(f):
        return math.degrees(2 * math.atan(300 / f))

    for extra, f in (((), f_exif), (("--f-px", "1000"), 1000.0)):
        ref, fst = runs[False, extra], runs[True, extra]
        assert ref["fov_deg"] == fst["fov_deg"] == pytest.approx(fov(f), abs=1e-3)
        assert ref["focallength_px"] == fst["focallength_px"] == pytest.approx(f, rel=1e-6)
        assert "fov_deg_estimated" in ref  # the reference path runs the FOV network ...
        assert "fov_deg_estimated" not in fst  # ... the fast path skips it
    ref, fst = runs[False, ("--ignore-exif",)], runs[True, ("--ignore-exif",)]
    for r in (ref, fst):  # estimated: fov_deg is the estimate, the FOV of focallength_px
        assert r["fov_deg"] == r["fov_deg_estimated"]
        assert r["fov_deg"] == pytest.approx(fov(r["focallength_px"]), rel=1e-5)
    assert ref["fov_deg"] == pytest.approx(fst["fov_deg"], abs=0.05)
    assert runs[False, ()]["fov_deg_estimated"] == pytest.approx(ref["fov_deg"], abs=1e-4)


# ----------------------------------------------------------------------------------------------
# trying predict without Apple's checkpoint
# ----------------------------------------------------------------------------------------------


def test_random_weights_runs_without_a_checkpoint_and_says_so(tmp_path, fake_model, capsys):
    img = tmp_path / "photo.png"
    Image.fromarray(noisy_rgb(10, 12)).save(img)
    out = tmp_path / "out"
    assert cli.main(["predict", "--config", "tiny", "--random-weights", str(img), "-o", str(out),
                     "--quiet"]) == 0
    checkpoint, kwargs = fake_model.loads[0]
    assert checkpoint is None and kwargs["config"] == "tiny"
    captured = capsys.readouterr()
    assert "MEANINGLESS" in captured.err and "MEANINGLESS" in captured.out  # before and after
    assert "random weights" in captured.out
    with np.load(out / "photo.npz") as z:
        assert bool(z["random_weights"]) is True
    # with a checkpoint: no note and no flag in the file
    fake_model.loads.clear()
    assert cli.main(["predict", "--checkpoint", "some.pt", str(img), "-o", str(out), "--quiet",
                     "--overwrite"]) == 0
    assert fake_model.loads[0][0] == "some.pt"
    captured = capsys.readouterr()
    assert "MEANINGLESS" not in captured.err + captured.out
    with np.load(out / "photo.npz") as z:
        assert "random_weights" not in z.files
    fake_model.loads.clear()
    assert cli.main(["predict", str(img), "-o", str(out), "--quiet", "--overwrite"]) == 0
    # the default, auto, resolved before the load (the file loaded is the file recorded)
    assert fake_model.loads[0][0] == str(tmp_path / "some.pt")


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint", "None"], "--checkpoint None: no such file. To run without Apple's weights "
                               "pass --random-weights --config tiny"),
    (["--checkpoint", "random"], "pass --random-weights --config tiny"),
    (["--checkpoint", "none"], "pass --random-weights --config tiny"),
    (["--random-weights"], "--random-weights needs --config: tiny"),
    (["--random-weights", "--config", "tiny", "--checkpoint", "x.pt"], "exclude each other"),
])
def test_checkpoint_choice_errors(tmp_path, fake_model, capsys, extra, message):
    img = tmp_path / "photo.png"
    Image.fromarray(noisy_rgb(10, 12)).save(img)
    assert cli.main(["predict", str(img), "-o", str(tmp_path / "out"), "--quiet", *extra]) == 1
    assert message in capsys.readouterr().err
    assert fake_model.loads == []  # refused before any loading


def test_readme_random_weights_command_works(tmp_path, monkeypatch, capsys):
    """The README's no-download line, for real: `predict --config tiny --random-weights`."""
    monkeypatch.chdir(tmp_path)
    Image.fromarray(smooth_rgb(30, 40)).save("photo.jpg", quality=95)
    assert cli.main(["predict", "--config", "tiny", "--random-weights", "photo.jpg",
                     "--quiet", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "1 image: 1 written" in captured.out and "MEANINGLESS" in captured.out
    with np.load(tmp_path / "depthpro_out" / "photo.npz") as z:
        assert z["depth"].shape == (30, 40) and np.isfinite(z["depth"]).all()
        assert bool(z["random_weights"]) is True
    assert (tmp_path / "depthpro_out" / "photo.color.png").is_file()


# ----------------------------------------------------------------------------------------------
# end to end with the tiny fixture model
# ----------------------------------------------------------------------------------------------


def test_tiny_model_end_to_end_batched(tmp_path, tiny_model, capsys):
    """Real network, batch of 2, all formats; files read back equal ``model.infer``."""
    model, transform = tiny_model
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    jpg = root / "cam.jpg"
    Image.fromarray(smooth_rgb(30, 40)).save(jpg, quality=95, exif=exif_with(8, f35=35))
    png = root / "sub" / "scan.png"
    Image.fromarray((np.arange(24 * 20).reshape(24, 20) * 97 % 65536).astype(np.uint16)).save(png)
    (root / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    out = tmp_path / "out"
    rc = cli.main(["predict", str(root), "-o", str(out), "--recursive", "--save", "all",
                   "--batch-size", "2", "--ply-stride", "2", "--quiet", "--device", "cpu",
                   "--backend", "reference", "--checkpoint", str(TINY_DIR / "state_dict_fp16.pt"),
                   "--config", str(TINY_DIR / "config.json"),
                   "--dtype", "fp32"])  # as the fp32 model it is compared with (auto: bf16
    assert rc == 1                      # on a CPU with bf16 arithmetic)
    captured = capsys.readouterr()
    assert "zz_corrupt.png" in captured.err
    assert "3 images: 2 written, 0 skipped (made the same way), 1 failed" in captured.out

    for src, name, source in ((jpg, "cam", "exif"), (png, "sub/scan", "estimated")):
        rgb, f_exif = load_image(src)
        want = model.infer(transform(rgb), f_px=f_exif)
        want_depth = want["depth"].numpy()
        with np.load(out / f"{name}.npz") as z:
            depth = z["depth"]
            assert depth.dtype == np.float32 and depth.shape == rgb.shape[:2]
            np.testing.assert_allclose(depth, want_depth, rtol=1e-4)  # batched vs one image
            assert float(z["focallength_px"]) == pytest.approx(float(want["focallength_px"]),
                                                               rel=1e-5)
            assert float(z["fov_deg"]) == pytest.approx(float(want["fov_deg"]), rel=1e-5)
            assert str(z["focallength_source"]) == source
        with Image.open(out / f"{name}.depth_mm.png") as im:
            mm = np.asarray(im).astype(np.int64)
        ok = depth <= 65.535
        assert np.abs(mm[ok] / 1000.0 - depth[ok]).max() <= 0.001  # within 1 mm
        assert (mm[~ok] == 65535).all()
        with Image.open(out / f"{name}.color.png") as im:
            assert im.mode == "RGB" and im.size == (rgb.shape[1], rgb.shape[0])
        header, rows = read_ply(out / f"{name}.ply")
        assert header["count"] == math.ceil(rgb.shape[0] / 2) * math.ceil(rgb.shape[1] / 2)
        np.testing.assert_allclose(rows["z"], depth[::2, ::2].ravel(), rtol=1e-6)
    assert tmp_files(out) == []
    assert not list(out.glob("zz_corrupt*"))
    assert os.path.isdir(out / "sub")


def test_fp16_on_a_cpu_is_said_once_in_command_line_words(tmp_path, monkeypatch, capsys):
    from depthpro_fast import api

    monkeypatch.setattr(api, "cpu_flags", lambda: frozenset({"avx2", "f16c"}))
    seen = []

    def no_inference(named, model, *args, **kwargs):  # the load is what this test is about
        seen.append(next(model.parameters()).dtype)
        return predict.Summary(total=len(named), written=len(named), seconds=1.0)

    monkeypatch.setattr(predict, "predict_sources", no_inference)
    img = tmp_path / "photo.png"
    Image.fromarray(noisy_rgb(10, 12)).save(img)
    assert cli.main(["predict", str(img), "-o", str(tmp_path / "out"), "--random-weights",
                     "--config", "tiny", "--device", "cpu", "--dtype", "fp16", "--quiet"]) == 0
    assert seen == [torch.float16]  # kept, not remapped
    err = capsys.readouterr().err
    warnings_ = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings_) == 1, err
    assert warnings_[0].startswith("depthpro-fast predict: warning: --dtype fp16 on this CPU: "
                                   "it has no float16 arithmetic")
    assert "Use --dtype fp32" in warnings_[0] and "RuntimeWarning" not in err


# ----------------------------------------------------------------------------------------------
# Ctrl-C while outputs are written
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def ctrl_c_run(tmp_path, fake_model, monkeypatch):
    """Three images; the second forward is a Ctrl-C; the first image's colour preview stays
    in its atomic write (half a file in a hidden temporary) until ``release`` is set."""
    import threading

    for i in range(3):
        Image.fromarray(noisy_rgb(10, 12, seed=i)).save(tmp_path / f"img{i}.png")
    release, released = threading.Event(), threading.Event()
    notices: list[str] = []

    def slow_color(path, depth, provenance=None):
        try:
            with outputs.atomic_write(path) as f:
                f.write(b"\x89PNG half a file")
                release.wait(30)
        finally:  # also when the rename fails: the temporary was removed by the abort
            released.set()

    real_forward = fake_model.forward

    def forward(x, need_fov=True):
        if len(fake_model.calls) == 1:
            raise KeyboardInterrupt
        return real_forward(x, need_fov)

    monkeypatch.setattr(outputs, "write_color", slow_color)
    monkeypatch.setattr(fake_model, "forward", forward)
    out = tmp_path / "out"
    argv = ["predict", str(tmp_path), "-o", str(out), "--quiet"]
    yield argv, out, release, released, notices
    release.set()  # let an abandoned writer go in any case


def test_ctrl_c_finishes_the_computed_outputs_and_prints_the_partial_summary(
        ctrl_c_run, monkeypatch, capsys):
    argv, out, release, released, notices = ctrl_c_run
    real_announce = predict_run.announce

    def announce(bar, text):
        notices.append(text)
        real_announce(bar, text)
        release.set()  # the pending write can only finish after the notice

    monkeypatch.setattr(predict_run, "announce", announce)
    assert cli.main(argv) == 130
    assert notices == ["interrupted: finishing the 2 outputs of 1 image already computed "
                       "(Ctrl-C again to abort them; no partial file is left)"]
    captured = capsys.readouterr()
    assert ("interrupted: 3 images: 1 written, 0 skipped (made the same way), 0 failed, "
            "2 not done, in ") in captured.out
    assert "a rerun with the same arguments continues" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["img0.color.png", "img0.npz"]
    assert (out / "img0.color.png").read_bytes() == b"\x89PNG half a file"  # complete write
    assert tmp_files(out) == []


def test_second_ctrl_c_aborts_promptly_and_leaves_no_temporary_file(ctrl_c_run, monkeypatch,
                                                                   capsys):
    import signal
    import threading
    import time

    argv, out, release, released, notices = ctrl_c_run
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    real_announce = predict_run.announce
    sent = []

    def announce(bar, text):
        notices.append(text)
        real_announce(bar, text)
        if text.startswith("interrupted"):  # the user presses Ctrl-C again while it waits
            def press():
                time.sleep(0.3)
                sent.append(time.perf_counter())
                os.kill(os.getpid(), signal.SIGINT)
            threading.Thread(target=press, daemon=True).start()

    monkeypatch.setattr(predict_run, "announce", announce)
    rc = cli.main(argv)
    returned = time.perf_counter()
    assert rc == 130
    assert returned - sent[0] < 3.0  # not held by the write, which is still blocked
    assert not released.is_set()
    assert notices[1] == "aborted: the outputs of 1 image were not written (a rerun computes it)"
    captured = capsys.readouterr()
    assert "interrupted: 3 images: 0 written, 0 skipped (made the same way), 0 failed, 3 not done" \
        in captured.out
    assert tmp_files(out) == []  # the abandoned write's hidden temporary is gone
    release.set()  # the abandoned writer wakes up: it must not put a file in place now
    assert released.wait(10)
    time.sleep(0.2)
    assert sorted(p.name for p in out.iterdir()) == ["img0.npz"]  # the rerun redoes img0
    assert tmp_files(out) == []


def test_cpu_defaults_fast_path_and_the_cpu_dtype(tmp_path, fake_model, capsys):
    """On a CPU predict runs the fast path by default (--no-fast: the reference) and --dtype
    auto is bf16-mixed where the CPU has bf16 arithmetic (bf16 with --no-fast), else fp32; the
    summary says which."""
    from depthpro_fast.cpu import cpu_default_precision

    img = tmp_path / "photo.png"
    Image.fromarray(noisy_rgb(10, 12)).save(img)
    out = tmp_path / "out"
    base = ["predict", "--config", "tiny", "--random-weights", str(img), "-o", str(out),
            "--device", "cpu", "--quiet", "--overwrite"]
    assert cli.main(base) == 0
    kwargs = fake_model.loads[-1][1]
    assert kwargs["fast"] is True
    assert kwargs["dtype"] == cpu_default_precision(True)
    assert cli.main(base + ["--no-fast", "--dtype", "fp32"]) == 0
    assert fake_model.loads[-1][1]["fast"] is False
    assert "reference path, float32" in capsys.readouterr().out
    assert predict._resolve_fast(None, torch.device("cuda")) is False
    assert predict._resolve_dtype("auto", torch.device("cuda")) == "float16"
