"""Pre-processing (the ``transform``), input checks and ``infer`` (spec §7-8)."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from . import intrinsics as camera
from ._spelling import option
from .config import IMG_SIZE
from .cpu import proc_kib_field
from .io import numpy_to_rgb, tensor_to_rgb

if TYPE_CHECKING:
    from .model import DepthPro

INVERSE_DEPTH_RANGE = (1e-4, 1e4)  # clamp of the inverse depth before the reciprocal
FOV_RANGE_DEG = (1.0, 179.0)  # estimated FOVs outside are clamped (with a warning)
_INTERPOLATION_MODES = ("bilinear", "bicubic", "nearest", "nearest-exact", "area")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


# ----------------------------------------------------------------------------------------------
# transform: image -> normalised CHW float tensor
# ----------------------------------------------------------------------------------------------


def image_to_chw_float(image: Any) -> torch.Tensor:
    """PIL image, HW / HWC numpy array or CHW tensor -> CHW float32 RGB tensor in [0, 1]
    (ToTensor); gray is repeated into three channels and alpha dropped, as for a file.

    The result never shares memory with ``image`` (callers may modify it in place)."""
    try:
        from PIL import Image
    except ImportError:  # Pillow is a dependency, but keep tensors usable without it
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(image, Image.Image):
        from .io import pil_to_rgb

        # as load_image decodes files: EXIF orientation, 16-bit / float scaled, alpha dropped
        # (a plain convert("RGB") clips I;16 to white and ignores the orientation)
        image = pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        image = numpy_to_rgb(image)
        if not image.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable
            image = image.copy()
        if image.dtype == np.uint8:
            t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
            return t.to(torch.float32) / 255.0
        if np.issubdtype(image.dtype, np.floating):
            # as torchvision's ToTensor: float arrays are taken as already in [0, 1]
            return _check_unit_range(torch.from_numpy(np.ascontiguousarray(image))
                                     .permute(2, 0, 1).to(torch.float32, copy=True))
        raise TypeError(f"numpy image dtype {image.dtype} not accepted; uint8 (0..255) or "
                        "float (0..1)")
    if isinstance(image, torch.Tensor):
        image = tensor_to_rgb(image)
        if image.dtype == torch.uint8:
            return image.to(torch.float32) / 255.0
        if image.dtype.is_floating_point:
            return _check_unit_range(image.to(torch.float32, copy=True))
        raise TypeError(f"tensor image dtype {image.dtype} not accepted; uint8 (0..255) or "
                        "float (0..1)")
    hint = ("; for a file use depthpro_fast.load_image(path), which returns (rgb, f_px)"
            if isinstance(image, (str, os.PathLike)) else "")
    raise TypeError("image must be a PIL image, an HW or HWC numpy array or a CHW tensor, got "
                    f"{type(image).__name__}{hint}")


def _check_unit_range(x: torch.Tensor, slack: float = 1e-3) -> torch.Tensor:
    """Float images must hold finite values in [0, 1]; anything else is a mistake upstream
    (0..255 floats, an ImageNet-normalised tensor, NaNs), which would give silent garbage."""
    if x.numel() == 0:
        return x
    if not bool(torch.isfinite(x).all()):
        raise ValueError("float image contains NaN or Inf values")
    low, high = float(x.min()), float(x.max())
    if low < -slack or high > 1 + slack:
        raise ValueError(f"float images must hold values in [0, 1], got [{low:.4g}, {high:.4g}]"
                         "; pass uint8 (0..255) or divide by 255")
    return x


class Transform:
    """The official pre-processing: ToTensor -> device -> ``2x - 1`` (fp32) -> model dtype."""

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype

    def __call__(self, image: Any) -> torch.Tensor:
        x = image_to_chw_float(image)
        if x.shape[1] < 1 or x.shape[2] < 1:
            raise ValueError(f"empty image: shape {tuple(x.shape)}")
        x = x.to(self.device)
        # Normalize(mean 0.5, std 0.5) in float32, in place: a 20000x20000 image is 4.8 GB
        x = x.sub_(0.5).div_(0.5)
        return x.to(self.dtype)

    def __repr__(self) -> str:
        return f"Transform(device={self.device}, dtype={self.dtype})"


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


def check_network_input(x: Any, model: DepthPro) -> None:
    """What ``DepthPro.forward`` accepts: a (B, 3, 1536, 1536) float tensor on the model's
    device and in its dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"forward expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2:] != (IMG_SIZE, IMG_SIZE) or x.shape[0] < 1:
        raise ValueError(f"forward expects a normalised (B, 3, {IMG_SIZE}, {IMG_SIZE}) batch, "
                         f"got shape {tuple(x.shape)}; use infer() for other sizes")
    device, dtype = model_device_dtype(model)
    if x.dtype != dtype:
        raise TypeError(f"forward expects {dtype} input (the model's dtype), got {x.dtype}")
    if x.device != device and not (x.device.type == device.type == "cuda"
                                   and device.index is None):
        raise ValueError(f"input is on {x.device} but the model is on {device}")


