"""``load()``: the drop-in for the official ``create_model_and_transforms``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import backends
from . import checkpoint as ckpt
from ._spelling import option
from .config import DepthProConfig, resolve_config
from .cpu import NATIVE_FLAGS as _NATIVE_FLAGS
from .cpu import cpu_flags, native_from_flags
from .inference import Transform
from .model import DepthPro

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16}


_FP8_NAMES = ("fp8", "float8", "float8_e4m3fn", "float8_e4m3", "e4m3", "float8_e5m2")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    fp8 = (isinstance(dtype, str) and dtype.lower() in _FP8_NAMES) or (
        isinstance(dtype, torch.dtype) and "float8" in str(dtype))
    if fp8:
        raise ValueError(f"dtype {dtype!r}: FP8 inference is not implemented; use "
                         + option("torch.bfloat16 or torch.float16 (with fast=True for the fast "
                                  "path)", "--dtype bf16 or fp16 (with --fast for the fast path)"))
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown {option('dtype', '--dtype')} {dtype!r}; accepted: "
                             f"{', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {dtype} not supported; torch.float32, torch.float16 or "
                         "torch.bfloat16")
    return dtype


def resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"invalid {option('device', '--device')} {device!r}; e.g. cpu, cuda, "
                         "cuda:1") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option('device', '--device')} {device!r} requested but CUDA is not "
                         "available here; use " + option("device='cpu'", "--device cpu"))
    return dev


_DTYPE_WORDS = {torch.float16: ("float16", "torch.float16", "fp16"),
                torch.bfloat16: ("bfloat16", "torch.bfloat16", "bf16")}


def cpu_has_native(dtype: torch.dtype) -> bool | None:
    """Whether this CPU has arithmetic for ``dtype`` (fp16 / bf16); None when unknown."""
    flags = cpu_flags()
    if flags is None:
        return None
    return native_from_flags(dtype, flags)


def warn_slow_cpu_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Say so when fp16 / bf16 on this CPU is emulated: every op then converts to fp32 and
    back, and the whole model runs many times slower than in fp32 (tiny config, 2-core AMD
    EPYC without AVX512-FP16 / -BF16: fp16 7-15x, bf16 about 14x). The computation stays in
    the dtype asked for; only the user can decide to change it."""
    if device.type != "cpu" or dtype not in _NATIVE_FLAGS or cpu_has_native(dtype) is not False:
        return
    name, py_name, cli_name = _DTYPE_WORDS[dtype]
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    alternatives = [option("torch.float32", "--dtype fp32")]
    if cpu_has_native(torch.bfloat16) and other == torch.bfloat16:
        alternatives.append(option("torch.bfloat16", "--dtype bf16") + " (native here)")
    flags = " / ".join(f.upper().replace("_", "-") for f in _NATIVE_FLAGS[dtype][:2])
    warnings.warn(
        f"{option('dtype=' + py_name, '--dtype ' + cli_name)} on this CPU: it has no {name} "
        f"arithmetic (no {flags}), so PyTorch emulates it and the model runs about 7x or more "
        f"slower than in float32 (measured 7-15x). Use {' or '.join(alternatives)} for speed; "
        f"the model stays in {name} as asked.", RuntimeWarning, stacklevel=3)


def build_model(config: DepthProConfig, *, use_fov: bool = True,
                device: torch.device | str = "meta") -> DepthPro:
    """An un-loaded model (random init, or no storage at all on ``meta``)."""
    with torch.device(device):
        return DepthPro(config, use_fov=use_fov)


@torch.no_grad()
def plausible_random_init_(model: DepthPro) -> DepthPro:
    """Make random weights give outputs in a realistic range (benchmarks, tests, demos).

    PyTorch's default init leaves LayerScale at 1e-5 (the ViT blocks would be near-identity)
    and the head's output near zero (depth clamped to 1e4 m) with an FOV near 0 degrees.
    """
    for name, p in model.named_parameters():
        if name.endswith((".ls1.gamma", ".ls2.gamma")):
            p.fill_(0.1)
    model.head[4].bias.fill_(0.5)  # canonical inverse depth around 0.5 before the ReLU
    if model.fov is not None:
        model.fov.head[4].bias.fill_(60.0)  # FOV around 60 degrees
    return model


