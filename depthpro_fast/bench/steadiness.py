"""Is a bench row's time steady? The same row in N fresh processes, side by side.

One process's median says little on a CPU: the same row of ``depthpro-fast bench`` measured
14.4 s in one run and 22 s in another on an AMX Xeon. Part of such a spread is the machine
(other processes, memory traffic, page faults: ``depthpro_fast/cpu_memory.py``), part can be
the process itself: a choice made per process by timing (the CPU GEMM library, the attention
kernel: ``fast/timed_choice.py``), the thread count, the allocator. This tool runs the row in
``--processes`` new Python processes one after the other, each timing ``--runs`` forwards after
``--warmup`` untimed ones, and reports per process its choices, its timings, minor page faults
per forward and peak resident memory; then the spread over processes, flagging every choice
that differs between them.

    python -m depthpro_fast.bench.steadiness --config tiny --dtype fp32 --processes 3

A row is given as in ``depthpro-fast bench`` (``--path engine --backend auto --dtype bf16``);
the default is the fast engine, the path ``predict`` runs. On a CPU each process applies
``cpu_memory.tune_cpu_allocator()`` first, as a model prepared for the fast path does
(``$DEPTHPRO_FAST_MALLOC=off`` in the environment turns it off in every process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .timing import dtype_name
from .variants import Variant

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the per-process choices compared between processes (keys of a record's ``choices``)
CHOICES = ("dtype", "threads", "cpu_gemm", "attention", "allocator")


class SteadinessError(RuntimeError):
    """A child process failed; the message gives its exit code and last lines."""


def allocator_summary() -> str:
    """This process's malloc tuning in a few words (compared between processes)."""
    from .. import cpu_memory

    s = cpu_memory.allocator_state()
    if s.get("applied"):
        return "glibc tuned: " + ", ".join(f"{k}={v}" for k, v in s["settings"].items())
    return f"not tuned ({s.get('why_not')})"


def process_choices(dtype: torch.dtype) -> dict[str, Any]:
    """The choices this process made that can change a row's time: the dtype, the intra-op
    thread count, each timed choice used (``timed_choice.USED``: label -> choice, and where
    it came from), and the allocator's tuning."""
    from ..fast.timed_choice import USED

    def chosen(kind: str) -> dict[str, str]:
        return {label: str(r.get("choice")) for label, r in sorted(USED.get(kind, {}).items())}

    def sources(kind: str) -> dict[str, str]:
        return {label: str(r.get("source")) for label, r in sorted(USED.get(kind, {}).items())}

    return {"dtype": dtype_name(dtype), "threads": torch.get_num_threads(),
            "cpu_gemm": chosen("cpu_gemm"), "attention": chosen("attention_choice"),
            "allocator": allocator_summary(),
            "sources": {"cpu_gemm": sources("cpu_gemm"),
                        "attention": sources("attention_choice")}}


