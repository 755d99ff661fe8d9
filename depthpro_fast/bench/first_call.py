"""Time to first depth map: a fresh model's first call, cold and warm (``depthpro-fast bench``).

What is timed: from a freshly built model (random weights, already on the device) to its first
depth map: the row's preparation (``set_backend``, ``prepare_fast``, a CUDA graph's warm-up and
capture, the ``torch.compile`` wrapper) and its first forward, synchronized, on the host clock.
Building the model is not timed (random initialisation is not checkpoint loading).

* **cold**: in a new Python process (``python -m depthpro_fast.bench.first_call``) that has run
  nothing before: no Triton kernel is loaded, no autotune result, cuBLAS / cuDNN handle or
  workspace, CUDA graph pool, or device-cache entry is in memory. The disk caches are as found
  (Triton's ``TRITON_CACHE_DIR``, the device cache ``$DEPTHPRO_FAST_DEVICE_CACHE``), so after
  the bench's timed rows this is a second run of the command line on this machine; with
  ``empty_disk_caches`` the process gets empty temporary ones instead: a first run on a new
  machine (every Triton kernel compiled, autotuned; every device decision made).
* **warm**: a second fresh model in that same process, right after the cold one: the in-memory
  caches hold what the cold call loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .runner import RowResult, Runner
from .timing import dtype_name, synchronize, tf32_disabled
from .variants import Variant, fast_options_key

#: ``--first-call`` choices of ``depthpro-fast bench``.
MODES = ("default", "engine", "all", "none")
#: Paths whose first call can be timed (transformers and ONNX Runtime rows cannot).
TIMED_PATHS = ("reference", "fast", "engine")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class FirstCallError(RuntimeError):
    """The first-call process failed; the message says how (its last lines of output)."""


def select_rows(rows: Sequence[RowResult], mode: str, gpu: bool) -> list[RowResult]:
    """The rows whose first call is timed for ``mode`` (only rows that ran).

    ``default``: one row, the path a user runs: on a GPU the first fast engine + CUDA graph row
    that is not fp8 (else the first fast engine row), on a CPU the first fast engine row.
    ``engine``: every fast engine row. ``all``: every reference, fast and engine row.
    """
    if mode not in MODES:
        raise ValueError(f"unknown first-call mode {mode!r} (accepted: {', '.join(MODES)})")
    ok = [r for r in rows if r.status == "ok" and r.variant.path in TIMED_PATHS]
    if mode == "none":
        return []
    if mode == "all":
        return ok
    engine = [r for r in ok if r.variant.path == "engine"]
    if mode == "engine":
        return engine
    if gpu:
        graphs = [r for r in engine if r.variant.mode == "cudagraph" and not r.variant.fp8]
        engine = graphs or engine
    return engine[:1]


def measure(runner: Runner, v: Variant, batch: int) -> tuple[float, float]:
    """(cold, warm) first-call milliseconds of two fresh models in this process, one after the
    other (cold is cold only when nothing ran before in the process: see ``main``)."""
    times = []
    for _ in range(2):
        runner.free()
        runner.model(v.dtype)  # a fresh model (not timed)
        x = runner.inputs(v.dtype, batch)[0]
        synchronize(runner.device)
        t0 = time.perf_counter()
        fn, _, cleanup = runner.row_callable(v, batch)
        with torch.no_grad():
            out = fn(x)
        synchronize(runner.device)
        times.append((time.perf_counter() - t0) * 1e3)
        del out
        cleanup()
    runner.free()
    return times[0], times[1]


def in_subprocess(config: str, device: torch.device, v: Variant, batch: int, *, seed: int = 0,
                  timeout_s: float = 900.0, empty_disk_caches: bool = False) -> dict[str, Any]:
    """Run ``measure`` for one row in a new Python process; its result as a dict
    (``cold_ms``, ``warm_ms``). Raises ``FirstCallError`` when the process fails."""
    argv = [sys.executable, "-m", "depthpro_fast.bench.first_call", "--config", config,
            "--device", str(device), "--path", v.path, "--backend", v.backend,
            "--mode", v.mode, "--dtype", dtype_name(v.dtype), "--batch", str(batch),
            "--seed", str(seed)] + (["--fp8"] if v.fp8 else []) + (
                ["--fast-options", v.options] if v.options else [])
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="depthpro_fast-first-call-") as tmp:
        if empty_disk_caches:
            env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton")
            env["DEPTHPRO_FAST_DEVICE_CACHE"] = os.path.join(tmp, "device-cache")
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, env=env,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise FirstCallError(f"no result within {timeout_s:.0f} s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise FirstCallError(f"exit {proc.returncode}: {tail[-400:]}")
    return json.loads(lines[-1])


def fill(rows: Sequence[RowResult], mode: str, *, config: str, device: torch.device,
         seed: int = 0, empty_disk_caches: bool = False,
         log: Callable[[str], None] = lambda msg: None,
         run: Callable[..., dict[str, Any]] = in_subprocess) -> bool:
    """Time the first call of the rows ``mode`` selects (``select_rows``), each in a process of
    its own, and set their ``first_call_cold_ms`` / ``first_call_warm_ms`` (or
    ``first_call_error``). Returns False when interrupted (Ctrl-C, a time limit)."""
    chosen = select_rows(rows, mode, device.type == "cuda")
    for i, row in enumerate(chosen, 1):
        v = row.variant
        log(f"first call [{i}/{len(chosen)}] {v.name} {v.dtype_label} batch {row.batch}: "
            "a new process, two fresh models")
        try:
            result = run(config, device, v, row.batch, seed=seed,
                         empty_disk_caches=empty_disk_caches)
            row.first_call_cold_ms = float(result["cold_ms"])
            row.first_call_warm_ms = float(result["warm_ms"])
        except KeyboardInterrupt:
            row.first_call_error = "interrupted"
            return False
        except Exception as e:  # noqa: BLE001  (reported in the row; the bench goes on)
            row.first_call_error = f"{type(e).__name__}: {e}"
            log(f"    failed: {row.first_call_error}")
    return True


def legend(empty_disk_caches: bool) -> str:
    """The table's explanation of the first-call column."""
    disk = ("empty temporary Triton and device caches (a first run on a new machine)"
            if empty_disk_caches else "the disk caches as found: Triton's TRITON_CACHE_DIR and "
            "the device cache, which the rows above filled (a second run of the command)")
    return ("1st call cold/warm: time to first depth map of a freshly built model (its "
            "preparation and first forward, synchronized; building it not timed); cold: in a "
            "new process, nothing in memory (no Triton kernel, autotune result, cuBLAS/cuDNN "
            f"handle, CUDA graph or device-cache entry), with {disk}; warm: a second fresh "
            "model in that process")


