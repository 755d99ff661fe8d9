"""Kernel qualification: every custom kernel the model calls is checked on this device, at the
model's real shapes and layouts, against its PyTorch reference, before it is trusted.

How: the fast engine's first forward for an input shape (``FastEngine._warm_up``, before the
attention timing and any CUDA-graph capture) runs with every op lookup routed through a
:class:`Qualifier` (``backends.set_intercept``). The first time an op is called with a given case
(its arguments' shapes, dtypes, strides and values: ``qualification_cases.describe``), the
qualifier

1. runs the op's reference on those inputs;
2. tries the implementations the call would use, in order (``backends.fallback_chain``: the
   chosen backend, then cuda -> triton -> torch -> reference), each on a copy of the inputs
   (same layouts), after filling the allocator's free memory with NaN so that an element the
   kernel never writes shows; an output within the tests' tolerances
   (``qualification_cases.check``) qualifies it; ``torch`` and ``reference`` are the baseline
   and end the chain unchecked;
3. disqualifies every implementation that failed or raised (``backends.disqualify``: warns once
   naming the op, the error and what runs now; ``auto`` and explicit backends skip it), and
   returns the reference output, so the forward goes on with correct values.

Later calls of a case run the implementation that qualified. The record is stored in the device
cache (``DeviceCache("qualification", device)``: GPU name, capability, driver, versions, kernel
sources hash; the entry key adds the dtype and a hash of the model / options / input shape), so a
second process only re-applies the disqualifications.

Modes (``FastOptions.qualify``, else ``$DEPTHPRO_FAST_QUALIFY``, else ``inline``):
``inline`` (in this process), ``subprocess`` (a child ``python -m depthpro_fast.qualification``
qualifies a random-weight copy of the model and writes the cache: an illegal address kills the
child, not the caller's CUDA context; a child that dies marks the implementation it was running
bad, from its progress file, and is run again without it) and ``off``. The command line's
``predict`` and ``bench`` use ``subprocess``. On a CPU nothing custom runs unless a Triton /
CUDA backend is asked for by name (``auto`` picks torch / reference there): qualification is
then a no-op, said in ``status()``.

``FastOptions.verify_model``: after qualification, the first fast forward is compared with the
reference path (every op its reference) against the dtype's budget (``depthpro_fast.accuracy``);
a failure disqualifies the custom kernels the forward used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import backends
from .device_cache import DeviceCache
from .qualification_cases import check, describe

MODES = ("inline", "subprocess", "off")
ENV_VAR = "DEPTHPRO_FAST_QUALIFY"
TRUSTED = ("torch", "reference")
#: FastOptions fields that do not change which ops the (eager, one-stream) qualifying forward
#: calls: left out of the cache key (the child also turns the graphs / timing off)
NOT_IN_KEY = ("qualify", "verify_model", "cuda_graphs", "max_graphs", "attention_choice",
              "streams", "cudnn_benchmark")
_RUN_LOCK = threading.Lock()  # one qualification at a time (the intercept is process-wide)


def resolve_mode(option: str | None = None) -> str:
    """The mode: ``option`` if given, else ``$DEPTHPRO_FAST_QUALIFY``, else ``inline``."""
    value = option if option is not None else os.environ.get(ENV_VAR, "inline")
    value = value.strip().lower()
    if value not in MODES:
        source = "qualify" if option is not None else f"${ENV_VAR}"
        raise ValueError(f"{source} must be one of {', '.join(MODES)}, got {value!r}")
    return value


@contextlib.contextmanager
def default_mode(mode: str) -> Iterator[None]:
    """Inside: ``mode`` unless ``$DEPTHPRO_FAST_QUALIFY`` says otherwise (the command line's
    ``predict`` and ``bench`` qualify in a child process); the environment is restored after."""
    resolve_mode(mode)
    before = os.environ.get(ENV_VAR)
    if before is None:
        os.environ[ENV_VAR] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_VAR, None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clone_args(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Copies of the tensor arguments with their layouts kept: same shapes, strides, storage
    offsets, and tensors that shared a storage (q, k, v of one qkv) share the copy's."""
    copies: dict[int, torch.UntypedStorage] = {}

    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        storage = t.untyped_storage()
        new = copies.get(storage.data_ptr())
        if new is None:
            new = copies[storage.data_ptr()] = storage.clone()
        return torch.empty(0, dtype=t.dtype, device=t.device).set_(
            new, t.storage_offset(), t.shape, t.stride())

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def poison_free_memory(like: Any, device: torch.device) -> None:
    """Fill, then free, one block per output of ``like`` with all-ones bytes (NaN in every
    float format, e4m3 included): the caching allocator hands those blocks to the next
    allocations of the same sizes, so an element a kernel never writes reads as NaN."""
    outs = like if isinstance(like, (tuple, list)) else [like]
    blocks = [torch.full((max(1, o.numel() * o.element_size()),), 255, dtype=torch.uint8,
                         device=device) for o in outs if isinstance(o, torch.Tensor)]
    del blocks


