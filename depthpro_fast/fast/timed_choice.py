"""A choice made by timing is made once: per process and shape, stored per device, near-ties
broken by a fixed order.

The fast path picks some implementations by measuring them (the attention kernel per shape,
``fast/attention_choice.py``; the CPU GEMM library, ``fast/cpu_gemm.py``). Timings of kernels
that are about as fast as each other are noise: measured afresh, two models built from the
same weights would pick different kernels and give bitwise-different depth maps (on a loaded
2-core CPU, eight measurements of one attention shape picked the two equal SDPA entries 4:4,
with per-candidate medians spreading 34-200 % between runs). So every such choice goes through
:func:`decide`:

- **once per process**: the first call measures; later calls (other engines, other threads)
  get the same record. Decisions are serialised by one lock (overlapping measurements would
  slow each other down and measure the same thing twice);
- **stored per device** in ``DeviceCache(kind, device)`` (``depthpro_fast/device_cache.py``:
  keyed by the device, its driver, the torch / CUDA / cuDNN / Triton / package versions and the
  kernel sources), so later processes reuse it without timing anything. A stored choice is
  reused only if ``usable(record)`` says that implementation can still run here; otherwise
  (and for a damaged entry) it is measured again and the reason kept in ``why_measured``;
- **near-ties go to a fixed order** (:func:`pick`): among the candidates within
  ``margin`` of the fastest, the first in the caller's preference order wins, so a new
  measurement (another device, new versions) flips only on a real difference.

Each record says where it came from: ``source`` is ``"measured"`` (timed in this process) or
``"device cache"`` (timed by an earlier process on this device and version set).
``$DEPTHPRO_FAST_REMEASURE`` (``1`` / ``all``, or a comma list of kinds such as
``attention_choice,cpu_gemm``) ignores stored choices: the kind is measured again, once in this
process, and the new record replaces the stored one.
"""

from __future__ import annotations

import datetime
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..device_cache import DeviceCache

REMEASURE_ENV = "DEPTHPRO_FAST_REMEASURE"
#: the kinds of choice made through :func:`decide` (the ``DeviceCache`` names)
KINDS = ("attention_choice", "cpu_gemm")

#: A candidate within this fraction of the fastest counts as tied with it; the tie goes to the
#: one earlier in the fixed preference order. CPU: 10 %. On this project's shared 2-core EPYC,
#: two candidates that run the very same kernel (SDPA's own pick and SDPA pinned to its CPU
#: flash kernel) measured 0-11 % apart in 7 of 8 runs at (35, 2, 577, 64) (~190 ms a call; 26 %
#: once), and the CPU GEMM rule this replaces asked oneDNN for 8 %. At (1, 2, 577, 64) (~10 ms a
#: call) the same pair measured up to 116 % apart: there the 4 ms scheduler slices of a loaded
#: machine dominate and no margin makes a measurement repeatable, which is why the choice is
#: stored; the margin only keeps a re-measurement on a quiet machine from flipping.
#: CUDA: 3 %. CUDA events resolve ~0.5 us and the median of 5 back-to-back launches of a
#: >= 0.1 ms kernel varies by ~1-2 % with clock boost and L2 state; attention is ~13 % of a
#: forward, so a 3 % slower pick costs < 0.5 % end to end, while a wider margin would give real
#: differences away.
NEAR_TIE_MARGIN = {"cuda": 0.03, "cpu": 0.10}
_DEFAULT_MARGIN = 0.10

#: this process's id in stored records (a record with another id was made by an earlier process)
PROCESS = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

#: every decision used in this process: kind -> label -> record (``depthpro_fast.info()``)
USED: dict[str, dict[str, dict[str, Any]]] = {}
_LOCK = threading.RLock()

_TRUE = ("1", "true", "yes", "on", "all")
_FALSE = ("", "0", "false", "no", "off", "none")


def near_tie_margin(device: torch.device | str) -> float:
    """The near-tie margin for timings on ``device`` (see :data:`NEAR_TIE_MARGIN`)."""
    return NEAR_TIE_MARGIN.get(torch.device(device).type, _DEFAULT_MARGIN)


def pick(timings: Mapping[str, float | None], order: Sequence[str], margin: float) -> str:
    """The choice from timings: the candidates with a timing (None: failed or wrong) within
    ``margin`` (a fraction) of the fastest are tied, and the one first in ``order`` wins
    (names not in ``order`` come after it, by name). Raises when no candidate has a timing."""
    if margin < 0:
        raise ValueError(f"the near-tie margin is a fraction >= 0, got {margin!r}")
    ok = {k: float(v) for k, v in timings.items() if v is not None}
    if not ok:
        raise RuntimeError(f"no candidate qualified (timings: {dict(timings)})")
    fastest = min(ok.values())
    tied = [k for k, v in ok.items() if v <= fastest * (1.0 + margin)]
    rank = {name: i for i, name in enumerate(order)}
    return min(tied, key=lambda k: (rank.get(k, len(rank)), k))


def remeasure_requested(kind: str) -> bool:
    """Whether ``$DEPTHPRO_FAST_REMEASURE`` asks to measure ``kind`` again (stored ignored)."""
    value = os.environ.get(REMEASURE_ENV, "").strip().lower()
    if value in _FALSE:
        return False
    if value in _TRUE:
        return True
    asked = {v.strip() for v in value.split(",") if v.strip()}
    unknown = asked - set(KINDS)
    if unknown:
        raise ValueError(f"${REMEASURE_ENV}={os.environ[REMEASURE_ENV]!r}: unknown kind(s) "
                         f"{', '.join(sorted(unknown))}; accepted: 1 / all, 0, or a comma list "
                         f"of {', '.join(KINDS)}")
    return kind in asked


def decide(kind: str, device: torch.device | str, key: str, label: str,
           measure: Callable[[], dict[str, Any]],
           usable: Callable[[dict[str, Any]], str | None]) -> dict[str, Any]:
    """The record of the choice ``key`` of ``kind`` on ``device``: stored (this process or an
    earlier one) when ``usable(stored)`` returns None, else ``measure()``'d now and stored.

    ``measure()`` returns a JSON-able dict with at least ``"choice"``; ``usable(record)``
    returns why a stored record cannot be used here (its choice unavailable), or None.
    ``label`` names the record in :data:`USED`. The returned record adds ``source``,
    ``why_measured`` (None when reused), ``cache_file`` and ``cache_error``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind of timed choice {kind!r}; known: {', '.join(KINDS)}")
    with _LOCK:
        cache = DeviceCache(kind, device)
        stored = cache.get(key)
        why: str | None
        if stored is None:
            why = "no stored choice for this device and version set"
        elif remeasure_requested(kind) and stored.get("process") != PROCESS:
            why = f"${REMEASURE_ENV} asks to measure {kind} again"
        else:
            try:
                why = usable(stored) if isinstance(stored.get("choice"), str) else "damaged"
            except Exception as e:  # noqa: BLE001  (a damaged entry is measured again)
                why = f"damaged ({type(e).__name__}: {e})"
            if why is not None:
                why = f"stored choice {stored.get('choice')!r} not usable: {why}"
        if why is None:
            assert stored is not None
            record = dict(stored)
        else:
            record = dict(measure())
            record.update(process=PROCESS, measured_at=datetime.datetime.now(
                datetime.timezone.utc).isoformat(timespec="seconds"))
            cache.put(key, dict(record))  # a copy: the fields added below are not stored
        fresh = record.get("process") == PROCESS
        record.update(source="measured" if fresh else "device cache",
                      why_measured=why, cache_file=str(cache.path) if cache.path else None,
                      cache_error=cache.disk_error)
        USED.setdefault(kind, {})[label] = record
        return dict(record)


def source_words(record: Mapping[str, Any]) -> str:
    """A few words on where a record came from, for status lines."""
    if record.get("source") == "device cache":
        return f"stored by an earlier process ({record.get('measured_at', 'time unknown')})"
    if record.get("why_measured") is None:
        return "measured earlier in this process"
    return f"measured in this process: {record['why_measured']}"
