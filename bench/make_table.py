#!/usr/bin/env python3
"""The README's performance table, generated from ``bench/results/*.json``.

    python bench/make_table.py                      # markdown on stdout
    python bench/make_table.py --readme README.md   # replace the table between the markers
    python bench/make_table.py a.json b.json --all  # chosen files, skipped rows too
    python bench/make_table.py --race race.json     # the CPU race (bench --peers) as markdown
    python bench/make_table.py --race race.json --readme README.md

Each results file (written by ``depthpro-fast bench --json``) becomes one block: a line naming
the device (on a GPU its host CPU too), the date, the commit, the versions it was measured with
and the machine's state during the timed rows (idle or shared, other processes' CPU use, load
average: ``machine_load`` in the file), then its rows, with the "CPU got" column where the file
has it. In the README the table sits between ``<!-- bench-table:start -->`` and
``<!-- bench-table:end -->``.

``--race FILE`` renders one CPU race (``depthpro-fast bench --peers``, schema
``depthpro_fast.race/1``) with ``depthpro_fast.bench.race_table``: the CPU model and flags,
threads, versions, commit and date, the machine's verdict, the GEMM floor and one row per
contestant; in the README it sits between ``<!-- race-table:start -->`` and
``<!-- race-table:end -->``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any

START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"
RACE_START = "<!-- race-table:start -->"
RACE_END = "<!-- race-table:end -->"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _num(value: Any, spec: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


def describe(data: dict[str, Any]) -> str:
    """One line: which device, when, which code and software."""
    env = data.get("environment", {})
    date = str(env.get("date", "?"))[:10]
    device = env.get("device", "?")
    if env.get("device_type") == "cuda":
        bits = [f"sm_{str(env.get('capability', '?')).replace('.', '')}"]
        if env.get("driver"):
            bits.append(f"driver {env['driver']}")
        device = f"{device} ({', '.join(bits)})"
        if env.get("cpu"):
            device += f" on CPU {env['cpu']} ({env.get('cpu_threads', '?')} threads)"
    else:
        device = f"CPU {device} ({env.get('cpu_threads', '?')} threads)"
    commit = (env.get("commit") or "unknown")[:10] + (" (modified)" if env.get("dirty") else "")
    soft = f"torch {env.get('torch', '?')}"
    if env.get("torch_cuda"):
        soft += f", CUDA {env['torch_cuda']}"
    if env.get("triton"):
        soft += f", Triton {env['triton']}"
    peak = data.get("peak_matmul") or {}
    cfg = data.get("config", {}).get("name", "?")
    line = (f"**{device}**, {date}, commit `{commit}`, {soft}; config {cfg}, "
            f"{data.get('flops_per_image', 0) / 1e9:,.1f} GFLOP per image")
    if peak.get("tflops"):
        floor = data.get("flops_per_image", 0) / (peak["tflops"] * 1e12) * 1e3
        line += (f"; peak {peak.get('dtype')} matmul measured in the same run "
                 f"{peak['tflops']:.1f} TFLOP/s (FLOP floor {floor:.2f} ms per image)")
    settings = data.get("settings", {})
    if settings.get("partial"):
        line += "; **partial run** (cut short: rows not timed are left out)"
    if settings:
        line += (f"; {settings.get('warmup', '?')} warm-up + {settings.get('runs', '?')} runs, "
                 f"median ({settings.get('timer', '?')})")
    return line + "; " + machine_state(data.get("machine_load"))


def machine_state(load: dict[str, Any] | None) -> str:
    """The caption's words on the machine during the timed rows: idle or shared (bold, with
    a warning), other processes' CPU use, steal and the load average; or "not recorded"."""
    if not load:
        return "machine state not recorded"
    span = load.get("rows") if load.get("judged_on") == "these rows" else load.get("run")
    span = span or {}
    bits = []
    if span.get("others_cores") is not None and span.get("cores"):
        bits.append(f"others used {span['others_cores']:.2f} of {span['cores']} cores")
    if span.get("steal_pct"):
        bits.append(f"steal {span['steal_pct']:.1f} %")
    if span.get("load_before") is not None and span.get("load_after") is not None:
        bits.append(f"load average {span['load_before']:.1f} -> {span['load_after']:.1f}")
    where = "the timed rows" if load.get("judged_on") == "these rows" else "the run"
    detail = f" ({', '.join(bits)})" if bits else ""
    state = load.get("state", "unknown")
    if state == "shared":
        return (f"**machine shared** during {where}{detail}: timings not comparable with an "
                "idle machine's")
    return f"machine {state} during {where}{detail}"


