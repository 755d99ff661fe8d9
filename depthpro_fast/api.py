"""``load()``: the drop-in for the official ``create_model_and_transforms``."""

from __future__ import annotations

import dataclasses
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
from .fp8_format import Fp8UnavailableError, fp8_problem
from .inference import Transform
from .model import DepthPro

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16}


#: Spellings of the fp8 precision mode (e4m3 ViT GEMMs, bf16 elsewhere).
FP8_NAMES = ("fp8", "float8", "float8_e4m3fn", "float8_e4m3", "e4m3")
#: FP8 formats that are not that mode.
_OTHER_FP8 = ("float8_e5m2", "e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")


#: Spellings of the bf16-mixed precision mode: an fp32 model whose GEMMs and convolutions take
#: bf16 inputs (fp32 accumulation and activations), on the CPU fast path.
BF16_MIXED_NAMES = ("bf16-mixed", "bf16_mixed", "bfloat16-mixed")


def is_bf16_mixed(dtype: object) -> bool:
    """Whether ``dtype`` names the bf16-mixed precision mode."""
    return isinstance(dtype, str) and dtype.lower() in BF16_MIXED_NAMES


def is_fp8(dtype: object) -> bool:
    """Whether ``dtype`` names the fp8 precision mode (a name above or torch.float8_e4m3fn)."""
    if isinstance(dtype, str):
        return dtype.lower() in FP8_NAMES
    return isinstance(dtype, torch.dtype) and str(dtype) == "torch.float8_e4m3fn"


def resolve_precision(dtype: torch.dtype | str) -> tuple[torch.dtype, bool]:
    """``(model dtype, fp8)``: fp8 is a bf16 model whose ViT linears run in e4m3."""
    if is_fp8(dtype):
        return torch.bfloat16, True
    name = dtype.lower() if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name in _OTHER_FP8:
        raise ValueError(f"dtype {dtype!r}: of the FP8 formats only e4m3 is supported ("
                         + option("dtype='fp8'", "--dtype fp8")
                         + ": e4m3 ViT GEMMs with per-token scales, bf16 elsewhere); e5m2 has "
                         "2 mantissa bits (made for gradients), the fnuz formats are AMD's")
    return resolve_dtype(dtype), False


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype for the model's tensors (fp8 is a mode, see :func:`resolve_precision`)."""
    if is_fp8(dtype):
        raise ValueError(f"dtype {dtype!r} is the fp8 mode, not a tensor dtype: the model is "
                         "bf16 with e4m3 ViT GEMMs; pass it to load(dtype='fp8') / --dtype fp8")
    if is_bf16_mixed(dtype):
        raise ValueError(f"dtype {dtype!r} is the bf16-mixed mode, not a tensor dtype: the model "
                         "is fp32 with bf16 GEMM inputs; pass it to load(dtype='bf16-mixed') / "
                         "--dtype bf16-mixed")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown {option('dtype', '--dtype')} {dtype!r}; accepted: "
                             f"{', '.join(DTYPES)}, fp8, bf16-mixed, auto")
        return DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {dtype} not supported; torch.float32, torch.float16, "
                         "torch.bfloat16 or 'fp8'")
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


def _fp8_fast_options(fast: Any) -> Any:
    """The fast options of ``dtype='fp8'``: the given ones (or the defaults) with fp8 on."""
    from .fast.engine import FastOptions

    if fast is False:
        raise ValueError(option("dtype='fp8'", "--dtype fp8") + " runs on the fast path only "
                         "(it is the fast engine's precision mode); "
                         + option("drop fast=False", "drop --no-fast"))
    opts = FastOptions.resolve(True if fast is None else fast)
    if isinstance(fast, Mapping) and fast.get("fp8") is False:
        raise ValueError("dtype='fp8' with fast option fp8=False: drop one of them")
    return dataclasses.replace(opts, fp8=True)


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


def warn_fp8_cpu(device: torch.device) -> None:
    """fp8 on a CPU is an emulation (no FP8 arithmetic): say so, once per load."""
    if device.type != "cpu":
        return
    bf16 = cpu_has_native(torch.bfloat16)
    rest = ("" if bf16 else "; the rest of the model is bf16, which this CPU also emulates "
            "(about 5-15x slower than float32)")
    # the fastest exact-enough choice here: bf16 where the CPU has its arithmetic (the fast
    # path measured 1.8x faster than fp32 on an AVX512_BF16 EPYC), else fp32
    faster = (option("torch.bfloat16", "--dtype bf16") + " (this CPU has bf16 arithmetic: "
              "about 2x faster than float32)" if bf16 else option("torch.float32", "--dtype fp32"))
    warnings.warn(
        f"{option('dtype=' + repr('fp8'), '--dtype fp8')} on a CPU is an emulation for tests: "
        "the e4m3 values and scales are the GPU's, but a CPU has no FP8 arithmetic, so the "
        f"GEMMs run as fp32 (torch._scaled_mm's CPU kernel or dequantised matmuls){rest}. "
        f"Use {faster} on a CPU for speed; fp8 is for GPUs of compute capability >= 8.9.",
        RuntimeWarning, stacklevel=3)


