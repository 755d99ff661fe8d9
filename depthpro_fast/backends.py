"""Backends and per-op dispatch.

A backend chooses the implementation of every op (`depthpro_fast/ops/`):

- ``reference``: pure PyTorch, any device; the correctness baseline (plain math).
- ``torch``: PyTorch's own fused kernels where one exists for the op
  (``scaled_dot_product_attention`` for attention: on a CPU its flash kernel is ~2.7x the
  reference's matmul-softmax-matmul); ops with no such kernel run their reference code, which
  is plain PyTorch already. Any device.
- ``triton``: Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
- ``cuda``: the optional C++/CUDA extension ``depthpro_fast._C`` (CUDA tensors).
- ``auto``: per op, the fastest implementation available for the tensor's device, falling back
  to the next one with the reason recorded (see :func:`fallback_log`): on a GPU
  cuda > triton > torch > reference, on a CPU torch > reference.

Op files register their implementations with :func:`register`; implementations are loaded
lazily so that importing the package never imports Triton or the extension.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import _ext

BACKENDS = ("reference", "torch", "triton", "cuda", "auto")
# Preference order of "auto" (fastest first) on a CUDA device and on any other device.
AUTO_ORDER_CUDA = ("cuda", "triton", "torch", "reference")
AUTO_ORDER_CPU = ("torch", "reference")

# op name -> backend -> zero-argument loader returning the implementation callable
_REGISTRY: dict[str, dict[str, Callable[[], Callable[..., Any]]]] = {}
_LOADED: dict[tuple[str, str], Callable[..., Any]] = {}
_FALLBACKS: dict[tuple[str, str], str] = {}
# (op, backend, device type) -> the implementation chosen for it. Ops are called
# inside torch.compile'd code: after the first call the dispatch is one dict lookup, which Dynamo
# traces, instead of the status probes (torch 2.11's Dynamo refuses importlib.util.find_spec).
_RESOLVED: dict[tuple[str, str, str], Callable[..., Any]] = {}
_LOCK = threading.Lock()


def register(op: str, backend: str, loader: Callable[[], Callable[..., Any]]) -> None:
    """Register a lazily loaded implementation of ``op`` for ``backend``."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"cannot register backend {backend!r}; one of "
                         f"{tuple(b for b in BACKENDS if b != 'auto')}")
    _REGISTRY.setdefault(op, {})[backend] = loader
    # a replaced implementation takes effect at the next call (tests register fakes)
    _LOADED.pop((op, backend), None)
    _forget_resolved(op)


def check_backend(backend: str | None) -> str:
    """Validate a backend name (None means ``auto``)."""
    if backend is None:
        return "auto"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    return backend


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_INSTALLED: bool | None = None


def triton_installed() -> bool:
    """Whether Triton can be imported (probed once, without importing it)."""
    global _TRITON_INSTALLED
    if _TRITON_INSTALLED is None:
        _TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
    return _TRITON_INSTALLED


def triton_status(device: torch.device | None = None) -> tuple[bool, str | None]:
    """Whether Triton kernels can run on ``device`` (None: on any device), and why not.

    On a CUDA device (None: the current one, when CUDA is available) this includes one tiny
    launch, once per process and device (:func:`triton_launch_probe`): importing Triton does not
    prove that it can build its launcher (it needs a C compiler and Python's headers)."""
    if not triton_installed():
        return False, "triton is not installed"
    if device is not None and device.type == "cpu":
        if not triton_interpreting():
            return False, "Triton runs on CPU tensors only with TRITON_INTERPRET=1"
        return True, None
    if device is not None and device.type != "cuda":
        return False, f"Triton kernels need a CUDA device, got {device.type}"
    if device is None and not torch.cuda.is_available() and not triton_interpreting():
        return False, "no CUDA device (on CPU Triton needs TRITON_INTERPRET=1)"
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device is not None:
        return triton_launch_probe(device)
    return True, None


