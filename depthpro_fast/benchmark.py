"""Latency measurement of DepthPro: timers, the side-by-side runner, stages, tables, JSON.

Rules this module follows (DESIGN.md §5, anchors.md §5.9):

- On a GPU every run is timed with CUDA events around it, starting from an idle device
  (``synchronize`` before the start event, the end event waited on), after warm-up; at least 20
  timed runs by default; the median is reported with the min-max spread. On a CPU the host clock
  (``perf_counter``) is used.
- Inputs are pre-generated random tensors (never zeros), rotated between runs.
- The FLOP floor is ``count_flops(config)`` per image over the peak matmul rate measured in the
  same run (a large bf16 matmul on a GPU, fp32 on a CPU).
- Stage timing runs the model's stages explicitly in sequence (:func:`staged_forward`), with a
  timer between them; nothing is hooked into or stored on the modules.

``depthpro_fast.commands.bench`` is the command-line face of this module.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import backends, ops
from .accuracy import max_abs_error, mean_abs_rel_error
from .config import IMG_SIZE, OFFICIAL, DepthProConfig
from .flops import STAGES
from .ops.merge_patches import tokens_to_maps

OPS = ("attention", "split_patches", "merge_patches")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SCHEMA = "depthpro_fast.bench/1"


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# ----------------------------------------------------------------------------------------------
# timers
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stats:
    """Times of the timed runs (milliseconds) and their summary."""

    times_ms: list[float]

    @property
    def runs(self) -> int:
        return len(self.times_ms)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min(self) -> float:
        return min(self.times_ms)

    @property
    def max(self) -> float:
        return max(self.times_ms)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times_ms)

    def to_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "median_ms": self.median, "min_ms": self.min,
                "max_ms": self.max, "mean_ms": self.mean,
                "times_ms": [round(t, 4) for t in self.times_ms]}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[torch.Tensor], Any], inputs: Sequence[torch.Tensor], *,
                  warmup: int, runs: int, device: torch.device) -> tuple[Stats, Stats]:
    """Time ``fn(x)`` over ``runs`` runs after ``warmup`` untimed ones, rotating ``inputs``.

    Returns (device times, host times). On a CUDA device the device times come from CUDA
    events recorded around each run, and every run starts on an idle device, so a run's time is
    its latency including the host's launch overhead; the host times are ``perf_counter`` around
    the same runs (after a synchronize). On a CPU both are the host times.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not inputs:
        raise ValueError("inputs must hold at least one tensor")
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    synchronize(device)
    device_ms, host_ms = [], []
    for i in range(runs):
        x = inputs[(warmup + i) % len(inputs)]
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            host_ms.append((time.perf_counter() - t0) * 1e3)
            device_ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(x)
            host_ms.append((time.perf_counter() - t0) * 1e3)
    return Stats(device_ms or host_ms), Stats(host_ms)