def warn_fp32_fast_on_gpu(device: torch.device) -> None:
    """The fast path on a GPU with the default fp32.

    The default stays fp32 (the official API's default precision, so that ``load`` is a
    drop-in and its outputs match the reference to 1e-5), but an fp32 fast path on a GPU runs
    fp32 GEMMs (no tensor cores, TF32 off) at several times the latency of fp16 / bf16, which a
    user who asked for speed should hear about once, with the choices."""
    if device.type != "cuda":
        return
    warnings.warn(
        f"{option('fast=True', '--fast')} on CUDA with the default fp32: the fast path then "
        "runs fp32 GEMMs without tensor cores, several times slower than half precision. Pass "
        f"{option('dtype=torch.float16', '--dtype fp16')} (what the official command line "
        f"runs) or {option('dtype=torch.bfloat16', '--dtype bf16')} for speed, or "
        f"{option('dtype=torch.float32', '--dtype fp32')} to keep fp32 without this warning.",
        RuntimeWarning, stacklevel=3)


def auto_precision(device: torch.device, *, fast: Any = None,
                   backend: str = "auto") -> torch.dtype | str:
    """``dtype="auto"``: float16 on CUDA (as the official command line); on a CPU
    ``"bf16-mixed"`` where it has bf16 arithmetic and the fast path runs (``fast`` not False,
    ``backend`` not ``"reference"``), bfloat16 there on the reference path, else float32
    (``depthpro_fast.cpu.cpu_default_precision``)."""
    if device.type == "cuda":
        return torch.float16
    from .cpu import cpu_default_precision

    name = cpu_default_precision(fast is not False and backend != "reference")
    return name if name == "bf16-mixed" else DTYPES[name]


def _mixed_fast_options(fast: Any, device: torch.device) -> Any:
    """The fast options of ``dtype='bf16-mixed'``: the given ones (or the defaults) with
    ``gemm_dtype="bf16"``."""
    from .fast.engine import FastOptions

    if device.type != "cpu":
        raise ValueError(option("dtype='bf16-mixed'", "--dtype bf16-mixed") + " runs on a CPU "
                         f"(oneDNN's bf16 GEMMs and convolutions); this model is on {device}: "
                         "use " + option("dtype=torch.bfloat16", "--dtype bf16") + " or "
                         + option("dtype=torch.float16", "--dtype fp16") + " on a GPU")
    if fast is False:
        raise ValueError(option("dtype='bf16-mixed'", "--dtype bf16-mixed") + " runs on the "
                         "fast path only (the reference path computes in one dtype); "
                         + option("drop fast=False", "drop --no-fast") + ", or use "
                         + option("dtype=torch.bfloat16", "--dtype bf16"))
    opts = FastOptions.resolve(True if fast is None else fast)
    if opts.gemm_dtype not in (None, "bf16"):
        raise ValueError(f"dtype='bf16-mixed' with fast option gemm_dtype={opts.gemm_dtype!r}: "
                         "drop one of them")
    return dataclasses.replace(opts, gemm_dtype="bf16")


def auto_dtype(device: torch.device) -> torch.dtype:
    """``dtype="auto"``, ``predict``'s default precision: float16 on CUDA (as the official
    command line), on a CPU bfloat16 where it has bf16 arithmetic (AVX512_BF16 / AMX / Arm
    BF16), else float32."""
    if device.type == "cuda":
        return torch.float16
    from .cpu import fastest_cpu_dtype

    return fastest_cpu_dtype()


def default_fast(fast: Any, device: torch.device, *, backend: str = "auto",
                 fp8: bool = False) -> Any:
    """``load``'s ``fast`` when not given (None): the fast path on a CPU, where it is the same
    function as the reference up to float32 rounding (max relative error <= 1e-5, tests) and
    several times faster, so the drop-in default loses nothing by it; the reference where
    ``backend="reference"`` was asked for (that backend names the plain-PyTorch path); off on
    CUDA (the reference modules are the official code's numerics there; ``fast=True`` is one
    word away); fp8 decides for itself (it is the fast path's mode). Anything given is kept."""
    if fast is not None or fp8:
        return fast
    return device.type == "cpu" and backend != "reference"