def _cpu_got(row: dict[str, Any]) -> float | None:
    return (row.get("machine_load") or {}).get("cpu_got")


def table(data: dict[str, Any], include_all: bool = False) -> str:
    rows = data.get("rows", [])
    # "CPU got": the share of its threads' time the process got during the row (CPU rows of
    # files that record it)
    got = any(r.get("status") == "ok" and _cpu_got(r) is not None for r in rows)
    header = ("variant", "dtype", "batch", "median ms", "min–max ms",
              *(("CPU got",) if got else ()), "img/s", "speed-up", "% of FLOP floor",
              "peak mem", "MARE vs fp32 ref", "FOV err °")
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for r in rows:
        if r.get("status") != "ok":
            if include_all:
                lines.append(f"| {r['name']} | {r['dtype']} | {r['batch']} | "
                             f"{r['status']}: {r.get('reason') or ''} |"
                             + " |" * (len(header) - 4))
            continue
        mem = r.get("peak_mem_bytes")
        share = _cpu_got(r)
        lines.append("| " + " | ".join([
            r["name"], r["dtype"], str(r["batch"]), _num(r.get("median_ms"), ".1f"),
            f"{_num(r.get('min_ms'), '.1f')}–{_num(r.get('max_ms'), '.1f')}",
            *((_num(share and 100 * share, ".0f", " %"),) if got else ()),
            _num(r.get("images_per_s"), ".2f"), _num(r.get("speedup"), ".2f", "x"),
            _num(r.get("pct_floor"), ".1f", "%"),
            "–" if mem is None else f"{mem / 2**30:.1f} GiB",
            _num(r.get("mare_vs_fp32_reference"), ".1e"),
            _num(r.get("fov_abs_err_deg"), ".3f")]) + " |")
    return "\n".join(lines)


def render(paths: list[str], include_all: bool = False) -> str:
    blocks = []
    loaded = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        schema = str(data.get("schema", ""))
        if not schema.startswith("depthpro_fast.bench/"):
            if not schema.startswith("depthpro_fast."):  # (smoke, micro, ablation: not tables)
                print(f"skipping {path}: not a depthpro-fast bench result", file=sys.stderr)
            continue
        loaded.append((str(data.get("environment", {}).get("date", "")), path, data))
    for _, path, data in sorted(loaded, key=lambda t: (t[0], t[1])):
        blocks.append(f"{describe(data)} (`{os.path.basename(path)}`)\n\n"
                      f"{table(data, include_all)}")
    if not blocks:
        return "_No benchmark results yet: run `bench/gpu_check.sh` on a GPU machine._"
    return "\n\n".join(blocks)


def update_readme(readme: str, text: str, start: str = START, end: str = END) -> None:
    with open(readme, encoding="utf-8") as f:
        content = f.read()
    if start not in content or end not in content or content.index(start) > content.index(end):
        raise SystemExit(f"{readme}: add the markers {start} and {end} where the table goes")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(readme, "w", encoding="utf-8") as f:
        f.write(f"{head}{start}\n{text}\n{end}{tail}")


def render_race(path: str) -> str:
    """The markdown of one CPU race file (``depthpro-fast bench --peers``)."""
    from depthpro_fast.bench.race import SCHEMA
    from depthpro_fast.bench.race_table import markdown

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("schema") != SCHEMA:
        raise SystemExit(f"{path}: not a CPU race file (schema {data.get('schema')!r}, "
                         f"expected {SCHEMA!r}: written by depthpro-fast bench --peers)")
    return markdown(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", help="results JSON files (default: bench/results/)")
    parser.add_argument("--readme", help="replace the table between the markers in this file")
    parser.add_argument("--all", action="store_true", help="include skipped and failed rows")
    parser.add_argument("--race", metavar="FILE",
                        help="render one CPU race file (depthpro-fast bench --peers) instead")
    args = parser.parse_args(argv)
    if args.race:
        if args.files:
            parser.error("--race takes one file; give no other results files")
        text = render_race(args.race)
        if args.readme:
            update_readme(args.readme, text, RACE_START, RACE_END)
            print(f"updated {args.readme} (race {args.race})")
        else:
            print(text)
        return 0
    paths = args.files or sorted(glob.glob(os.path.join(RESULTS, "*.json")))
    text = render(paths, include_all=args.all)
    if args.readme:
        update_readme(args.readme, text)
        print(f"updated {args.readme} ({len(paths)} results file(s))")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
