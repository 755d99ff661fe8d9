"""``depthpro-fast bench --peers``: the CPU race (``depthpro_fast/bench/race.py``), our engine
and its peers each in its own process, rounds interleaved, one JSON and one markdown table."""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The race's own options (``--config``, ``--runs``, ``--warmup``, ``--seed``, ``--json``,
    ``--quiet`` are the bench's)."""
    parser.add_argument("--peers", action="store_true",
                        help="the CPU race: our engine (reference, fast fp32 / bf16 / bf16 GEMM "
                             "inputs, the default) against OpenVINO, torch.compile, ONNX "
                             "Runtime and transformers, each contestant in a fresh process "
                             "per round, interleaved; writes one JSON (--json, default "
                             "<date>-cpu-race-<config>.json here) and prints the table "
                             "(default config tiny; --config official for the real race)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="--peers: race only these contestants (names: --peers --list)")
    parser.add_argument("--skip", nargs="+", default=None, metavar="NAME",
                        help="--peers: leave these contestants out")
    parser.add_argument("--list", action="store_true",
                        help="--peers: list the contestants and whether each can run here")
    parser.add_argument("--rounds", type=int, default=None,
                        help="--peers: rounds (default: 2 for the official config, else 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="--peers: threads of every contestant (default: torch's, "
                             "the cores)")
    parser.add_argument("--timeout-s", type=float, default=None,
                        help="--peers: time limit of one contestant's process (default: "
                             "3600 s for the official config, else 900 s)")
    parser.add_argument("--scratch", default=None, metavar="DIR",
                        help="--peers: folder for the exports, the reference output and the "
                             "children's logs, kept (default: a temporary folder, removed; the "
                             "official exports take about 4 GB each)")
    parser.add_argument("--no-gemm-floor", action="store_true",
                        help="--peers: do not measure the GEMM floor")
    parser.add_argument("--gemm-rows", type=int, default=None, metavar="N",
                        help="--peers: token rows of the GEMM floor's GEMMs (default 4039: 7 of "
                             "the 35 windows of 577 tokens)")


def _list(config: str) -> int:
    from ..bench.race_contestants import CONTESTANTS, why_not
    from ..config import resolve_config

    cfg = resolve_config(config)
    for c in CONTESTANTS:
        reason = why_not(c, cfg)
        print(f"{c.name:20s} {c.label}, {c.dtype}"
              + (f"  [skipped: {reason}]" if reason else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    from ..bench.race import RaceOptions, json_path_for, run_race
    from ..bench.race_summary import NOT_IDLE
    from ..bench.race_table import markdown

    config = args.config or "tiny"
    if args.list:
        return _list(config)
    if args.device not in (None, "cpu"):
        print("depthpro-fast bench --peers: the race runs on the CPU (--device cpu or none)",
              file=sys.stderr)
        return 2
    for flag, value in (("--rounds", args.rounds), ("--threads", args.threads),
                        ("--gemm-rows", args.gemm_rows)):
        if value is not None and value < 1:
            print(f"depthpro-fast bench --peers: {flag} must be >= 1, got {value}",
                  file=sys.stderr)
            return 2
    opts = RaceOptions(config=config, rounds=args.rounds,
                       runs=args.runs if args.runs is not None else 1,
                       warmup=args.warmup if args.warmup is not None else 1, seed=args.seed,
                       threads=args.threads, only=args.only or (), skip=args.skip or (),
                       json=args.json, timeout_s=args.timeout_s, scratch=args.scratch,
                       gemm_floor=not args.no_gemm_floor, gemm_rows=args.gemm_rows,
                       quiet=args.quiet)
    opts.json = json_path_for(args.json, os.path.splitext(os.path.basename(config))[0])
    try:
        data = run_race(opts)
    except ValueError as e:  # an unknown contestant name
        print(f"depthpro-fast bench --peers: {e}", file=sys.stderr)
        return 2
    print(markdown(data))
    print(f"\nwrote {opts.json}")
    ok = any(c.get("runs_s") for c in data["contestants"])
    if data["machine"]["verdict"] == NOT_IDLE:
        print(f"\nWARNING: {NOT_IDLE}: rerun on an idle machine.", file=sys.stderr)
    return 0 if ok else 1
