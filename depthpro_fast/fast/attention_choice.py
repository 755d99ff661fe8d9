"""Attention chosen by measurement.

At the engine's warm-up, for each attention shape the model runs (the patch encoder's
(35B, heads, 577, D) and the image / FOV encoders' (B, heads, 577, D), in the model dtype), every
implementation available on the device is timed on random q, k, v laid out as the model lays
them out (strided views of a packed (B, N, 3, H, D) qkv tensor), checked against the reference
on the same inputs, and the fastest correct one (near-ties: below) is used for that shape:

- ``reference`` (``ops.attention_reference``), ``torch`` (SDPA, PyTorch's own pick);
- ``sdpa:<backend>``: SDPA restricted with ``torch.nn.attention.sdpa_kernel`` to one backend
  (CUDA: flash, efficient, cudnn, math; CPU: flash (PyTorch's CPU flash kernel), math);
- ``triton`` and ``cuda`` (our kernels) on a CUDA device. Triton under the interpreter
  (``TRITON_INTERPRET=1``, a test mode) is never a candidate.

The timing path is the same on a CPU and a GPU (:func:`time_candidate`: one untimed call, which
also runs Triton's autotuning and cuDNN's plan search, then the median of ``repeats`` calls;
CUDA events on a GPU, :data:`CLOCK` on a CPU). The choice (:func:`choose`) is a pure function
of the timings, unit-tested with injected ones: among the candidates within the near-tie margin
of the fastest (``fast/timed_choice.py``: 3 % on CUDA, 10 % on a CPU) the first in
:data:`PREFERENCE` wins.

The engine asks :func:`decide`, not :func:`measure`: a shape is measured once per process and
stored per device and version set (``DeviceCache("attention_choice", device)``), so every later
engine and process uses the same kernel and gives bitwise the same output
(``fast/timed_choice.py``; ``$DEPTHPRO_FAST_REMEASURE`` measures again). On a CUDA device the
candidates that materialise the (B, H, N, N) scores (``reference``, ``sdpa:math``) are skipped
above :data:`SCORES_LIMIT_BYTES` (at batch 8 they would allocate ~12 GB to lose). Every record
used in this process is in ``timed_choice.USED["attention_choice"]``
(``depthpro_fast.info()["attention_measurements"]``) and in the engine's ``status()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .. import backends, ops
from . import timed_choice

#: SDPA backends tried one by one, per device type.
SDPA_BACKENDS = {"cuda": ("flash", "efficient", "cudnn", "math"), "cpu": ("flash", "math")}
_SDPA_ENUM = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
              "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
#: max |out - reference| / max |reference| accepted from a candidate (one rounding in 16 bits)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

#: The fixed order that breaks near-ties (``timed_choice.pick``), first preferred: candidates
#: whose output bits depend on nothing timed come first (our fixed-tile CUDA kernel, then the
#: SDPA kernels pinned one by one), Triton's autotuned kernel after them (its tile sizes, and so
#: its rounding, are picked by Triton's own timing), then SDPA's own pick (PyTorch's heuristic
#: may move between kernels with its version) and last the two that materialise the scores.
PREFERENCE = ("cuda", "sdpa:flash", "sdpa:cudnn", "sdpa:efficient", "triton", "torch",
              "sdpa:math", "reference")
#: Candidates that write the whole (B, H, N, N) score matrix (in fp32: the reference's math;
#: SDPA's math kernel at least once in the model dtype, plus the softmax's copy) ...
MATERIALISING = ("reference", "sdpa:math")
#: ... are skipped on a CUDA device when B * H * N * N * 4 bytes of fp32 scores exceed this:
#: 512 MiB. The patch encoder at batch 1 (35 x 16 x 577^2 x 4 B = 746 MB) is above it, the
#: image / FOV encoders at batch 1 (21 MB) below; at batch 8 the two would allocate ~12 GB. A
#: GPU's flash-style kernels beat them by far more than the margin at every size above it.
SCORES_LIMIT_BYTES = 512 * 2**20
#: CPU timer of :func:`time_candidate` (read at each call: tests inject a noisy one)
CLOCK: Callable[[], float] = time.perf_counter


@dataclasses.dataclass(frozen=True)
class Candidate:
    """An attention implementation: an op backend, optionally SDPA pinned to one kernel."""

    name: str
    backend: str
    sdpa: str | None = None


def scores_bytes(batch: int, heads: int, n: int) -> int:
    """Bytes of one fp32 (B, H, N, N) score matrix (what the materialising candidates write)."""
    return batch * heads * n * n * 4


def candidates(device: torch.device, shape: Sequence[int] | None = None,
               ) -> tuple[list[Candidate], dict[str, str]]:
    """(the implementations that can run on ``device``, in :data:`PREFERENCE` order,
    {name: why not} for the others). With ``shape`` = (B, H, N, D) on a CUDA device, the
    candidates that materialise the scores are skipped above :data:`SCORES_LIMIT_BYTES`."""
    out = [Candidate("reference", "reference"), Candidate("torch", "torch")]
    skipped: dict[str, str] = {}
    for b in SDPA_BACKENDS.get(device.type, ()):
        if hasattr(torch.nn.attention.SDPBackend, _SDPA_ENUM[b]):
            out.append(Candidate(f"sdpa:{b}", "torch", b))
        else:
            skipped[f"sdpa:{b}"] = f"this torch ({torch.__version__}) has no SDPA backend {b}"
    for name in ("triton", "cuda"):
        ok, why = backends.backend_status(name, device)
        if ok and name == "triton" and backends.triton_interpreting():
            ok, why = False, "the Triton interpreter (TRITON_INTERPRET=1) is a test mode"
        if ok and device.type != "cuda":
            ok, why = False, f"{name} kernels are for CUDA devices"
        if ok:  # failed its qualification on this device: never timed, never chosen
            bad = backends.is_disqualified("attention", name, device)
            if bad:
                ok, why = False, f"disqualified on {device}: {bad}"
        if ok:
            out.append(Candidate(name, name))
        else:
            skipped[name] = why or "unavailable"
    if shape is not None and device.type == "cuda":
        size = scores_bytes(*shape[:3])
        if size > SCORES_LIMIT_BYTES:
            for c in [c for c in out if c.name in MATERIALISING]:
                out.remove(c)
                skipped[c.name] = (f"materialises {size / 2**20:.0f} MiB of fp32 attention "
                                   f"scores (limit on CUDA: {SCORES_LIMIT_BYTES / 2**20:.0f} MiB):"
                                   " never the fastest at this size, not timed")
    rank = {name: i for i, name in enumerate(PREFERENCE)}
    out.sort(key=lambda c: (rank.get(c.name, len(rank)), c.name))
    return out, skipped


@contextlib.contextmanager
def pinned(candidate: Candidate | None) -> Iterator[None]:
    """Inside: SDPA runs only the candidate's backend (no effect for the others)."""
    if candidate is None or candidate.sdpa is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, _SDPA_ENUM[candidate.sdpa])]):
        yield