# -- the Triton launch probe -------------------------------------------------------------------
# Triton compiles a small C launcher with the host's C compiler (and Python.h) at the first
# launch of a process; a machine without them imports Triton fine and fails only there, in the
# middle of a forward. One tiny launch per process and device decides, before Triton is chosen.

_TRITON_PROBES: dict[int, tuple[bool, str | None]] = {}  # CUDA device index -> (ok, why not)
_PROBE_LOCK = threading.Lock()


def _default_probe_launch(device: torch.device) -> None:
    from .triton.probe import launch_probe

    launch_probe(device)


def triton_launch_probe(device: torch.device,
                        launch: Callable[[torch.device], None] | None = None,
                        ) -> tuple[bool, str | None]:
    """Whether one tiny Triton kernel launches (and computes right) on the CUDA ``device``, and
    why not; run once per process and device, then remembered (:func:`triton_probe_log`).

    ``launch`` (tests): the function that launches the probe kernel on a device and raises if it
    fails. Nothing is launched off CUDA, under ``TRITON_INTERPRET`` (no compiler step there),
    inside a ``torch.compile`` trace or a CUDA-graph capture (asked again later)."""
    if device.type != "cuda" or triton_interpreting():
        return True, None
    index = device.index if device.index is not None else torch.cuda.current_device()
    found = _TRITON_PROBES.get(index)
    if found is not None:
        return found
    if torch.compiler.is_compiling() or (torch.cuda.is_available()
                                         and torch.cuda.is_current_stream_capturing()):
        return True, None  # no host sync possible here; the first eager use probes
    with _PROBE_LOCK:
        found = _TRITON_PROBES.get(index)
        if found is None:
            try:
                (launch or _default_probe_launch)(torch.device("cuda", index))
                found = (True, None)
            except Exception as e:  # noqa: BLE001  (no compiler, no Python.h, driver, ...)
                lines = str(e).strip().splitlines()
                found = (False, f"a first Triton launch failed on cuda:{index} "
                                f"({type(e).__name__}: {lines[0][:200] if lines else ''}); "
                                "Triton needs a C compiler (gcc, or $CC) and Python's headers "
                                "(python3-dev) to build its launcher")
            _TRITON_PROBES[index] = found
    return found


def triton_probe_log() -> dict[str, dict[str, Any]]:
    """``{"cuda:N": {"ok": bool, "why_not": str | None}}`` of the launch probes run so far."""
    return {f"cuda:{i}": {"ok": ok, "why_not": why}
            for i, (ok, why) in sorted(_TRITON_PROBES.items())}


def cuda_status(device: torch.device | None = None) -> tuple[bool, str | None]:
    """Whether the CUDA extension can run on ``device`` (None: on any device), and why not."""
    if _ext.load() is None:
        return False, _ext.unavailable_reason()
    if device is not None and device.type != "cuda":
        return False, f"the CUDA extension needs CUDA tensors, got {device.type}"
    if device is None and not torch.cuda.is_available():
        return False, "the CUDA extension is built but no CUDA device is visible"
    return True, None


def backend_status(backend: str, device: torch.device | None = None) -> tuple[bool, str | None]:
    if backend in ("reference", "torch", "auto"):
        return True, None
    if backend == "triton":
        return triton_status(device)
    if backend == "cuda":
        return cuda_status(device)
    raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")


def _load(op: str, backend: str) -> Callable[..., Any]:
    key = (op, backend)
    fn = _LOADED.get(key)
    if fn is None:
        with _LOCK:
            fn = _LOADED.get(key)
            if fn is None:
                fn = _REGISTRY[op][backend]()
                _LOADED[key] = fn
    return fn


def implementation(op: str, backend: str | None, device: torch.device) -> Callable[..., Any]:
    """The implementation of ``op`` to run for ``backend`` on ``device``.

    An explicit backend that cannot run raises ``RuntimeError`` saying why; ``auto`` falls back
    and records why (``fallback_log``). The choice is remembered per (op, backend, device type).
    """
    if _INTERCEPT is not None:  # kernel qualification is running (see the section below)
        return _INTERCEPT(op, backend, device)
    key = (op, backend or "auto", device.type, device.index)
    fn = _RESOLVED.get(key)
    if fn is not None:
        return fn
    fn = _resolve(op, backend, device)
    _RESOLVED[key] = fn
    return fn


