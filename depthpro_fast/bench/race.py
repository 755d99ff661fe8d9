"""The CPU race: ``depthpro-fast bench --peers``. Our engine and its peers side by side on the
same seeded random weights and the same seeded input, each contestant in a fresh process per
round, rounds interleaved; one JSON (schema ``depthpro_fast.race/1``) and one table.

The steps, each child a process of its own (``race_children.launch``):

1. the machine's idleness before anything runs (``machine_load.probe``, two seconds);
2. the exports the chosen peers run from (OpenVINO IR, ONNX), once per race into the race's
   scratch folder, their time reported apart from the timings;
3. the fp32 reference's output, once, when ``--only`` / ``--skip`` left the reference out
   (the others' accuracy is measured against it);
4. the GEMM floor (``race_floor.py``);
5. the rounds (``race_summary.round_order``): per contestant, build, ``warmup`` untimed and
   ``runs`` timed calls, then exit (``race_child.py``).

A child that crashes, fails or passes ``timeout_s`` is recorded (exit status, error, the tail
of its output) and the race goes on. The JSON is rewritten (atomically) after every child, so
a race cut short keeps what it measured (``partial``: true).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import machine_load
from .race_children import ChildOutcome, launch
from .race_contestants import CONTESTANTS, Contestant, reference_contestant, select, why_not
from .race_summary import ORDER_WHY, round_order, summarise, verdict
from .results import json_safe, write_json

SCHEMA = "depthpro_fast.race/1"
#: the default time limit of one child, by config (a full-size forward takes minutes on a CPU)
DEFAULT_TIMEOUT_S = {"big": 3600.0, "small": 900.0}
#: configs above this many FLOPs per image are "big" (fewer rounds by default)
BIG_FLOPS = 1e12


@dataclasses.dataclass
class RaceOptions:
    """The race's settings (the command line's ``--peers`` options)."""

    config: str = "tiny"
    rounds: int | None = None  # None: 2 for a big config (the official one), else 3
    runs: int = 1
    warmup: int = 1
    seed: int = 0
    threads: int | None = None  # None: torch's default
    only: Sequence[str] = ()
    skip: Sequence[str] = ()
    json: str | None = None
    timeout_s: float | None = None
    scratch: str | None = None  # None: a temporary folder, removed at the end
    gemm_floor: bool = True
    gemm_rows: int | None = None  # None: race_floor.DEFAULT_ROWS (a fifth of the 35 windows)
    probe_s: float = 2.0
    quiet: bool = False


def cpu_flag_table() -> dict[str, bool | None]:
    """AVX2 / AVX-512 / AVX512_BF16 / AMX of this CPU (/proc/cpuinfo; None: unknown)."""
    from ..cpu import cpu_flags

    flags = cpu_flags()
    if flags is None:
        return {"AVX2": None, "AVX-512": None, "AVX512_BF16": None, "AMX": None}
    return {"AVX2": "avx2" in flags, "AVX-512": "avx512f" in flags,
            "AVX512_BF16": "avx512_bf16" in flags,
            "AMX": any(f in flags for f in ("amx_bf16", "amx_tile", "amx_int8"))}


def race_environment(threads: int) -> dict[str, Any]:
    """``environment()`` of the CPU with the race's extras: CPU flags and features, threads,
    the peers' versions."""
    from ..cpu import cpu_features
    from ..device_cache import cpu_name, dist_version
    from .environment import environment

    env = environment(torch.device("cpu"))
    env.update(cpu=cpu_name(), cpu_threads=threads, cpu_flags=cpu_flag_table(),
               cpu_features=cpu_features().as_dict(), os_cpu_count=os.cpu_count(),
               openvino=dist_version("openvino"), onnxruntime=dist_version("onnxruntime"))
    return env


def _record(c: Contestant, reason: str | None) -> dict[str, Any]:
    return {**c.to_dict(), "status": "skipped" if reason else "pending", "reason": reason,
            "rounds": []}