def _check_image_batch(x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError("infer expects a normalised float tensor (3, H, W) or (B, 3, H, W) "
                        f"(use the transform returned by load()), got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"infer expects (3, H, W) or (B, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        if x.shape[-1] == 3:  # an HWC image (or BHWC batch): the usual mix-up
            raise ValueError(f"infer expects channels first, (3, H, W) or (B, 3, H, W), got "
                             f"shape {tuple(x.shape)}, which looks channels-last (HWC): pass "
                             "the image through the transform returned by load() (it takes "
                             "HWC numpy arrays and PIL images), or permute a tensor to CHW")
        raise ValueError(f"infer expects 3 (RGB) channels, got {x.shape[1]} in shape "
                         f"{tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"infer got an empty tensor of shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"infer expects a normalised float tensor (values in [-1, 1]), got "
                        f"{x.dtype}; pass images through the transform returned by load()")
    return x


def _list_value(v: Any, i: int) -> float:
    """One entry of an ``f_px`` list: a number (or a 1-element array / tensor), or None."""
    if v is None:
        return math.nan  # marks "estimate this one"
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, np.generic, np.ndarray,
                                                 torch.Tensor)):
        raise TypeError(f"f_px[{i}] must be a number of pixels or None, got "
                        f"{type(v).__name__}")
    n = v.numel() if isinstance(v, torch.Tensor) else getattr(v, "size", 1)
    if n != 1:
        raise ValueError(f"f_px[{i}] must be one number, got shape {tuple(v.shape)}")
    try:
        value = float(v.item() if isinstance(v, (np.ndarray, torch.Tensor)) else v)
    except (TypeError, ValueError):
        raise ValueError(f"f_px[{i}] must be one number, got {v!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"f_px[{i}] must be finite and > 0 (pixels), got {value}")
    return value


def focal_length_tensor(f_px: Any, batch: int, device: torch.device) -> torch.Tensor:
    """A user's focal length -> float32 tensor (B, 1, 1, 1).

    Accepted: a number, a numpy scalar / array or a tensor (one value, or one per image), or a
    list / tuple of numbers, one per image (or one for all), where ``None`` means "no focal
    length for this image": its entry is NaN, and ``infer`` estimates it from the FOV."""
    if isinstance(f_px, np.ndarray) and f_px.dtype == object:  # e.g. np.array([800, None])
        f_px = f_px.ravel().tolist()
    if isinstance(f_px, (list, tuple)):
        if not f_px:
            raise ValueError("f_px is an empty list; pass one value, or one per image "
                             f"({batch}), or None")
        if len(f_px) not in (1, batch):
            raise ValueError(f"f_px has {len(f_px)} values but the batch has {batch} "
                             f"image{'s' if batch != 1 else ''}; pass one value, or one per "
                             "image")
        values = [_list_value(v, i) for i, v in enumerate(f_px)]
        f = torch.tensor(values, dtype=torch.float32, device=device)
        return f.reshape(-1, 1, 1, 1).expand(batch, 1, 1, 1)
    if isinstance(f_px, torch.Tensor):
        f = f_px.detach().to(device=device, dtype=torch.float32)
    elif isinstance(f_px, (numbers.Real, np.ndarray, np.generic)) and not isinstance(f_px, bool):
        try:
            f = torch.as_tensor(np.asarray(f_px, dtype=np.float64), dtype=torch.float32,
                                device=device)
        except (TypeError, ValueError):
            raise TypeError(f"f_px must be numeric, got {f_px!r}") from None
    else:
        raise TypeError("f_px must be None, a number, a list of numbers (None for an image "
                        "without one), a numpy scalar/array or a tensor, got "
                        f"{type(f_px).__name__}")
    if f.numel() not in (1, batch):
        raise ValueError(f"f_px must hold 1 value or one per image ({batch}), got shape "
                         f"{tuple(f.shape)}")
    if not bool(torch.isfinite(f).all()) or bool((f <= 0).any()):
        raise ValueError(f"f_px must be finite and > 0 (pixels), got {f.flatten().tolist()}")
    return f.reshape(-1, 1, 1, 1).expand(batch, 1, 1, 1)


def clamp_fov(fov_deg: torch.Tensor, *, warn: bool | torch.Tensor = True) -> torch.Tensor:
    """The network's FOV estimate in float32, clamped to ``FOV_RANGE_DEG`` (NaN -> 60 degrees),
    with a warning when a clamped value is used (``warn``: True, False, or a per-image mask)."""
    fov = fov_deg.to(torch.float32)
    low, high = FOV_RANGE_DEG
    bad = ~torch.isfinite(fov) | (fov < low) | (fov > high)
    if bool(bad.any()):
        if isinstance(warn, torch.Tensor):
            warn = bool((bad & warn.reshape(bad.shape)).any())
        if warn:
            warnings.warn(f"estimated field of view {fov.flatten().tolist()} deg is outside "
                          f"[{low}, {high}]; clamped (pass {option('f_px', '--f-px')} to "
                          "override)", RuntimeWarning, stacklevel=4)
        fov = torch.nan_to_num(fov, nan=60.0).clamp(low, high)
    return fov


def focal_from_fov(fov_deg: torch.Tensor, width: int) -> torch.Tensor:
    """``f = 0.5 W / tan(fov / 2)`` in float32 (W is the original image width); an estimate
    outside ``FOV_RANGE_DEG`` is clamped with a warning."""
    fov = clamp_fov(fov_deg)
    return 0.5 * width / torch.tan(0.5 * torch.deg2rad(fov))


def fov_from_focal(f_px: torch.Tensor, width: int) -> torch.Tensor:
    """The horizontal FOV in degrees of a focal length (pixels) on an image ``width`` wide."""
    return torch.rad2deg(2 * torch.atan(0.5 * width / f_px.to(torch.float32)))


def centred_intrinsics(f: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B,) focal lengths -> (B, 3, 3) float32 K with fx = fy = f and the principal point at
    the image centre ((W - 1) / 2, (H - 1) / 2: OpenCV's pixel-centre convention)."""
    k = torch.zeros(f.shape[0], 3, 3, dtype=torch.float32, device=f.device)
    k[:, 0, 0] = k[:, 1, 1] = f.to(torch.float32)
    k[:, 0, 2], k[:, 1, 2], k[:, 2, 2] = (width - 1) / 2.0, (height - 1) / 2.0, 1.0
    return k


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    align = False if mode in ("bilinear", "bicubic") else None
    return F.interpolate(x, size=size, mode=mode, align_corners=align)


# ----------------------------------------------------------------------------------------------
# infer
# ----------------------------------------------------------------------------------------------

# float32 maps at the original resolution that infer holds at its peak: the resized inverse
# depth, the clamped copy and the depth
_OUTPUT_MAPS = 3


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (CUDA: the driver's free memory; CPU: MemAvailable), or None."""
    if device.type != "cuda":
        return proc_kib_field("/proc/meminfo", "MemAvailable")
    try:
        return torch.cuda.mem_get_info(device)[0]
    except RuntimeError:
        return None


def check_output_memory(batch: int, height: int, width: int, device: torch.device) -> None:
    """Refuse, before any work, an output that cannot fit, saying how much it needs."""
    needed = _OUTPUT_MAPS * 4 * batch * height * width
    free = available_memory(device)
    if free is not None and needed > free:
        raise MemoryError(
            f"a {batch}x{height}x{width} input needs about {needed / 2**30:.1f} GiB for its "
            f"full-resolution depth outputs on {device}, but only {free / 2**30:.1f} GiB is "
            "free; downscale the image (the network itself always runs at 1536x1536) or use a "
            "smaller batch" + option("", " (--batch-size)"))


def infer(model: DepthPro, x: torch.Tensor, f_px: Any = None,
          interpolation_mode: str = "bilinear", *, return_inverse_depth: bool = False,
          intrinsics: Any = None) -> dict[str, torch.Tensor]:
    """See ``DepthPro.infer``."""
    if interpolation_mode not in _INTERPOLATION_MODES:
        raise ValueError(f"interpolation_mode {interpolation_mode!r} not accepted; one of "
                         f"{', '.join(_INTERPOLATION_MODES)}")
    if intrinsics is not None and f_px is not None:
        raise ValueError("pass f_px or intrinsics, not both: the focal length of the depth is "
                         "the intrinsics' fx")
    x = _check_image_batch(x)
    device, dtype = model_device_dtype(model)
    batch, _, height, width = x.shape
    # first, from the shape alone: a huge image is refused before any pass over its values
    check_output_memory(batch, height, width, device)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("input contains NaN or Inf values")
    low, high = float(x.min()), float(x.max())
    if low < -1.01 or high > 1.01:
        raise ValueError(f"infer expects a normalised image with values in [-1, 1] (the output "
                         f"of the transform returned by load()), got [{low:.4g}, {high:.4g}]")
    k = None if intrinsics is None else camera.as_tensor(intrinsics, batch, device)
    if k is not None:  # the depth's focal length is fx (see depthpro_fast.intrinsics)
        f_px = k[:, 0, 0]
    f_given = None if f_px is None else focal_length_tensor(f_px, batch, device)
    x = x.to(device=device, dtype=dtype)
    if (height, width) != (IMG_SIZE, IMG_SIZE):
        x = _resize(x, (IMG_SIZE, IMG_SIZE), interpolation_mode)

    # need_fov=False lets the fast path skip the FOV network: every image has a focal length
    need_fov = f_given is None or bool(torch.isnan(f_given).any())
    canonical_inverse_depth, fov_deg = model(x, need_fov=need_fov)
    return postprocess(canonical_inverse_depth, fov_deg, f_given, height, width,
                       interpolation_mode, return_inverse_depth=return_inverse_depth,
                       intrinsics=k)


def postprocess(canonical_inverse_depth: torch.Tensor, fov_deg: torch.Tensor | None,
                f_given: torch.Tensor | None, height: int, width: int,
                interpolation_mode: str = "bilinear", *, return_inverse_depth: bool = False,
                intrinsics: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Network outputs (B, 1, 1536, 1536) and (B, 1, 1, 1) -> infer's result at (height, width).

    ``intrinsics``: the (B, 3, 3) K given to ``infer`` (its fx is then ``f_given``), returned
    as ``intrinsics``; without it the result's K is the focal length used on both axes with
    the principal point at the image centre (``depthpro_fast.intrinsics.centred``).

    ``f_given``: the user's focal lengths as from :func:`focal_length_tensor`, or None to use
    the FOV estimate (spec §7 steps 4-9). ``fov_deg``: the network's estimate, or None when the
    FOV network did not run (no FOV network, or skipped by the fast path because ``f_given``
    made it unnecessary).

    One rule for the FOV, whichever path produced the outputs: ``fov_deg`` is the FOV of the
    focal length used (``focallength_px``, on the original width), and ``fov_deg_estimated``
    is the network's own estimate (clamped to ``FOV_RANGE_DEG``), present exactly when the
    FOV network ran. Without ``f_given`` the two are equal."""
    batch = canonical_inverse_depth.shape[0]
    # images without a given focal length (all, or the None entries of an f_px list: NaN)
    unknown = None if f_given is None else torch.isnan(f_given)
    if unknown is not None and not bool(unknown.any()):
        unknown = None
    if (f_given is None or unknown is not None) and fov_deg is None:
        raise ValueError("this model has no FOV network ("
                         + option("use_fov=False", "use_fov false in its config") + "): pass "
                         + option("f_px", "--f-px")
                         + ("" if f_given is None else " for every image (no None entries)"))
    warn: bool | torch.Tensor = f_given is None or (unknown if unknown is not None else False)
    estimated = None if fov_deg is None else clamp_fov(fov_deg, warn=warn)
    if f_given is None:
        f = 0.5 * width / torch.tan(0.5 * torch.deg2rad(estimated))
        fov_used = estimated  # the FOV of that focal length, without a float round trip
    elif unknown is None:
        f = f_given
        fov_used = fov_from_focal(f, width)
    else:  # a mix: the estimate where no focal length was given, the given one elsewhere
        f = torch.where(unknown, 0.5 * width / torch.tan(0.5 * torch.deg2rad(estimated)),
                        f_given)
        fov_used = torch.where(unknown, estimated, fov_from_focal(f, width))
    inverse_depth = canonical_inverse_depth * (width / f)
    if (height, width) != (IMG_SIZE, IMG_SIZE):
        inverse_depth = _resize(inverse_depth, (height, width), interpolation_mode)
    depth = 1.0 / torch.clamp(inverse_depth, min=INVERSE_DEPTH_RANGE[0],
                              max=INVERSE_DEPTH_RANGE[1])

    def per_image(t: torch.Tensor, is_map: bool) -> torch.Tensor:
        """(B, 1, H, W) -> (B, H, W) or (B, 1, 1, 1) -> (B,); no batch axis for one image."""
        t = t[:, 0] if is_map else t.reshape(batch)
        return t[0] if batch == 1 else t

    if intrinsics is None:
        intrinsics = centred_intrinsics(f.reshape(batch), height, width)
    k = intrinsics if batch > 1 else intrinsics[0]
    out = {"depth": per_image(depth, True), "focallength_px": per_image(f, False),
           "fov_deg": per_image(fov_used, False), "intrinsics": k}
    if estimated is not None:
        out["fov_deg_estimated"] = per_image(estimated, False)
    if return_inverse_depth:
        out["inverse_depth"] = per_image(inverse_depth, True)
    return out
