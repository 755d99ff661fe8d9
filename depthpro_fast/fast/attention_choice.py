"""Attention chosen by measurement (issue 13 item 3).

At the engine's warm-up, for each attention shape the model runs (the patch encoder's
(35B, heads, 577, D) and the image / FOV encoders' (B, heads, 577, D), in the model dtype), every
implementation available on the device is timed on random q, k, v laid out as the model lays
them out (strided views of a packed (B, N, 3, H, D) qkv tensor), checked against the reference
on the same inputs, and the fastest correct one is used for that shape:

- ``reference`` (``ops.attention_reference``), ``torch`` (SDPA, PyTorch's own pick);
- ``sdpa:<backend>``: SDPA restricted with ``torch.nn.attention.sdpa_kernel`` to one backend
  (CUDA: flash, efficient, cudnn, math; CPU: flash (PyTorch's CPU flash kernel), math);
- ``triton`` and ``cuda`` (our kernels) on a CUDA device. Triton under the interpreter
  (``TRITON_INTERPRET=1``, a test mode) is never a candidate.

The timing path is the same on a CPU and a GPU (:func:`time_candidate`: one untimed call, which
also runs Triton's autotuning and cuDNN's plan search, then the median of ``repeats`` calls;
CUDA events on a GPU, ``perf_counter`` on a CPU). The choice (:func:`choose`) is a pure function
of the timings, unit-tested with injected ones. Every measurement is kept in :data:`MEASURED`
(``depthpro_fast.info()["attention_measurements"]``) and in the engine's ``status()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .. import backends, ops

#: SDPA backends tried one by one, per device type.
SDPA_BACKENDS = {"cuda": ("flash", "efficient", "cudnn", "math"), "cpu": ("flash", "math")}
_SDPA_ENUM = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
              "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
#: max |out - reference| / max |reference| accepted from a candidate (one rounding in 16 bits)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

#: every measurement made in this process: "shape dtype device" -> its record
MEASURED: dict[str, dict[str, Any]] = {}
_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Candidate:
    """An attention implementation: an op backend, optionally SDPA pinned to one kernel."""

    name: str
    backend: str
    sdpa: str | None = None


def candidates(device: torch.device) -> tuple[list[Candidate], dict[str, str]]:
    """(the implementations that can run on ``device``, {name: why not} for the others)."""
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
        if ok:
            out.append(Candidate(name, name))
        else:
            skipped[name] = why or "unavailable"
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
                   clock: Callable[[], Any] | None = None) -> tuple[float, torch.Tensor]:
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
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def choose(timings: dict[str, float | None], order: Sequence[str] = ()) -> str:
    """The fastest candidate with a timing (None: failed or wrong); ties go to the one first
    in ``order`` (then by name), so the choice is deterministic. Raises when none qualifies."""
    ok = {k: v for k, v in timings.items() if v is not None}
    if not ok:
        raise RuntimeError(f"no attention implementation qualified: {timings}")
    rank = {name: i for i, name in enumerate(order)}
    return min(ok, key=lambda k: (ok[k], rank.get(k, len(rank)), k))


def measure(batch: int, heads: int, n: int, d: int, dtype: torch.dtype,
            device: torch.device, *, repeats: int | None = None,
            timer: Callable[..., tuple[float, torch.Tensor]] = time_candidate,
            ) -> dict[str, Any]:
    """Time every candidate for one shape; returns the record (also kept in ``MEASURED``):
    ``{"shape", "dtype", "device", "timings_ms", "errors", "skipped", "choice"}``."""
    if repeats is None:
        repeats = 5 if device.type == "cuda" else 2
    found, skipped = candidates(device)
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
    record = {"shape": [batch, heads, n, d], "dtype": str(dtype).removeprefix("torch."),
              "device": str(device), "timings_ms": timings, "errors": errors,
              "skipped": skipped, "choice": choose(timings, [c.name for c in found])}
    with _LOCK:
        MEASURED[f"{batch}x{heads}x{n}x{d} {record['dtype']} {device}"] = record
    return record


def by_name(name: str, device: torch.device) -> Candidate:
    for c in candidates(device)[0]:
        if c.name == name:
            return c
    raise KeyError(f"no attention candidate {name!r} on {device}")