def random_inputs(shape: Sequence[int], *, count: int, device: torch.device, dtype: torch.dtype,
                  seed: int = 0, low: float = -1.0, high: float = 1.0) -> list[torch.Tensor]:
    """``count`` different uniform random tensors in [low, high) (never zeros)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(count):
        t = torch.rand(tuple(shape), generator=gen, dtype=torch.float32)
        out.append((t * (high - low) + low).to(device=device, dtype=dtype))
    return out


def peak_matmul_tflops(device: torch.device, dtype: torch.dtype | None = None,
                       n: int | None = None, runs: int | None = None) -> dict[str, Any]:
    """The matmul rate this device reaches right now: a large (n x n) @ (n x n) product.

    GPU: bf16, n = 8192, 20 timed runs (CUDA events, median) after about 0.5 s of warm-up
    (clocks ramp up). CPU: fp32, n = 2048, 3 runs.
    Returns ``{"tflops", "dtype", "n", "median_ms"}``.
    """
    gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    n = n or (8192 if gpu else 2048)
    runs = runs or (20 if gpu else 3)
    pairs = [random_inputs((2, n, n), count=1, device=device, dtype=dtype, seed=s)[0]
             for s in (101, 102)]

    def matmul(ab: torch.Tensor) -> torch.Tensor:
        return torch.matmul(ab[0], ab[1])

    warmup = 1
    if gpu:
        # an idle GPU runs at low clocks: keep it busy for about half a second first
        matmul(pairs[0])
        synchronize(device)
        t0 = time.perf_counter()
        matmul(pairs[1])
        synchronize(device)
        warmup = max(5, math.ceil(0.5 / max(time.perf_counter() - t0, 1e-6)))
    stats, _ = time_callable(matmul, pairs, warmup=warmup, runs=runs, device=device)
    del pairs
    return {"tflops": 2 * n ** 3 / (stats.median * 1e-3) / 1e12, "dtype": dtype_name(dtype),
            "n": n, "median_ms": stats.median}


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------

STAGE_NAMES = tuple(STAGES)


@torch.no_grad()
def staged_forward(model: torch.nn.Module, x: torch.Tensor,
                   mark: Callable[[str], None] = lambda stage: None,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``model(x)`` computed stage by stage, calling ``mark(stage)`` after each stage.

    The same computation as ``DepthPro.forward`` (the bench tests check that the outputs are
    identical), in the order of ``STAGE_NAMES``; the FOV encoder runs before the merge since it
    depends only on the input. Nothing is stored on the modules.
    """
    from .inference import check_network_input

    check_network_input(x, model)
    enc = model.encoder
    b = x.shape[0]
    n0 = enc.LEVEL0[0] ** 2 * b
    n1 = enc.LEVEL1[0] ** 2 * b

    patches = ops.split_patches(x, prenormalized=True, backend=enc.backend)
    mark("split")
    tokens, (hook0, hook1) = enc.patch_encoder.forward_with_hooks(patches, enc.hook_block_ids)
    mark("patch encoder")
    global_tokens = enc.image_encoder(patches[n0 + n1:])
    mark("image encoder")
    fov_tokens = None
    if model.fov is not None:
        y = F.interpolate(x, scale_factor=0.25, mode="bilinear", align_corners=False)
        fov_tokens = model.fov.encoder(y)
    mark("FOV encoder")
    latent0 = enc._merge(hook0[:n0], b, enc.LEVEL0)
    latent1 = enc._merge(hook1[:n0], b, enc.LEVEL0)
    x0 = enc._merge(tokens[:n0], b, enc.LEVEL0)
    x1 = enc._merge(tokens[n0:n0 + n1], b, enc.LEVEL1)
    x2 = tokens_to_maps(tokens[n0 + n1:])
    fused = enc.fuse_lowres(torch.cat([enc.upsample2(x2),
                                       enc.upsample_lowres(tokens_to_maps(global_tokens))], dim=1))
    encodings = [enc.upsample_latent0(latent0), enc.upsample_latent1(latent1),
                 enc.upsample0(x0), enc.upsample1(x1), fused]
    mark("merge + upsample")
    features, lowres = model.decoder(encodings)
    mark("decoder")
    depth = model.head(features)
    fov = None
    if model.fov is not None:
        fov = model.fov.head(tokens_to_maps(fov_tokens) + model.fov.downsample(lowres.detach()))
    mark("head")
    return depth, fov


