"""From a photo to the exported graph's input, and from its outputs to metric depth, in numpy.

For users of an exported graph (ONNX Runtime, TensorRT) without PyTorch: this file imports
numpy only, so it can be copied as it is. It does what ``transform`` and ``infer`` do around
``model(x)`` (spec §7, §8), and is tested against ``infer``::

    rgb = np.asarray(PIL.ImageOps.exif_transpose(PIL.Image.open(path)).convert("RGB"))
    cid, fov_deg = session.run(None, {"image": network_input(rgb)})
    depth, f_px = metric_depth(cid, fov_deg, rgb.shape[0], rgb.shape[1])

``f_px`` (pixels of the original image, e.g. from EXIF) replaces the FOV estimate when known;
a depth-only graph (exported without the FOV) needs it.
"""

from __future__ import annotations

import numpy as np

IMG_SIZE = 1536
INVERSE_DEPTH_RANGE = (1e-4, 1e4)
FOV_RANGE_DEG = (1.0, 179.0)


def _taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows of bilinear resampling with align_corners=False (PyTorch's rule: source
    coordinate (i + 0.5) * n_in / n_out - 0.5, clamped at 0; no antialias)."""
    scale = np.float32(n_in / n_out)  # float32 arithmetic throughout, as PyTorch's kernel
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5))
                     - np.float32(0.5), np.float32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


def resize_bilinear(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., H, W) -> (..., height, width) as ``torch.nn.functional.interpolate(...,
    mode="bilinear", align_corners=False)``."""
    a = np.asarray(a, dtype=np.float32)
    if a.shape[-2:] == (height, width):
        return a
    y0, y1, ty = _taps(height, a.shape[-2])
    x0, x1, tx = _taps(width, a.shape[-1])
    top, bottom = a[..., y0, :], a[..., y1, :]
    rows = top + (bottom - top) * ty[:, None]
    left, right = rows[..., x0], rows[..., x1]
    return left + (right - left) * tx


def network_input(rgb: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """An RGB uint8 (H, W, 3) image (or a (B, H, W, 3) stack) -> the graph's ``image`` input,
    (B, 3, 1536, 1536): ``2 * rgb / 255 - 1``, resized bilinearly without antialias.
    ``dtype``: np.float16 for a graph exported in float16."""
    rgb = np.asarray(rgb)
    if rgb.ndim == 3:
        rgb = rgb[None]
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"network_input expects RGB uint8 (H, W, 3) or (B, H, W, 3), got "
                         f"{rgb.dtype} {rgb.shape}")
    x = rgb.astype(np.float32).transpose(0, 3, 1, 2) / 255.0 * 2.0 - 1.0
    return resize_bilinear(x, IMG_SIZE, IMG_SIZE).astype(dtype)


def metric_depth(canonical_inverse_depth: np.ndarray, fov_deg: np.ndarray | None,
                 height: int, width: int, f_px: float | np.ndarray | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The graph's outputs -> (depth in metres (B, height, width), focal length in pixels (B,))
    for images of the original size (height, width).

    The focal length is ``f_px`` when given, else ``0.5 W / tan(fov / 2)`` of the estimate
    (clamped to [1, 179] degrees, as ``infer``); the inverse depth is scaled by ``W / f_px``,
    resized back to (height, width), clamped to [1e-4, 1e4] and inverted.
    """
    cid = np.asarray(canonical_inverse_depth, dtype=np.float32)
    batch = cid.shape[0]
    if f_px is None:
        if fov_deg is None:
            raise ValueError("a depth-only graph has no FOV estimate: pass f_px (pixels)")
        fov = np.clip(np.asarray(fov_deg, dtype=np.float32).reshape(batch), *FOV_RANGE_DEG)
        f = 0.5 * width / np.tan(0.5 * np.deg2rad(fov))
    else:
        f = np.broadcast_to(np.asarray(f_px, dtype=np.float32).reshape(-1), (batch,))
    inverse_depth = cid * (width / f).astype(np.float32)[:, None, None, None]
    inverse_depth = resize_bilinear(inverse_depth, height, width)
    depth = 1.0 / np.clip(inverse_depth, *INVERSE_DEPTH_RANGE)
    return depth[:, 0], f.astype(np.float32)
