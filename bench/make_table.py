#!/usr/bin/env python3
"""The README's performance table, generated from ``bench/results/*.json``.

    python bench/make_table.py                      # markdown on stdout
    python bench/make_table.py --readme README.md   # replace the table between the markers
    python bench/make_table.py a.json b.json --all  # chosen files, skipped rows too

Each results file (written by ``depthpro-fast bench --json``) becomes one block: a line naming
the device, the date, the commit and the versions it was measured with, then its rows. In the
README the table sits between ``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->``.
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
    return line


def table(data: dict[str, Any], include_all: bool = False) -> str:
    header = ("variant", "dtype", "batch", "median ms", "min–max ms", "img/s", "speed-up",
              "% of FLOP floor", "peak mem", "MARE vs fp32 ref", "FOV err °")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 8) + "|"]
    for r in data.get("rows", []):
        if r.get("status") != "ok":
            if include_all:
                lines.append(f"| {r['name']} | {r['dtype']} | {r['batch']} | "
                             f"{r['status']}: {r.get('reason') or ''} |" + " |" * 7)
            continue
        mem = r.get("peak_mem_bytes")
        lines.append("| " + " | ".join([
            r["name"], r["dtype"], str(r["batch"]), _num(r.get("median_ms"), ".1f"),
            f"{_num(r.get('min_ms'), '.1f')}–{_num(r.get('max_ms'), '.1f')}",
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


def update_readme(readme: str, text: str) -> None:
    with open(readme, encoding="utf-8") as f:
        content = f.read()
    if START not in content or END not in content or content.index(START) > content.index(END):
        raise SystemExit(f"{readme}: add the markers {START} and {END} where the table goes")
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w", encoding="utf-8") as f:
        f.write(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", help="results JSON files (default: bench/results/)")
    parser.add_argument("--readme", help="replace the table between the markers in this file")
    parser.add_argument("--all", action="store_true", help="include skipped and failed rows")
    args = parser.parse_args(argv)
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