def time_stages(model: torch.nn.Module, inputs: Sequence[torch.Tensor], *, warmup: int,
                runs: int, device: torch.device) -> dict[str, Stats]:
    """Per-stage times of :func:`staged_forward` (CUDA events between stages on a GPU)."""
    for i in range(warmup):
        staged_forward(model, inputs[i % len(inputs)])
    synchronize(device)
    per_stage: dict[str, list[float]] = {s: [] for s in STAGE_NAMES}
    per_stage["total"] = []
    for i in range(runs):
        x = inputs[(warmup + i) % len(inputs)]
        if device.type == "cuda":
            events: list[tuple[str, torch.cuda.Event]] = []

            def mark(stage: str, events=events) -> None:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                events.append((stage, ev))

            torch.cuda.synchronize(device)
            mark("start")
            staged_forward(model, x, mark)
            events[-1][1].synchronize()
            for (_, prev), (stage, ev) in zip(events, events[1:], strict=False):
                per_stage[stage].append(prev.elapsed_time(ev))
            per_stage["total"].append(events[0][1].elapsed_time(events[-1][1]))
        else:
            stamps: list[tuple[str, float]] = [("start", time.perf_counter())]
            staged_forward(model, x, lambda stage, s=stamps: s.append((stage,
                                                                        time.perf_counter())))
            for (_, prev), (stage, now) in zip(stamps, stamps[1:], strict=False):
                per_stage[stage].append((now - prev) * 1e3)
            per_stage["total"].append((stamps[-1][1] - stamps[0][1]) * 1e3)
    return {stage: Stats(times) for stage, times in per_stage.items()}


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> dict[str, Any]:
    """The package's git commit and whether tracked files differ from it (None outside git)."""
    root = str(Path(__file__).resolve().parents[1])
    commit = _run(["git", "rev-parse", "HEAD"], cwd=root)
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return {"commit": commit, "dirty": bool(status)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Device, driver, versions, relevant torch flags and the git commit, as a plain dict."""
    from . import __version__, _ext

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "depthpro_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _dist_version("triton"),
        "transformers": _dist_version("transformers"),
        "extension": {"loaded": _ext.load() is not None, "why_not": _ext.unavailable_reason()},
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "device_type": device.type,
        **git_commit(),
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        env.update({
            "device": p.name,
            "capability": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        })
        smi = _run(["nvidia-smi", f"--id={idx}", "--query-gpu=driver_version,clocks.sm,"
                    "clocks.max.sm,power.limit,temperature.gpu", "--format=csv,noheader"])
        if smi:
            fields = [f.strip() for f in smi.splitlines()[0].split(",")]
            keys = ("driver", "clock_sm", "clock_sm_max", "power_limit", "temperature")
            env.update(dict(zip(keys, fields, strict=False)))
    else:
        env["device"] = env["cpu"]
    return env


def device_slug(env: dict[str, Any]) -> str:
    """A file-name-safe short name of the device: ``nvidia-h100-80gb-hbm3``, ``cpu``."""
    if env.get("device_type") != "cuda":
        return "cpu"
    name = "".join(c if c.isalnum() else "-" for c in str(env.get("device", "gpu")).lower())
    while "--" in name:
        name = name.replace("--", "-")
    return name.strip("-")


def default_results_name(env: dict[str, Any], suffix: str = "") -> str:
    """``<date>-<device>[-suffix].json`` as committed under ``bench/results/``."""
    date = str(env.get("date", ""))[:10] or datetime.date.today().isoformat()
    return f"{date}-{device_slug(env)}{('-' + suffix) if suffix else ''}.json"


# ----------------------------------------------------------------------------------------------
# variants and the runner
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the side-by-side table.

    ``path``: ``reference`` (our model, all ops pure PyTorch), ``fast`` (our model with
    ``backend``: the ops' kernels only), ``engine`` (the whole fast path: ``prepare_fast()``'s
    fused ViT epilogues, conv folds, channels_last, side stream; its own CUDA graphs in mode
    ``cudagraph``), ``hf`` (transformers' ``DepthProForDepthEstimation``). ``mode``: ``eager``,
    ``compile`` (``torch.compile`` of the module) or ``cudagraph`` (one captured CUDA graph,
    replayed).
    """

    path: str
    dtype: torch.dtype
    backend: str = "reference"
    mode: str = "eager"

    @property
    def name(self) -> str:
        if self.path == "hf":
            base = "transformers DepthPro"
        elif self.path == "reference":
            base = "reference"
        elif self.path == "engine":
            base = "fast engine" if self.backend == "auto" else f"fast engine {self.backend}"
        else:
            base = f"fast {self.backend}"
        mode = {"eager": " eager" if self.path == "reference" else "",
                "compile": " torch.compile", "cudagraph": " + CUDA graph"}[self.mode]
        return base + mode

    @property
    def is_fp32_reference(self) -> bool:
        """The row every other row's accuracy is measured against."""
        return self.path == "reference" and self.mode == "eager" and self.dtype == torch.float32


def _json_safe(value: Any) -> Any:
    """``value`` with every container made JSON-friendly (keys and unknown leaves as str)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class SkipRow(Exception):
    """A row that cannot run here; the message says why."""


@dataclasses.dataclass
class RowResult:
    variant: Variant
    batch: int
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    device: Stats | None = None
    host: Stats | None = None
    first_call_ms: float | None = None
    peak_mem_bytes: int | None = None
    ops: dict[str, str] | None = None
    stages: dict[str, Stats] | None = None
    # accuracy on the first input vs the fp32 reference eager row of the same batch (same
    # weights, same input before rounding to the row's dtype)
    mare: float | None = None
    fov_err_deg: float | None = None
    engine: dict[str, Any] | None = None  # FastEngine.status() of engine rows
    # filled in by the runner once the baseline and the floor are known
    speedup: float | None = None
    pct_floor: float | None = None

    @property
    def images_per_s(self) -> float | None:
        return self.batch / (self.device.median * 1e-3) if self.device else None

    def to_dict(self) -> dict[str, Any]:
        v = self.variant
        d: dict[str, Any] = {
            "name": v.name, "path": v.path, "backend": v.backend, "mode": v.mode,
            "dtype": dtype_name(v.dtype), "batch": self.batch, "status": self.status,
            "reason": self.reason, "ops": self.ops, "first_call_ms": self.first_call_ms,
            "peak_mem_bytes": self.peak_mem_bytes, "images_per_s": self.images_per_s,
            "speedup": self.speedup, "pct_floor": self.pct_floor,
            "mare_vs_fp32_reference": self.mare, "fov_abs_err_deg": self.fov_err_deg,
        }
        if self.engine is not None:
            d["engine"] = self.engine
        if self.device is not None:
            d.update(self.device.to_dict())
            d["host_median_ms"] = self.host.median if self.host else None
        if self.stages is not None:
            d["stages"] = {s: st.to_dict() for s, st in self.stages.items()}
        return d


def default_variants(device: torch.device, *, dtypes: Sequence[torch.dtype] | None = None,
                     fast_backends: Sequence[str] = ("auto", "triton", "cuda"),
                     compile: bool | None = None, cuda_graph: bool | None = None,
                     hf: bool | None = None) -> list[Variant]:
    """The rows of ``depthpro-fast bench``.

    GPU: the reference eager in fp32, bf16 and fp16; ``torch.compile`` of the reference, the
    fast backends, a CUDA graph of ``auto``, the fast engine (eager and with its CUDA graphs)
    and transformers in bf16. CPU: the same rows in
    fp32 (the runner skips, with the reason, what cannot or need not run on a CPU).
    ``compile``, ``cuda_graph``, ``hf`` = False leave those rows out; ``dtypes`` puts every
    row in each of the given dtypes instead.
    """
    gpu = device.type == "cuda"
    if dtypes:
        ref_dtypes = fast_dtypes = list(dtypes)
    elif gpu:
        ref_dtypes, fast_dtypes = [torch.float32, torch.bfloat16, torch.float16], [torch.bfloat16]
    else:
        ref_dtypes = fast_dtypes = [torch.float32]
    rows = [Variant("reference", dt) for dt in ref_dtypes]
    for dt in fast_dtypes:
        if compile is not False:
            rows.append(Variant("reference", dt, mode="compile"))
        rows += [Variant("fast", dt, backend=b) for b in fast_backends]
        if cuda_graph is not False and "auto" in fast_backends:
            rows.append(Variant("fast", dt, backend="auto", mode="cudagraph"))
        if fast_backends:
            engine_backend = "auto" if "auto" in fast_backends else fast_backends[0]
            rows.append(Variant("engine", dt, backend=engine_backend))
            if cuda_graph is not False:
                rows.append(Variant("engine", dt, backend=engine_backend, mode="cudagraph"))
        if hf is not False:
            rows.append(Variant("hf", dt, backend="-"))
    return rows


def resolved_ops(backend: str, device: torch.device) -> dict[str, str]:
    """For each op, the backend whose implementation ``backend`` runs on ``device``.

    Raises ``SkipRow`` (with the reason) when an explicit backend cannot run an op here.
    """
    chosen = {}
    for op in OPS:
        try:
            impl = backends.implementation(op, backend, device)
        except Exception as e:  # unavailable backend, missing module, broken import
            raise SkipRow(f"{op}: {e}") from None
        name = backend
        if backend == "auto":
            name = "?"
            for candidate in backends.AUTO_ORDER_CUDA:
                try:
                    if backends.implementation(op, candidate, device) is impl:
                        name = candidate
                        break
                except Exception:
                    continue
        chosen[op] = name
    return chosen


def hf_unavailable(config: DepthProConfig) -> str | None:
    """Why transformers' DepthPro cannot be timed for ``config`` (None: it can)."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install transformers)"
    if config != OFFICIAL:
        return "transformers' model is built for the official config only"
    version = _dist_version("transformers") or "0"
    try:
        too_old = tuple(int(p) for p in version.split(".")[:2]) < (4, 49)
    except ValueError:
        too_old = False
    if too_old:
        return f"transformers {version} has no DepthPro (needs >= 4.49)"
    return None


def build_hf_model(config: DepthProConfig, device: torch.device,
                   dtype: torch.dtype) -> torch.nn.Module:
    """transformers' ``DepthProForDepthEstimation`` with random weights, the official shapes.

    Checked on the meta device: 951,991,330 parameters and 19,247.4 GFLOP, as our model.
    """
    why = hf_unavailable(config)
    if why:
        raise SkipRow(why)
    import transformers

    vit = {"model_type": "dinov2", "hidden_size": config.embed_dim,
           "num_hidden_layers": config.depth, "num_attention_heads": config.num_heads,
           "mlp_ratio": int(config.mlp_ratio), "image_size": 384, "patch_size": 16,
           "use_mask_token": False, "layer_norm_eps": 1e-6}
    hf_config = transformers.DepthProConfig(
        fusion_hidden_size=config.decoder_features, patch_model_config=dict(vit),
        image_model_config=dict(vit), fov_model_config=dict(vit), use_fov_model=True)
    with torch.device(device):
        model = transformers.DepthProForDepthEstimation(hf_config)
    return model.to(dtype=dtype).eval()


class Runner:
    """Runs variants side by side for one config and device, and collects ``RowResult``s."""

    def __init__(self, config: DepthProConfig, device: torch.device, *, batches: Sequence[int],
                 runs: int, warmup: int, stages: bool = False, n_inputs: int | None = None,
                 seed: int = 0, log: Callable[[str], None] | None = None,
                 skip_same_as_reference: bool = True, allow_interpreter: bool = False,
                 cpu_opt_in: Iterable[str] = (), accuracy: bool = True):
        self.config = config
        self.device = device
        self.batches = list(batches)
        self.runs = runs
        self.warmup = warmup
        self.stages = stages
        self.n_inputs = n_inputs or (2 if device.type == "cuda" or runs > 1 else 1)
        self.seed = seed
        self.log = log or (lambda msg: None)
        self.skip_same_as_reference = skip_same_as_reference
        self.allow_interpreter = allow_interpreter
        # rows that run on a CPU only when asked for: "compile", "hf" (minutes each there)
        self.cpu_opt_in = set(cpu_opt_in)
        # accuracy columns: taken from the first call's output; when a row makes no first call
        # (eager, no warm-up), ``accuracy`` allows one more, untimed, forward for them
        self.accuracy = accuracy
        self.interrupted = False
        self._reference_out: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._model: tuple[torch.dtype, torch.nn.Module] | None = None
        self._inputs: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}

    # -- resources ---------------------------------------------------------------------------
    def _free(self) -> None:
        self._model = None
        self._inputs.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def model(self, dtype: torch.dtype) -> torch.nn.Module:
        if self._model is None or self._model[0] != dtype:
            from .api import load

            self._free()
            t0 = time.perf_counter()
            # the same seed for every dtype: the rows' models share their weights (up to
            # rounding), so their outputs can be compared with the fp32 reference's
            torch.manual_seed(self.seed)
            model, _ = load(None, config=self.config, device=self.device, dtype=dtype,
                            backend="reference")
            self.log(f"built the {dtype_name(dtype)} model with random weights in "
                     f"{time.perf_counter() - t0:.1f} s")
            self._model = (dtype, model)
        return self._model[1]

    def inputs(self, dtype: torch.dtype, batch: int) -> list[torch.Tensor]:
        key = (dtype, batch)
        if key not in self._inputs:
            self._inputs[key] = random_inputs((batch, 3, IMG_SIZE, IMG_SIZE),
                                              count=self.n_inputs, device=self.device,
                                              dtype=dtype, seed=self.seed + batch)
        return self._inputs[key]

    # -- one row -----------------------------------------------------------------------------
    def _callable(self, v: Variant, batch: int) -> tuple[Callable[[torch.Tensor], Any],
                                                         torch.nn.Module, Callable[[], None]]:
        """(the function to time, the module it runs, a clean-up function)."""
        cleanup: Callable[[], None] = lambda: None  # noqa: E731
        if v.path == "hf":
            hf_model = build_hf_model(self.config, self.device, v.dtype)

            def run_hf(x: torch.Tensor) -> Any:
                with torch.no_grad():
                    return hf_model(pixel_values=x)

            return run_hf, hf_model, cleanup
        model = self.model(v.dtype)
        model.set_backend(v.backend if v.path in ("fast", "engine") else "reference")
        if v.path == "engine":
            # the engine captures and replays its own CUDA graphs in mode "cudagraph"
            model.prepare_fast({"cuda_graphs": v.mode == "cudagraph"})

            def run_engine(x: torch.Tensor) -> Any:
                with torch.no_grad():
                    return model(x)

            def detach() -> None:
                model.prepare_fast(False)

            return run_engine, model, detach
        if v.mode == "eager":
            def run_eager(x: torch.Tensor) -> Any:
                with torch.no_grad():
                    return model(x)

            return run_eager, model, cleanup
        if v.mode == "compile":
            compiled = torch.compile(model)

            def run_compiled(x: torch.Tensor) -> Any:
                with torch.no_grad():
                    return compiled(x)

            def reset() -> None:
                torch._dynamo.reset()

            return run_compiled, model, reset
        if v.mode == "cudagraph":
            if self.device.type != "cuda":
                raise SkipRow("CUDA graphs need a CUDA device")
            static_x = self.inputs(v.dtype, batch)[0].clone()
            with torch.no_grad():
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # warm up outside the capture (lazy inits)
                    for _ in range(2):
                        model(static_x)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = model(static_x)

            def replay(x: torch.Tensor) -> Any:
                static_x.copy_(x)  # the copy is part of the timed latency
                graph.replay()
                return static_out

            def release() -> None:
                nonlocal graph
                graph.reset()

            return replay, model, release
        raise ValueError(f"unknown mode {v.mode!r}")

    def run_row(self, v: Variant, batch: int) -> RowResult:
        row = RowResult(v, batch)
        cuda = self.device.type == "cuda"
        cleanup: Callable[[], None] = lambda: None  # noqa: E731
        try:
            if v.path in ("fast", "engine"):
                ok, why = backends.backend_status(v.backend, self.device)
                if not ok:
                    raise SkipRow(f"backend {v.backend!r} unavailable: {why}")
                if (v.backend == "triton" and self.device.type == "cpu"
                        and not self.allow_interpreter):
                    raise SkipRow("on a CPU Triton runs in its interpreter, which is a "
                                  "correctness tool, not a performance path")
                row.ops = resolved_ops(v.backend, self.device)
                if (self.skip_same_as_reference and v.mode == "eager" and v.path == "fast"
                        and all(b == "reference" for b in row.ops.values())):
                    raise SkipRow(f"{v.backend} runs the reference for every op on "
                                  f"{self.device.type} (timed in the reference row)")
            elif v.path == "reference":
                row.ops = {op: "reference" for op in OPS}
            if v.mode == "cudagraph" and not cuda:
                raise SkipRow("CUDA graphs need a CUDA device")
            if v.path == "hf" and hf_unavailable(self.config):
                raise SkipRow(hf_unavailable(self.config))
            if not cuda and v.mode == "compile" and "compile" not in self.cpu_opt_in:
                raise SkipRow("on a CPU only with --compile (compilation takes minutes)")
            if not cuda and v.path == "hf" and "hf" not in self.cpu_opt_in:
                raise SkipRow("on a CPU only with --hf (one more full forward)")
            if v.path == "hf":
                self._free()  # make room: transformers' model is built in _callable
            else:
                self.model(v.dtype)  # built before the memory baseline: weights added below
            inputs = self.inputs(v.dtype, batch)
            if cuda:
                synchronize(self.device)
                base = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            fn, module, cleanup = self._callable(v, batch)
            warmup = self.warmup
            if v.mode != "eager" or warmup > 0:
                # the first call on its own (compilation, autotuning, lazy initialisation): it
                # counts as one warm-up run
                synchronize(self.device)
                t0 = time.perf_counter()
                first_out = fn(inputs[0])
                synchronize(self.device)
                row.first_call_ms = (time.perf_counter() - t0) * 1e3
                if v.path != "hf":  # (no extra forward: the first call's output is checked)
                    self._check_accuracy(row, first_out)
                del first_out
                warmup = max(warmup - 1, 0)
            row.device, row.host = time_callable(fn, inputs, warmup=warmup, runs=self.runs,
                                                 device=self.device)
            if row.first_call_ms is None and self.accuracy and v.path != "hf":
                self._check_accuracy(row, fn(inputs[0]))
            if cuda:
                # weights + one input + everything allocated on top (activations, workspaces,
                # a CUDA graph's pool, compilation buffers)
                peak = torch.cuda.max_memory_allocated(self.device) - base
                peak += inputs[0].numel() * inputs[0].element_size()
                if v.path != "hf":  # transformers' weights were allocated after the baseline
                    peak += sum(p.numel() * p.element_size() for p in module.parameters())
                row.peak_mem_bytes = peak
            if v.path == "engine" and getattr(module, "fast_engine", None) is not None:
                row.engine = _json_safe(module.fast_engine.status())
            if self.stages and v.mode == "eager" and v.path in ("reference", "fast"):
                row.stages = time_stages(module, inputs, warmup=min(self.warmup, 2),
                                         runs=self.runs, device=self.device)
        except SkipRow as e:
            row.status, row.reason = "skipped", str(e)
        except Exception as e:  # a broken backend must not stop the other rows
            row.status, row.reason = "failed", f"{type(e).__name__}: {e}".strip()
            # (a CUDA error such as an illegal address poisons the context: later rows on this
            # device will fail too; the reason of the first failure is the one to read)
        finally:
            try:
                cleanup()
            except Exception:
                pass
            if v.path == "hf" or row.status == "failed":
                self._free()
        return row

    def _check_accuracy(self, row: RowResult, out: Any) -> None:
        """Compare a row's output on its first input with the fp32 reference's (same batch).

        The fp32 reference eager row records the reference; rows run after it (the plan runs
        fp32 first) get their mean absolute relative error of the canonical inverse depth and
        their FOV error. Without an fp32 reference row in the run, the columns stay empty.
        """
        cid, fov = out
        v = row.variant
        if v.is_fp32_reference:
            if row.batch not in self._reference_out:
                self._reference_out[row.batch] = (
                    cid.detach().float().clone(),
                    None if fov is None else fov.detach().float().clone())
        ref = self._reference_out.get(row.batch)
        if ref is None:
            return
        row.mare = mean_abs_rel_error(cid, ref[0])
        if fov is not None and ref[1] is not None:
            row.fov_err_deg = max_abs_error(fov, ref[1])

    def run(self, variants: Iterable[Variant],
            on_row: Callable[[list[RowResult]], None] | None = None) -> list[RowResult]:
        """Time every variant at every batch size; rows come back in the given order.

        ``on_row(rows)`` is called after each row with every row so far (in table order), e.g.
        to save partial results. An interrupt (Ctrl-C, or ``timeout --signal=INT``) stops the
        run: the rows not yet timed come back as skipped ("interrupted") and ``interrupted``
        is set, so a run cut short by a time limit still reports what it measured.
        """
        variants = list(variants)
        order = {dt: i for i, dt in enumerate(dict.fromkeys(v.dtype for v in variants))}
        # one model per dtype at a time: run grouped by dtype, torch.compile (slow to compile)
        # last in its group, transformers last of all
        plan = sorted(((v, b) for v in variants for b in self.batches),
                      key=lambda vb: (vb[0].path == "hf", order[vb[0].dtype],
                                      vb[0].mode == "compile"))
        results: dict[tuple[Variant, int], RowResult] = {}

        def in_order() -> list[RowResult]:
            return [results[(v, b)] for b in self.batches for v in variants
                    if (v, b) in results]

        self.interrupted = False
        try:
            for i, (v, b) in enumerate(plan, 1):
                self.log(f"[{i}/{len(plan)}] {v.name} {dtype_name(v.dtype)} batch {b}")
                row = self.run_row(v, b)
                if row.status != "ok":
                    self.log(f"    {row.status}: {row.reason}")
                else:
                    self.log(f"    median {row.device.median:.1f} ms")
                results[(v, b)] = row
                if on_row is not None:
                    on_row(in_order())
        except KeyboardInterrupt:
            self.interrupted = True
            self.log("interrupted: the rows not timed yet are reported as skipped")
            for v, b in plan:
                results.setdefault((v, b), RowResult(v, b, "skipped",
                                                     "interrupted (time limit or Ctrl-C)"))
        self._free()
        return in_order()


