"""What an op's face (``ops/<op>.py``) and its implementations (``triton/<op>.py``,
``cuda/<op>.py``) both need: input checks, output layouts, window geometry.

Imports run one way (DESIGN.md §7): ``ops/`` imports ``triton/`` and ``cuda/``, and all three
import this module, which imports neither of them (only torch and the config constants).
``tests/test_import_direction.py`` checks it.
"""

from __future__ import annotations

import math

import torch

from .config import IMG_SIZE, WINDOW_SIZE

# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------

#: dtypes the attention op accepts.
ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def empty_attention_output(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B, H, N, D) tensor laid out (B, N, H, D)-contiguous: the layout whose
    ``transpose(1, 2).reshape(B, N, H * D)`` feeds the ``proj`` GEMM without a copy."""
    b, h, n, d = q.shape
    return torch.empty((b, n, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k, v: tensors of one float dtype and device, one (B, H, N, D) shape, N and D > 0."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, H, N, D), got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in ATTENTION_DTYPES:
            raise TypeError(f"attention: {name} has dtype {t.dtype}; accepted: float32, "
                            "float16, bfloat16")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, "
                         f"{k.device}, {v.device}")
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError("attention: q, k, v must have the same (B, H, N, D) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] == 0 or q.shape[3] == 0:
        raise ValueError(f"attention: N and D must be positive, got shape {tuple(q.shape)}")


# ----------------------------------------------------------------------------------------------
# merge_patches: token grids and merged sizes
# ----------------------------------------------------------------------------------------------


def tokens_to_maps(tokens: torch.Tensor) -> torch.Tensor:
    """(n, 1 + h*w, C) tokens (class token first) -> (n, C, h, w) maps (a view, no copy)."""
    n, t, c = tokens.shape
    side = math.isqrt(t - 1)
    return tokens[:, 1:].reshape(n, side, side, c).permute(0, 3, 1, 2)


def merged_size(window: int, grid: int, padding: int) -> int:
    """Length of the merged axis: ``grid`` windows of ``window`` tokens, stride window - 2p."""
    return grid * window - 2 * padding * (grid - 1)


# ----------------------------------------------------------------------------------------------
# split_patches: the pyramid's window geometry (spec §2.1-2.2)
# ----------------------------------------------------------------------------------------------

#: (scale of the level, overlap ratio) of the three pyramid levels.
PYRAMID = ((1.0, 0.25), (0.5, 0.5), (0.25, None))


def window_origins(size: int, overlap: float | None) -> list[int]:
    """Window origins (pixels, one axis) of a level of width ``size`` (spec §2.2)."""
    if overlap is None:
        return [0]
    stride = int(WINDOW_SIZE * (1 - overlap))
    steps = int(math.ceil((size - WINDOW_SIZE) / stride)) + 1
    return [i * stride for i in range(steps)]


def windows_per_image() -> int:
    """Windows of the pyramid per image (35 for the official 1536 / 384 sizes)."""
    return sum(len(window_origins(int(IMG_SIZE * s), o)) ** 2 for s, o in PYRAMID)


# ----------------------------------------------------------------------------------------------
# conv epilogues (bias_relu, bias_residual, subpixel_tail): (N, C, H, W) feature maps
# ----------------------------------------------------------------------------------------------

#: dtypes of the conv epilogue ops (float64: the references only, for exactness tests).
FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The references' arithmetic: fp32 for fp32 and the 16-bit types, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def feature_map_format(x: torch.Tensor) -> torch.memory_format:
    """The dense memory format of a (N, C, H, W) map: ``channels_last`` when it is laid out so
    (and not also plain contiguous), else ``contiguous_format`` (a strided map is copied to it
    by the implementations)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def check_feature_map(op: str, name: str, t: object, like: torch.Tensor | None = None) -> None:
    """A float (N, C, H, W) tensor; with ``like``: of its shape, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be a 4-D (N, C, H, W) map, got shape "
                         f"{tuple(t.shape)}")
    if t.dtype not in FEATURE_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; accepted: float32, float16, "
                        "bfloat16 (float64 on the reference backend)")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{op}: {name} must have the shape of x {tuple(like.shape)}, got "
                             f"{tuple(t.shape)}")
        if t.dtype != like.dtype:
            raise TypeError(f"{op}: {name} must have the dtype of x ({like.dtype}), got "
                            f"{t.dtype}")
        if t.device != like.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {like.device}")


def check_channel_vector(op: str, name: str, v: object, length: int,
                         like: torch.Tensor) -> None:
    """A 1-D per-channel float vector of ``length`` on ``like``'s device."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != length:
        raise ValueError(f"{op}: {name} must be 1-D of length {length}, got shape "
                         f"{tuple(v.shape)}")
    if not v.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be a float tensor, got {v.dtype}")
    if v.device != like.device:
        raise ValueError(f"{op}: {name} is on {v.device} but x is on {like.device}")
