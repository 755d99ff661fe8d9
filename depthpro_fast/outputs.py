"""Writing predictions: NPZ, 16-bit PNG (millimetres), colour preview, PLY point cloud.

Every writer is atomic: the data goes to a hidden temporary file in the destination folder
(``.<name>.<random>.tmp``), is flushed and fsynced, and only then renamed over the final name
with ``os.replace``. An interrupted or failing write therefore never leaves a half-written
output under the final name (an older complete file stays as it was), and the temporary file
is removed on any error. (A process killed with SIGKILL may leave a hidden ``.tmp`` file, never
a broken output.)

Formats (``FORMATS`` gives the file suffix of each):

* ``npz``: ``depth`` (H, W) float32 metres, ``focallength_px`` and ``fov_deg`` (float32
  scalars; ``fov_deg`` is the FOV of ``focallength_px``, whatever its source); when the FOV
  network ran, ``fov_deg_estimated`` (its estimate: equal to ``fov_deg`` unless the focal
  length was given or read from EXIF); ``intrinsics``, the 3x3 float32 camera matrix K (the
  given one, else ``focallength_px`` on both axes and the image centre); ``image_size`` [H, W];
  when known,
  ``focallength_source`` (``"estimated"``, ``"exif"`` or ``"given"``); ``random_weights``
  (True) when the network had random weights (``predict --random-weights``: the depth is
  meaningless). ``np.load(path)`` opens it without pickle.
* ``png16``: 16-bit grayscale PNG of the depth in millimetres, rounded to the nearest mm. The
  range of uint16 caps it: depths beyond 65.535 m are stored as 65535 (saturated), depths below
  0.5 mm (and any non-finite value) as 0. Read back with ``depth_m = png / 1000``.
* ``color``: 8-bit RGB PNG, same size as the image, of the inverse depth through a turbo-style
  colormap (near = red, far = blue). The inverse depth is normalised between its own minimum and
  maximum within [1/250, 1/0.1] 1/m, i.e. depths outside 0.1 .. 250 m saturate the colours.
* ``ply``: coloured point cloud (``x y z`` float32 metres, ``red green blue`` uint8), binary
  little-endian by default or ASCII. Pinhole unprojection with the camera matrix K (the given
  intrinsics, else the focal length ``f`` on both axes and the principal point at the image
  centre, ``cx = (W - 1) / 2``, ``cy = (H - 1) / 2``; OpenCV's convention, pixel (column u,
  row v) centred at (u, v)): ``x = (u - cx) * z / fx``, ``y = (v - cy) * z / fy``,
  ``z = depth`` (OpenCV camera axes: x right, y down, z forward); K is in a header comment
  (``comment K`` and its nine values, row by row). ``stride`` keeps every stride-th row and
  column: ``ceil(H / stride) * ceil(W / stride)`` points.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from . import intrinsics as camera

FORMATS = {"npz": ".npz", "png16": ".depth_mm.png", "color": ".color.png", "ply": ".ply"}
PNG16_MAX_MM = 65535
COLOR_DEPTH_RANGE_M = (0.1, 250.0)  # depths outside saturate the preview's colours
_PNG_COMPRESS_LEVEL = 3  # zlib 3: most of the size gain of 6 at a fraction of the time


# ----------------------------------------------------------------------------------------------
# atomic files
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Open a temporary file next to ``path`` for binary writing; rename it to ``path`` when the
    block succeeds, delete it when the block raises (including KeyboardInterrupt)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # "xb": never clobber; the file gets the usual permissions (umask), unlike mkstemp's 0600
    f = open(tmp, "xb")  # noqa: SIM115 (closed below on every path)
    try:
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        finally:
            f.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class OutputFolderError(OSError):
    """The output folder cannot be used: it is a file, cannot be created, or is not writable."""


_ERRNO_WORDS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EROFS: "the file system is read-only", errno.ENOSPC: "no space left",
                errno.EDQUOT: "disk quota exceeded",
                # an existing folder that answers "no such file" to a new entry: /proc and alike
                errno.ENOENT: "that file system does not accept new folders"}


def check_output_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Fail fast, with one message naming the folder and the reason, if outputs cannot be
    written under ``folder``: it is a file, lies under a file, or it (or, when it does not
    exist yet, the folder it would be created in) does not accept new entries.

    Nothing is left behind: the probe is a hidden folder created and removed at once, and a
    missing ``folder`` is not created here (the first output creates it). Returns the path."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"cannot use {what} {os.fspath(folder)}: it is a file, not a "
                                "folder; pick another one")
    target = path.absolute()
    while not target.exists() and not target.is_symlink():  # the nearest existing ancestor
        target = target.parent
    if target.is_symlink() and not target.exists():
        raise OutputFolderError(f"cannot create {what} {os.fspath(folder)}: {target} is a "
                                "broken symbolic link")
    if not target.is_dir():
        raise OutputFolderError(f"cannot create {what} {os.fspath(folder)}: {target} is a "
                                "file, not a folder")
    try:  # the only reliable test (permissions, ACLs, read-only mounts, root): try it
        os.rmdir(tempfile.mkdtemp(prefix=".depthpro-write-test-", dir=target))
    except OSError as e:
        reason = _ERRNO_WORDS.get(e.errno, e.strerror or type(e).__name__)
        if target == path.absolute():
            raise OutputFolderError(f"cannot write to {what} {os.fspath(folder)}: "
                                    f"{reason}") from None
        raise OutputFolderError(f"cannot create {what} {os.fspath(folder)}: creating a folder "
                                f"in {target} fails: {reason}") from None
    return path


# ----------------------------------------------------------------------------------------------
# conversions
# ----------------------------------------------------------------------------------------------


def as_depth_array(depth: Any) -> np.ndarray:
    """A (H, W) depth map (numpy array or torch tensor) as a float32 numpy array."""
    if hasattr(depth, "detach") and hasattr(depth, "cpu"):  # torch.Tensor, without importing it
        depth = depth.detach().float().cpu().numpy()
    if not isinstance(depth, np.ndarray):
        raise TypeError(f"depth must be a numpy array or a torch tensor, got "
                        f"{type(depth).__name__}")
    if depth.ndim != 2 or depth.shape[0] < 1 or depth.shape[1] < 1:
        raise ValueError(f"depth must be a non-empty (H, W) map, got shape {depth.shape}")
    if not np.issubdtype(depth.dtype, np.floating):
        raise TypeError(f"depth must be a float array (metres), got {depth.dtype}")
    return np.ascontiguousarray(depth, dtype=np.float32)


def _as_rgb(rgb: Any, shape: tuple[int, int]) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
        raise TypeError("rgb must be a uint8 numpy array (H, W, 3), got "
                        f"{getattr(rgb, 'dtype', type(rgb).__name__)}")
    if rgb.shape != (*shape, 3):
        raise ValueError(f"rgb must have shape {(*shape, 3)} (the depth map's size), got "
                         f"{rgb.shape}")
    return rgb


def _positive_float(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {v}")
    return v


def depth_to_millimetres(depth: Any) -> np.ndarray:
    """Depth in metres -> uint16 millimetres, rounded, clipped to 0..65535 (non-finite -> 0)."""
    d = as_depth_array(depth).astype(np.float64)
    mm = np.rint(np.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0) * 1000.0)
    return np.clip(mm, 0, PNG16_MAX_MM).astype(np.uint16)


# Turbo colormap, polynomial approximation: each channel is a degree-5 polynomial in t
# (coefficients of 1, t, t^2, ..., t^5), the published fit of Google's Turbo (2019).
_TURBO_POLY = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
])


def turbo(t: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) -> uint8 RGB of shape ``t.shape + (3,)``; 0 blue, 1 red."""
    t = np.clip(np.nan_to_num(np.asarray(t, dtype=np.float64), nan=0.0), 0.0, 1.0)
    powers = np.stack([t ** k for k in range(6)], axis=-1)  # (..., 6)
    rgb = powers @ _TURBO_POLY.T  # (..., 3)
    return np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def colorize_inverse_depth(depth: Any) -> np.ndarray:
    """The preview image: (H, W) depth in metres -> (H, W, 3) uint8, near red, far blue."""
    d = as_depth_array(depth)
    near, far = COLOR_DEPTH_RANGE_M
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.clip(np.nan_to_num(d, nan=far, posinf=far), near, far)
    high, low = float(inv.max()), float(inv.min())
    span = high - low
    t = (inv - low) / span if span > 1e-12 else np.zeros_like(inv)
    return turbo(t)