def fill_relative(rows: Sequence[RowResult], flops_per_image: float,
                  peak_tflops: float | None) -> RowResult | None:
    """Set speed-up (vs the first ok reference eager row of the same batch) and % of floor."""
    baselines: dict[int, RowResult] = {}
    for r in rows:
        if (r.status == "ok" and r.variant.path == "reference" and r.variant.mode == "eager"
                and r.batch not in baselines):
            baselines[r.batch] = r
    for r in rows:
        if r.status != "ok":
            continue
        base = baselines.get(r.batch)
        if base is not None:
            r.speedup = base.device.median / r.device.median
        if peak_tflops:
            floor_ms = flops_per_image * r.batch / (peak_tflops * 1e12) * 1e3
            r.pct_floor = 100.0 * floor_ms / r.device.median
    return next(iter(baselines.values()), None)


# ----------------------------------------------------------------------------------------------
# report: text and JSON
# ----------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def format_table(rows: Sequence[RowResult], note_width: int = 60) -> str:
    """The side-by-side table; rows that did not run show their reason in the last column."""
    header = ("variant", "dtype", "batch", "median ms", "min-max ms", "img/s", "speed-up",
              "% floor", "peak mem", "MARE", "FOV err", "note")
    lines = []
    for r in rows:
        v = r.variant
        if r.status == "ok":
            d = r.device
            note = ""
            if v.path == "fast" and r.ops:
                note = "ops: " + ", ".join(f"{op.split('_')[0]}={b}" for op, b in r.ops.items())
            if r.first_call_ms is not None and v.mode != "eager":
                note = (note + "; " if note else "") + f"first call {r.first_call_ms / 1e3:.1f} s"
            failures = ((r.engine or {}).get("graphs") or {}).get("failures")
            if failures:
                note = (note + "; " if note else "") + f"graph capture failed (eager): {failures}"
            is_ref = v.is_fp32_reference and r.mare == 0.0
            cells = (v.name, dtype_name(v.dtype), str(r.batch), f"{d.median:.1f}",
                     f"{d.min:.1f}-{d.max:.1f}", _fmt(r.images_per_s, ".2f"),
                     _fmt(r.speedup, ".2f", "-") + ("x" if r.speedup else ""),
                     _fmt(r.pct_floor, ".1f") + ("%" if r.pct_floor is not None else ""),
                     _gib(r.peak_mem_bytes), "ref" if is_ref else _fmt(r.mare, ".1e"),
                     "ref" if is_ref else _fmt(r.fov_err_deg, ".3f"), note)
        else:
            reason = (r.reason or "").replace("\n", " ")
            if len(reason) > note_width:
                reason = reason[:note_width - 3] + "..."
            cells = (v.name, dtype_name(v.dtype), str(r.batch), "-", "-", "-", "-", "-", "-",
                     "-", "-", f"{r.status}: {reason}")
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    right = {2, 3, 4, 5, 6, 7, 8, 9, 10}

    def fmt_row(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt_row(header), sep, *(fmt_row(c) for c in lines)])


