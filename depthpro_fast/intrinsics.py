"""Camera intrinsics: the 3x3 matrix K, its checks and spellings, and the image-centre default.

``K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` in pixels of the image as read (after EXIF
orientation), in OpenCV's convention: the centre of pixel (column u, row v) is at (u, v), so
the image centre is ((W - 1) / 2, (H - 1) / 2). Without intrinsics (a focal length from EXIF,
``f_px`` or the FOV estimate) K is that focal length on both axes with the principal point at
the image centre. Zero skew only.

Metric depth uses fx: DepthPro scales its canonical inverse depth by ``W / f`` (the official
``inverse_depth = canonical * W / f_px``, with ``f_px = 0.5 W / tan(fov / 2)`` from the
horizontal field of view), so the focal length it needs is the one along the width. fy and the
principal point change nothing in the depth map (z along the optical axis); they place the
points of the point cloud.

This module imports numpy only at load (``outputs`` uses it without torch); the tensor helper
imports torch when called.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

#: What the ``intrinsics`` argument accepts, for messages.
ACCEPTED = ("(fx, fy, cx, cy) or a 3x3 K (numpy, tensor or nested lists), or one of those per "
            "image: a list, a (B, 4) or a (B, 3, 3) array")


def camera_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` as float64, after :func:`check_values`."""
    fx, fy, cx, cy = check_values(fx, fy, cx, cy)
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def centred(f_px: float, height: int, width: int) -> np.ndarray:
    """K of a focal length ``f_px`` on both axes with the principal point at the image centre
    (what EXIF, ``f_px`` and the FOV estimate give)."""
    return camera_matrix(f_px, f_px, (width - 1) / 2.0, (height - 1) / 2.0)


def check_values(fx: Any, fy: Any, cx: Any, cy: Any, where: str = "intrinsics",
                 ) -> tuple[float, float, float, float]:
    """Four finite numbers with fx, fy > 0 (the principal point may lie outside the image, as
    after a crop)."""
    values = []
    for name, v in zip(("fx", "fy", "cx", "cy"), (fx, fy, cx, cy), strict=True):
        if isinstance(v, bool) or not isinstance(v, (numbers.Real, np.generic)):
            raise TypeError(f"{where}: {name} must be a number of pixels, got {v!r}")
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"{where}: {name} must be finite, got {v}")
        values.append(v)
    if values[0] <= 0 or values[1] <= 0:
        raise ValueError(f"{where}: fx and fy must be > 0 (pixels), got fx={values[0]}, "
                         f"fy={values[1]}")
    return values[0], values[1], values[2], values[3]


def from_matrix(k: Any, where: str = "intrinsics") -> np.ndarray:
    """A 3x3 K (array-like) -> float64 K, refused unless ``[[fx, 0, cx], [0, fy, cy], [0, 0,
    1]]`` (zero skew)."""
    k = np.asarray(k, dtype=np.float64)
    if k.shape != (3, 3):
        raise ValueError(f"{where}: a camera matrix must be 3x3, got shape {k.shape}")
    if not np.isfinite(k).all():
        raise ValueError(f"{where}: K has non-finite values: {k.tolist()}")
    if k[0, 1] != 0 or k[1, 0] != 0 or k[2].tolist() != [0.0, 0.0, 1.0]:
        raise ValueError(f"{where}: K must be [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] (no skew), "
                         f"got {k.tolist()}")
    return camera_matrix(k[0, 0], k[1, 1], k[0, 2], k[1, 2])


def as_matrix(value: Any, where: str = "intrinsics") -> np.ndarray:
    """One camera, as (fx, fy, cx, cy) or a 3x3 K -> float64 K."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().double().numpy()
    array = np.asarray(value, dtype=object if isinstance(value, (list, tuple)) else None)
    if array.shape == (4,):
        return camera_matrix(*check_values(*array.tolist(), where=where))
    if array.shape == (3, 3):
        return from_matrix(array.astype(np.float64), where)
    raise ValueError(f"{where} must be {ACCEPTED}; got shape {array.shape}")


def per_image(intrinsics: Any, batch: int) -> np.ndarray:
    """``infer``'s ``intrinsics`` -> (batch, 3, 3) float64 K, one per image (one camera for
    all images, or one each)."""
    if hasattr(intrinsics, "detach"):  # a torch tensor, without importing torch
        intrinsics = intrinsics.detach().cpu().double().numpy()
    if isinstance(intrinsics, np.ndarray) and (
            intrinsics.ndim == 3 or (intrinsics.ndim == 2 and intrinsics.shape[1] == 4)):
        cameras = list(intrinsics)  # (B, 3, 3) or (B, 4)
    elif isinstance(intrinsics, (list, tuple)) and intrinsics \
            and not any(_is_number(c) for c in intrinsics) and not _is_one_camera(intrinsics):
        cameras = list(intrinsics)  # one entry per image
    else:
        return np.broadcast_to(as_matrix(intrinsics), (batch, 3, 3)).copy()
    if len(cameras) not in (1, batch):
        raise ValueError(f"intrinsics has {len(cameras)} cameras but the batch has {batch} "
                         f"image{'s' if batch != 1 else ''}; pass one, or one per image")
    ks = np.stack([as_matrix(c, f"intrinsics[{i}]") for i, c in enumerate(cameras)])
    return np.broadcast_to(ks, (batch, 3, 3)).copy()


def _is_number(v: Any) -> bool:
    return isinstance(v, (numbers.Real, np.generic)) and not isinstance(v, bool)


def _is_one_camera(value: Sequence[Any]) -> bool:
    """Whether a list is one camera: four numbers, or a K written as three rows of three."""
    if len(value) == 4 and all(_is_number(v) for v in value):
        return True
    return len(value) == 3 and all(isinstance(row, (list, tuple, np.ndarray)) and len(row) == 3
                                   and all(_is_number(v) for v in row) for row in value)


def as_tensor(intrinsics: Any, batch: int, device: Any) -> torch.Tensor:
    """``infer``'s ``intrinsics`` -> (batch, 3, 3) float32 tensor on ``device``."""
    import torch

    return torch.as_tensor(per_image(intrinsics, batch), dtype=torch.float32, device=device)


def parse(text: str) -> tuple[float, float, float, float]:
    """``"fx,fy,cx,cy"`` (the command line's ``--intrinsics``) -> four checked numbers."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4:
        raise ValueError(f"--intrinsics must be four numbers fx,fy,cx,cy (pixels of the image "
                         f"as read), e.g. 1400,1400,959.5,539.5; got {text!r}")
    return check_values(*values, where="--intrinsics")