class Race:
    """One race: the state the steps share, and the JSON they fill."""

    def __init__(self, opts: RaceOptions, contestants: Sequence[Contestant] = CONTESTANTS, *,
                 reader: machine_load.ProcReader | None = None,
                 launcher: Callable[..., ChildOutcome] = launch,
                 sleep: Callable[[float], None] = time.sleep,
                 log: Callable[[str], None] | None = None):
        from ..config import PRESETS, resolve_config
        from ..flops import count_flops

        self.opts = opts
        self.t0 = time.perf_counter()
        self.cfg = resolve_config(opts.config)
        self.flops = count_flops(self.cfg).per_image
        big = self.flops > BIG_FLOPS
        self.rounds = opts.rounds or (2 if big else 3)
        self.timeout_s = opts.timeout_s or DEFAULT_TIMEOUT_S["big" if big else "small"]
        self.threads = opts.threads or torch.get_num_threads()
        self.table = tuple(contestants)
        self.chosen = select(self.table, list(opts.only), list(opts.skip))
        self.reader = reader or machine_load.ProcReader()
        self.launcher, self.sleep = launcher, sleep
        self.log = log or ((lambda m: None) if opts.quiet else
                           (lambda m: print(m, file=sys.stderr, flush=True)))
        self.records = {c.name: _record(c, why_not(c, self.cfg)) for c in self.chosen}
        self.runnable = [c for c in self.chosen if self.records[c.name]["status"] != "skipped"]
        self.loads: list[machine_load.Load] = []
        self.probe: machine_load.Load | None = None
        config_name = opts.config if opts.config in PRESETS else os.path.basename(opts.config)
        self.data: dict[str, Any] = {
            "schema": SCHEMA, "environment": race_environment(self.threads),
            "config": {"name": config_name, **self.cfg.to_dict()},
            "flops_per_image": self.flops,
            "settings": {"rounds": self.rounds, "runs": opts.runs, "warmup": opts.warmup,
                         "seed": opts.seed, "threads": self.threads,
                         "timeout_s": self.timeout_s, "only": list(opts.only),
                         "skip": list(opts.skip), "order_rule": ORDER_WHY,
                         "timer": "perf_counter around each call, in the child",
                         "input": f"one seeded uniform [-1, 1) image, seed {opts.seed}",
                         "weights": f"load(None, seed={opts.seed}): seeded random weights"},
            "order": [], "exports": {}, "reference": None, "gemm_floor": None,
            "machine": None, "contestants": list(self.records.values()), "partial": True,
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}

    # -- plumbing -------------------------------------------------------------------------------
    def elapsed(self) -> str:
        s = int(time.perf_counter() - self.t0)
        return f"{s // 60:02d}:{s % 60:02d}"

    def save(self) -> None:
        if self.json_path is not None:
            self.data["wall_s"] = round(time.perf_counter() - self.t0, 1)
            write_json(self.json_path, json_safe(self.data))

    def child(self, spec: dict[str, Any], tag: str) -> ChildOutcome:
        spec = {"config": self.opts.config, "seed": self.opts.seed, "threads": self.threads,
                "out": str(self.scratch / "results" / f"{tag}.json"), **spec}
        env = dict(os.environ)
        # Inductor's caches in the race's folder: round 1 compiles from nothing (its first
        # call is the whole compile), later rounds find the cache
        env["TORCHINDUCTOR_CACHE_DIR"] = str(self.scratch / "inductor")
        return self.launcher(spec, timeout_s=self.timeout_s,
                             log_path=self.scratch / "logs" / f"{tag}.log", env=env)

    # -- steps ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        opts = self.opts
        self.json_path = Path(opts.json) if opts.json else None
        owned = opts.scratch is None
        self.scratch = Path(opts.scratch or tempfile.mkdtemp(prefix="depthpro-race-"))
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.reference_file = self.scratch / "reference.pt"
        if self.reference_file.exists():
            self.reference_file.unlink()  # (a kept folder: the reference of this race only)
        try:
            self.probe = machine_load.probe(self.reader, opts.probe_s, sleep=self.sleep)
            self.log(f"[race] machine before the race: {machine_load.summary(self.probe)}")
            for c in self.chosen:
                if self.records[c.name]["status"] == "skipped":
                    self.log(f"[race] {c.name}: skipped: {self.records[c.name]['reason']}")
            self.save()
            self.exports()
            self.reference_once()
            if opts.gemm_floor:
                self.gemm_floor()
            self.race_rounds()
            self.data["partial"] = False
        finally:
            self.finish()
            if owned:
                shutil.rmtree(self.scratch, ignore_errors=True)
        return self.data

    def exports(self) -> None:
        formats = list(dict.fromkeys(c.export for c in self.runnable if c.export))
        self.export_paths: dict[str, str] = {}
        for fmt in formats:
            self.log(f"[race {self.elapsed()}] exporting {fmt} once for the race ...")
            outcome = self.child({"job": "export", "format": fmt,
                                  "folder": str(self.scratch / "exports" / fmt)}, f"export-{fmt}")
            entry = {"status": "failed" if outcome.failure else "ok", "wall_s": outcome.wall_s,
                     "peak_rss_bytes": outcome.peak_rss_bytes}
            if outcome.failure:
                entry.update(error=outcome.failure, output_tail=outcome.output_tail)
                self.log(f"[race] {fmt} export FAILED: {outcome.failure}")
            else:
                entry.update({k: outcome.result.get(k) for k in
                              ("seconds", "build_s", "bytes", "summary", "path")})
                self.export_paths[fmt] = outcome.result["path"]
                self.log(f"[race] exported {fmt} in {entry['seconds']:.1f} s")
            self.data["exports"][fmt] = entry
            self.save()

    def reference_once(self) -> None:
        """The reference output, when the reference contestant is not racing."""
        ref = reference_contestant(self.table)
        racing = any(c.reference for c in self.runnable)
        if racing or ref is None or not any(c.comparable for c in self.runnable):
            self.data["reference"] = {
                "contestant": ref.name if ref is not None else None,
                "source": "the reference contestant, round 1" if racing else None}
            return
        self.log(f"[race {self.elapsed()}] computing the accuracy reference once ({ref.name})")
        outcome = self.child({"job": "contestant", "contestant": ref.to_dict(), "warmup": 0,
                              "runs": 1, "reference": str(self.reference_file),
                              "exports": {}}, "reference")
        self.data["reference"] = {
            "source": "computed once (the reference contestant is not racing)",
            "contestant": ref.name, "status": "failed" if outcome.failure else "ok",
            "error": outcome.failure, "wall_s": outcome.wall_s}
        self.save()

    def gemm_floor(self) -> None:
        self.log(f"[race {self.elapsed()}] measuring the GEMM floor at the ViT shapes ...")
        outcome = self.child({"job": "gemm_floor", "rows": self.opts.gemm_rows}, "gemm-floor")
        if outcome.failure:
            self.data["gemm_floor"] = {"status": "failed", "error": outcome.failure,
                                       "output_tail": outcome.output_tail}
        else:
            self.data["gemm_floor"] = {**outcome.result, "wall_s": outcome.wall_s}
            floors = ", ".join(f"{v:.1f} s ({k})" for k, v in outcome.result["floor_s"].items())
            self.log(f"[race] floor: {floors} per image at the measured GEMM rate")
        self.save()

    def race_rounds(self) -> None:
        names = [c.name for c in self.runnable]
        by_name = {c.name: c for c in self.runnable}
        for r in range(1, self.rounds + 1):
            order = round_order(names, r)
            self.data["order"].append(order)
            for i, name in enumerate(order, 1):
                self.log(f"[race {self.elapsed()}] round {r}/{self.rounds}, {i}/{len(order)}: "
                         f"{name} ...")
                entry = self.run_one(by_name[name], r, i)
                self.records[name]["rounds"].append(entry)
                self.log(f"[race {self.elapsed()}] {name} round {r}: " + (
                    f"{entry['status']}: {entry.get('error')}" if entry["status"] != "ok" else
                    "ok, runs " + ", ".join(f"{s:.2f}" for s in entry["runs_s"])
                    + f" s (first call {entry['first_call_s']:.2f} s, process "
                    f"{entry['child_wall_s']:.1f} s)"))
                self.save()

    def run_one(self, c: Contestant, round_no: int, position: int) -> dict[str, Any]:
        entry: dict[str, Any] = {"round": round_no, "position": position}
        if c.export and c.export not in self.export_paths:
            return {**entry, "status": "failed", "error": f"the {c.export} export failed "
                    "(see exports)"}
        outcome = self.child({"job": "contestant", "contestant": c.to_dict(),
                              "warmup": self.opts.warmup, "runs": self.opts.runs,
                              "reference": str(self.reference_file),
                              "exports": self.export_paths}, f"r{round_no}-{c.name}")
        entry.update(child_wall_s=outcome.wall_s, peak_rss_bytes=outcome.peak_rss_bytes,
                     exit_code=outcome.exit_code)
        result = outcome.result or {}
        if result.get("status") == "skipped":
            return {**entry, "status": "skipped", "error": result.get("reason")}
        if outcome.failure:
            return {**entry, "status": "failed", "error": outcome.failure,
                    "output_tail": outcome.output_tail}
        raw = result.pop("loads", [])
        loads = [machine_load.Load(**x) for x in raw]
        self.loads += loads
        return {**entry, **result, "status": "ok", "loads": [x.to_dict() for x in loads],
                "loads_raw": raw}

    def finish(self) -> None:
        ref = next((r for r in self.records.values() if r.get("reference")), None)
        for rec in self.records.values():
            if rec["status"] == "pending" and rec["rounds"] and all(
                    r["status"] == "skipped" for r in rec["rounds"]):
                rec.update(status="skipped", reason=rec["rounds"][0].get("error"))
        if ref is not None:
            summarise(ref, None)
        ref_median = ref.get("median_s") if ref is not None else None
        for rec in self.records.values():
            if rec is not ref:
                summarise(rec, ref_median)
        if ref is not None and ref_median:
            ref["speedup"] = 1.0
        self.data["machine"] = verdict(self.probe, self.loads)
        self.data["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        self.save()


def json_path_for(json: str | None, config_name: str) -> str:
    """Where the race's JSON goes: ``json``, or ``<date>-cpu-race-<config>.json`` in the folder
    ``json`` names (None: the current folder)."""
    name = f"{datetime.date.today().isoformat()}-cpu-race-{config_name}.json"
    if json is None:
        return name
    if os.path.isdir(json) or json.endswith(os.sep):
        return os.path.join(json, name)
    return json


def run_race(opts: RaceOptions, contestants: Sequence[Contestant] = CONTESTANTS,
             **kw: Any) -> dict[str, Any]:
    """Run the race (see the module's docstring); returns the JSON's data (also written to
    ``opts.json`` when set)."""
    return Race(opts, contestants, **kw).run()
