"""Reading photos: ``load_image(path) -> (rgb uint8 HWC array, f_px or None)``.

The counterpart of the official ``load_rgb`` (spec §8), with a few deliberate improvements:

* all 8 EXIF orientations are applied (``ImageOps.exif_transpose``), not only 3 / 6 / 8;
* every Pillow mode becomes 3-channel RGB uint8: grayscale, palette, RGBA / LA (alpha dropped),
  CMYK, 1-bit, and 16-bit grayscale (``I;16*``) scaled to 8 bits with rounding (``v / 257``),
  not clipped; 32-bit integer images (``I``) are taken as 16-bit data, float images (``F``) as
  0..1 (NaN as 0), and values outside those ranges are refused (``ImageReadError``) rather than
  clipped into a saturated image. 16-bit colour PNGs are reduced to 8 bits by Pillow itself
  (high byte);
* HEIC / HEIF is read through ``pillow-heif`` when it is installed (a clear error otherwise);
* a file that cannot be read raises ``ImageReadError`` (a ``ValueError``) naming the file.

The focal length comes from EXIF ``FocalLengthIn35mmFilm`` (tag 0xA405, in the Exif IFD or, from
some writers, in IFD0) with the official diagonal formula
``f_px = f35 * sqrt(W^2 + H^2) / sqrt(36^2 + 24^2)``, W and H after rotation. The ICC profile
the official loader also returns is not used by DepthPro and is not returned here.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

EXIF_IFD = 0x8769  # pointer to the Exif sub-IFD
TAG_FOCAL_35MM = 0xA405  # FocalLengthIn35mmFilm
FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)
HEIF_SUFFIXES = (".heic", ".heif", ".hif", ".avif")

_heif_state: bool | None = None  # None: not tried yet; True / False: pillow-heif registered


class ImageReadError(ValueError):
    """A file that is not a readable image."""


def _register_heif() -> bool:
    """Register pillow-heif's opener with Pillow once, if the package is installed."""
    global _heif_state
    if _heif_state is None:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            _heif_state = False
        else:
            register_heif_opener()
            _heif_state = True
    return _heif_state


def focal_length_px(f35: float, width: int, height: int) -> float:
    """The official conversion of a 35 mm-equivalent focal length to pixels (diagonal based)."""
    return float(f35) * math.hypot(width, height) / FULL_FRAME_DIAGONAL_MM


def exif_focal_length_35mm(exif) -> float | None:
    """``FocalLengthIn35mmFilm`` from a Pillow ``Image.Exif``, or None if absent, 0 or bad."""
    candidates = []
    try:
        candidates.append(exif.get_ifd(EXIF_IFD).get(TAG_FOCAL_35MM))
    except Exception:  # a malformed Exif IFD: treat as absent, the pixels may still be fine
        pass
    candidates.append(exif.get(TAG_FOCAL_35MM))
    for value in candidates:
        if value is None:
            continue
        if isinstance(value, (tuple, list)):  # some writers store a 1-element sequence
            value = value[0] if value else None
        try:
            f35 = float(value)
        except (TypeError, ValueError, ZeroDivisionError):
            continue
        if math.isfinite(f35) and f35 > 0:
            return f35
    return None


def _to_rgb_uint8(img) -> np.ndarray:
    """Any Pillow image -> HWC uint8 RGB array (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode.startswith("I;16"):
        gray16 = np.asarray(img).astype(np.uint32)
        return _gray_to_rgb(((gray16 + 128) // 257).astype(np.uint8))
    if mode == "I":  # 32-bit integer: in practice 16-bit data (old Pillow PNGs, some TIFFs)
        gray = np.asarray(img, dtype=np.int64)
        low, high = (int(gray.min()), int(gray.max())) if gray.size else (0, 0)
        if low < 0 or high > 65535:  # clipping would saturate it silently: refuse instead
            raise ImageReadError(
                f"32-bit integer image (mode I) with values in [{low}, {high}]: it is read as "
                "16-bit data (0..65535); scale it into that range, or convert it to an 8-bit "
                "(L / RGB) or 16-bit (I;16) image first")
        return _gray_to_rgb(((gray + 128) // 257).astype(np.uint8))
    if mode == "F":
        gray = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)  # NaN: no data
        finite = gray[np.isfinite(gray)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if not np.isfinite(gray).all() or low < -1e-3 or high > 1 + 1e-3:
            raise ImageReadError(
                f"float image (mode F) with values in [{low:.4g}, {high:.4g}]"
                f"{' and infinities' if not np.isfinite(gray).all() else ''}: float images are "
                "read as 0..1; scale it into that range, or convert it to an 8-bit (L / RGB) or "
                "16-bit (I;16) image first")
        return _gray_to_rgb(np.rint(np.clip(gray, 0.0, 1.0) * 255.0).astype(np.uint8))
    try:  # L, 1, P, RGBA, RGBX, RGBa, CMYK, YCbCr, LAB, HSV, ...: Pillow's own conversion
        if mode == "La":  # premultiplied: Pillow converts it only to LA
            img = img.convert("LA")
        if img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")  # via RGBA: the direct conversion is missing or warns
        return np.asarray(img.convert("RGB"))
    except ValueError as e:  # a mode without a conversion to RGB
        raise ImageReadError(f"image mode {mode!r} cannot be converted to RGB: {e}") from None


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


# channels of an image array -> what they hold; the colour channels are the first 1 or 3
_CHANNELS = {1: "gray", 2: "gray + alpha", 3: "RGB", 4: "RGBA"}


def numpy_to_rgb(image: np.ndarray) -> np.ndarray:
    """An HW (gray) or HWC array with 1-4 channels -> HWC RGB, as ``load_image`` reads the
    same picture from a file: gray repeated into R, G and B, alpha dropped (not composited)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in _CHANNELS:
        hint = ""
        if image.ndim == 3 and image.shape[0] in _CHANNELS and image.shape[2] > 4:
            hint = "; it looks channels-first (CHW): pass image.transpose(1, 2, 0)"
        raise ValueError("numpy images must be HW (gray) or HWC with 1 (gray), 2 (gray + "
                         f"alpha), 3 (RGB) or 4 (RGBA) channels, got shape {image.shape}{hint}")
    colour = image[:, :, :1] if image.shape[2] <= 2 else image[:, :, :3]
    return np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour


def tensor_to_rgb(image: Any) -> Any:
    """A CHW (or HW: gray) tensor with 1-4 channels -> CHW RGB, by the rules of
    :func:`numpy_to_rgb`."""
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3 or image.shape[0] not in _CHANNELS:
        hint = ""
        if image.dim() == 3 and image.shape[2] in _CHANNELS and image.shape[0] > 4:
            hint = "; it looks channels-last (HWC): pass image.permute(2, 0, 1)"
        raise ValueError("tensor images must be HW (gray) or CHW with 1 (gray), 2 (gray + "
                         f"alpha), 3 (RGB) or 4 (RGBA) channels, got shape "
                         f"{tuple(image.shape)}{hint}")
    colour = image[:1] if image.shape[0] <= 2 else image[:3]
    return colour.repeat(3, 1, 1) if colour.shape[0] == 1 else colour


# Pillow signals corrupt data with all of these, depending on the plugin
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError)


def _upright_rgb(img) -> np.ndarray:
    """EXIF orientation applied, then the mode rules: what both readers below share."""
    from PIL import ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about odd EXIF; not fatal
        img = ImageOps.exif_transpose(img)
    rgb = np.ascontiguousarray(_to_rgb_uint8(img), dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageReadError(f"decoded to an unexpected shape {rgb.shape}")
    return rgb if rgb.flags.writeable else rgb.copy()


def pil_to_rgb(img) -> np.ndarray:
    """A Pillow image (any mode Pillow opens) -> upright RGB uint8 HWC array, exactly as
    :func:`load_image` decodes the same file: EXIF orientation applied, 16-bit and float
    grayscale scaled (not clipped), alpha dropped, palette / CMYK converted.

    The ``transform`` returned by ``load()`` calls this for PIL images, so
    ``transform(Image.open(p))`` equals ``transform(load_image(p)[0])``. An image that cannot
    be decoded (truncated file behind a lazy ``Image.open``) raises ``ImageReadError``."""
    from PIL import Image

    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    try:
        return _upright_rgb(img)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"PIL image: {e}") from None
    except _DECODE_ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        name = getattr(img, "filename", "") or f"PIL image (mode {img.mode}, size {img.size})"
        raise ImageReadError(f"{name} cannot be decoded (corrupt or truncated?): {msg}") from None


def load_image(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """Read a photo as an RGB uint8 HWC array and its EXIF focal length in pixels (or None).

    Like the official ``load_rgb`` (without the ICC profile): EXIF orientation applied, alpha
    dropped, grayscale / palette / 16-bit converted to 8-bit RGB. Raises ``FileNotFoundError``
    for a missing file and ``ImageReadError`` (a ``ValueError``) for an unreadable one.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if path.is_dir():
        raise ImageReadError(f"{path} is a folder, not an image file")

    from PIL import Image, UnidentifiedImageError

    is_heif = path.suffix.lower() in HEIF_SUFFIXES
    if is_heif and not _register_heif():
        raise ImageReadError(f"{path}: reading HEIC/HEIF needs the 'pillow-heif' package "
                             "(pip install pillow-heif)")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated or corrupt data fails here, inside the try
            exif = img.getexif()
            rgb = _upright_rgb(img)
    except ImageReadError as e:
        raise ImageReadError(f"{path}: {e}") from None
    except UnidentifiedImageError:
        formats = "JPEG, PNG, TIFF, WebP, BMP" + (", HEIC" if _register_heif() else "")
        raise ImageReadError(f"{path} cannot be read as an image: corrupt, or not a format "
                             f"Pillow reads ({formats})") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: {e}") from None
    except _DECODE_ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageReadError(f"{path} is corrupt or truncated: {msg}") from None

    f35 = exif_focal_length_35mm(exif)
    height, width = rgb.shape[:2]
    f_px = focal_length_px(f35, width, height) if f35 is not None else None
    return rgb, f_px