class Qualifier:
    """The ``backends`` intercept of one qualifying forward (module docstring)."""

    def __init__(self, device: torch.device, *, progress: str | os.PathLike | None = None,
                 on_crash: Callable[[str, str, BaseException], None] | None = None):
        self.device = device
        self.progress = None if progress is None else Path(progress)
        self.on_crash = on_crash
        self.chosen: dict[tuple[str, str, str], str] = {}
        self.records: list[dict[str, Any]] = []
        self._lock = threading.RLock()

    def __call__(self, op: str, backend: str | None, device: torch.device) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            return self.call(op, backend, device, args, kwargs)

        return run

    def _note(self, line: str) -> None:
        if self.progress is not None:
            with open(self.progress, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def call(self, op: str, backend: str | None, device: torch.device, args: tuple,
             kwargs: dict[str, Any]) -> Any:
        chain = backends.fallback_chain(op, backend, device)
        if not any(b in backends.CUSTOM_BACKENDS for b in chain):
            return backends.load_implementation(op, chain[-1])(*args, **kwargs)
        case = describe(args, kwargs)
        key = (op, backends.check_backend(backend), case)
        with self._lock:
            chosen = self.chosen.get(key)
            if chosen is None:
                chosen, ref = self._qualify(op, key[1], device, chain, case, args, kwargs)
                self.chosen[key] = chosen
                return ref
        return backends.load_implementation(op, chosen)(*args, **kwargs)

    def _qualify(self, op: str, backend: str, device: torch.device, chain: list[str],
                 case: str, args: tuple, kwargs: dict[str, Any]) -> tuple[str, Any]:
        t0 = time.perf_counter()
        ref = backends.load_implementation(op, "reference")(*args, **kwargs)
        tried: list[dict[str, Any]] = []
        chosen = "reference"
        for b in chain:
            if b in TRUSTED:
                chosen = b
                break
            bad = backends.is_disqualified(op, b, device)
            if bad is not None:
                tried.append({"impl": b, "ok": False, "why": f"disqualified: {bad}", "ms": 0.0})
                continue
            self._note(f"start\t{op}\t{b}\t{case}")
            t1 = time.perf_counter()
            try:
                a2, k2 = clone_args(args, kwargs)
                poison_free_memory(ref, device)
                out = backends.load_implementation(op, b)(*a2, **k2)
                _sync(device)
                why = check(op, args, kwargs, out, ref)
                del out, a2, k2
            except Exception as e:  # noqa: BLE001  (a kernel that raises is disqualified)
                why = _first_line(e)
                if self.on_crash is not None and _context_lost(device):
                    self.on_crash(op, b, e)
            ms = (time.perf_counter() - t1) * 1e3
            self._note(f"end\t{op}\t{b}")
            tried.append({"impl": b, "ok": why is None, "why": why, "ms": round(ms, 3)})
            if why is None:
                chosen = b
                break
            backends.disqualify(op, b, device, f"{why} (case {case})")
        self.records.append({"op": op, "backend": backend, "case": case, "chosen": chosen,
                             "tried": tried,
                             "ms": round((time.perf_counter() - t0) * 1e3, 3)})
        return chosen, ref


def _context_lost(device: torch.device) -> bool:
    """After a kernel raised: is the CUDA context unusable (an illegal address is sticky)?"""
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
        return False
    except Exception:  # noqa: BLE001
        return True


@contextlib.contextmanager
def intercepted(fn: Callable[[str, str | None, torch.device], Callable[..., Any]],
                ) -> Iterator[None]:
    """Inside: every op lookup goes to ``fn`` (one such run at a time), without gradients,
    ``torch.compile``'d code run eagerly (so that its ops are seen too)."""
    with _RUN_LOCK:
        backends.set_intercept(fn)
        try:
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                yield
        finally:
            backends.set_intercept(None)


def qualify_forward(forward: Callable[[], Any], device: torch.device, *,
                    progress: str | os.PathLike | None = None,
                    on_crash: Callable[[str, str, BaseException], None] | None = None,
                    ) -> dict[str, Any]:
    """Run ``forward()`` once with every op checked as it is called; returns the record
    ``{"results": [...], "disqualified": {"op/backend": why}, "time_s": ...}``."""
    q = Qualifier(device, progress=progress, on_crash=on_crash)
    t0 = time.perf_counter()
    with intercepted(q):
        forward()
        _sync(device)
    here = backends.device_key(device)
    bad = {k.rsplit("@", 1)[0]: why for k, why in backends.disqualified().items()
           if k.rsplit("@", 1)[1] == here}
    return {"results": q.records, "disqualified": bad,
            "time_s": round(time.perf_counter() - t0, 4)}


# ----------------------------------------------------------------------------------------------
# the engine's qualification: cache, modes, summary
# ----------------------------------------------------------------------------------------------


def run_description(model: Any, options: Any, input_shape: tuple[int, ...],
                    compute_fov: bool) -> dict[str, Any]:
    """What decides which ops the qualifying forward calls (the cache entry's identity)."""
    opts = {k: v for k, v in dataclasses.asdict(options).items() if k not in NOT_IN_KEY}
    dtype = "fp8" if options.fp8 else str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"config": model.config.to_dict(), "use_fov": model.fov is not None,
            "backend": model.backend, "options": opts, "input": list(input_shape),
            "dtype": dtype, "compute_fov": bool(compute_fov)}


