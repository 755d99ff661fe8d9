"""The cases of the decision micro-benchmarks (``micro.py`` runs them and prints the table).

A case builds its inputs when it runs (nothing stays allocated between cases), checks a
kernel's output against the reference, then times it (:func:`measure`). Adding a
micro-benchmark means adding a ``_<group>_cases`` function here and its name to ``GROUPS``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .. import backends
from ..fast.engine import cudnn_benchmark
from ..ops.attention import attention_reference
from ..ops.merge_patches import merge_patches_reference
from ..ops.split_patches import split_patches_reference
from .journal import Case, CaseFailed, SkipCase
from .timing import dtype_name, random_inputs, time_callable


@dataclasses.dataclass(frozen=True)
class Size:
    """The problems of one size: ``official`` (the model's) or ``tiny`` (a CPU dry run)."""

    attention: tuple[tuple[int, int, int, int], ...]  # (B, H, N, D)
    tokens: int  # GEMM rows: windows x tokens
    width: int  # ViT embed dim
    mlp: int  # ViT hidden dim
    conv: tuple[int, int, int]  # channels, height, width
    merge_channels: int


SIZES = {
    "official": Size(attention=((35, 16, 577, 64), (1, 16, 577, 64)), tokens=35 * 577,
                     width=1024, mlp=4096, conv=(256, 768, 768), merge_channels=1024),
    "tiny": Size(attention=((2, 2, 65, 64), (1, 2, 65, 64)), tokens=2 * 65, width=128, mlp=512,
                 conv=(16, 96, 96), merge_channels=8),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    size: str
    warmup: int
    runs: int
    dtypes: tuple[torch.dtype, ...]
    n_inputs: int = 2  # rotated random inputs per case

    @property
    def dtype_names(self) -> list[str]:
        return [dtype_name(d) for d in self.dtypes]


# ----------------------------------------------------------------------------------------------
# measuring


def measure(call: Callable[[Any], Any], inputs: Sequence[Any], settings: Settings,
            device: torch.device) -> dict[str, Any]:
    """Eager latency of ``call`` over rotated ``inputs``, and on a GPU its graph-replay time."""
    stats, _ = time_callable(call, inputs, warmup=settings.warmup, runs=settings.runs,
                             device=device)
    row: dict[str, Any] = {"median_ms": stats.median, "min_ms": stats.min, "max_ms": stats.max,
                           "runs": stats.runs, "times_ms": [round(t, 4) for t in stats.times_ms]}
    if device.type == "cuda":
        row["graph_ms"], why = _graph_ms(call, inputs, settings, device)
        if why:
            row["note"] = why
    return row


def _graph_ms(call: Callable[[Any], Any], inputs: Sequence[Any], settings: Settings,
              device: torch.device) -> tuple[float | None, str | None]:
    """Median time of ``call`` replayed from CUDA graphs (one per input; already warmed up)."""
    graphs = []
    try:
        for x in inputs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                call(x)
            graphs.append(graph)
    except Exception as e:  # noqa: BLE001  (an op that cannot be captured: eager time only)
        torch.cuda.synchronize(device)
        return None, f"no CUDA graph: {str(e).splitlines()[0][:120]}"
    stats, _ = time_callable(lambda g: g.replay(), graphs, warmup=2, runs=settings.runs,
                             device=device)
    return stats.median, None


def _with_rate(row: dict[str, Any], *, flops: float | None = None,
               nbytes: float | None = None) -> dict[str, Any]:
    ms = row["graph_ms"] if row.get("graph_ms") is not None else row["median_ms"]
    if flops:
        row.update(flops=flops, tflops=flops / (ms * 1e-3) / 1e12)
    if nbytes:
        row.update(bytes=nbytes, gb_per_s=nbytes / (ms * 1e-3) / 1e9)
    return row


def _kernel(op: str, backend: str, device: torch.device) -> Callable[..., Any]:
    """Our ``backend`` implementation of ``op``, or SkipCase saying why there is none here."""
    ok, why = backends.backend_status(backend, device)
    if not ok:
        raise SkipCase(f"backend {backend} unavailable: {why}")
    try:
        return backends.implementation(op, backend, device)
    except (ImportError, RuntimeError) as e:  # not built / this op missing from the build
        raise SkipCase(f"no {backend} {op} here: {str(e).splitlines()[0]}") from None


def _check_close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    err = float((out.float() - ref.float()).abs().max())
    if not err <= tol:  # (NaN fails too)
        raise CaseFailed(f"wrong output: max error {err:.2e} > {tol:g} vs the reference",
                         {"max_err": err})
    return err


def _case(group: str, problem: str, impl: str, dtype: torch.dtype,
          run: Callable[[], dict[str, Any]]) -> Case:
    info = {"group": group, "problem": problem, "impl": impl, "dtype": dtype_name(dtype)}
    return Case(f"{group}/{problem}/{dtype_name(dtype)}/{impl}", info, run)


# ----------------------------------------------------------------------------------------------
# attention

_SDPA = {"sdpa math": "MATH", "sdpa efficient": "EFFICIENT_ATTENTION",
         "sdpa flash": "FLASH_ATTENTION", "sdpa cudnn": "CUDNN_ATTENTION"}
ATTENTION_IMPLS = ("triton", "cuda", "reference", *_SDPA)
# what PyTorch says when an SDPA backend does not take a case (versions differ)
_SDPA_REFUSALS = ("No available kernel", "No viable backend")


def _attention_fn(impl: str, dtype: torch.dtype, device: torch.device) -> Callable[..., Any]:
    if impl == "reference":
        return attention_reference
    if impl in _SDPA:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, _SDPA[impl], None)
        if backend is None:
            raise SkipCase(f"this torch has no SDPBackend.{_SDPA[impl]}")

        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)

        return sdpa
    if impl == "cuda" and dtype == torch.float32:
        raise SkipCase("the CUDA kernel serves fp16 / bf16; fp32 falls back to Triton (the "
                       "triton row)")
    return _kernel("attention", impl, device)