def main(argv: Sequence[str] | None = None) -> int:
    from ..api import resolve_device
    from ..config import resolve_config

    p = argparse.ArgumentParser(prog="python -m depthpro_fast.bench.first_call",
                                description="Time one bench row's first call on two fresh "
                                            "models in this new process; prints JSON.")
    p.add_argument("--config", required=True, help="preset or JSON file of knobs")
    p.add_argument("--device", default=None)
    p.add_argument("--path", choices=TIMED_PATHS, required=True)
    p.add_argument("--backend", default="reference")
    p.add_argument("--mode", choices=("eager", "compile", "cudagraph"), default="eager")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--fast-options", default="", metavar="JSON",
                   help="the fast engine row's further FastOptions fields")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    options = fast_options_key(json.loads(args.fast_options)) if args.fast_options else ""
    v = Variant(args.path, _DTYPES[args.dtype], backend=args.backend, mode=args.mode,
                fp8=args.fp8, options=options)
    runner = Runner(resolve_config(args.config), device, batches=[args.batch], runs=1,
                    warmup=0, seed=args.seed, allow_interpreter=True, accuracy=False)
    if v.tf32_off:
        with tf32_disabled():
            cold, warm = measure(runner, v, args.batch)
    else:
        cold, warm = measure(runner, v, args.batch)
    print(json.dumps({"cold_ms": cold, "warm_ms": warm, "row": v.name,
                      "dtype": v.dtype_label, "batch": args.batch}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