def entry_key(run: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode())
    return f"{run['dtype']} batch {run['input'][0]} {digest.hexdigest()[:16]}"


def custom_kernels_possible(backend_names: list[str], device: torch.device) -> bool:
    """Whether any op could run a Triton / CUDA implementation with these backends here."""
    return any(b in backends.CUSTOM_BACKENDS
               for op in backends.registered_ops() for name in backend_names
               for b in backends.fallback_chain(op, name, device))


def apply(record: dict[str, Any], device: torch.device) -> None:
    """Disqualify, in this process, what ``record`` found bad."""
    for name, why in record.get("disqualified", {}).items():
        op, b = name.split("/", 1)
        if backends.is_disqualified(op, b, device) is None:
            backends.disqualify(op, b, device, why)


def summarize(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per op: the implementations it qualified with, its cases, and what fell back and why."""
    ops: dict[str, dict[str, Any]] = {}
    for r in record.get("results", []):
        s = ops.setdefault(r["op"], {"implementations": [], "cases": 0, "fallbacks": {}})
        if r["chosen"] not in s["implementations"]:
            s["implementations"].append(r["chosen"])
        s["cases"] += 1
        for t in r["tried"]:
            if not t["ok"]:
                s["fallbacks"].setdefault(t["impl"], t["why"])
    return ops


def qualify_engine(engine: Any, x: torch.Tensor, compute_fov: bool,
                   forward: Callable[[], Any]) -> dict[str, Any]:
    """The engine's qualification for one input (``FastEngine._warm_up``): cached, inline, in a
    child process or off; returns what ``status()["qualification"]`` shows for it."""
    from .qualification_child import run_child

    model, options, device = engine.model, engine.options, x.device
    mode = resolve_mode(getattr(options, "qualify", None))
    if device.type == "meta":  # shapes only (torch.export, the Triton AOT capture): no values
        return {"mode": mode, "state": "nothing to qualify on meta tensors (no values to check)"}
    run = run_description(model, options, tuple(x.shape), compute_fov)
    out: dict[str, Any] = {"mode": mode, "key": entry_key(run)}
    if mode == "off":
        return {**out, "state": "off: no kernel qualified (qualify='off')"}
    names = [model.backend, options.epilogue_backend or model.backend]
    if not custom_kernels_possible(names, device):
        return {**out, "state": f"nothing to qualify: no Triton / CUDA kernel runs on {device} "
                                f"with backend {' / '.join(dict.fromkeys(names))}"}
    cache = DeviceCache("qualification", device)
    record = cache.get(out["key"])
    if record is not None and record.get("complete", True):
        state = f"from the device cache ({record.get('mode', '?')} run, no work)"
    else:
        if record is not None:  # an inline run that lost the CUDA context: not again
            apply(record, device)
        state = ""
        if mode == "subprocess":
            record, state = run_child(run, device)
        if mode == "inline" or record is None:
            record = qualify_forward(forward, device,
                                     on_crash=_stop_inline(cache, out["key"], device))
            record["mode"] = "inline"
            state = (state + "; " if state else "") + \
                f"qualified inline in {record['time_s']:.2f} s"
        cache.put(out["key"], record)
        announce(record, device)
    apply(record, device)
    out.update(state=state, ops=summarize(record), time_s=record.get("time_s"),
               crashes=record.get("crashes", {}))
    if getattr(options, "verify_model", False):
        from .qualification_model import verify_model

        out["verify_model"] = verify_model(model, forward, x, record)
    return out


def _stop_inline(cache: DeviceCache, key: str, device: torch.device,
                 ) -> Callable[[str, str, BaseException], None]:
    """Inline, a kernel that breaks the CUDA context leaves this process unusable: store the
    verdict (so the next process skips that kernel), then stop with what to do."""

    def stop(op: str, backend: str, error: BaseException) -> None:
        why = f"broke the CUDA context ({_first_line(error)})"
        cache.put(key, {"complete": False, "mode": "inline",
                        "disqualified": {f"{op}/{backend}": why}})
        raise RuntimeError(
            f"kernel qualification: op {op!r}'s {backend} implementation {why} on "
            f"{backends.device_key(device)}; it is marked bad in the device cache. Restart the "
            f"process (it runs without it), or qualify in a child process "
            f"({ENV_VAR}=subprocess or FastOptions(qualify='subprocess')).") from error

    return stop


def announce(record: dict[str, Any], device: torch.device) -> None:
    """On a GPU, the first qualification says which implementation each op qualified with."""
    if device.type != "cuda":
        return
    name = torch.cuda.get_device_name(device)
    parts = [f"{op} {'/'.join(s['implementations'])}"
             + (f" (not {', '.join(s['fallbacks'])})" if s["fallbacks"] else "")
             for op, s in summarize(record).items()]
    print(f"depthpro_fast: kernels qualified on {name} in {record['time_s']:.2f} s: "
          + "; ".join(parts), file=sys.stderr)


if __name__ == "__main__":
    from .qualification_child import main

    sys.exit(main())