def _first_attention_call(call: Callable[[Any], Any], x: Any, impl: str) -> torch.Tensor:
    """The first call; an SDPA backend refusing the case becomes a skip with its reasons."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return call(x)
        except RuntimeError as e:
            if impl not in _SDPA or not any(s in str(e) for s in _SDPA_REFUSALS):
                raise
            why = [str(w.message).splitlines()[0] for w in caught] or [str(e).splitlines()[0]]
            raise SkipCase("refused: " + "; ".join(dict.fromkeys(why))[:400]) from None


def _attention_case(shape: tuple[int, int, int, int], dtype: torch.dtype, impl: str,
                    settings: Settings, device: torch.device) -> dict[str, Any]:
    fn = _attention_fn(impl, dtype, device)
    b, h, n, d = shape
    scale = d ** -0.5
    packed = random_inputs((b, n, 3, h, d), count=settings.n_inputs, device=device,
                           dtype=dtype, seed=sum(shape))
    inputs = [tuple(p[:, :, i].transpose(1, 2) for i in range(3)) for p in packed]

    def call(qkv: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # ends with the proj GEMM's input: a view for our (B, N, H, D) output, a copy for SDPA
        return fn(*qkv, scale).transpose(1, 2).reshape(b, n, h * d)

    out = _first_attention_call(call, inputs[0], impl)
    q, k, v = (t.float() for t in inputs[0])
    ref = attention_reference(q, k, v, scale).transpose(1, 2).reshape(b, n, h * d)
    err = _check_close(out, ref, 1e-4 if dtype == torch.float32 else 3e-2)
    del out, ref, q, k, v
    row = _with_rate(measure(call, inputs, settings, device), flops=4.0 * b * h * n * n * d)
    return {**row, "max_err": err}


def _attention_cases(settings: Settings, device: torch.device) -> Iterator[Case]:
    for shape in SIZES[settings.size].attention:
        for dtype in settings.dtypes:
            for impl in ATTENTION_IMPLS:
                yield _case("attention", "x".join(map(str, shape)), impl, dtype,
                            lambda s=shape, dt=dtype, i=impl: _attention_case(s, dt, i, settings,
                                                                              device))


# ----------------------------------------------------------------------------------------------
# the ViT GEMMs


def _gemm_case(m: int, k: int, n: int, bias: bool, dtype: torch.dtype, settings: Settings,
               device: torch.device) -> dict[str, Any]:
    inputs = random_inputs((m, k), count=settings.n_inputs, device=device, dtype=dtype, seed=k)
    w = random_inputs((n, k), count=1, device=device, dtype=dtype, seed=n, low=-k ** -0.5,
                      high=k ** -0.5)[0]
    b = random_inputs((n,), count=1, device=device, dtype=dtype, seed=1)[0] if bias else None
    row = measure(lambda x: F.linear(x, w, b), inputs, settings, device)
    return _with_rate(row, flops=2.0 * m * k * n)


def _gemm_cases(settings: Settings, device: torch.device) -> Iterator[Case]:
    s = SIZES[settings.size]
    shapes = {"qkv": (s.width, 3 * s.width), "proj": (s.width, s.width),
              "fc1": (s.width, s.mlp), "fc2": (s.mlp, s.width)}
    for name, (k, n) in shapes.items():
        for dtype in settings.dtypes:
            for bias in (True, False):
                yield _case("gemm", f"{name} {s.tokens}x{k}->{n}",
                            "linear + bias" if bias else "linear, no bias", dtype,
                            lambda k=k, n=n, b=bias, dt=dtype: _gemm_case(
                                s.tokens, k, n, b, dt, settings, device))


# ----------------------------------------------------------------------------------------------
# the decoder's largest convolution


def _conv_case(c: int, h: int, w: int, bias: bool, channels_last: bool, dtype: torch.dtype,
               settings: Settings, device: torch.device) -> dict[str, Any]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inputs = [x.contiguous(memory_format=fmt) for x in random_inputs(
        (1, c, h, w), count=settings.n_inputs, device=device, dtype=dtype, seed=c)]
    bound = (9 * c) ** -0.5
    weight = random_inputs((c, c, 3, 3), count=1, device=device, dtype=dtype, seed=2,
                           low=-bound, high=bound)[0].contiguous(memory_format=fmt)
    b = random_inputs((c,), count=1, device=device, dtype=dtype, seed=3)[0] if bias else None
    with cudnn_benchmark(True):  # as the fast engine runs the decoder
        row = measure(lambda x: F.conv2d(x, weight, b, padding=1), inputs, settings, device)
    return _with_rate(row, flops=2.0 * h * w * c * c * 9)


def _conv_cases(settings: Settings, device: torch.device) -> Iterator[Case]:
    c, h, w = SIZES[settings.size].conv
    for dtype in settings.dtypes:
        for channels_last in (True, False):
            for bias in (True, False):
                impl = ("channels_last" if channels_last else "NCHW") + (" + bias" if bias else "")
                yield _case("conv", f"conv3x3 {c}->{c} {h}x{w}", impl, dtype,
                            lambda b=bias, cl=channels_last, dt=dtype: _conv_case(
                                c, h, w, b, cl, dt, settings, device))


# ----------------------------------------------------------------------------------------------
# split / merge against a plain copy of the same bytes

PATCH_IMPLS = ("reference", "triton", "cuda")
MERGE_LEVELS = {"level0": (5, 3), "level1": (3, 6)}  # grid, padding (the model's)


def _copy_case(nbytes: int, dtype: torch.dtype, settings: Settings,
               device: torch.device) -> dict[str, Any]:
    """A device copy moving ``nbytes`` (read + write): the bound for a memory-bound op."""
    n = nbytes // (2 * torch.empty((), dtype=dtype).element_size())
    inputs = random_inputs((n,), count=settings.n_inputs, device=device, dtype=dtype, seed=4)
    dst = torch.empty_like(inputs[0])
    return _with_rate(measure(dst.copy_, inputs, settings, device), nbytes=nbytes)


def _split_case(impl: str, dtype: torch.dtype, settings: Settings,
                device: torch.device) -> dict[str, Any]:
    kwargs = {"prenormalized": True, "out_dtype": dtype}
    inputs = random_inputs((1, 3, 1536, 1536), count=settings.n_inputs, device=device,
                           dtype=dtype, seed=5)
    ref = split_patches_reference(inputs[0], **kwargs)
    nbytes = inputs[0].numel() * inputs[0].element_size() + ref.numel() * ref.element_size()
    if impl == "copy":
        return _copy_case(nbytes, dtype, settings, device)
    if impl == "triton" and device.type == "cpu":
        raise SkipCase("35 x 3 x 384^2 outputs are too large for the Triton interpreter")
    fn = split_patches_reference if impl == "reference" else _kernel("split_patches", impl,
                                                                     device)
    err = _check_close(fn(inputs[0], **kwargs), ref, 1e-5 if dtype == torch.float32 else 2e-2)
    del ref
    row = measure(lambda x: fn(x, **kwargs), inputs, settings, device)
    return {**_with_rate(row, nbytes=nbytes), "max_err": err}


def _merge_case(impl: str, level: str, channels_last: bool, dtype: torch.dtype,
                settings: Settings, device: torch.device) -> dict[str, Any]:
    grid, padding = MERGE_LEVELS[level]
    kwargs = {"batch_size": 1, "grid": grid, "padding": padding, "blend": 0,
              "channels_last": channels_last}
    channels = SIZES[settings.size].merge_channels
    inputs = random_inputs((grid * grid, 577, channels), count=settings.n_inputs,
                           device=device, dtype=dtype, seed=6)
    ref = merge_patches_reference(inputs[0], **kwargs)
    nbytes = 2 * ref.numel() * ref.element_size()  # the kept tokens read, the map written
    if impl == "copy":
        return _copy_case(nbytes, dtype, settings, device)
    fn = merge_patches_reference if impl == "reference" else _kernel("merge_patches", impl,
                                                                     device)
    out = fn(inputs[0], **kwargs)
    if out.shape != ref.shape or not torch.equal(out, ref):
        raise CaseFailed("wrong output: differs from the reference (a crop is exact)",
                         {"shape": list(out.shape)})
    del out
    del ref
    row = measure(lambda x: fn(x, **kwargs), inputs, settings, device)
    return _with_rate(row, nbytes=nbytes)


def _patch_cases(settings: Settings, device: torch.device) -> Iterator[Case]:
    dtype = settings.dtypes[0]  # memory-bound: the other 16-bit dtype moves the same bytes
    for impl in (*PATCH_IMPLS, "copy"):
        yield _case("patches", "split 1x3x1536x1536", impl, dtype,
                    lambda i=impl: _split_case(i, dtype, settings, device))
    channels = SIZES[settings.size].merge_channels
    for level, (grid, _) in MERGE_LEVELS.items():
        problem = f"merge {level} {grid * grid}x577x{channels}"
        for impl in PATCH_IMPLS:
            for channels_last in (False, True):
                name = impl + (", channels_last out" if channels_last else "")
                yield _case("patches", problem, name, dtype,
                            lambda i=impl, lv=level, cl=channels_last: _merge_case(
                                i, lv, cl, dtype, settings, device))
        yield _case("patches", problem, "copy", dtype,
                    lambda lv=level: _merge_case("copy", lv, False, dtype, settings, device))


GROUPS = ("attention", "gemm", "conv", "patches")
_BUILDERS = {"attention": _attention_cases, "gemm": _gemm_cases, "conv": _conv_cases,
             "patches": _patch_cases}


def build_cases(groups: Sequence[str], settings: Settings, device: torch.device) -> list[Case]:
    """Every case of ``groups`` (in the order given), nothing allocated yet."""
    unknown = [g for g in groups if g not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown micro-benchmark groups {unknown}; known: {list(GROUPS)}")
    if settings.size not in SIZES:
        raise ValueError(f"unknown size {settings.size!r}; known: {sorted(SIZES)}")
    return [case for g in groups for case in _BUILDERS[g](settings, device)]