def _resolve(op: str, backend: str | None, device: torch.device) -> Callable[..., Any]:
    backend = check_backend(backend)
    impls = _REGISTRY.get(op)
    if impls is None:
        raise KeyError(f"no op named {op!r}")
    if backend == "torch" and "torch" not in impls:
        return _load(op, "reference")  # no dedicated PyTorch kernel: the reference is plain torch
    if backend != "auto":
        if backend not in impls:
            raise RuntimeError(f"op {op!r} has no {backend!r} implementation "
                               f"(it has: {', '.join(sorted(impls))})")
        ok, why = backend_status(backend, device)
        if not ok:
            raise RuntimeError(f"backend {backend!r} cannot run op {op!r} on {device}: {why}")
        if is_disqualified(op, backend, device) is not None:
            return _load(op, next_implementation(op, backend, device))
        return _load(op, backend)
    order = AUTO_ORDER_CUDA if device.type == "cuda" else AUTO_ORDER_CPU
    for candidate in order:
        if candidate not in impls:  # this op has no such implementation: nothing to report
            continue
        ok, why = backend_status(candidate, device)
        if not ok:
            _note_fallback(op, candidate, why or "unavailable")
            continue
        bad = is_disqualified(op, candidate, device)
        if bad is not None:
            _note_fallback(op, candidate, f"disqualified on {device_key(device)}: {bad}")
            continue
        if candidate == "cuda" and not _ext.has_op(op):
            _note_fallback(op, candidate, f"the built extension has no {op!r} kernel")
            continue
        try:
            return _load(op, candidate)
        except Exception as e:  # a broken optional backend must not break the model
            _note_fallback(op, candidate, f"failed to load: {e}")
    return _load(op, "reference")


def preload(backend: str | None, device: torch.device) -> None:
    """Resolve (import, compile-free) every op's implementation for ``backend`` on ``device``.

    ``torch.compile(fullgraph=True)`` cannot trace a first-time load (an import under a lock),
    so models call this when their backend is set. Failures are left for the call to report.
    """
    for op in _REGISTRY:
        try:
            implementation(op, backend, device)
        except Exception:  # noqa: BLE001  (reported again, with the reason, at call time)
            pass


def _note_fallback(op: str, backend: str, why: str) -> None:
    _FALLBACKS[(op, backend)] = why


def fallback_log() -> dict[str, str]:
    """``{"op/backend": reason}`` for every implementation that ``auto`` (or
    :func:`implementation_with_fallback`) had to skip."""
    return {f"{op}/{b}": why for (op, b), why in sorted(_FALLBACKS.items())}


def registered_ops() -> dict[str, tuple[str, ...]]:
    return {op: tuple(sorted(impls)) for op, impls in sorted(_REGISTRY.items())}


class BackendUnavailableError(RuntimeError):
    """An explicitly chosen backend cannot run on the model's device."""


def require_backend(backend: str | None, device: torch.device) -> None:
    """Refuse, before any work, an explicit backend that cannot run on ``device``, with the
    reason ``info()`` gives; otherwise every call of every op would fail on its own."""
    from ._spelling import option

    backend = check_backend(backend)
    if device.type == "meta":  # nothing runs on meta tensors (shape tracing, AOT capture)
        return
    ok, why = backend_status(backend, device)
    if not ok:
        raise BackendUnavailableError(
            f"backend {backend!r} cannot run on {device}: {why}. "
            + option("backend='auto'", "--backend auto")
            + " uses the fastest backend that can; `depthpro-fast info` lists which are "
            "available and why not")


# ----------------------------------------------------------------------------------------------
# qualification: implementations found wrong on a device, and what runs instead
# (``depthpro_fast/qualification.py`` decides; this section only records and honours it)
# ----------------------------------------------------------------------------------------------

