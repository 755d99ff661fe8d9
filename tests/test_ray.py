"""``predict --ray`` / ``depthpro_fast.ray_data``: a local Ray cluster (2 CPUs, no network).

Most runs use the predict tests' cheap stand-in network in the actors (``ray_helpers``), so
that they test the pipeline: the same files as single-process ``predict``, resume, a bad image,
an actor killed mid-run, a task that always kills its actor. One run uses the tiny random
network end to end through the command line, against ``predict`` without ``--ray``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'ray[data]' "
                                        "(this package's [ray] extra)")
pytest.importorskip("ray.data", reason="Ray is installed without Ray Data: pip install "
                                       "'ray[data]'")

from depthpro_fast import cli, ray_data  # noqa: E402
from depthpro_fast.commands import predict_ray, predict_run  # noqa: E402
from depthpro_fast.commands.predict_inputs import assign_names, collect_sources  # noqa: E402
from depthpro_fast.inference import Transform  # noqa: E402
from depthpro_fast.ray_inputs import fetch, list_uri, rows  # noqa: E402
from tests.conftest import TINY_DIR  # noqa: E402
from tests.test_io import exif_with, noisy_rgb, smooth_rgb  # noqa: E402
from tests.test_predict_cli import FakeDepthPro, tmp_files  # noqa: E402

HERE = Path(__file__).resolve().parent
ALL = ("npz", "png16", "color", "ply")


@pytest.fixture(scope="module")
def cluster():
    """One small local cluster for the module: 2 CPUs, no dashboard, a small object store.
    Its workers import ``ray_helpers`` (and the package) from this checkout."""
    path = os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = path  # the raylet and its workers inherit it
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def make_images(root: Path, n: int = 6, bad: bool = False) -> list[Path]:
    """Small photos: EXIF rotation and focal length, a name collision, a sub-folder, 16-bit
    grayscale, palette; ``bad`` adds a corrupt JPEG."""
    (root / "sub").mkdir(parents=True)
    files = [root / "a.jpg", root / "a.png", root / "sub" / "g16.png", root / "p.png",
             root / "sub" / "c.webp", root / "d.bmp"][:n]
    Image.fromarray(smooth_rgb(24, 36)).save(files[0], quality=95, exif=exif_with(6, f35=28))
    makers = [
        lambda p: Image.fromarray(noisy_rgb(20, 30, seed=1)).save(p),
        lambda p: Image.fromarray((np.arange(18 * 26).reshape(18, 26) * 137 % 65536)
                                  .astype(np.uint16)).save(p),
        lambda p: Image.fromarray(noisy_rgb(12, 20, seed=3)).convert("P").save(p),
        lambda p: Image.fromarray(noisy_rgb(16, 16, seed=2)).save(p, lossless=True),
        lambda p: Image.fromarray(smooth_rgb(10, 14)).save(p),
    ]
    for make, path in zip(makers, files[1:], strict=False):
        make(path)
    if bad:
        files.append(root / "broken.jpg")
        files[-1].write_bytes(b"\xff\xd8\xff not really a jpeg")
    return files


def options(outdir: Path, **kw) -> ray_data.PredictOptions:
    from ray_helpers import fake_load

    # a real file as the checkpoint: the outputs record its identity (fake_load ignores it)
    base = {"outdir": str(outdir), "formats": ALL,
            "checkpoint": str(TINY_DIR / "state_dict_fp16.pt"), "load": fake_load,
            "batch_size": 2}
    return ray_data.PredictOptions(**{**base, **kw})


def output_files(outdir: Path) -> list[str]:
    return sorted(str(p.relative_to(outdir)) for p in outdir.rglob("*") if p.is_file())


def same_record(a: str, b: str) -> bool:
    """Two provenance records alike but for the input's mtime (its bytes' hash must match)."""
    import json

    ra, rb = json.loads(a), json.loads(b)
    for r in (ra, rb):
        (r.get("input") or {}).pop("mtime_ns", None)
    return ra == rb


def assert_same_outputs(a: Path, b: Path) -> None:
    """The same files with the same content (npz members, PNG pixels, PLY bytes)."""
    names = output_files(a)
    assert names == output_files(b)
    for name in names:
        pa, pb = a / name, b / name
        if name.endswith(".npz"):
            with np.load(pa) as za, np.load(pb) as zb:
                assert sorted(za.files) == sorted(zb.files), name
                for key in za.files:
                    if key == "provenance":  # a URI's local copy has its own mtime
                        assert same_record(str(za[key]), str(zb[key])), name
                        continue
                    np.testing.assert_array_equal(za[key], zb[key], err_msg=f"{name}:{key}")
        elif name.endswith(".png"):
            np.testing.assert_array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb)),
                                          err_msg=name)
        else:  # PLY: the same bytes, but for the record's input mtime (see same_record)
            ba, bb = pa.read_bytes(), pb.read_bytes()
            key = b"comment depthpro_fast "
            if key in ba and key in bb:
                ia, ib = ba.index(key), bb.index(key)
                ea, eb = ba.index(b"\n", ia), bb.index(b"\n", ib)
                assert same_record(ba[ia + len(key):ea].decode(), bb[ib + len(key):eb].decode())
                ba, bb = ba[:ia] + ba[ea:], bb[:ib] + bb[eb:]
            assert ba == bb, name


def single_process(src: Path, outdir: Path, formats=ALL, **kw) -> predict_run.Summary:
    """``predict``'s own run, with one torch thread as in each actor (1 CPU each): the same
    arithmetic, so the same bits."""
    sources, _, _ = collect_sources([str(src)], recursive=True, outdir=outdir)
    # the recipe an actor on this CPU records (the same provenance in every file)
    kw.setdefault("recipe", options(outdir).recipe(torch.device("cpu")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return predict_run.predict_sources(
            assign_names(sources), FakeDepthPro(), Transform("cpu", torch.float32), outdir,
            formats=list(formats), progress=False, random_weights=False, **kw)
    finally:
        torch.set_num_threads(threads)


def complete_sets(outdir: Path, names: list[str], formats=ALL) -> bool:
    from depthpro_fast.commands.predict_inputs import output_paths

    return all(p.is_file() for n in names for p in output_paths(outdir, n, formats).values())


# ----------------------------------------------------------------------------------------------
# no cluster needed
# ----------------------------------------------------------------------------------------------


def test_uri_inputs_are_listed_and_named_like_local_paths(tmp_path):
    make_images(tmp_path / "in")
    (tmp_path / "in" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "in" / "a.color.png").write_bytes(b"x")  # one of our own outputs
    local, problems, _ = rows([str(tmp_path / "in")], recursive=True)
    uri = (tmp_path / "in").as_uri()
    remote, problems_uri, _ = rows([uri], recursive=True)
    assert problems == problems_uri == []
    assert [r["name"] for r in local] == [r["name"] for r in remote] == \
        ["a.jpg", "a.png", "d", "p", "sub/c", "sub/g16"]
    assert [r["source"] for r in remote] == [f"{uri}/{r['name']}" if "." in r["name"] else
                                             r["source"] for r in remote]
    assert all(r["source"].startswith(uri + "/") for r in remote)
    # a file URI, a missing one, a folder without images
    assert list_uri((tmp_path / "in" / "a.jpg").as_uri())[0][0][0].endswith("/in/a.jpg")
    assert list_uri((tmp_path / "nope").as_uri()) == ([], "no such file or folder")
    (tmp_path / "empty").mkdir()
    assert list_uri((tmp_path / "empty").as_uri())[1].startswith("no image in this folder")
    # the actor's copy is byte for byte the file (the package's loader then reads it)
    copy = fetch(f"{uri}/sub/g16.png", tmp_path)
    assert copy.suffix == ".png" and copy.read_bytes() == (tmp_path / "in/sub/g16.png").read_bytes()


def test_options_and_address_are_checked():
    with pytest.raises(ValueError, match="not to a URI"):
        ray_data.PredictOptions(outdir="s3://bucket/out")
    with pytest.raises(ValueError, match="unknown"):
        ray_data.PredictOptions(outdir="out", formats=("npz", "jpeg"))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ray_data.PredictOptions(outdir="out", batch_size=0)
    assert predict_ray.check_address("") is None
    for good in ("auto", "local", "10.0.0.1:6379", "head-node:6379", "ray://head:10001"):
        assert predict_ray.check_address(good) == good
    with pytest.raises(ValueError, match="put --ray after the paths"):
        predict_ray.check_address("photos/")


def test_a_missing_checkpoint_fails_before_any_cluster_starts(tmp_path, monkeypatch):
    from depthpro_fast.checkpoint import ENV_VAR

    make_images(tmp_path / "in", n=2)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "no_such.pt"))
    monkeypatch.setattr(ray_data, "_connect", lambda *a: pytest.fail("a cluster was started"))
    with pytest.raises(FileNotFoundError, match="no_such.pt"):
        ray_data.run([str(tmp_path / "in")], ray_data.PredictOptions(outdir=str(tmp_path / "o")))


def test_cli_passes_predict_options_to_ray(tmp_path, monkeypatch):
    seen = {}

    def fake_run(paths, opts, **kw):
        seen.update(paths=paths, options=opts, **kw)
        return predict_run.Summary(total=3, written=3, seconds=1.0)

    monkeypatch.setattr(ray_data, "run", fake_run)
    rc = cli.main(["predict", "in", "s3://b/x", "-o", str(tmp_path / "o"), "--ray", "auto",
                   "--random-weights", "--config", "tiny", "--save", "npz,ply", "--f-px", "500",
                   "--batch-size", "4", "--ray-actors", "3", "--ply-stride", "2", "--quiet"])
    assert rc == 0
    o = seen["options"]
    assert seen["paths"] == ["in", "s3://b/x"] and seen["address"] == "auto"
    assert seen["concurrency"] == 3 and seen["quiet"] is True
    assert (o.formats, o.checkpoint, o.config, o.f_px, o.batch_size, o.ply_stride) == \
        (("npz", "ply"), None, "tiny", 500.0, 4, 2)
    assert cli.main(["predict", "in", "--ray", "photos/"]) == 1  # a path taken for ADDRESS


# ----------------------------------------------------------------------------------------------
# on a local cluster
# ----------------------------------------------------------------------------------------------


def test_same_outputs_as_predict_and_resume(cluster, tmp_path):
    make_images(tmp_path / "in")
    single_process(tmp_path / "in", tmp_path / "single")
    summary = ray_data.run([str(tmp_path / "in")], options(tmp_path / "out"), recursive=True,
                           quiet=True)
    assert (summary.total, summary.written, summary.skipped, summary.failed) == (6, 6, 0, [])
    assert_same_outputs(tmp_path / "single", tmp_path / "out")
    assert tmp_files(tmp_path) == []

    # a rerun skips everything and starts no actor; a deleted output is made again, alone
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}
    again = ray_data.run([str(tmp_path / "in")], options(tmp_path / "out"), recursive=True,
                         quiet=True)
    assert (again.written, again.skipped, again.failed) == (0, 6, [])
    (tmp_path / "out" / "sub" / "c.ply").unlink()
    third = ray_data.run([str(tmp_path / "in")], options(tmp_path / "out"), recursive=True,
                         quiet=True)
    assert (third.written, third.skipped, third.failed) == (1, 5, [])
    changed = [p.name for p, t in stamps.items() if p.exists() and p.stat().st_mtime_ns != t]
    assert sorted(changed) == ["c.color.png", "c.depth_mm.png", "c.npz", "c.ply"]  # all its
    assert_same_outputs(tmp_path / "single", tmp_path / "out")


def test_uri_input_and_bad_image(cluster, tmp_path, capsys):
    make_images(tmp_path / "in", n=3, bad=True)
    summary = ray_data.run([(tmp_path / "in").as_uri()], options(tmp_path / "out"),
                           recursive=True, progress_every=1)
    assert (summary.total, summary.written, summary.skipped) == (4, 3, 0)
    [(source, why)] = summary.failed  # reported once: caught in the task, not retried
    assert source == (tmp_path / "in" / "broken.jpg").as_uri()
    assert "ImageReadError" in why and "depthpro-ray-" not in why
    err = capsys.readouterr().err
    assert "ray: 4 of 4 images to do, 2 actors (1 CPU each)" in err
    assert "ray: 4/4 images (3 written, 1 failed)" in err and "images/s" in err
    single_process(tmp_path / "in", tmp_path / "single")
    assert_same_outputs(tmp_path / "single", tmp_path / "out")
    # the bad image is tried again by a rerun (it may have been fixed), and fails again
    again = ray_data.run([(tmp_path / "in").as_uri()], options(tmp_path / "out"),
                         recursive=True, quiet=True)
    assert (again.written, again.skipped, len(again.failed)) == (0, 3, 1)


def test_actor_killed_mid_run_loses_and_duplicates_nothing(cluster, tmp_path):
    from ray_helpers import DiesOnce

    make_images(tmp_path / "in")
    names = [r["name"] for r in rows([str(tmp_path / "in")], recursive=True)[0]]
    summary = ray_data.run([str(tmp_path / "in")], options(tmp_path / "out"), recursive=True,
                           quiet=True, predictor=DiesOnce)
    assert (tmp_path / DiesOnce.marker).exists()  # an actor did die, after writing
    assert (summary.total, summary.written, summary.skipped, summary.failed) == (6, 6, 0, [])
    assert complete_sets(tmp_path / "out", names)
    assert tmp_files(tmp_path) == []  # the dead attempt's half-written file is gone
    assert len(output_files(tmp_path / "out")) == 6 * len(ALL)  # one set each, nothing else
    single_process(tmp_path / "in", tmp_path / "single")
    assert_same_outputs(tmp_path / "single", tmp_path / "out")


def test_task_that_always_kills_its_actor_is_reported_not_retried_forever(cluster, tmp_path):
    from ray_helpers import DiesOn

    make_images(tmp_path / "in", n=3)
    Image.fromarray(noisy_rgb(8, 8)).save(tmp_path / "in" / "poison.png")
    t0 = time.perf_counter()
    summary = ray_data.run([str(tmp_path / "in")], options(tmp_path / "out", batch_size=1),
                           recursive=True, quiet=True, predictor=DiesOn, max_task_retries=1,
                           concurrency=1)
    assert time.perf_counter() - t0 < 120
    assert (summary.written, summary.skipped) == (3, 0), summary
    [(source, why)] = summary.failed
    assert source.endswith("poison.png") and "failed 2 times" in why
    assert tmp_files(tmp_path) == []


def test_cli_ray_with_tiny_network_equals_predict(cluster, tmp_path):
    """End to end: the real network (the tiny fixture weights, Apple's code's test config) in
    the actors, through the command line, against the same command without --ray."""
    from tests.conftest import TINY_DIR

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(smooth_rgb(24, 36)).save(src / "a.jpg", quality=95,
                                             exif=exif_with(6, f35=28))
    Image.fromarray(noisy_rgb(20, 30, seed=1)).save(src / "b.png")
    common = [str(src), "--checkpoint", str(TINY_DIR / "state_dict_fp16.pt"), "--config",
              str(TINY_DIR / "config.json"), "--dtype", "float32",
              "--save", "all", "--quiet", "--batch-size", "2"]
    assert cli.main(["predict", *common, "-o", str(tmp_path / "single")]) == 0
    torch_threads = torch.get_num_threads()
    assert cli.main(["predict", *common, "-o", str(tmp_path / "out"), "--ray"]) == 0
    assert torch.get_num_threads() == torch_threads
    names = output_files(tmp_path / "out")
    assert names == output_files(tmp_path / "single") and len(names) == 8
    for name in names:
        a, b = tmp_path / "single" / name, tmp_path / "out" / name
        if name.endswith(".npz"):
            with np.load(a) as za, np.load(b) as zb:
                assert sorted(za.files) == sorted(zb.files)
                for key in za.files:  # other thread counts: float rounding only
                    if za[key].dtype.kind == "f":
                        np.testing.assert_allclose(za[key], zb[key], rtol=1e-4, err_msg=name)
                    else:
                        np.testing.assert_array_equal(za[key], zb[key], err_msg=name)
        elif name.endswith(".depth_mm.png"):
            diff = np.abs(np.asarray(Image.open(a), np.int64) - np.asarray(Image.open(b)))
            assert diff.max() <= 1, name