def time_row(config: str, device: torch.device, v: Variant, *, runs: int, warmup: int,
             seed: int = 0, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Build the row in this process and time it: ``warmup`` untimed then ``runs`` timed
    forwards of one image (``clock`` is injectable for tests). Returns the process's record."""
    from ..config import resolve_config
    from .runner import Runner
    from .timing import synchronize

    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    if device.type == "cpu":
        from ..cpu_memory import tune_cpu_allocator

        tune_cpu_allocator()  # as a model prepared for the fast path on a CPU does
    runner = Runner(resolve_config(config), device, batches=[1], runs=runs, warmup=0,
                    seed=seed, allow_interpreter=True, accuracy=False)
    runner.model(v.dtype)
    x = runner.inputs(v.dtype, 1)[0]
    fn, _, cleanup = runner.row_callable(v, 1)
    times_ms, faults = [], []
    for i in range(warmup + runs):
        synchronize(device)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = clock()
        fn(x)
        synchronize(device)
        t1 = clock()
        if i >= warmup:
            times_ms.append((t1 - t0) * 1e3)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    cleanup()
    return {"pid": os.getpid(), "row": v.name, "times_ms": times_ms, "minor_faults": faults,
            # ru_maxrss is in KiB on Linux (bytes on macOS)
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            * (1 if sys.platform == "darwin" else 1024),
            "choices": process_choices(v.dtype)}


def child_argv(config: str, device: torch.device, v: Variant, *, runs: int, warmup: int,
               seed: int) -> list[str]:
    """The command line of one child process."""
    return [sys.executable, "-m", "depthpro_fast.bench.steadiness", "--child",
            "--config", config, "--device", str(device), "--path", v.path,
            "--backend", v.backend, "--mode", v.mode, "--dtype", dtype_name(v.dtype),
            "--runs", str(runs), "--warmup", str(warmup), "--seed", str(seed)]


def in_subprocess(argv: Sequence[str], timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run one child; its record (the last line of its output, JSON)."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SteadinessError(f"no result within {timeout_s:.0f} s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise SteadinessError(f"child exit {proc.returncode}: {tail[-500:]}")
    return json.loads(lines[-1])


def _spread(values: Sequence[float]) -> dict[str, float]:
    lo, hi = min(values), max(values)
    return {"min": lo, "median": statistics.median(values), "max": hi,
            "spread": (hi - lo) / lo if lo > 0 else float("inf")}


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-process medians, the spread of all timed runs and of the per-process medians
    (``spread``: (max - min) / min), and ``differs``: each choice whose value is not the
    same in every process, with the value per process (in order)."""
    if not records:
        raise ValueError("no process records to summarize")
    per_process = []
    for r in records:
        per_process.append({"pid": r["pid"], **_spread(r["times_ms"]),
                            "median_minor_faults": statistics.median(r["minor_faults"]),
                            "peak_rss_bytes": r["peak_rss_bytes"], "choices": r["choices"]})
    differs = {}
    for key in CHOICES:
        values = [r["choices"].get(key) for r in records]
        if any(v != values[0] for v in values[1:]):
            differs[key] = values
    all_ms = [t for r in records for t in r["times_ms"]]
    return {"row": records[0].get("row"), "processes": per_process,
            "all_runs_ms": _spread(all_ms),
            "process_medians_ms": _spread([p["median"] for p in per_process]),
            "differs": differs}


def _words(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {v}" for k, v in value.items()) or "none used"
    return str(value)


def format_report(summary: dict[str, Any]) -> str:
    """The summary as text: one block per process, the spreads, the differing choices."""
    lines = [f"row: {summary['row']}"]
    for i, p in enumerate(summary["processes"], 1):
        c = p["choices"]
        lines.append(f"process {i} (pid {p['pid']}): median {p['median']:.1f} ms (min "
                     f"{p['min']:.1f}, max {p['max']:.1f}), {p['median_minor_faults']:.0f} "
                     f"minor faults per forward, peak RSS {p['peak_rss_bytes'] / 2**30:.2f} GiB")
        lines.append(f"  dtype {c['dtype']}, {c['threads']} threads; cpu gemm "
                     f"{_words(c['cpu_gemm'])}; attention {_words(c['attention'])}")
        lines.append(f"  allocator: {c['allocator']}")
    a, m = summary["all_runs_ms"], summary["process_medians_ms"]
    lines.append(f"all runs: min {a['min']:.1f} / median {a['median']:.1f} / max {a['max']:.1f}"
                 f" ms (spread {a['spread'] * 100:.0f} %)")
    lines.append(f"process medians: min {m['min']:.1f} / median {m['median']:.1f} / max "
                 f"{m['max']:.1f} ms (spread {m['spread'] * 100:.0f} %)")
    if summary["differs"]:
        for key, values in summary["differs"].items():
            lines.append(f"DIFFERS between processes: {key}: "
                         + " | ".join(_words(v) for v in values))
    else:
        lines.append("every process made the same choices (" + ", ".join(CHOICES) + ")")
    return "\n".join(lines)


def run(config: str, device: torch.device, v: Variant, *, processes: int, runs: int,
        warmup: int, seed: int = 0, log: Callable[[str], None] = lambda msg: None,
        spawn: Callable[[Sequence[str]], dict[str, Any]] = in_subprocess) -> dict[str, Any]:
    """Run the row in ``processes`` fresh processes, one after the other (``spawn`` runs one
    child and returns its record; tests inject it); the :func:`summarize` of their records."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    records = []
    for i in range(processes):
        log(f"process {i + 1}/{processes}: {v.name} {v.dtype_label}, {warmup} warm-up + "
            f"{runs} timed forwards")
        records.append(spawn(child_argv(config, device, v, runs=runs, warmup=warmup,
                                        seed=seed)))
    return summarize(records)


def main(argv: Sequence[str] | None = None) -> int:
    from ..api import resolve_device

    p = argparse.ArgumentParser(prog="python -m depthpro_fast.bench.steadiness",
                                description="Run one bench row in several fresh processes and "
                                            "report each one's choices and the timing spread.")
    p.add_argument("--config", default="tiny", help="preset or JSON file of knobs (default tiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--path", choices=("reference", "fast", "engine"), default="engine")
    p.add_argument("--backend", default="auto")
    p.add_argument("--mode", choices=("eager", "cudagraph"), default="eager")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    v = Variant(args.path, DTYPES[args.dtype], backend=args.backend, mode=args.mode)
    if args.child:
        print(json.dumps(time_row(args.config, device, v, runs=args.runs, warmup=args.warmup,
                                  seed=args.seed)))
        return 0
    summary = run(args.config, device, v, processes=args.processes, runs=args.runs,
                  warmup=args.warmup, seed=args.seed,
                  log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_report(summary))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
