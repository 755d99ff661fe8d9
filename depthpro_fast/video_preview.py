"""The colour preview video of a clip's depth frames, on one colour scale for the whole clip.

The image preview (``outputs.colorize_inverse_depth``) stretches each image's own inverse depth
range over the colour map; done per frame, the colours of a still scene would pump with every
change of the nearest or farthest point. Here the scale is fixed for the clip: the 1st and 99th
percentiles of the inverse depth pooled over up to ``range_frames`` frames spread over it
(limited to ``outputs.COLOR_DEPTH_RANGE_M``); values outside saturate.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from .outputs import COLOR_DEPTH_RANGE_M, turbo
from .video_io import PreviewWriter, read_depth_frame

_PIXELS_PER_FRAME = 20_000  # pixels per frame pooled for the percentiles


def _inverse(depth_m: np.ndarray) -> np.ndarray:
    near, far = COLOR_DEPTH_RANGE_M
    d = np.where(depth_m > 0, depth_m, far)  # 0 = invalid: shown as far
    return 1.0 / np.clip(d, near, far)


def inverse_depth_scale(frames: Sequence[str | os.PathLike], range_frames: int,
                        ) -> tuple[float, float]:
    """(low, high) inverse depth (1/m) of the clip's colour scale."""
    from .video import sample_indices

    pooled = []
    for i in sample_indices(len(frames), range_frames):
        inv = _inverse(read_depth_frame(frames[i])[0]).ravel()
        step = max(1, inv.size // _PIXELS_PER_FRAME)
        pooled.append(inv[::step])
    values = np.concatenate(pooled)
    low, high = np.percentile(values, [1.0, 99.0])
    return float(low), float(high)


def colorize(depth_m: np.ndarray, low: float, high: float) -> np.ndarray:
    """Depth (metres, 0 = invalid) -> RGB uint8 on the fixed scale; near red, far blue."""
    span = high - low
    inv = _inverse(depth_m)
    t = (inv - low) / span if span > 1e-12 else np.zeros_like(inv)
    return turbo(t)


def write_preview(path: str | os.PathLike, frames: Sequence[str | os.PathLike], fps: Fraction,
                  range_frames: int = 64) -> list[float]:
    """Encode the preview of ``frames`` (depth PNGs, in order) at ``fps``, atomically;
    returns the colour scale as [near, far] metres (red at near, blue at far)."""
    low, high = inverse_depth_scale(frames, range_frames)
    writer = None
    try:
        for p in frames:
            rgb = colorize(read_depth_frame(p)[0], low, high)
            if writer is None:
                writer = PreviewWriter(path, fps, rgb.shape[1], rgb.shape[0])
            writer.write(rgb)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return [1.0 / high, 1.0 / low]
