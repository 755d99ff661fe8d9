"""The decision micro-benchmarks: ``python -m depthpro_fast.bench.micro`` (or ``depthpro-fast
bench --micro``).

Each group times what one default of the fast path depends on, next to its peers:

- ``attention``: our Triton and CUDA kernels, our fp32-math reference and every SDPA backend
  (math, efficient, flash, cuDNN; one refusing a case is skipped with its reason) at the patch
  encoder's (35, 16, 577, 64) and the image / FOV encoders' (1, 16, 577, 64). q, k, v are views
  of a packed qkv GEMM output, as the model passes them, and each timed call ends with the
  (B, N, H*D) input of the proj GEMM (a free view for our kernels, a copy for SDPA's layout).
- ``gemm``: the patch encoder's four GEMMs (M = 35 x 577 tokens: qkv 1024->3072, proj
  1024->1024, fc1 1024->4096, fc2 4096->1024), with the bias in the GEMM and without (the fast
  path adds it in a fused epilogue); TFLOP/s.
- ``conv``: the decoder's 768x768 3x3 256->256 convolution with and without bias, NCHW and
  channels_last, cuDNN autotuning on (as in the fast engine).
- ``patches``: ``split_patches`` and ``merge_patches`` (both levels, NCHW and channels_last
  output) of each backend against a plain copy that moves the same bytes; GB/s.

Timing: :func:`~.timing.time_callable` (CUDA events, each run from an idle device, warm-up,
median) over two rotated random inputs; on a GPU each case is also captured in CUDA graphs and
replayed ("graph ms": device time without the host's launch overhead, what the fast engine's
graphs see). Rates come from the graph time when there is one. A kernel's output is checked
against the reference before it is timed. Default dtypes: bf16 and fp16 on a GPU, so the fp32
Triton attention autotune sweep (its own 6 fp32 configs) is not in the default run
(``--dtype fp32`` adds it); fp32 on a CPU, where ``--size tiny`` (the default
there) shrinks every problem and Triton runs in its interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .journal import Case, Journal, run_cases, show_results
from .micro_cases import GROUPS, SIZES, Settings, build_cases
from .timing import dtype_name

SCHEMA = "depthpro_fast.micro/1"
# the reason shown for a case left "running": its process ended inside it
_STOPPED = "the process was stopped in this case (time limit, hang or crash)"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per case, grouped; ``vs best``: time over the fastest ok case of its problem."""
    best: dict[tuple[str, str], float] = {}
    for r in rows:
        if r.get("status") == "ok":
            key = (r["problem"], r["dtype"])
            best[key] = min(best.get(key, float("inf")), _time_of(r))
    header = ("group", "problem", "impl", "dtype", "median ms", "min-max ms", "graph ms", "rate",
              "vs best", "note")
    lines = []
    for r in rows:
        if r.get("status") == "ok":
            rate = (f"{_num(r['tflops'])} TFLOP/s" if r.get("tflops") is not None
                    else f"{_num(r['gb_per_s'])} GB/s" if r.get("gb_per_s") is not None
                    else "-")
            note = r.get("note") or ""
            if r.get("max_err") is not None:
                note = f"max err {r['max_err']:.1e}" + (f"; {note}" if note else "")
            cells = (r["group"], r["problem"], r["impl"], r["dtype"], f"{r['median_ms']:.3f}",
                     f"{r['min_ms']:.3f}-{r['max_ms']:.3f}",
                     "-" if r.get("graph_ms") is None else f"{r['graph_ms']:.3f}", rate,
                     f"{_time_of(r) / best[(r['problem'], r['dtype'])]:.2f}x", note)
        else:
            reason = (r.get("reason") or _STOPPED).replace("\n", " ")
            cells = (r["group"], r["problem"], r["impl"], r["dtype"], "-", "-", "-", "-", "-",
                     f"{r['status']}: {reason[:90]}")
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    right = {4, 5, 6, 7, 8}

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])


def _num(value: float) -> str:
    """A rate with 3 significant digits and no exponent down to 0.01: 788, 45.3, 0.92."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}" if value >= 0.01 else f"{value:.1e}"


def _time_of(row: dict[str, Any]) -> float:
    """The time a case is compared by: its graph replay when it has one, else its median."""
    return row["graph_ms"] if row.get("graph_ms") is not None else row["median_ms"]


def _header(device: torch.device, settings: Settings) -> dict[str, Any]:
    from .environment import environment

    return {"environment": environment(device),
            "settings": {**dataclasses.asdict(settings), "dtypes": settings.dtype_names,
                         "timer": "CUDA events, each run from an idle device; CUDA graph replay"
                         if device.type == "cuda" else "perf_counter"},
            "notes": ["fp32 is not in the default GPU run: the fp32 Triton attention autotune "
                      "sweep costs compile time and decides nothing (--dtype fp32 adds it)."]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group", nargs="+", choices=GROUPS, default=list(GROUPS),
                        help="which groups to run (default: all, in this order)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="problem sizes (default: official on a GPU, tiny on a CPU)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(_DTYPES), default=None,
                        help="dtypes (default: bf16 fp16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs per case (default: 5 on a GPU, 1 on a CPU)")
    parser.add_argument("--runs", type=int, default=None,
                        help="timed runs per case (default: 20 on a GPU, 3 on a CPU)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="results file, rewritten after every case (other groups' rows in "
                             "it are kept)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases already finished in --json (after a crash)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="cases not started after S seconds are recorded as skipped")
    parser.add_argument("--show", default=None, metavar="PATH",
                        help="only print the table of a results file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    """Run the chosen groups; exit code 0 (done), 1 (a case failed), 3 / 130 (stopped)."""
    if args.show:
        return show_results(args.show, SCHEMA, "micro-benchmark", format_table)
    from ..api import resolve_device

    for name in ("warmup", "runs", "time_limit"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "runs" else 0):
            print(f"micro: --{name.replace('_', '-')} must be >= "
                  f"{1 if name == 'runs' else 0}, got {value}", file=sys.stderr)
            return 2
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if gpu and device.index is not None:
        torch.cuda.set_device(device)  # CUDA events and graphs use the current device
    dtypes = tuple(_DTYPES[d] for d in dict.fromkeys(args.dtype or (
        ["bf16", "fp16"] if gpu else ["fp32"])))
    settings = Settings(size=args.size or ("official" if gpu else "tiny"),
                        warmup=args.warmup if args.warmup is not None else (5 if gpu else 1),
                        runs=args.runs or (20 if gpu else 3), dtypes=dtypes)
    log: Callable[[str], None] = (lambda msg: None) if args.quiet else (
        lambda msg: print(msg, file=sys.stderr, flush=True))
    cases: list[Case] = build_cases(args.group, settings, device)
    journal = Journal(args.json, schema=SCHEMA, header=lambda: _header(device, settings))
    t0 = time.perf_counter()
    rc = run_cases(cases, journal, device=device, resume=args.resume,
                   time_limit_s=args.time_limit, log=log)
    mine = [journal.get(c.key) for c in cases if journal.get(c.key) is not None]
    print(f"micro-benchmarks on {device}: {', '.join(args.group)}, size {settings.size}, "
          f"{'/'.join(dtype_name(d) for d in dtypes)}, {settings.warmup} warm-up + "
          f"{settings.runs} runs ({time.perf_counter() - t0:.0f} s)")
    print(format_table(mine))
    if args.json:
        print(f"wrote {args.json}")
    if rc == 0 and any(r["status"] == "failed" for r in mine):
        return 1
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m depthpro_fast.bench.micro",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