def load(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor] | None = "auto", *,
         config: DepthProConfig | Mapping[str, Any] | str | os.PathLike | None = None,
         device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
         backend: str = "auto", use_fov: bool | None = None,
         fast: bool | Mapping[str, Any] | Any = None,
         seed: int | None = 0) -> tuple[DepthPro, Transform]:
    """Build DepthPro, load weights and return ``(model, transform)``.

    ``checkpoint``: a path to Apple's ``depth_pro.pt`` (or a ``.safetensors`` in the same key
    layout, or an in-memory state dict; Hugging Face ``DepthPro-hf`` weights, their folder or
    its ``model.safetensors``, are mapped to Apple's keys); ``"auto"`` searches
    ``$DEPTHPRO_CHECKPOINT``, ``./checkpoints/depth_pro.pt`` and the user cache; ``None`` builds
    random weights.
    ``seed`` (random weights only): the weights are drawn from this seed (default 0), so
    ``load(None)`` gives the same network every call; another seed, another network; None
    draws from the global RNG (a different network each call). The caller's RNG state is
    left as it was.
    ``config``: a ``DepthProConfig``, a dict of knobs, a preset name or a JSON file path
    (default: the official model). ``device`` defaults to CUDA when available. The model is
    returned in eval mode. ``use_fov``: build the FOV network (default None: the config's
    ``use_fov``, True unless it says otherwise); without it every image needs ``f_px``.
    ``dtype``: ``torch.float32`` (the default, None, as in the official code) / ``float16`` /
    ``bfloat16`` (or their names), ``"bf16-mixed"``: the CPU fast path's mixed precision, an
    fp32 model whose GEMMs and convolutions take bf16 inputs (fp32 accumulation, activations,
    LayerNorm, softmax and residual stream; the bf16 speed of the arithmetic at a mean relative
    error of about 1e-5 against fp32, where the all-bf16 model is at about 1e-3), ``"auto"``
    (``predict``'s choice: float16 on CUDA, as the official command line; on a CPU
    ``"bf16-mixed"`` where it has bf16 arithmetic, bfloat16 there when ``fast=False``, else
    float32), or ``"fp8"``: the fp8 precision mode of the fast path, a bf16 model whose three
    ViTs run their linears in e4m3 (per-output-channel weight scales, per-token activation
    scales; CUDA compute capability >= 8.9; an emulation on a CPU, with a warning). fp8 and
    bf16-mixed imply ``fast=True``.
    ``fast``: ``True`` (or a dict of ``depthpro_fast.fast.FastOptions`` fields) prepares the
    fast path once, here: exact conv folds, fused ViT epilogues, channels_last, and on CUDA a
    second stream, cuDNN autotuning and CUDA graphs; the FOV branch is then skipped when
    ``infer`` is given ``f_px`` (``fov_deg`` is the FOV of ``f_px`` on every path; the fast
    path then has no ``fov_deg_estimated``). ``False``: the reference modules only.
    Default (None): on for a CPU, in the model's dtype (the same function as the reference up
    to float32 rounding, and 1.3-1.7x faster there), unless ``backend="reference"`` was asked for;
    off on CUDA; on for fp8. On CUDA use it with ``dtype=torch.bfloat16`` or ``torch.float16``:
    ``fast=True`` with the default dtype warns there (an fp32 fast path is several times slower
    than fp16 / bf16 and hides its cost); an explicit ``dtype=torch.float32`` says it was meant.
    """
    cfg = resolve_config(config)
    dev = resolve_device(device)
    dtype_given = dtype is not None
    backend = backends.check_backend(backend)
    if isinstance(dtype, str) and dtype.lower() == "auto":
        dtype = auto_precision(dev, fast=fast, backend=backend)
    mixed = is_bf16_mixed(dtype)
    dt, fp8 = resolve_precision(torch.float32 if dtype is None or mixed else dtype)
    fast_asked = fast is not None
    fast = default_fast(fast, dev, backend=backend, fp8=fp8 or mixed)
    if use_fov is None:  # the config's own (True unless a JSON config says "use_fov": false)
        use_fov = cfg.use_fov
    if not isinstance(use_fov, bool):
        raise TypeError(f"use_fov must be True or False, got {use_fov!r}")
    from .fast.engine import FastOptions

    if fp8:
        fast = _fp8_fast_options(fast)
    if mixed:
        fast = _mixed_fast_options(fast, dev)
    fast_options = FastOptions.resolve(fast)  # checked before the (slow) weight loading
    # a backend that cannot run here is refused now, not once per image later
    backends.require_backend(backend, dev)
    if fast_options is not None and fast_options.epilogue_backend is not None:
        backends.require_backend(fast_options.epilogue_backend, dev)
    if fast_options is not None and fast_options.fp8:
        problem = fp8_problem(dev)
        if problem:
            raise Fp8UnavailableError(
                f"{option('dtype=' + repr('fp8'), '--dtype fp8')} cannot run here: {problem}. "
                f"Use {option('dtype=torch.bfloat16', '--dtype bf16')} instead")
        if dt != torch.bfloat16:
            raise ValueError("fast option fp8 needs the bf16 model: use "
                             + option("dtype='fp8'", "--dtype fp8"))
        warn_fp8_cpu(dev)
    else:
        warn_slow_cpu_dtype(dev, torch.bfloat16 if mixed else dt)
    if fast_options is not None and fast_asked and not dtype_given:
        warn_fp32_fast_on_gpu(dev)

    if checkpoint is None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an integer or None, got {seed!r}")
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [],
                                   enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
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
