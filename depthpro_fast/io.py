"""Reading photos: ``load_image(path) -> (rgb uint8 HWC array, f_px or None)``.

The counterpart of the official ``load_rgb`` (spec §8), with a few deliberate improvements:

* all 8 EXIF orientations are applied (``ImageOps.exif_transpose``), not only 3 / 6 / 8;
* every Pillow mode becomes 3-channel RGB uint8: grayscale, palette, RGBA / LA (alpha dropped),
  CMYK, 1-bit, and 16-bit grayscale (``I;16*``) scaled to 8 bits with rounding (``v / 257``),
  not clipped; 32-bit integer images (``I``) are taken as 16-bit data, float images (``F``) as
  0..1. 16-bit colour PNGs are reduced to 8 bits by Pillow itself (high byte);
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
        gray = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        return _gray_to_rgb(((gray + 128) // 257).astype(np.uint8))
    if mode == "F":
        gray = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
        return _gray_to_rgb(np.rint(np.clip(gray, 0.0, 1.0) * 255.0).astype(np.uint8))
    if mode in ("L", "1", "P", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LA", "La", "PA"):
        if mode in ("LA", "La", "PA") or (mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")  # via RGBA: the direct conversion is missing or warns
        return np.asarray(img.convert("RGB"))
    try:  # anything else Pillow can convert (LAB, HSV, ...)
        return np.asarray(img.convert("RGB"))
    except (ValueError, OSError) as e:
        raise ImageReadError(f"image mode {mode!r} cannot be converted to RGB: {e}") from None


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


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

    from PIL import Image, ImageOps, UnidentifiedImageError

    is_heif = path.suffix.lower() in HEIF_SUFFIXES
    if is_heif and not _register_heif():
        raise ImageReadError(f"{path}: reading HEIC/HEIF needs the 'pillow-heif' package "
                             "(pip install pillow-heif)")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated or corrupt data fails here, inside the try
            exif = img.getexif()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow warns about odd EXIF; not fatal
                img = ImageOps.exif_transpose(img)
            rgb = _to_rgb_uint8(img)
    except UnidentifiedImageError:
        formats = "JPEG, PNG, TIFF, WebP, BMP" + (", HEIC" if _register_heif() else "")
        raise ImageReadError(f"{path} cannot be read as an image: corrupt, or not a format "
                             f"Pillow reads ({formats})") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError) as e:
        # Pillow signals corrupt data with all of these, depending on the plugin
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageReadError(f"{path} is corrupt or truncated: {msg}") from None

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageReadError(f"{path}: decoded to an unexpected shape {rgb.shape}")
    if not rgb.flags.writeable:
        rgb = rgb.copy()
    f35 = exif_focal_length_35mm(exif)
    height, width = rgb.shape[:2]
    f_px = focal_length_px(f35, width, height) if f35 is not None else None
    return rgb, f_px