#: The order in which an implementation falls back when it is disqualified on a device, for
#: ``auto`` and for an explicit backend alike. ``torch`` and ``reference`` are PyTorch's own
#: code: they are the baseline and are never disqualified.
FALLBACK_ORDER = ("cuda", "triton", "torch", "reference")
CUSTOM_BACKENDS = ("cuda", "triton")

# (op, backend, device key) -> why it was disqualified
_DISQUALIFIED: dict[tuple[str, str, str], str] = {}
_WARNED: set[tuple[str, str, str]] = set()
# When set, ``implementation`` hands every lookup to it (kernel qualification records the ops
# one forward calls and checks each at its real shapes); None otherwise.
_INTERCEPT: Callable[[str, str | None, torch.device], Callable[..., Any]] | None = None


def device_key(device: torch.device | str) -> str:
    """``"cuda:0"`` (the current device's index filled in), ``"cpu"``: what a
    disqualification is recorded for."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _forget_resolved(op: str | None = None) -> None:
    for key in [k for k in _RESOLVED if op is None or k[0] == op]:
        _RESOLVED.pop(key, None)
    for key in [k for k in _WITH_FALLBACK if op is None or k[0] == op]:
        _WITH_FALLBACK.pop(key, None)


def is_disqualified(op: str, backend: str, device: torch.device | str) -> str | None:
    """Why ``backend``'s implementation of ``op`` is disqualified on ``device``, or None."""
    if not _DISQUALIFIED:
        return None
    return _DISQUALIFIED.get((op, backend, device_key(device)))


def fallback_chain(op: str, backend: str | None, device: torch.device | str) -> list[str]:
    """The implementations of ``op`` that a call with ``backend`` may run on ``device``, in
    the order they are tried: the chosen one first (``auto``: the fastest available), then
    the next ones of :data:`FALLBACK_ORDER`. Unregistered, unavailable and (``cuda``) unbuilt
    implementations are left out; disqualified ones are kept (the caller skips them). Ends at
    the first of ``torch`` / ``reference`` (``torch`` without its own implementation of the op
    is its reference)."""
    device = torch.device(device)
    backend = check_backend(backend)
    impls = _REGISTRY.get(op)
    if impls is None:
        raise KeyError(f"no op named {op!r}")
    if backend == "auto":
        order = AUTO_ORDER_CUDA if device.type == "cuda" else AUTO_ORDER_CPU
    else:
        order = FALLBACK_ORDER[FALLBACK_ORDER.index(backend):]
    chain = []
    for b in order:
        if b in CUSTOM_BACKENDS:
            if b not in impls or not backend_status(b, device)[0]:
                continue
            if b == "cuda" and not _ext.has_op(op):
                continue
            chain.append(b)
            continue
        chain.append(b if b in impls else "reference")
        break
    return chain


def next_implementation(op: str, backend: str, device: torch.device | str) -> str:
    """The backend whose implementation of ``op`` runs on ``device`` in place of ``backend``'s
    (the first of :func:`fallback_chain` that is not disqualified)."""
    for b in fallback_chain(op, backend, device)[1:]:
        if is_disqualified(op, b, device) is None:
            return b
    return "reference"


def disqualify(op: str, backend: str, device: torch.device | str, why: str) -> None:
    """Never run ``backend``'s implementation of ``op`` on ``device`` again in this process
    (``auto`` skips it, with the reason in :func:`fallback_log`; an explicit backend falls to
    the next of :data:`FALLBACK_ORDER`), and warn once, saying which op, why, and what runs
    now."""
    if op not in _REGISTRY:
        raise KeyError(f"no op named {op!r}; registered: {', '.join(sorted(_REGISTRY))}")
    if backend not in CUSTOM_BACKENDS:
        raise ValueError(f"only the custom implementations ({', '.join(CUSTOM_BACKENDS)}) can "
                         f"be disqualified, got {backend!r}: torch and reference are the "
                         "baseline they are checked against")
    key = (op, backend, device_key(device))
    with _LOCK:
        _DISQUALIFIED[key] = why
        _forget_resolved(op)
    if key not in _WARNED:
        _WARNED.add(key)
        now = next_implementation(op, backend, device)
        warnings.warn(f"depthpro_fast: op {op!r}: the {backend} implementation failed its "
                      f"qualification on {key[2]} ({why}); it now runs the {now} "
                      "implementation", RuntimeWarning, stacklevel=2)