def load(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor] | None = "auto", *,
         config: DepthProConfig | Mapping[str, Any] | str | os.PathLike | None = None,
         device: torch.device | str | None = None, dtype: torch.dtype | str = torch.float32,
         backend: str = "auto", use_fov: bool = True,
         fast: bool | Mapping[str, Any] | Any = False) -> tuple[DepthPro, Transform]:
    """Build DepthPro, load weights and return ``(model, transform)``.

    ``checkpoint``: a path to Apple's ``depth_pro.pt`` (or a ``.safetensors`` in the same key
    layout, or an in-memory state dict; Hugging Face ``DepthPro-hf`` weights, their folder or
    its ``model.safetensors``, are mapped to Apple's keys); ``"auto"`` searches
    ``$DEPTHPRO_CHECKPOINT``, ``./checkpoints/depth_pro.pt`` and the user cache; ``None`` builds
    random weights.
    ``config``: a ``DepthProConfig``, a dict of knobs, a preset name or a JSON file path
    (default: the official model). ``device`` defaults to CUDA when available. The model is
    returned in eval mode.
    ``fast``: ``True`` (or a dict of ``depthpro_fast.fast.FastOptions`` fields) prepares the
    fast path once, here: exact conv folds, fused ViT epilogues, channels_last, and on CUDA a
    second stream, cuDNN autotuning and CUDA graphs; the FOV branch is then skipped when
    ``infer`` is given ``f_px`` (``fov_deg`` is the FOV of ``f_px`` on every path; the fast
    path then has no ``fov_deg_estimated``). Use it with
    ``dtype=torch.bfloat16`` or ``torch.float16`` on a GPU.
    """
    cfg = resolve_config(config)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    backend = backends.check_backend(backend)
    if not isinstance(use_fov, bool):
        raise TypeError(f"use_fov must be True or False, got {use_fov!r}")
    from .fast.engine import FastOptions

    fast_options = FastOptions.resolve(fast)  # checked before the (slow) weight loading
    # a backend that cannot run here is refused now, not once per image later
    backends.require_backend(backend, dev)
    if fast_options is not None and fast_options.epilogue_backend is not None:
        backends.require_backend(fast_options.epilogue_backend, dev)
    warn_slow_cpu_dtype(dev, dt)

    if checkpoint is None:
        model = build_model(cfg, use_fov=use_fov, device=dev)
        plausible_random_init_(model)
        model = model.to(dtype=dt)
    else:
        if isinstance(checkpoint, Mapping):
            source = "(in-memory state dict)"
            state_dict = ckpt.to_apple_keys(dict(checkpoint), source)  # HF layout accepted
        elif isinstance(checkpoint, (str, os.PathLike)):
            path = ckpt.find_checkpoint() if checkpoint == "auto" else Path(checkpoint)
            state_dict, source = ckpt.read_state_dict(path), str(path)
        else:
            raise TypeError("checkpoint must be 'auto', None, a path or a state dict, got "
                            f"{type(checkpoint).__name__}")
        model = build_model(cfg, use_fov=use_fov, device="meta")
        ckpt.check_keys(model.state_dict(), state_dict, cfg, use_fov, source)
        wanted = model.state_dict().keys()
        state_dict = {k: v for k, v in state_dict.items() if k in wanted}
        model.load_state_dict(state_dict, strict=True, assign=True)
        model = model.to(device=dev, dtype=dt)
    model.eval()
    model.set_backend(backend)
    if fast_options is not None:
        model.prepare_fast(fast_options)
    return model, Transform(dev, dt)
