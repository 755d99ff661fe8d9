"""Output writers: values read back, the PLY geometry, and atomic writes under failure."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from PIL import Image

from depthpro_fast import outputs


def read_ply(path) -> tuple[dict, np.ndarray]:
    """A small PLY reader (vertex element with float x y z and uchar colours): (header, rows)."""
    data = open(path, "rb").read()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header_lines = data[:end].decode("ascii").splitlines()
    assert header_lines[0] == "ply"
    fmt = header_lines[1].split()[1]
    count = next(int(line.split()[2]) for line in header_lines
                 if line.startswith("element vertex"))
    props = [line.split()[1:] for line in header_lines if line.startswith("property")]
    assert props == [["float", "x"], ["float", "y"], ["float", "z"], ["uchar", "red"],
                     ["uchar", "green"], ["uchar", "blue"]]
    dtype = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"),
                      ("blue", "u1")])
    body = data[end:]
    if fmt == "binary_little_endian":
        assert len(body) == count * dtype.itemsize  # nothing missing, nothing extra
        rows = np.frombuffer(body, dtype=dtype)
    else:
        assert fmt == "ascii"
        lines = body.decode("ascii").splitlines()
        assert len(lines) == count
        values = np.array([line.split() for line in lines], dtype=np.float64)
        rows = np.empty(count, dtype=dtype)
        for i, name in enumerate(dtype.names):
            rows[name] = values[:, i]
    return {"format": fmt, "count": count, "lines": header_lines}, rows


def random_depth(h: int = 30, w: int = 41, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 60.0, (h, w)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# formats
# ----------------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    depth = random_depth()
    path = tmp_path / "a.npz"
    outputs.write_npz(path, depth, 123.5, 61.25, focallength_source="exif")
    with np.load(path) as z:  # no pickle needed
        assert z["depth"].dtype == np.float32 and np.array_equal(z["depth"], depth)
        assert z["focallength_px"] == np.float32(123.5) and z["fov_deg"] == np.float32(61.25)
        assert z["image_size"].tolist() == [30, 41]
        assert str(z["focallength_source"]) == "exif"
        assert "fov_deg_estimated" not in z.files and "random_weights" not in z.files
    outputs.write_npz(path, depth, 123.5, 61.25, fov_deg_estimated=48.5, random_weights=True)
    with np.load(path) as z:
        assert z["fov_deg_estimated"] == np.float32(48.5) and bool(z["random_weights"])
    for bad in (0.0, float("nan")):
        with pytest.raises(ValueError, match="fov_deg"):
            outputs.write_npz(tmp_path / "b.npz", depth, 123.5, bad)
    assert not (tmp_path / "b.npz").exists()


def test_png16_round_trip_within_1mm(tmp_path):
    depth = random_depth()
    depth[0, 0], depth[0, 1], depth[0, 2], depth[0, 3] = 80.0, 65.535, np.nan, 1e-4
    path = tmp_path / "a.depth_mm.png"
    outputs.write_png16(path, depth)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16") and im.format == "PNG"
        mm = np.asarray(im).astype(np.int64)
    assert mm.shape == depth.shape
    ok = np.isfinite(depth) & (depth <= 65.535)
    assert np.abs(mm[ok] / 1000.0 - depth[ok]).max() <= 0.0005 + 1e-6  # rounded to the mm
    assert mm[0, 0] == 65535  # beyond 65.535 m: saturated
    assert mm[0, 1] == 65535
    assert mm[0, 2] == 0  # non-finite
    assert mm[0, 3] == 0  # below half a millimetre


def test_color_preview(tmp_path):
    depth = np.tile(np.linspace(0.5, 20.0, 50, dtype=np.float32), (20, 1))  # near left, far right
    path = tmp_path / "a.color.png"
    outputs.write_color(path, depth)
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size == (50, 20)
        rgb = np.asarray(im).astype(int)
    # inverse depth normalised between its min and max: t = 1 near, 0 far
    inv = 1 / depth[0]
    t = (inv - inv.min()) / (inv.max() - inv.min())
    assert np.array_equal(rgb[0], outputs.turbo(t))
    near, far = rgb[0, 0], rgb[0, np.argmin(np.abs(t - 0.15))]
    assert near[0] > near[2] + 50  # near: red end of turbo
    assert far[2] > far[0] + 50  # far: blue (the very end of turbo is almost black)
    # constant depth and NaN do not break it
    flat = outputs.colorize_inverse_depth(np.full((4, 5), 3.0, np.float32))
    assert flat.shape == (4, 5, 3) and flat.dtype == np.uint8
    nan = outputs.colorize_inverse_depth(np.full((4, 5), np.nan, np.float32))
    assert nan.dtype == np.uint8


def test_turbo_is_blue_to_red_through_green():
    colours = outputs.turbo(np.array([0.0, 0.15, 0.5, 0.85, 1.0])).astype(int)
    assert colours.shape == (5, 3) and colours.dtype == np.int64
    assert colours[1, 2] > colours[1, 0]  # blue
    assert colours[2, 1] > max(colours[2, 0], colours[2, 2])  # green in the middle
    assert colours[3, 0] > colours[3, 2]  # red
    assert outputs.turbo(np.array([-1.0, 2.0, np.nan])).shape == (3, 3)  # clipped, no error


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("stride", [1, 3])
def test_ply_parses_with_right_count_and_geometry(tmp_path, binary, stride):
    h, w, f = 7, 10, 12.5
    depth = random_depth(h, w)
    rgb = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path = tmp_path / "a.ply"
    n = outputs.write_ply(path, depth, rgb, f, stride=stride, binary=binary)
    header, rows = read_ply(path)
    expected_count = math.ceil(h / stride) * math.ceil(w / stride)
    assert n == header["count"] == len(rows) == expected_count
    assert header["format"] == ("binary_little_endian" if binary else "ascii")
    # pixel (v, u) -> x = (u + 0.5 - W/2) z / f, y = (v + 0.5 - H/2) z / f, z = depth
    vs, us = np.meshgrid(np.arange(0, h, stride), np.arange(0, w, stride), indexing="ij")
    z = depth[vs, us].ravel()
    rtol = 1e-6 if binary else 1e-5
    np.testing.assert_allclose(rows["z"], z, rtol=rtol)
    np.testing.assert_allclose(rows["x"], (us.ravel() + 0.5 - w / 2) * z / f, rtol=rtol,
                               atol=1e-6)
    np.testing.assert_allclose(rows["y"], (vs.ravel() + 0.5 - h / 2) * z / f, rtol=rtol,
                               atol=1e-6)
    colours = np.stack([rows["red"], rows["green"], rows["blue"]], 1)
    assert np.array_equal(colours, rgb[::stride, ::stride].reshape(-1, 3))


def test_bad_arguments(tmp_path):
    depth = random_depth(4, 5)
    with pytest.raises(TypeError):
        outputs.write_png16(tmp_path / "a.png", depth.astype(np.int32))
    with pytest.raises(TypeError):
        outputs.write_npz(tmp_path / "a.npz", [[1.0]], 1.0, 1.0)
    with pytest.raises(ValueError, match="H, W"):
        outputs.write_color(tmp_path / "a.png", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        outputs.write_ply(tmp_path / "a.ply", depth, np.zeros((5, 4, 3), np.uint8), 10.0)
    with pytest.raises(ValueError, match="f_px"):
        outputs.write_ply(tmp_path / "a.ply", depth, np.zeros((4, 5, 3), np.uint8), 0.0)
    with pytest.raises(ValueError, match="stride"):
        outputs.write_ply(tmp_path / "a.ply", depth, np.zeros((4, 5, 3), np.uint8), 1.0,
                          stride=0)
    assert os.listdir(tmp_path) == []  # nothing written by failed calls


def test_torch_depth_accepted(tmp_path):
    import torch

    depth = torch.rand(6, 7, dtype=torch.float16) + 1
    outputs.write_npz(tmp_path / "t.npz", depth, 10.0, 50.0)
    with np.load(tmp_path / "t.npz") as z:
        assert z["depth"].dtype == np.float32
        assert np.array_equal(z["depth"], depth.float().numpy())


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------


def test_atomic_write_success_leaves_only_the_file(tmp_path):
    target = tmp_path / "sub" / "x.bin"
    with outputs.atomic_write(target) as f:
        f.write(b"hello")
        assert not target.exists()  # not visible under its name before the end
    assert target.read_bytes() == b"hello"
    assert os.listdir(target.parent) == ["x.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # usual permissions, not 0600


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_write_failure_leaves_nothing(tmp_path, error):
    target = tmp_path / "x.bin"
    with pytest.raises(type(error)):
        with outputs.atomic_write(target) as f:
            f.write(b"half of the data")
            raise error
    assert os.listdir(tmp_path) == []  # no final file, no temporary file


@pytest.mark.parametrize("fmt", ["npz", "png16", "color", "ply"])
def test_interrupted_writer_keeps_old_file_and_no_temp(tmp_path, monkeypatch, fmt):
    """A writer that dies halfway (simulated: the file object fails after some bytes)."""
    depth = random_depth(40, 50)
    rgb = np.zeros((40, 50, 3), np.uint8)
    path = tmp_path / f"img{outputs.FORMATS[fmt]}"

    def write(p):
        if fmt == "npz":
            outputs.write_npz(p, depth, 30.0, 60.0)
        elif fmt == "png16":
            outputs.write_png16(p, depth)
        elif fmt == "color":
            outputs.write_color(p, depth)
        else:
            outputs.write_ply(p, depth, rgb, 30.0)

    write(path)
    old = path.read_bytes()

    real_atomic_write = outputs.atomic_write

    class Failing:
        """Wraps the temporary file: accepts 100 bytes, then raises as a full disk would."""

        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 100:
                self.f.write(bytes(b)[:10])
                raise OSError(28, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    import contextlib

    @contextlib.contextmanager
    def failing_atomic_write(p):
        with real_atomic_write(p) as f:
            yield Failing(f)

    monkeypatch.setattr(outputs, "atomic_write", failing_atomic_write)
    depth = depth + 1.0  # a different result, which must not half-replace the old file
    with pytest.raises(OSError, match="No space"):
        write(path)
    assert path.read_bytes() == old  # the previous complete file is untouched
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left behind


# ----------------------------------------------------------------------------------------------
# the output folder is checked before any work
# ----------------------------------------------------------------------------------------------


def test_check_output_folder_accepts_and_leaves_nothing(tmp_path):
    assert outputs.check_output_folder(tmp_path) == tmp_path
    assert list(tmp_path.iterdir()) == []  # the probe is gone
    new = tmp_path / "a" / "b"
    assert outputs.check_output_folder(new) == new
    assert list(tmp_path.iterdir()) == []  # a missing folder is not created by the check


def test_check_output_folder_refusals(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(outputs.OutputFolderError, match="it is a file, not a folder"):
        outputs.check_output_folder(f)
    with pytest.raises(outputs.OutputFolderError, match=r"file is a file, not a folder"):
        outputs.check_output_folder(f / "sub" / "deeper")
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(outputs.OutputFolderError, match="broken symbolic link"):
        outputs.check_output_folder(link / "out")
    err = outputs.OutputFolderError("x")
    assert isinstance(err, OSError)

    import errno
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(outputs.OutputFolderError,
                       match=f"cannot write to output folder {tmp_path}: no space left"):
        outputs.check_output_folder(tmp_path)
