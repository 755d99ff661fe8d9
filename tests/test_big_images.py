"""Big photos: the depth resized back in bands, writers with bounded memory, the PLY stride
chosen to cap the point count, an optional deflated npz, and a summary that says so."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from depthpro_fast import cli, outputs
from depthpro_fast.commands import predict_post
from depthpro_fast.inference import postprocess
from tests import test_predict_cli
from tests.test_io import smooth_rgb
from tests.test_outputs import read_ply

fake_model = test_predict_cli.fake_model  # the stand-in network's fixture


def network_output(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, 1536, 1536, generator=g) + 0.05, torch.tensor([[[[55.0]]]])


@pytest.mark.parametrize("height, width", [(1700, 2300), (37, 53), (1536, 1536), (2000, 300)])
def test_depth_in_bands_equals_the_full_size_resize(height, width):
    cid, _ = network_output()
    got = predict_post.depth_in_bands(cid, 0.7, height, width, band_pixels=1 << 18)
    full = torch.nn.functional.interpolate(cid * 0.7, (height, width), mode="bilinear",
                                           align_corners=False)
    want = (1 / full.clamp(1e-4, 1e4))[0, 0].numpy()
    assert got.dtype == np.float32 and got.shape == (height, width)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("f_px", [None, 900.0])
def test_banded_post_process_is_infers_post_process(monkeypatch, f_px):
    """The banded path takes the focal length and FOV from postprocess at one row: they depend
    on the width only (this test fails if that ever changes)."""
    cid, fov = network_output(1)
    height, width = 700, 1100
    monkeypatch.setattr(predict_post, "BANDED_ABOVE_PIXELS", 0)
    got = predict_post.post_process(cid, fov, f_px, height, width)
    f = None if f_px is None else torch.tensor([f_px])
    want = postprocess(cid, fov, f, height, width)
    assert isinstance(got["depth"], np.ndarray)
    np.testing.assert_allclose(got["depth"], want["depth"].numpy(), rtol=1e-6, atol=0)
    assert set(got) == set(want)
    for key in set(want) - {"depth"}:
        assert torch.equal(got[key], want[key]), key


def peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_writers_work_in_bands_of_rows(tmp_path, monkeypatch):
    """1.5 MP in bands of 64 K pixels: the PNG and PLY writers' numpy peak stays near their
    output (before: float64 copies of the whole map, 6 of them for the colour polynomial)."""
    monkeypatch.setattr(outputs, "BAND_PIXELS", 1 << 16)
    h, w = 1000, 1500
    depth = np.random.default_rng(0).uniform(0.3, 80.0, (h, w)).astype(np.float32)
    rgb = np.zeros((h, w, 3), np.uint8)
    whole = h * w * 8 / 2**20  # one float64 copy of the map: 11.4 MiB
    assert peak_mib(lambda: outputs.depth_to_millimetres(depth)) < 0.5 * whole
    assert peak_mib(lambda: outputs.colorize_inverse_depth(depth)) < 0.8 * whole  # out: 0.4x
    assert peak_mib(lambda: outputs.write_ply(tmp_path / "a.ply", depth, rgb, 900.0)) < whole
    # and the values are those of the whole-map arithmetic
    inv = 1.0 / np.clip(depth, 0.1, 250.0)
    want = outputs.turbo((inv - inv.min()) / (inv.max() - inv.min()))
    assert np.array_equal(outputs.colorize_inverse_depth(depth), want)
    mm = np.clip(np.rint(depth.astype(np.float64) * 1000), 0, 65535).astype(np.uint16)
    assert np.array_equal(outputs.depth_to_millimetres(depth), mm)
    header, rows = read_ply(tmp_path / "a.ply")
    assert header["count"] == h * w
    np.testing.assert_array_equal(rows["z"], depth.ravel())


@pytest.mark.parametrize("height, width, stride", [
    (1536, 1536, 1), (2048, 2048, 1), (2049, 2048, 2), (3024, 4032, 2), (6000, 8000, 4),
    (4000, 6000, 3), (1, 10_000_000, 3), (100_000, 1, 1)])
def test_choose_ply_stride_is_the_smallest_under_the_cap(height, width, stride):
    cap = outputs.PLY_MAX_POINTS
    assert outputs.choose_ply_stride(height, width) == stride

    def points(s):
        return math.ceil(height / s) * math.ceil(width / s)

    assert points(stride) <= cap and (stride == 1 or points(stride - 1) > cap)
    assert outputs.choose_ply_stride(height, width, max_points=1) == max(height, width)
    with pytest.raises(ValueError, match="max_points"):
        outputs.choose_ply_stride(10, 10, 0)


def test_big_photo_run_says_what_was_chosen(tmp_path, fake_model, monkeypatch, capsys):
    """A 2100 x 2100 photo (4.4 MP) with a 4 MP banding threshold stands in for a 48 MP one."""
    monkeypatch.setattr(predict_post, "BANDED_ABOVE_PIXELS", 4 << 20)
    from depthpro_fast.commands import predict, predict_run

    monkeypatch.setattr(predict_run, "BANDED_ABOVE_PIXELS", 4 << 20)
    monkeypatch.setattr(predict, "BANDED_ABOVE_PIXELS", 4 << 20)
    Image.fromarray(smooth_rgb(2100, 2100)).save(tmp_path / "big.png")
    out = tmp_path / "out"
    argv = ["predict", str(tmp_path / "big.png"), "-o", str(out), "--save", "npz,ply",
            "--quiet", "--random-weights", "--config", "tiny"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "PLY: stride 2 for 1 image (at most 4194304 points; --ply-stride 1 keeps every " \
           "pixel)" in text
    assert "1 image above 4.2 MP (largest 4.4 MP): depth resized back in bands of rows; npz " \
           "18 MB uncompressed (--npz-compress deflates it)" in text
    header, _ = read_ply(out / "big.ply")
    assert header["count"] == 1050 * 1050
    assert outputs.read_provenance(out / "big.ply")["ply_stride"] == 2
    plain = (out / "big.npz").stat().st_size
    with np.load(out / "big.npz") as z:
        depth = z["depth"]
    assert depth.shape == (2100, 2100) and np.isfinite(depth).all()
    # compression changes no value and is no reason to recompute; --overwrite rewrites
    assert cli.main([*argv, "--npz-compress", "--overwrite"]) == 0
    assert "--npz-compress deflates" not in capsys.readouterr().out
    assert (out / "big.npz").stat().st_size < plain
    with np.load(out / "big.npz") as z:
        assert np.array_equal(z["depth"], depth)
    assert cli.main([*argv, "--npz-compress"]) == 0
    assert "nothing left to do" in capsys.readouterr().out
