"""Kernel qualification in a child process, and its command line
(``python -m depthpro_fast.qualification``).

An illegal memory access kills the CUDA context of the process it happens in, so the first
qualification for a new device-cache key may run in a child (``qualify='subprocess'``; the
command line's default): the child builds a random-weight copy of the model (same config,
dtype, backend, fast options, input shape), runs one qualifying forward and writes the record
(``--json``, and the device cache). Before each kernel it appends ``start<TAB>op<TAB>backend``
to its progress file (``end`` after): when the child dies (a signal, a non-zero exit) the parent
reads which kernel was running, marks it bad and runs the child again without it.

Standalone, the same entry prints a table: op, case, the implementation that qualified, the
fallbacks and why, time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import backends

#: a child run again at most this many times (each time one crashing kernel fewer)
MAX_CHILD_RUNS = 8
#: exit code of a child whose kernel broke its CUDA context (the progress file names it)
CONTEXT_LOST_EXIT = 70
CHILD_TIMEOUT_S = float(os.environ.get("DEPTHPRO_FAST_QUALIFY_TIMEOUT", "900"))


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == CONTEXT_LOST_EXIT:
        return "the kernel broke the CUDA context"
    return f"exit status {code}"


def blamed(progress: Path) -> tuple[str, str, str] | None:
    """(op, backend, case) of the kernel the child started and never finished, or None."""
    if not progress.is_file():
        return None
    running = None
    for line in progress.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if parts[0] == "start" and len(parts) >= 4:
            running = (parts[1], parts[2], parts[3])
        elif parts[0] == "end":
            running = None
    return running


def child_command(run: dict[str, Any], device: torch.device, folder: Path,
                  exclude: dict[str, str]) -> list[str]:
    config = folder / "config.json"
    config.write_text(json.dumps(run["config"]), encoding="utf-8")
    cmd = [sys.executable, "-m", "depthpro_fast.qualification",
           "--device", backends.device_key(device), "--dtype", run["dtype"],
           "--config", str(config), "--batch", str(run["input"][0]),
           "--backend", run["backend"], "--options", json.dumps(run["options"]),
           "--json", str(folder / "record.json"), "--progress", str(folder / "progress.txt"),
           "--quiet"]
    cmd += ["--fov" if run["compute_fov"] else "--no-fov"]
    if not run["use_fov"]:
        cmd.append("--no-fov-network")
    for name, why in exclude.items():
        cmd += ["--exclude", f"{name}={why}"]
    return cmd


def run_child(run: dict[str, Any], device: torch.device) -> tuple[dict[str, Any] | None, str]:
    """Qualify ``run`` in child processes; (the record, or None when no child could finish
    for another reason than a kernel, and the words for ``status()``)."""
    exclude: dict[str, str] = {}
    crashes: dict[str, str] = {}
    for _ in range(MAX_CHILD_RUNS):
        with tempfile.TemporaryDirectory(prefix="depthpro_fast-qualify-") as tmp:
            folder = Path(tmp)
            try:
                proc = subprocess.run(child_command(run, device, folder, exclude),
                                      capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return None, f"the qualifying child ran past {CHILD_TIMEOUT_S:.0f} s"
            except OSError as e:
                return None, f"no qualifying child ({e})"
            record_path = folder / "record.json"
            if proc.returncode == 0 and record_path.is_file():
                record = json.loads(record_path.read_text(encoding="utf-8"))
                record["mode"] = "subprocess"
                record["crashes"] = crashes
                runs = len(crashes) + 1
                return record, (f"qualified in a child process in {record['time_s']:.2f} s "
                                f"({runs} run{'s' if runs > 1 else ''})")
            culprit = blamed(folder / "progress.txt")
            if culprit is None:
                tail = " | ".join((proc.stderr or "").strip().splitlines()[-3:])
                return None, (f"the qualifying child failed ({describe_exit(proc.returncode)}) "
                              f"outside a kernel: {tail[-300:]}")
            op, b, case = culprit
            why = f"crashed the qualifying process ({describe_exit(proc.returncode)}; case {case})"
            exclude[f"{op}/{b}"] = why
            crashes[f"{op}/{b}"] = why
            backends.disqualify(op, b, device, why)
    return None, f"the qualifying child crashed {MAX_CHILD_RUNS} times"


# ----------------------------------------------------------------------------------------------
# the child / command line
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m depthpro_fast.qualification",
        description="Qualify the custom kernels a fast DepthPro calls, on this device, against "
                    "their references (random weights; the result goes to the device cache).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", help="fp32, fp16, bf16 or fp8 (default: bf16)")
    p.add_argument("--config", default="official", help="preset name or JSON file")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--backend", default="auto")
    p.add_argument("--options", default="{}", help="fast options as JSON")
    p.add_argument("--fov", action=argparse.BooleanOptionalAction, default=True,
                   help="the FOV branch is computed (default: yes)")
    p.add_argument("--no-fov-network", action="store_true", help="a model without FOV network")
    p.add_argument("--exclude", action="append", default=[], metavar="OP/BACKEND=WHY",
                   help="an implementation to disqualify first (a kernel that crashed)")
    p.add_argument("--json", metavar="PATH", help="write the record as JSON")
    p.add_argument("--progress", metavar="PATH", help="progress file (for the parent)")
    p.add_argument("--verify-model", action="store_true",
                   help="also compare the fast forward with the reference path")
    p.add_argument("--quiet", action="store_true", help="no table")
    return p


def main(argv: list[str] | None = None) -> int:
    from . import api
    from .device_cache import DeviceCache
    from .qualification import apply, entry_key, qualify_forward, run_description, summarize

    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    options = json.loads(args.options)
    for item in args.exclude:
        name, _, why = item.partition("=")
        op, _, b = name.partition("/")
        backends.disqualify(op, b, device, why or "excluded")
    torch.manual_seed(0)
    # the qualifying forward is eager and on one stream, nothing timed or captured (these
    # fields are not part of the cache key: the parent's key is this run's)
    child = {**options, "qualify": "off", "cuda_graphs": False, "streams": False,
             "attention_choice": "backend"}
    model, _ = api.load(None, config=args.config, device=device, dtype=args.dtype,
                        backend=args.backend, use_fov=not args.no_fov_network, fast=child)
    engine = model.fast_engine
    dtype = next(model.parameters()).dtype
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.rand(args.batch, 3, 1536, 1536, generator=g) * 2 - 1).to(device, dtype)
    on_crash = None
    if args.progress:
        def on_crash(op: str, b: str, error: BaseException) -> None:  # noqa: ARG001
            os._exit(CONTEXT_LOST_EXIT)  # the progress file names the kernel

    def forward():
        return model(x, need_fov=args.fov)

    record = qualify_forward(forward, device, progress=args.progress, on_crash=on_crash)
    record["mode"] = "subprocess" if args.progress else "inline"
    compute_fov = model.fov is not None and (args.fov or not engine.options.skip_unused_fov)
    run = run_description(model, engine.options, tuple(x.shape), compute_fov)
    DeviceCache("qualification", device).put(entry_key(run), record)
    apply(record, device)
    if args.verify_model:
        from .qualification_model import verify_model

        record["verify_model"] = verify_model(model, forward, x, record)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1), encoding="utf-8")
    if not args.quiet:
        print(format_table(record, summarize(record)))
    return 0


def format_table(record: dict[str, Any], summary: dict[str, Any]) -> str:
    rows = [("op", "case", "qualified", "fallbacks (why)", "ms")]
    for r in record.get("results", []):
        falls = "; ".join(f"{t['impl']}: {t['why']}" for t in r["tried"] if not t["ok"])
        case = r["case"] if len(r["case"]) <= 60 else r["case"][:57] + "..."
        rows.append((r["op"], case, r["chosen"], falls or "-", f"{r['ms']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
             for row in rows]
    lines.append(f"{len(record.get('results', []))} cases, {len(summary)} ops, "
                 f"{record.get('time_s', 0):.2f} s; disqualified: "
                 + (", ".join(record.get("disqualified", {})) or "none"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

