"""Image -> the 35 overlapping 384x384 windows of DepthPro's 3-level pyramid (spec §2.1-2.2).

Fused chain: normalise (``2x - 1``) -> bilinear resize to 1536 (no antialias,
align_corners=False) -> pyramid 1536 / 768 / 384 -> windows. The result is the (35B, 3, 384, 384)
patch batch in the official order: 25 level-0 windows (origins {0, 288, ..., 1152}^2, rows
outer, columns inner), 9 level-1 windows (origins {0, 192, 384}^2), the level-2 image; window-major,
image-minor (index ``window * B + b``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from ..config import IMG_SIZE, WINDOW_SIZE
from ..op_common import PYRAMID, window_origins, windows_per_image  # noqa: F401 (re-exported)


def normalize_image(image: torch.Tensor, *, prenormalized: bool = False) -> torch.Tensor:
    """uint8 -> /255, then ``2x - 1`` in float32; already-normalised floats are only upcast."""
    if image.dtype == torch.uint8:
        x = image.to(torch.float32) / 255.0
    else:
        x = image.to(torch.float32)
    if not prenormalized or image.dtype == torch.uint8:
        x = (x - 0.5) / 0.5  # the official Normalize(mean 0.5, std 0.5), in float32
    return x


def resize_to_network(x: torch.Tensor) -> torch.Tensor:
    """Bilinear resize to 1536x1536 when needed (no antialias, independent axes)."""
    if x.shape[-2:] == (IMG_SIZE, IMG_SIZE):
        return x
    return F.interpolate(x, size=(IMG_SIZE, IMG_SIZE), mode="bilinear", align_corners=False)


def pyramid_windows(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, 1536, 1536) normalised -> (35B, 3, 384, 384) windows, official order."""
    pieces = []
    for scale, overlap in PYRAMID:
        level = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear",
                                                     align_corners=False)
        origins = window_origins(level.shape[-1], overlap)
        for y in origins:
            for xo in origins:
                pieces.append(level[..., y:y + WINDOW_SIZE, xo:xo + WINDOW_SIZE])
    return torch.cat(pieces, dim=0)


def split_patches_reference(image: torch.Tensor, *, prenormalized: bool = False,
                            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain ``interpolate`` + slicing chain of the official code.

    Normalisation is done in float32 (as the official transform), the result is cast to
    ``out_dtype`` and resized / windowed in that dtype (as the official ``infer`` + encoder).
    """
    out_dtype = out_dtype or _default_out_dtype(image)
    x = normalize_image(image, prenormalized=prenormalized).to(out_dtype)
    return pyramid_windows(resize_to_network(x))


def _default_out_dtype(image: torch.Tensor) -> torch.dtype:
    return image.dtype if image.dtype.is_floating_point else torch.float32


def _check(image: torch.Tensor, prenormalized: bool, out_dtype: torch.dtype | None) -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"split_patches: image must be a torch.Tensor, got "
                        f"{type(image).__name__}")
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError("split_patches: image must be (B, 3, H, W), got shape "
                         f"{tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[2] < 1 or image.shape[3] < 1:
        raise ValueError(f"split_patches: empty image batch, shape {tuple(image.shape)}")
    if image.dtype != torch.uint8 and not image.dtype.is_floating_point:
        raise TypeError(f"split_patches: image dtype {image.dtype} not accepted; uint8 or "
                        "float (in [0, 1], or in [-1, 1] with prenormalized=True)")
    if prenormalized and image.dtype == torch.uint8:
        raise ValueError("split_patches: prenormalized=True needs a float image in [-1, 1], "
                         "got uint8")
    if out_dtype is not None and out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"split_patches: out_dtype {out_dtype} not accepted; float32, float16 "
                        "or bfloat16")


def split_patches(image: torch.Tensor, *, prenormalized: bool = False,
                  out_dtype: torch.dtype | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """(B, 3, H, W) image of any size -> (35B, 3, 384, 384) normalised windows.

    ``image``: uint8, or float in [0, 1]; with ``prenormalized=True`` a float image already
    mapped to [-1, 1] (what ``DepthPro.forward`` receives). ``out_dtype`` defaults to the
    image's float dtype (float32 for uint8).
    """
    _check(image, prenormalized, out_dtype)
    impl = backends.implementation("split_patches", backend, image.device)
    return impl(image, prenormalized=prenormalized, out_dtype=out_dtype)


def _load_triton():
    from ..triton.split_patches import split_patches_triton

    return split_patches_triton


def _load_cuda():
    from ..cuda.split_patches import split_patches_cuda

    return split_patches_cuda


backends.register("split_patches", "reference", lambda: split_patches_reference)
backends.register("split_patches", "triton", _load_triton)
backends.register("split_patches", "cuda", _load_cuda)
