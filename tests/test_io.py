"""load_image: every listed format, EXIF orientation (all 8) and focal length, clear errors."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import depthpro_fast
from depthpro_fast.io import ImageReadError, focal_length_px, load_image

H, W = 24, 36  # not square: a rotation shows in the shape


def smooth_rgb(h: int = H, w: int = W) -> np.ndarray:
    """A smooth, asymmetric image (survives lossy codecs; every orientation is distinct)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / (w - 1), yy / (h - 1), 0.25 + 0.5 * (xx * yy) / ((w - 1) * (h - 1))], -1)
    return (img * 255).round().astype(np.uint8)


def noisy_rgb(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def exif_with(orientation: int | None = None, f35: float | None = None,
              in_ifd0: bool = False) -> Image.Exif:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    if f35 is not None:
        if in_ifd0:
            exif[0xA405] = f35
        else:
            exif.get_ifd(0x8769)[0xA405] = f35
    return exif


def write_png_rgb16(path, array: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    path.write_bytes(png)


# ----------------------------------------------------------------------------------------------
# formats and modes
# ----------------------------------------------------------------------------------------------


def _case(name, tmp_path):
    """(file, expected RGB, max abs error allowed)."""
    rgb = noisy_rgb()
    p = tmp_path / name
    if name == "rgb.png":
        Image.fromarray(rgb).save(p)
        return p, rgb, 0
    if name == "gray8.png":
        g = rgb[..., 0]
        Image.fromarray(g).save(p)
        return p, np.repeat(g[..., None], 3, 2), 0
    if name == "gray16.png":
        g16 = np.random.default_rng(1).integers(0, 65536, (H, W)).astype(np.uint16)
        g16[0, :4] = [0, 65535, 128, 32767]
        Image.fromarray(g16).save(p)
        assert Image.open(p).mode == "I;16"
        g8 = ((g16.astype(np.uint32) + 128) // 257).astype(np.uint8)  # rounded, not clipped
        return p, np.repeat(g8[..., None], 3, 2), 0
    if name == "rgb16.png":
        rgb16 = rgb.astype(np.uint16) * 257 + np.uint16(100)
        rgb16[0, 0] = [65535, 0, 30000]
        write_png_rgb16(p, rgb16)
        return p, np.round(rgb16 / 257).clip(0, 255).astype(np.uint8), 1
    if name == "rgba.png":
        rgba = np.concatenate([rgb, noisy_rgb(seed=2)[..., :1]], axis=2)
        Image.fromarray(rgba).save(p)
        return p, rgb, 0  # alpha dropped, as the official loader does
    if name == "gray_alpha.png":
        Image.fromarray(rgb[..., 0]).convert("LA").save(p)
        return p, np.repeat(rgb[..., :1], 3, 2), 0
    if name == "palette.png":
        pal = Image.fromarray(smooth_rgb()).quantize(16)
        pal.save(p)
        return p, np.asarray(pal.convert("RGB")), 0
    if name == "palette_transparent.png":
        pal = Image.fromarray(smooth_rgb()).quantize(16)
        pal.info["transparency"] = 0
        pal.save(p, transparency=0)
        return p, np.asarray(pal.convert("RGBA"))[..., :3], 0
    if name == "bilevel.png":
        Image.fromarray(rgb[..., 0]).convert("1").save(p)
        bits = np.asarray(Image.open(p).convert("L"))
        return p, np.repeat(bits[..., None], 3, 2), 0
    if name == "rgb.tif":
        Image.fromarray(rgb).save(p)
        return p, rgb, 0
    if name == "gray16.tif":
        g16 = np.random.default_rng(3).integers(0, 65536, (H, W)).astype(np.uint16)
        Image.fromarray(g16).save(p)
        g8 = ((g16.astype(np.uint32) + 128) // 257).astype(np.uint8)
        return p, np.repeat(g8[..., None], 3, 2), 0
    if name == "lossless.webp":
        Image.fromarray(rgb).save(p, lossless=True)
        return p, rgb, 0
    if name == "photo.jpg":
        smooth = smooth_rgb()
        Image.fromarray(smooth).save(p, quality=95)
        return p, smooth, 12
    if name == "gray.jpg":
        smooth = smooth_rgb()[..., 0]
        Image.fromarray(smooth).save(p, quality=95)
        return p, np.repeat(smooth[..., None], 3, 2), 12
    if name == "cmyk.jpg":
        smooth = smooth_rgb()
        Image.fromarray(smooth).convert("CMYK").save(p, quality=95)
        return p, smooth, 16
    if name == "photo.bmp":
        Image.fromarray(rgb).save(p)
        return p, rgb, 0
    raise AssertionError(name)


@pytest.mark.parametrize("name", [
    "rgb.png", "gray8.png", "gray16.png", "rgb16.png", "rgba.png", "gray_alpha.png",
    "palette.png", "palette_transparent.png", "bilevel.png", "rgb.tif", "gray16.tif",
    "lossless.webp", "photo.jpg", "gray.jpg", "cmyk.jpg", "photo.bmp"])
def test_formats_decode_to_rgb_uint8(tmp_path, name):
    path, expected, tolerance = _case(name, tmp_path)
    rgb, f_px = load_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (H, W, 3)
    assert rgb.flags.c_contiguous and rgb.flags.writeable
    err = np.abs(rgb.astype(int) - expected.astype(int))
    assert err.max() <= tolerance, (name, err.max())
    assert f_px is None  # no EXIF
    # the transform accepts it as is
    x = depthpro_fast.Transform()(rgb)
    assert x.shape == (3, H, W)


def test_public_export():
    assert depthpro_fast.load_image is load_image
    assert "load_image" in depthpro_fast.__all__


# ----------------------------------------------------------------------------------------------
# EXIF orientation
# ----------------------------------------------------------------------------------------------

# What a viewer shows for each EXIF orientation value (stored image -> upright image), written
# from the EXIF definition: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise,
# 7 transverse, 8 rotate 90 counter-clockwise.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_eight_orientations_png(tmp_path, orientation):
    stored = noisy_rgb()
    path = tmp_path / f"o{orientation}.png"
    Image.fromarray(stored).save(path, exif=exif_with(orientation))
    rgb, _ = load_image(path)
    assert np.array_equal(rgb, UPRIGHT[orientation](stored))


@pytest.mark.parametrize("ext, kwargs, tol", [
    (".tif", {}, 0),  # Pillow already rotates TIFFs on open: must not be rotated twice
    (".webp", {"lossless": True}, 0),
    (".jpg", {"quality": 95}, 12),
])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_orientation_other_formats(tmp_path, ext, kwargs, tol, orientation):
    stored = smooth_rgb() if ext == ".jpg" else noisy_rgb()
    path = tmp_path / f"o{orientation}{ext}"
    Image.fromarray(stored).save(path, exif=exif_with(orientation), **kwargs)
    rgb, _ = load_image(path)
    expected = UPRIGHT[orientation](stored)
    assert rgb.shape == expected.shape
    assert np.abs(rgb.astype(int) - expected.astype(int)).max() <= tol


# ----------------------------------------------------------------------------------------------
# EXIF focal length
# ----------------------------------------------------------------------------------------------


def test_focal_length_formula():
    # the official diagonal formula, W and H after rotation
    assert focal_length_px(28, 4032, 3024) == pytest.approx(
        28 * math.sqrt(4032**2 + 3024**2) / math.sqrt(36**2 + 24**2))
    assert focal_length_px(50, 36, 24) == pytest.approx(50.0)  # a 36x24 "sensor" in pixels


@pytest.mark.parametrize("ext, kwargs", [(".jpg", {"quality": 95}), (".webp", {}),
                                         (".png", {})])
def test_focal_length_from_exif(tmp_path, ext, kwargs):
    path = tmp_path / f"f{ext}"
    Image.fromarray(smooth_rgb()).save(path, exif=exif_with(6, f35=28), **kwargs)
    rgb, f_px = load_image(path)
    assert rgb.shape == (W, H, 3)  # rotated
    assert f_px == pytest.approx(28 * math.hypot(W, H) / math.hypot(36, 24))


def test_focal_length_in_ifd0_and_rational(tmp_path):
    from PIL.TiffImagePlugin import IFDRational

    path = tmp_path / "ifd0.jpg"
    Image.fromarray(smooth_rgb()).save(path, exif=exif_with(f35=IFDRational(52, 2),
                                                            in_ifd0=True))
    _, f_px = load_image(path)
    assert f_px == pytest.approx(26 * math.hypot(W, H) / math.hypot(36, 24))


@pytest.mark.parametrize("f35", [0, None])
def test_focal_length_absent_or_zero(tmp_path, f35):
    path = tmp_path / "nofocal.jpg"
    Image.fromarray(smooth_rgb()).save(path, exif=exif_with(1, f35=f35))
    assert load_image(path)[1] is None


# ----------------------------------------------------------------------------------------------
# HEIC
# ----------------------------------------------------------------------------------------------


def test_heic(tmp_path):
    try:
        import pillow_heif
    except ImportError:
        path = tmp_path / "photo.heic"
        path.write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
        with pytest.raises(ImageReadError, match="pillow-heif"):
            load_image(path)
        return
    pillow_heif.register_heif_opener()
    path = tmp_path / "photo.heic"
    smooth = smooth_rgb(32, 48)
    Image.fromarray(smooth).save(path, quality=95, exif=exif_with(6, f35=26).tobytes())
    rgb, f_px = load_image(path)
    assert rgb.shape == (48, 32, 3)
    assert np.abs(rgb.astype(int) - np.rot90(smooth, -1).astype(int)).mean() < 8
    assert f_px == pytest.approx(26 * math.hypot(32, 48) / math.hypot(36, 24))


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "nope.jpg")


def test_corrupt_and_truncated(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageReadError, match="junk.jpg") as err:
        load_image(junk)
    assert isinstance(err.value, ValueError)

    good = tmp_path / "good.png"
    Image.fromarray(noisy_rgb(64, 64)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        load_image(cut)

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError):
        load_image(empty)


def test_folder_and_wrong_type(tmp_path):
    with pytest.raises(ImageReadError, match="folder"):
        load_image(tmp_path)
    with pytest.raises(TypeError, match="str or os.PathLike"):
        load_image(123)


# ----------------------------------------------------------------------------------------------
# transform(PIL image) == transform(load_image(path)[0])
# ----------------------------------------------------------------------------------------------

FILE_CASES = ["rgb.png", "gray8.png", "gray16.png", "rgb16.png", "rgba.png", "gray_alpha.png",
              "palette.png", "palette_transparent.png", "bilevel.png", "rgb.tif", "gray16.tif",
              "lossless.webp", "photo.jpg", "gray.jpg", "cmyk.jpg", "photo.bmp"]


@pytest.mark.parametrize("name", FILE_CASES)
def test_transform_of_opened_file_equals_cli_decoding(tmp_path, name):
    path, _, _ = _case(name, tmp_path)
    transform = depthpro_fast.Transform()
    want = transform(load_image(path)[0])
    with Image.open(path) as im:  # lazily opened, not loaded: transform decodes it
        got = transform(im)
    assert torch.equal(got, want), name


def _in_memory(mode: str) -> Image.Image:
    """A PIL image of ``mode`` built in memory, with content that uses the mode's range."""
    rgb = noisy_rgb(seed=5)
    g16 = np.random.default_rng(6).integers(0, 65536, (H, W)).astype(np.uint16)
    if mode == "I;16":
        return Image.fromarray(g16)
    if mode == "I":
        return Image.fromarray(g16.astype(np.int32))
    if mode == "F":
        return Image.fromarray(g16.astype(np.float32) / 65535)
    if mode == "La":
        return Image.fromarray(rgb).convert("LA").convert("La")
    if mode == "PA":
        return Image.fromarray(rgb).convert("P").convert("PA")
    if mode == "RGBa":
        return Image.fromarray(np.concatenate([rgb, rgb[..., :1]], 2)).convert("RGBa")
    return Image.fromarray(rgb).convert(mode)


MODES = ["1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "I", "F",
         "LA", "La", "PA", "I;16"]
# the modes a file format here keeps as they are (TIFF keeps the most)
FILE_MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "I", "F", "LA", "PA", "I;16"]


def _expected_rgb(im: Image.Image) -> np.ndarray:
    """The decoding rule, written out independently: 16-bit scaled with rounding, float as
    0..1, grey repeated, alpha dropped (premultiplied colours restored), else Pillow's RGB."""
    if im.mode in ("I;16", "I"):
        g = np.asarray(im).astype(np.int64)
        return np.repeat(((g + 128) // 257).astype(np.uint8)[..., None], 3, 2)
    if im.mode == "F":
        g = np.rint(np.asarray(im, dtype=np.float32) * 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, 2)
    if im.mode in ("LA", "La"):
        g = np.asarray(im.convert("LA"))[..., 0]
        return np.repeat(g[..., None], 3, 2)
    if im.mode == "PA":
        return np.asarray(im.convert("RGBA"))[..., :3]
    return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("mode", MODES)
def test_transform_of_every_pil_mode_follows_the_decoding_rule(mode):
    im = _in_memory(mode)
    assert im.mode == mode
    got = depthpro_fast.Transform()(im)
    assert got.shape == (3, H, W) and got.dtype == torch.float32
    want = torch.from_numpy(_expected_rgb(im).copy()).permute(2, 0, 1).float() / 255 * 2 - 1
    assert torch.equal(got, want), mode
    if mode in ("I;16", "I", "F"):  # the 16-bit content is not saturated
        assert float((got >= 0.999).float().mean()) < 0.01


@pytest.mark.parametrize("mode", FILE_MODES)
def test_transform_of_pil_mode_equals_load_image_of_its_file(tmp_path, mode):
    """In memory, lazily opened and through load_image: the same tensor."""
    im = _in_memory(mode)
    path = tmp_path / "m.tiff"
    im.save(path)
    transform = depthpro_fast.Transform()
    with Image.open(path) as back:
        assert back.mode == mode
        from_opened = transform(back)
    want = transform(load_image(path)[0])
    assert torch.equal(from_opened, want), mode
    assert torch.equal(transform(im), want), mode


def test_transform_of_16bit_png_is_not_saturated(tmp_path):
    """The issue's case: an I;16 PNG through a plain convert('RGB') is ~100% white."""
    g16 = np.random.default_rng(7).integers(0, 65536, (H, W)).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(g16).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
        x = depthpro_fast.Transform()(im)
    expected = ((g16.astype(np.int64) + 128) // 257) / 255.0 * 2 - 1
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-6)
    assert float((x >= 0.999).float().mean()) < 0.01


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_transform_applies_exif_orientation(tmp_path, orientation):
    stored = smooth_rgb()
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif_with(orientation, f35=28))
    transform = depthpro_fast.Transform()
    with Image.open(path) as im:
        x = transform(im)
    assert tuple(x.shape[1:]) == UPRIGHT[orientation](stored).shape[:2]
    assert torch.equal(x, transform(load_image(path)[0]))
    # an image the user already turned upright is not turned again
    from PIL import ImageOps

    with Image.open(path) as im:
        upright = ImageOps.exif_transpose(im)
    assert torch.equal(transform(upright), x)


@pytest.mark.parametrize("image, match", [
    (Image.fromarray(np.full((4, 5), 255.0, np.float32)), r"mode F\) with values in \[255, 255\]"),
    (Image.fromarray(np.full((4, 5), 70000, np.int32)), r"mode I\) with values in \[70000, "),
    (Image.fromarray(np.full((4, 5), -3, np.int32)), "read as 16-bit data"),
])
def test_out_of_range_pil_images_are_refused_not_clipped(tmp_path, image, match):
    with pytest.raises(ImageReadError, match=match):
        depthpro_fast.Transform()(image)
    path = tmp_path / "x.tiff"
    image.save(path)
    with pytest.raises(ImageReadError, match="x.tiff"):
        load_image(path)


def test_transform_of_truncated_lazy_image_and_of_a_path(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(noisy_rgb(64, 64)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with Image.open(cut) as im, pytest.raises(ImageReadError, match="cut.png"):
        depthpro_fast.Transform()(im)
    with pytest.raises(TypeError, match=r"depthpro_fast.load_image\(path\)"):
        depthpro_fast.Transform()(str(good))
