"""Writing predictions: NPZ, 16-bit PNG (millimetres), colour preview, PLY point cloud.

Every writer is atomic (``atomic_files.atomic_write``): an interrupted or failing write never
leaves a half-written output under the final name.

Formats (``FORMATS`` gives the file suffix of each):

* ``npz``: ``depth`` (H, W) float32 metres, ``focallength_px`` and ``fov_deg`` (float32
  scalars; ``fov_deg`` is the FOV of ``focallength_px``, whatever its source); when the FOV
  network ran, ``fov_deg_estimated`` (its estimate: equal to ``fov_deg`` unless the focal
  length was given or read from EXIF); ``intrinsics``, the 3x3 float32 camera matrix K (the
  given one, else ``focallength_px`` on both axes and the image centre); ``image_size`` [H, W];
  when known,
  ``focallength_source`` (``"estimated"``, ``"exif"`` or ``"given"``); ``random_weights``
  (True) when the network had random weights (``predict --random-weights``: the depth is
  meaningless); ``provenance``: the record of what made it (a JSON string, see below).
  ``np.load(path)`` opens it without pickle. ``compress=True`` (``predict --npz-compress``)
  deflates it (``np.savez_compressed``): smaller, slower to write, read the same way.
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
  column: ``ceil(H / stride) * ceil(W / stride)`` points; :func:`choose_ply_stride` picks the
  smallest stride that keeps at most ``PLY_MAX_POINTS``.

Provenance: every writer takes ``provenance``, a JSON-able mapping (``depthpro_fast.provenance``
builds it) stored in the file itself: the npz member ``provenance``, the PNG text chunk
``depthpro_fast`` (before the image data, so reading it decodes no pixel) and a PLY header line
``comment depthpro_fast {...}``. :func:`read_provenance` reads it back from any of them.

Memory: the PNG and PLY writers work in bands of rows (about ``BAND_PIXELS`` pixels each), so
that a 48 MP depth map needs only its own 192 MB and the output array, not gigabytes of float64
temporaries.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import intrinsics as camera
from .atomic_files import (  # noqa: F401 (public here too: the writers' module)
    OutputFolderError,
    atomic_write,
    check_output_folder,
)

FORMATS = {"npz": ".npz", "png16": ".depth_mm.png", "color": ".color.png", "ply": ".ply"}
PNG16_MAX_MM = 65535
COLOR_DEPTH_RANGE_M = (0.1, 250.0)  # depths outside saturate the preview's colours
_PNG_COMPRESS_LEVEL = 3  # zlib 3: most of the size gain of 6 at a fraction of the time
#: the key of the provenance record: PNG text chunk, PLY comment (npz member: "provenance")
PROVENANCE_KEY = "depthpro_fast"
#: the default cap of ``choose_ply_stride``: 2^22 (4.2 M points, 63 MB binary). The network
#: predicts at 1536 x 1536 (2.4 M samples): finer point clouds only interpolate it.
PLY_MAX_POINTS = 1 << 22
#: pixels per band of the banded writers (4 M float64 temporaries per band: 32 MB each)
BAND_PIXELS = 1 << 20


def row_bands(height: int, width: int, step: int = 1,
              pixels: int | None = None) -> Iterator[tuple[int, int]]:
    """``(first, stop)`` row ranges covering ``range(height)`` of about ``pixels`` pixels each
    (default ``BAND_PIXELS``); every ``first`` is a multiple of ``step`` (so a stride of
    ``step`` keeps the same rows)."""
    pixels = BAND_PIXELS if pixels is None else pixels
    rows = max(step, (max(pixels // max(width, 1), 1) // step) * step)
    for first in range(0, height, rows):
        yield first, min(first + rows, height)


def choose_ply_stride(height: int, width: int, max_points: int = PLY_MAX_POINTS) -> int:
    """The smallest stride whose point cloud (``ceil(H/s) * ceil(W/s)``) has at most
    ``max_points`` points."""
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    stride = max(1, math.isqrt(max(height * width // max_points, 1)))
    while math.ceil(height / stride) * math.ceil(width / stride) > max_points:
        stride += 1
    while stride > 1 and (math.ceil(height / (stride - 1)) * math.ceil(width / (stride - 1))
                          <= max_points):
        stride -= 1
    return stride


def _provenance_text(provenance: Mapping[str, Any] | None) -> str | None:
    if provenance is None:
        return None
    # ASCII on one line: a PLY header line, a PNG tEXt chunk (Latin-1) and an npz string
    return json.dumps(dict(provenance), sort_keys=True, ensure_ascii=True, allow_nan=False)


def read_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance record stored in an output file (npz, PNG or PLY), or None when the file
    has none, cannot be read or holds something else."""
    path = Path(path)
    text = None
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:  # lazy: only this member is read
                if "provenance" in z.files:
                    text = str(z["provenance"])
        elif path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:  # text chunks before IDAT are in .info unloaded
                text = im.info.get(PROVENANCE_KEY)
        elif path.suffix == ".ply":
            with open(path, "rb") as f:
                head = f.read(1 << 16)
            end = head.find(b"end_header")
            prefix = f"comment {PROVENANCE_KEY} ".encode()
            for line in head[:max(end, 0)].splitlines():
                if line.startswith(prefix):
                    text = line[len(prefix):].decode("ascii")
                    break
    except (OSError, ValueError, KeyError, EOFError, UnicodeDecodeError):
        return None
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


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
    d = as_depth_array(depth)
    out = np.empty(d.shape, np.uint16)
    for a, b in row_bands(*d.shape):  # float64 temporaries of one band only
        band = d[a:b].astype(np.float64)
        mm = np.rint(np.nan_to_num(band, nan=0.0, posinf=0.0, neginf=0.0) * 1000.0)
        out[a:b] = np.clip(mm, 0, PNG16_MAX_MM)
    return out


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
    out = np.empty((*t.shape, 3), np.uint8)
    acc = np.empty_like(t)
    for c, coefficients in enumerate(_TURBO_POLY):  # Horner, in place: 16 bytes per pixel
        acc.fill(coefficients[-1])
        for a in coefficients[-2::-1]:
            acc *= t
            acc += a
        out[..., c] = np.rint(np.clip(acc, 0.0, 1.0, out=acc) * 255.0)
    return out