def format_stages(rows: Sequence[RowResult], flops_by_stage: dict[str, int] | None,
                  peak_tflops: float | None) -> str:
    """Per-stage medians of every row that has them, with each stage's share and TFLOP/s."""
    blocks = []
    for r in rows:
        if not r.stages:
            continue
        total = r.stages["total"].median
        lines = [f"{r.variant.name} {dtype_name(r.variant.dtype)}, batch {r.batch} "
                 f"(staged total {total:.1f} ms, whole forward {r.device.median:.1f} ms):",
                 f"  {'stage':<18} {'median ms':>10} {'share':>7} {'GFLOP':>10} {'TFLOP/s':>9}"
                 + ("  % peak" if peak_tflops else "")]
        for stage in STAGE_NAMES:
            st = r.stages[stage]
            gflop = (flops_by_stage or {}).get(stage, 0) * r.batch / 1e9
            rate = gflop / st.median if st.median > 0 and gflop else None  # GFLOP/ms = TFLOP/s
            line = (f"  {stage:<18} {st.median:>10.2f} {100 * st.median / total:>6.1f}% "
                    f"{gflop:>10,.1f} {_fmt(rate, '.1f'):>9}")
            if peak_tflops:
                line += f"  {_fmt(rate and 100 * rate / peak_tflops, '.1f'):>6}"
            lines.append(line)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def results_dict(*, env: dict[str, Any], config_name: str, config: DepthProConfig,
                 params: int, flops_per_image: float, flops_by_stage: dict[str, int],
                 peak: dict[str, Any] | None, settings: dict[str, Any],
                 rows: Sequence[RowResult], notes: Sequence[str]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "environment": env,
        "config": {"name": config_name, **config.to_dict()},
        "parameters": params,
        "flops_per_image": flops_per_image,
        "flops_by_stage": flops_by_stage,
        "peak_matmul": peak,
        "settings": settings,
        "rows": [r.to_dict() for r in rows],
        "notes": list(notes),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
    }