def qkv_like_the_model(batch: int, heads: int, n: int, d: int, dtype: torch.dtype,
                       device: torch.device, seed: int = 0):
    """q, k, v as strided (B, H, N, D) views of one packed (B, N, 3, H, D) tensor."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(batch, n, 3, heads, d, generator=g).to(device=device, dtype=dtype)
    return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))


def time_candidate(c: Candidate, q, k, v, scale: float, repeats: int,
                   ) -> tuple[float, torch.Tensor]:
    """(median ms of ``repeats`` calls after one untimed call, the output)."""
    cuda = q.device.type == "cuda"

    def call() -> torch.Tensor:
        with pinned(c):
            return ops.attention(q, k, v, scale=scale, backend=c.backend)

    out = call()  # compiles / autotunes / plans; not timed
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            clock = CLOCK
            t0 = clock()
            call()
            times.append((clock() - t0) * 1e3)
    return statistics.median(times), out


def choose(timings: dict[str, float | None], order: Sequence[str] = PREFERENCE,
           margin: float = 0.0) -> str:
    """The candidate to use: among those with a timing (None: failed or wrong) within
    ``margin`` (a fraction) of the fastest, the first in ``order`` (then by name). Raises when
    none qualifies."""
    try:
        return timed_choice.pick(timings, order, margin)
    except RuntimeError:
        raise RuntimeError(f"no attention implementation qualified: {timings}") from None


def shape_key(batch: int, heads: int, n: int, d: int, dtype: torch.dtype) -> str:
    """The name of one measured shape (the device cache's entry key)."""
    return f"{batch}x{heads}x{n}x{d} {str(dtype).removeprefix('torch.')}"


def measure(batch: int, heads: int, n: int, d: int, dtype: torch.dtype,
            device: torch.device, *, repeats: int | None = None,
            timer: Callable[..., tuple[float, torch.Tensor]] | None = None,
            ) -> dict[str, Any]:
    """Time every candidate for one shape now (the engine uses :func:`decide`); the record:
    ``{"shape", "dtype", "device", "timings_ms", "errors", "skipped", "choice", "margin",
    "order"}``. ``timer`` defaults to :func:`time_candidate`."""
    timer = timer or time_candidate
    if repeats is None:
        repeats = 5 if device.type == "cuda" else 2
    found, skipped = candidates(device, (batch, heads, n, d))
    q, k, v = qkv_like_the_model(batch, heads, n, d, dtype, device)
    scale = d ** -0.5
    ref = ops.attention_reference(q, k, v, scale).double()
    peak = float(ref.abs().max().clamp_min(1e-30))
    timings: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    for c in found:
        try:
            ms, out = timer(c, q, k, v, scale, repeats)
            err = float((out.double() - ref).abs().max()) / peak
            if not err <= TOLERANCE.get(dtype, 1e-4):
                raise ValueError(f"error {err:.2e} vs the reference is over the tolerance")
            timings[c.name] = float(ms)
        except Exception as e:  # noqa: BLE001  (a candidate that cannot run is recorded, skipped)
            timings[c.name] = None
            errors[c.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    order = [c.name for c in found]
    margin = timed_choice.near_tie_margin(device)
    return {"shape": [batch, heads, n, d], "dtype": str(dtype).removeprefix("torch."),
            "device": str(device), "timings_ms": timings, "errors": errors,
            "skipped": skipped, "choice": choose(timings, order, margin), "margin": margin,
            "order": order}


def decide(batch: int, heads: int, n: int, d: int, dtype: torch.dtype,
           device: torch.device, *, repeats: int | None = None,
           timer: Callable[..., tuple[float, torch.Tensor]] | None = None) -> dict[str, Any]:
    """The attention implementation for one shape: measured once per process and stored per
    device (``fast/timed_choice.py``); a stored choice is reused while that candidate is still
    available here for this shape. The record of :func:`measure` plus ``source``
    (``"measured"`` / ``"device cache"``), ``why_measured``, ``measured_at``, ``cache_file``."""
    device = torch.device(device)
    shape = (batch, heads, n, d)

    def usable(stored: dict[str, Any]) -> str | None:
        found, skipped = candidates(device, shape)
        if stored["choice"] in {c.name for c in found}:
            return None
        return skipped.get(stored["choice"], "not a candidate in this process")

    key = shape_key(batch, heads, n, d, dtype)
    return timed_choice.decide(
        "attention_choice", device, key, f"{key} {device}",
        lambda: measure(batch, heads, n, d, dtype, device, repeats=repeats, timer=timer), usable)


def by_name(name: str, device: torch.device) -> Candidate:
    for c in candidates(device)[0]:
        if c.name == name:
            return c
    raise KeyError(f"no attention candidate {name!r} on {device}")