def colorize_inverse_depth(depth: Any) -> np.ndarray:
    """The preview image: (H, W) depth in metres -> (H, W, 3) uint8, near red, far blue."""
    d = as_depth_array(depth)
    near, far = COLOR_DEPTH_RANGE_M

    def inverse(a: int, b: int) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1.0 / np.clip(np.nan_to_num(d[a:b], nan=far, posinf=far), near, far)

    bands = list(row_bands(*d.shape))
    # two passes over bands (range, then colours): bounded temporaries, the same values
    high = max(float(inverse(a, b).max()) for a, b in bands)
    low = min(float(inverse(a, b).min()) for a, b in bands)
    span = high - low
    out = np.empty((*d.shape, 3), np.uint8)
    for a, b in bands:
        inv = inverse(a, b)
        out[a:b] = turbo((inv - low) / span if span > 1e-12 else np.zeros_like(inv))
    return out


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
    parts = list(point_cloud_bands(depth, rgb, f_px, stride, intrinsics=intrinsics))
    return (np.concatenate([p for p, _ in parts]).reshape(-1, 3),
            np.concatenate([c for _, c in parts]).reshape(-1, 3))


def point_cloud_bands(depth: Any, rgb: np.ndarray, f_px: float, stride: int = 1, *,
                      intrinsics: Any = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`point_cloud` in bands of rows, in order (bounded temporaries)."""
    d = as_depth_array(depth)
    rgb = _as_rgb(rgb, d.shape)
    k = camera_of(f_px, d.shape, intrinsics)
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    height, width = d.shape
    u = np.arange(0, width, stride, dtype=np.float64)[None, :]
    for a, b in row_bands(height, width, stride, BAND_PIXELS * stride):
        z = d[a:b:stride, ::stride].astype(np.float64)
        v = np.arange(a, b, stride, dtype=np.float64)[:, None]
        x = (u - k[0, 2]) * z / k[0, 0]
        y = (v - k[1, 2]) * z / k[1, 1]
        points = np.stack([x, y, z], axis=-1).reshape(-1, 3).astype(np.float32)
        yield points, np.ascontiguousarray(rgb[a:b:stride, ::stride].reshape(-1, 3))


# ----------------------------------------------------------------------------------------------
# writers
# ----------------------------------------------------------------------------------------------


def write_npz(path: str | os.PathLike, depth: Any, focallength_px: float, fov_deg: float,
              focallength_source: str | None = None, *, fov_deg_estimated: float | None = None,
              random_weights: bool = False, provenance: Mapping[str, Any] | None = None,
              compress: bool = False, intrinsics: Any = None) -> None:
    """Depth (float32 metres), focal length (px), FOV (degrees), camera matrix ``intrinsics``
    (3x3 float32: the given one, else ``focallength_px`` on both axes and the image centre)
    and image size, atomically.

    ``fov_deg`` is the FOV of ``focallength_px``; ``fov_deg_estimated`` the network's estimate
    (stored when given, i.e. when the FOV network ran; see ``inference.postprocess``).

    ``random_weights``: the network had random weights; the file then says so
    (``random_weights`` = True), so that a meaningless depth map cannot pass for a real one.
    ``provenance``: the record of what made the file (member ``provenance``, a JSON string).
    ``compress``: deflate the members (``np.savez_compressed``)."""
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
    text = _provenance_text(provenance)
    if text is not None:
        arrays["provenance"] = np.array(text)
    with atomic_write(path) as f:
        (np.savez_compressed if compress else np.savez)(f, **arrays)


def _write_png(path: str | os.PathLike, array: np.ndarray,
               provenance: Mapping[str, Any] | None = None) -> None:
    from PIL import Image, PngImagePlugin

    image = Image.fromarray(array)
    info = None
    text = _provenance_text(provenance)
    if text is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(PROVENANCE_KEY, text)  # written before the image data
    with atomic_write(path) as f:
        image.save(f, format="PNG", compress_level=_PNG_COMPRESS_LEVEL, pnginfo=info)


def write_png16(path: str | os.PathLike, depth: Any,
                provenance: Mapping[str, Any] | None = None) -> None:
    """16-bit grayscale PNG of the depth in millimetres (see the module docstring)."""
    _write_png(path, depth_to_millimetres(depth), provenance)


def write_color(path: str | os.PathLike, depth: Any,
                provenance: Mapping[str, Any] | None = None) -> None:
    """8-bit RGB PNG preview of the inverse depth (turbo-style colormap)."""
    _write_png(path, colorize_inverse_depth(depth), provenance)


def write_ply(path: str | os.PathLike, depth: Any, rgb: np.ndarray, f_px: float,
              stride: int = 1, binary: bool = True, fov_deg: float | None = None,
              provenance: Mapping[str, Any] | None = None, *, intrinsics: Any = None) -> int:
    """Coloured point cloud (see the module docstring); returns the number of points.

    ``fov_deg`` (the FOV of ``f_px``) goes into a header comment when given, ``provenance``
    into a ``comment depthpro_fast {...}`` line; the camera matrix K (``intrinsics``, else
    ``f_px`` and the image centre) always goes into a ``comment K`` line. Written in bands of
    rows."""
    d = as_depth_array(depth)
    bands = point_cloud_bands(d, rgb, f_px, stride, intrinsics=intrinsics)  # checks arguments
    first = next(bands)
    k = camera_of(f_px, d.shape, intrinsics)
    height, width = d.shape
    n = math.ceil(height / stride) * math.ceil(width / stride)
    fov = "" if fov_deg is None else f" fov_deg {_positive_float(fov_deg, 'fov_deg'):.6f}"
    text = _provenance_text(provenance)
    record = "" if text is None else f"comment {PROVENANCE_KEY} {text}\n"
    header = ("ply\n"
              f"format {'binary_little_endian' if binary else 'ascii'} 1.0\n"
              "comment depthpro_fast: pinhole unprojection with K (pixels, OpenCV convention),"
              " OpenCV axes (x right, y down, z forward), metres\n"
              f"comment focal_length_px {float(f_px):.6f}{fov} stride {stride}\n"
              f"comment K {' '.join(f'{v:.6f}' for v in k.ravel())}\n"
              f"{record}"
              f"element vertex {n}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\n"
              "end_header\n").encode("ascii")
    vertex_type = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                            ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    written = 0
    with atomic_write(path) as f:
        f.write(header)
        for points, colours in _chain(first, bands):
            written += len(points)
            if binary:
                vertex = np.empty(len(points), dtype=vertex_type)
                vertex["x"], vertex["y"], vertex["z"] = points[:, 0], points[:, 1], points[:, 2]
                vertex["red"], vertex["green"], vertex["blue"] = (colours[:, 0], colours[:, 1],
                                                                  colours[:, 2])
                f.write(vertex.tobytes())
            else:
                chunk = 1 << 16  # bounded memory for the text of large bands
                for i in range(0, len(points), chunk):
                    p, c = points[i:i + chunk].tolist(), colours[i:i + chunk].tolist()
                    f.write("".join(f"{a:.6g} {b:.6g} {z:.6g} {r} {g} {bl}\n"
                                    for (a, b, z), (r, g, bl) in zip(p, c, strict=True)
                                    ).encode("ascii"))
        if written != n:  # the header's count must be the truth
            raise AssertionError(f"PLY {path}: {written} points written, header says {n}")
    return n


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest
