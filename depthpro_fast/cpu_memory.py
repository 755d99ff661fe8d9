"""Keep a CPU forward's freed activation memory in the process (glibc malloc tuning).

PyTorch's CPU allocator caches nothing: every tensor is a ``posix_memalign`` and every free a
``free``. glibc serves requests above its mmap threshold (dynamic, at most 32 MiB) with a fresh
``mmap`` and returns them with ``munmap``, so each forward of DepthPro takes a page fault and
zero-fills a page for every 4 KiB of its large activations, again and again: on this
project's 2-core EPYC one tiny-config forward at 1536x1536 took ~300 000 minor faults (1.2 GB
zero-filled) per call, and the time varied with the machine's memory traffic.

:func:`tune_cpu_allocator` raises glibc's mmap threshold and trim threshold once per process
(``mallopt``), so large blocks come from the heap and freed ones stay there for the next
forward: later forwards reuse pages already faulted in. What it keeps is bounded: glibc
returns the free memory at the top of the heap past ``M_TRIM_THRESHOLD`` (:data:`SETTINGS`),
and the heap never grows past the forward's own peak plus fragmentation (measured: docs/
cpu_path.md, "Memory and steady timings"). Blocks of 2 GiB or more (``mallopt`` takes an
``int``) are still mapped and unmapped each time.

It does nothing, and says why, where it cannot or should not act: not Linux, a C library that
is not glibc, ``malloc`` provided by another allocator (jemalloc / tcmalloc through
``LD_PRELOAD``, tuned their own way), glibc's two thresholds already set through the environment
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``), or
``$DEPTHPRO_FAST_MALLOC=off``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from typing import Any

ENV_VAR = "DEPTHPRO_FAST_MALLOC"
#: accepted values of ``$DEPTHPRO_FAST_MALLOC`` (unset: ``auto``)
MODES = ("auto", "off")

# mallopt parameter numbers (glibc's <malloc.h>)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
PARAMS = {"M_MMAP_THRESHOLD": M_MMAP_THRESHOLD, "M_TRIM_THRESHOLD": M_TRIM_THRESHOLD}

_INT_MAX = 2**31 - 1  # mallopt's value is a C int
#: what :func:`tune_cpu_allocator` sets, in order. The mmap threshold first: setting it also
#: turns glibc's dynamic threshold off. Both at the largest value ``mallopt`` accepts: every
#: block below 2 GiB comes from the heap, and up to 2 GiB of free memory at the heap's top
#: stays mapped between forwards (when the free top passes it, glibc returns all of it).
SETTINGS: dict[str, int] = {"M_MMAP_THRESHOLD": _INT_MAX, "M_TRIM_THRESHOLD": _INT_MAX}

#: environment variables through which glibc reads the same two settings at start-up (a
#: user's choice: left alone; other malloc variables, e.g. MALLOC_ARENA_MAX, do not conflict)
GLIBC_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
GLIBC_TUNABLES_MALLOC = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")
#: allocators that replace malloc (LD_PRELOAD); they are tuned their own way (MALLOC_CONF ...)
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_LOCK = threading.Lock()
_RECORD: dict[str, Any] | None = None


def malloc_mode() -> str:
    """``$DEPTHPRO_FAST_MALLOC`` (``auto`` when unset); raises on any other value."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"${ENV_VAR}={os.environ[ENV_VAR]!r} is not understood; accepted: "
                         f"{', '.join(MODES)} (unset means auto)")
    return value


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def load_glibc() -> tuple[Any | None, str | None, str | None]:
    """``(this process's C library, its glibc version, None)``, or ``(None, None, why not)``
    where the platform is not Linux or its C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None, None, f"not Linux ({sys.platform}): mallopt's settings are glibc's"
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process
        version_fn = libc.gnu_get_libc_version
        libc.mallopt  # noqa: B018  (present in every glibc; checked before it is called)
    except (OSError, AttributeError):
        return None, None, "the C library is not glibc (no gnu_get_libc_version / mallopt)"
    version_fn.restype = ctypes.c_char_p
    return libc, version_fn().decode(), None


def malloc_provider(libc: Any) -> str | None:
    """The file of the shared object whose ``malloc`` this process calls (``dladdr``), or
    None where it cannot be found out."""
    try:
        dladdr = libc.dladdr
        addr = ctypes.cast(libc.malloc, ctypes.c_void_p).value
    except (AttributeError, TypeError, ValueError):
        return None
    info = _DlInfo()
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    if not dladdr(addr, ctypes.byref(info)) or not info.dli_fname:
        return None
    return info.dli_fname.decode(errors="replace")


def environment_tuning() -> list[str]:
    """The variables through which the environment already sets glibc's mmap or trim
    threshold (``MALLOC_*_THRESHOLD_``, ``GLIBC_TUNABLES``)."""
    found = [f"{k}={os.environ[k]}" for k in GLIBC_MALLOC_ENV if k in os.environ]
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    found += [f"GLIBC_TUNABLES {t}" for t in tunables.split(":")
              if t.split("=", 1)[0] in GLIBC_TUNABLES_MALLOC]
    return found


def _decide(apply: bool = True) -> dict[str, Any]:
    record: dict[str, Any] = {"mode": malloc_mode(), "applied": False, "why_not": None,
                              "glibc": None, "malloc": None, "settings": {}}
    libc, version, why = load_glibc()
    record["glibc"] = version
    if libc is None:
        record["why_not"] = why
        return record
    provider = malloc_provider(libc)
    record["malloc"] = provider
    if record["mode"] == "off":
        record["why_not"] = f"${ENV_VAR}=off"
        return record
    other = next((a for a in OTHER_ALLOCATORS if provider and a in provider.lower()), None)
    if other:
        record["why_not"] = (f"malloc is {other} ({provider}), not glibc's: glibc's settings "
                             f"would change nothing (tune {other} itself, e.g. jemalloc's "
                             "MALLOC_CONF)")
        return record
    tuned = environment_tuning()
    if tuned:
        record["why_not"] = ("glibc malloc is already tuned by the environment ("
                             + ", ".join(tuned) + "): left as set")
        return record
    if not apply:
        record["why_not"] = "not yet in this process (applied when a CPU model is prepared)"
        record["would_set"] = dict(SETTINGS)
        return record
    failed = []
    for name, value in SETTINGS.items():
        ok = libc.mallopt(ctypes.c_int(PARAMS[name]), ctypes.c_int(value)) == 1
        record["settings"][name] = value if ok else None
        if not ok:
            failed.append(name)
    record["applied"] = not failed
    if failed:
        record["why_not"] = f"glibc {version} refused mallopt({', '.join(failed)})"
    return record


def tune_cpu_allocator() -> dict[str, Any]:
    """Tune glibc malloc for repeated CPU forwards, once per process (later calls return the
    first call's record). Returns what it did: ``mode`` (``$DEPTHPRO_FAST_MALLOC``),
    ``applied``, ``settings`` (name -> value set, None where glibc refused), ``why_not`` (None
    when applied), ``glibc`` (version or None), ``malloc`` (the library whose ``malloc`` runs).
    """
    global _RECORD
    with _LOCK:
        if _RECORD is None:
            _RECORD = _decide()
        return dict(_RECORD, settings=dict(_RECORD["settings"]))


def tuning_record() -> dict[str, Any] | None:
    """:func:`tune_cpu_allocator`'s record in this process, or None before its first call."""
    with _LOCK:
        return None if _RECORD is None else dict(_RECORD, settings=dict(_RECORD["settings"]))


def forget() -> None:
    """Forget the record, so the next :func:`tune_cpu_allocator` decides again (tests). The
    settings already made stay in effect: glibc has no way back to its dynamic threshold."""
    global _RECORD
    with _LOCK:
        _RECORD = None


THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"
#: PyTorch's switch (c10/core/alloc_cpu.cpp, read at its first CPU allocation): blocks of
#: 2 MiB or more are aligned to 2 MiB and advised MADV_HUGEPAGE
TORCH_THP_ENV = "THP_MEM_ALLOC_ENABLE"


def transparent_hugepages() -> dict[str, Any]:
    """The kernel's transparent-huge-page mode (``always`` / ``madvise`` / ``never``, None
    where unknown), PyTorch's ``THP_MEM_ALLOC_ENABLE`` as set in this environment, and this
    process's anonymous memory in huge pages (bytes, None where unknown)."""
    mode = None
    try:
        with open(THP_SYSFS, encoding="utf-8") as f:
            text = f.read()
        mode = text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        pass
    huge = None
    try:
        with open("/proc/self/smaps_rollup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    huge = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"system": mode, "torch_env": os.environ.get(TORCH_THP_ENV), "process_bytes": huge}


def allocator_state() -> dict[str, Any]:
    """What ``depthpro-fast info`` shows: the tuning record of this process (or what
    :func:`tune_cpu_allocator` would do, ``pending``), and transparent huge pages."""
    record = tuning_record()
    pending = record is None
    if pending:
        try:
            record = _decide(apply=False)
        except ValueError as e:  # a bad $DEPTHPRO_FAST_MALLOC: shown, not raised, by info
            record = {"mode": None, "applied": False, "why_not": str(e), "glibc": None,
                      "malloc": None, "settings": {}}
    return {**record, "pending": pending, "thp": transparent_hugepages()}


def describe(state: dict[str, Any]) -> list[str]:
    """:func:`allocator_state` as lines of text."""
    where = f"glibc {state['glibc']}" if state.get("glibc") else "not glibc"
    lines = [f"cpu allocator: malloc from {state.get('malloc') or 'unknown'} ({where}); "
             f"${ENV_VAR}={state.get('mode')}"]
    if state.get("applied"):
        lines.append("  tuned: " + ", ".join(f"{k}={v}" for k, v in state["settings"].items()))
    elif state.get("would_set"):
        lines.append(f"  {state['why_not']}; would set "
                     + ", ".join(f"{k}={v}" for k, v in state["would_set"].items()))
    else:
        lines.append(f"  not tuned: {state.get('why_not')}")
    thp = state.get("thp") or {}
    huge = thp.get("process_bytes")
    lines.append(f"  transparent huge pages: system {thp.get('system') or 'unknown'}; "
                 f"PyTorch {TORCH_THP_ENV}={thp.get('torch_env') or 'unset'}; this process "
                 + (f"{huge / 2**20:.0f} MiB" if huge is not None else "unknown"))
    return lines