def camera_of(f_px: float, shape: tuple[int, int], intrinsics: Any = None) -> np.ndarray:
    """The 3x3 K of an output: ``intrinsics`` ((fx, fy, cx, cy) or K) when given, else
    ``f_px`` on both axes with the principal point at the image centre."""
    if intrinsics is not None:
        return camera.as_matrix(intrinsics)
    return camera.centred(_positive_float(f_px, "f_px"), *shape)


def point_cloud(depth: Any, rgb: np.ndarray, f_px: float, stride: int = 1, *,
                intrinsics: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Unproject a depth map: -> (points (N, 3) float32 metres, colours (N, 3) uint8).

    ``intrinsics``: (fx, fy, cx, cy) or a 3x3 K (pixels, OpenCV convention); without it
    ``f_px`` on both axes and the image centre. Pixel (column u, row v) goes to
    ``x = (u - cx) z / fx``, ``y = (v - cy) z / fy``, ``z = depth``."""
    d = as_depth_array(depth)
    rgb = _as_rgb(rgb, d.shape)
    k = camera_of(f_px, d.shape, intrinsics)
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    height, width = d.shape
    z = d[::stride, ::stride].astype(np.float64)
    v = np.arange(0, height, stride, dtype=np.float64)[:, None]
    u = np.arange(0, width, stride, dtype=np.float64)[None, :]
    x = (u - k[0, 2]) * z / k[0, 0]
    y = (v - k[1, 2]) * z / k[1, 1]
    points = np.stack([x, y, z], axis=-1).reshape(-1, 3).astype(np.float32)
    colours = np.ascontiguousarray(rgb[::stride, ::stride].reshape(-1, 3))
    return points, colours


# ----------------------------------------------------------------------------------------------
# writers
# ----------------------------------------------------------------------------------------------


def write_npz(path: str | os.PathLike, depth: Any, focallength_px: float, fov_deg: float,
              focallength_source: str | None = None, *, fov_deg_estimated: float | None = None,
              random_weights: bool = False, intrinsics: Any = None) -> None:
    """Depth (float32 metres), focal length (px), FOV (degrees), camera matrix ``intrinsics``
    (3x3 float32: the given one, else ``focallength_px`` on both axes and the image centre)
    and image size, atomically.

    ``fov_deg`` is the FOV of ``focallength_px``; ``fov_deg_estimated`` the network's estimate
    (stored when given, i.e. when the FOV network ran; see ``inference.postprocess``).

    ``random_weights``: the network had random weights; the file then says so
    (``random_weights`` = True), so that a meaningless depth map cannot pass for a real one."""
    d = as_depth_array(depth)
    arrays = {"depth": d,
              "focallength_px": np.float32(_positive_float(focallength_px, "focallength_px")),
              "fov_deg": np.float32(_positive_float(fov_deg, "fov_deg")),
              "image_size": np.array(d.shape, dtype=np.int32),
              "intrinsics": camera_of(focallength_px, d.shape, intrinsics).astype(np.float32)}
    if fov_deg_estimated is not None:
        arrays["fov_deg_estimated"] = np.float32(_positive_float(fov_deg_estimated,
                                                                 "fov_deg_estimated"))
    if focallength_source is not None:
        arrays["focallength_source"] = np.array(str(focallength_source))
    if random_weights:
        arrays["random_weights"] = np.array(True)
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def _write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    from PIL import Image

    image = Image.fromarray(array)
    with atomic_write(path) as f:
        image.save(f, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)


def write_png16(path: str | os.PathLike, depth: Any) -> None:
    """16-bit grayscale PNG of the depth in millimetres (see the module docstring)."""
    _write_png(path, depth_to_millimetres(depth))


def write_color(path: str | os.PathLike, depth: Any) -> None:
    """8-bit RGB PNG preview of the inverse depth (turbo-style colormap)."""
    _write_png(path, colorize_inverse_depth(depth))


def write_ply(path: str | os.PathLike, depth: Any, rgb: np.ndarray, f_px: float,
              stride: int = 1, binary: bool = True, fov_deg: float | None = None, *,
              intrinsics: Any = None) -> int:
    """Coloured point cloud (see the module docstring); returns the number of points.

    ``fov_deg`` (the FOV of ``f_px``) goes into a header comment when given; the camera
    matrix K (``intrinsics``, else ``f_px`` and the image centre) always does."""
    points, colours = point_cloud(depth, rgb, f_px, stride, intrinsics=intrinsics)
    k = camera_of(f_px, as_depth_array(depth).shape, intrinsics)
    n = len(points)
    fov = "" if fov_deg is None else f" fov_deg {_positive_float(fov_deg, 'fov_deg'):.6f}"
    header = ("ply\n"
              f"format {'binary_little_endian' if binary else 'ascii'} 1.0\n"
              "comment depthpro_fast: pinhole unprojection with K (pixels, OpenCV convention),"
              " OpenCV axes (x right, y down, z forward), metres\n"
              f"comment focal_length_px {float(f_px):.6f}{fov} stride {stride}\n"
              f"comment K {' '.join(f'{v:.6f}' for v in k.ravel())}\n"
              f"element vertex {n}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\n"
              "end_header\n").encode("ascii")
    with atomic_write(path) as f:
        f.write(header)
        if binary:
            vertex = np.empty(n, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                        ("red", "u1"), ("green", "u1"), ("blue", "u1")])
            vertex["x"], vertex["y"], vertex["z"] = points[:, 0], points[:, 1], points[:, 2]
            vertex["red"], vertex["green"], vertex["blue"] = (colours[:, 0], colours[:, 1],
                                                              colours[:, 2])
            f.write(vertex.tobytes())
        else:
            chunk = 1 << 16  # bounded memory for the text formatting of large clouds
            for start in range(0, n, chunk):
                p, c = points[start:start + chunk], colours[start:start + chunk]
                lines = [f"{a:.6g} {b:.6g} {z:.6g} {r} {g} {bl}\n"
                         for (a, b, z), (r, g, bl) in zip(p.tolist(), c.tolist(), strict=True)]
                f.write("".join(lines).encode("ascii"))
    return n
