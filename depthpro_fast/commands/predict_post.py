"""``predict``'s network call and post-processing: a batch in, one depth map per image out.

With ``batch_size`` N the images, each resized to 1536 x 1536 as in ``infer``, go through the
network N at a time; the post-processing (focal length, resize back, reciprocal) is done per
image at its original size with ``infer``'s arithmetic, so results equal ``model.infer`` per
image up to float rounding of the batched network.

Big images (more than ``BANDED_ABOVE_PIXELS``) are resized back in bands of rows
(:func:`depth_in_bands`): ``infer`` holds three float32 maps of the full size at once (the
resized inverse depth, its clamped copy and the depth: 576 MB for 48 MP, on the GPU for a CUDA
model); the bands need the output (192 MB, on the CPU) and one 1536-row map of the output width.
Same bilinear rule (``align_corners=False``, no antialias), equal up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: above this many pixels an image's depth is resized back in bands of rows (16 MiB pixels:
#: every phone photo up to 12 MP takes ``infer``'s own path)
BANDED_ABOVE_PIXELS = 16 << 20
#: output pixels per band
BAND_PIXELS = 4 << 20


def _bilinear_taps(size_in: int, size_out: int, device: torch.device,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch's bilinear source taps (``align_corners=False``, no antialias): for each output
    index, the two input indices and the weight of the second."""
    # float32, as PyTorch's kernels compute them: scale = in / out, then one fused multiply-add
    # (src = scale * (i + 0.5) - 0.5, rounded once: exact in float64, then rounded to float32).
    # Exact float64 taps would differ from F.interpolate by up to 1e-4 of a pixel at 6000 px,
    # i.e. 1e-3 of the depth between unlike pixels.
    scale = (torch.tensor(size_in, dtype=torch.float32) / size_out).double()
    src = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * scale - 0.5).float()
    src = src.clamp_(min=0.0)
    i0 = src.long().clamp_(max=size_in - 1)  # src >= 0: truncation is the floor
    i1 = (i0 + 1).clamp_(max=size_in - 1)
    return i0.to(device), i1.to(device), (src - i0).to(device)


def depth_in_bands(canonical_inverse_depth: torch.Tensor, scale: float | torch.Tensor,
                   height: int, width: int, band_pixels: int = BAND_PIXELS) -> np.ndarray:
    """``1 / clamp(resize(cid * scale, (height, width)))`` as a float32 (height, width) numpy
    array, computed in bands of rows: the bilinear resize is separable, so the width is
    resized once (1536 x width) and each band of output rows blends two of those rows."""
    from ..inference import INVERSE_DEPTH_RANGE

    cid = canonical_inverse_depth.reshape(canonical_inverse_depth.shape[-2:]).float()
    h_in, w_in = cid.shape
    dev = cid.device
    c0, c1, wc = _bilinear_taps(w_in, width, dev)
    wide = torch.lerp(cid.index_select(1, c0), cid.index_select(1, c1), wc)  # (h_in, width)
    r0, r1, wr = _bilinear_taps(h_in, height, dev)
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=dev).reshape(())
    out = np.empty((height, width), np.float32)
    rows = max(1, band_pixels // max(width, 1))
    for a in range(0, height, rows):
        b = min(a + rows, height)
        band = torch.lerp(wide.index_select(0, r0[a:b]), wide.index_select(0, r1[a:b]),
                          wr[a:b, None]).mul_(scale_t)
        band = band.clamp_(min=INVERSE_DEPTH_RANGE[0], max=INVERSE_DEPTH_RANGE[1]).reciprocal_()
        out[a:b] = band.cpu().numpy()
    return out


def post_process(cid: Any, fov_deg: Any, f_px: float | None, height: int, width: int,
                 ) -> dict[str, Any]:
    """One image's network output (1, 1, 1536, 1536) -> infer's result at (height, width);
    ``depth`` is a numpy array when computed in bands (big images), else a tensor."""
    from ..inference import (
        centred_intrinsics,
        check_output_memory,
        focal_length_tensor,
        postprocess,
    )

    f = None if f_px is None else focal_length_tensor(f_px, 1, cid.device)
    if height * width <= BANDED_ABOVE_PIXELS:
        check_output_memory(1, height, width, cid.device)
        return postprocess(cid, fov_deg, f, height, width)
    # the focal length and FOV depend on the width only: postprocess at one row gives them
    # (and its own FOV rule) without a full-size map (tests/test_big_images.py checks this)
    small = postprocess(cid, fov_deg, f, 1, width)
    result = {k: v for k, v in small.items() if k not in ("depth", "inverse_depth")}
    if "intrinsics" in small:  # its principal point is the centre of the full image
        result["intrinsics"] = centred_intrinsics(small["focallength_px"].reshape(1), height,
                                                  width)[0]
    scale = width / small["focallength_px"].float()  # inference's inverse depth scale
    result["depth"] = depth_in_bands(cid, scale, height, width)
    return result


def infer_batch(model: Any, images: Sequence[Any], f_pxs: Sequence[float | None],
                ) -> list[dict[str, Any]]:
    """``model.infer`` for several normalised (3, H, W) images of any sizes, with one network
    call: each is resized to 1536 x 1536, the batch goes through ``model``, and each result is
    post-processed at its own size. One image that is not big: exactly ``model.infer``."""
    from ..config import IMG_SIZE
    from ..inference import model_device_dtype

    if len(images) != len(f_pxs):
        raise ValueError(f"{len(images)} images but {len(f_pxs)} focal lengths")
    if len(images) == 1 and images[0].shape[-2] * images[0].shape[-1] <= BANDED_ABOVE_PIXELS:
        return [model.infer(images[0], f_px=f_pxs[0])]
    device, dtype = model_device_dtype(model)
    net = []
    for x in images:
        x = x.to(device=device, dtype=dtype).unsqueeze(0)
        if tuple(x.shape[-2:]) != (IMG_SIZE, IMG_SIZE):
            x = torch.nn.functional.interpolate(x, size=(IMG_SIZE, IMG_SIZE), mode="bilinear",
                                                align_corners=False)  # as infer
        net.append(x)
    with torch.no_grad():
        # the FOV network is needed only for images without a focal length (the fast path
        # skips it otherwise, as infer does)
        cid, fov = model(torch.cat(net), need_fov=any(f is None for f in f_pxs))
        return [post_process(cid[i:i + 1], None if fov is None else fov[i:i + 1], f,
                             int(x.shape[-2]), int(x.shape[-1]))
                for i, (x, f) in enumerate(zip(images, f_pxs, strict=True))]