def disqualified() -> dict[str, str]:
    """``{"op/backend@device": why}`` for every implementation disqualified in this process."""
    return {f"{op}/{b}@{dev}": why for (op, b, dev), why in sorted(_DISQUALIFIED.items())}


def requalify(op: str | None = None, device: torch.device | str | None = None) -> None:
    """Forget disqualifications (all, of one op, and / or on one device): tests, and a
    qualification run again after a kernel was fixed."""
    dev = None if device is None else device_key(device)
    with _LOCK:
        for key in [k for k in _DISQUALIFIED if op in (None, k[0]) and dev in (None, k[2])]:
            del _DISQUALIFIED[key]
            _WARNED.discard(key)
        _forget_resolved(op)


def load_implementation(op: str, backend: str) -> Callable[..., Any]:
    """The implementation ``backend`` registered for ``op`` (``torch`` without one: the
    reference), loaded without any availability check or fallback (qualification)."""
    impls = _REGISTRY.get(op)
    if impls is None:
        raise KeyError(f"no op named {op!r}")
    if backend == "torch" and "torch" not in impls:
        backend = "reference"
    return _load(op, backend)


def set_intercept(fn: Callable[[str, str | None, torch.device], Callable[..., Any]] | None,
                  ) -> None:
    """Route every :func:`implementation` lookup through ``fn`` (None: back to normal)."""
    global _INTERCEPT
    _INTERCEPT = fn


# -- explicit backends, falling back per op ----------------------------------------------------

# (FALLBACK_ORDER, above: the order an explicit backend falls back in, from the one asked)
_WITH_FALLBACK: dict[tuple[str, str, str], tuple[Callable[..., Any], str]] = {}


def implementation_with_fallback(op: str, backend: str | None,
                                 device: torch.device) -> tuple[Callable[..., Any], str]:
    """``(implementation, backend used)`` of ``op`` for ``backend`` on ``device``: the asked
    backend's own where it has one that runs here, else the next of :data:`FALLBACK_ORDER` after
    it that does (``cuda`` -> ``triton`` -> ``torch`` -> ``reference``), each skipped backend
    recorded with its reason in :func:`fallback_log`. ``auto`` (or None): auto's choice.

    For callers that run many ops on one backend of which some ops have no implementation (the
    fast engine's epilogue ops have no CUDA-extension kernels): :func:`implementation` refuses
    those; this runs them on the next backend and says so. Remembered per (op, backend,
    device type), as :func:`implementation` is."""
    backend = check_backend(backend)
    key = (op, backend, device.type)
    found = _WITH_FALLBACK.get(key)
    if found is not None:
        return found
    if op not in _REGISTRY:
        raise KeyError(f"no op named {op!r}")
    if backend == "auto":
        fn = implementation(op, "auto", device)
        used = next((b for b in FALLBACK_ORDER if _LOADED.get((op, b)) is fn), "reference")
        found = (fn, used)
    else:
        for candidate in FALLBACK_ORDER[FALLBACK_ORDER.index(backend):]:
            try:
                fn = implementation(op, candidate, device)
            except Exception as e:  # noqa: BLE001  (missing, unavailable here, or broken)
                _note_fallback(op, candidate, str(e).strip().splitlines()[0] if str(e).strip()
                               else type(e).__name__)
                continue
            if candidate == "cuda" and device.type != "meta" and not _ext.has_op(op):
                _note_fallback(op, candidate, f"the built extension has no {op!r} kernel")
                continue
            found = (fn, candidate)
            break
        assert found is not None  # the reference runs anywhere
    _WITH_FALLBACK[key] = found
    return found
