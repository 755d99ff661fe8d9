"""``depthpro-fast bench --breakdown``: where one forward's time goes, against a floor.

:func:`profile_forward` runs warm-up forwards, then one forward under ``torch.profiler`` (CPU
activities, ``record_shapes``) with the labels of ``breakdown_scopes.py`` installed;
:func:`aggregate` walks the recorded event tree and gives each op called from Python its
category (``breakdown_categories.py``) and stage; :func:`breakdown` adds the floor of each
category (``breakdown_floor.py``: FLOPs at the GEMM / conv rate of the dtype they ran in, or
estimated bytes at the copy bandwidth, both measured in the same process) and the gap
(time - floor); :func:`format_breakdown` prints the table sorted by gap.

Times are the profiler's CPU times on the thread that ran the forward (intra-op threads work
inside the ops it records). Each op's inclusive time counts once, under the category of the
outermost op (``linear`` and the ``addmm`` inside it are one GEMM); the self time of the labels
(Python between ops) is its own category, so the categories add up to the profiled root; what
the wall clock saw beyond it is reported as ``unaccounted``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .breakdown_categories import (
    CATEGORIES,
    FLOOR_KIND,
    LABELS,
    classify,
    scope_category,
)
from .breakdown_events import Event, Tally, bytes_moved, flops_by_dtype
from .breakdown_floor import Floor
from .breakdown_scopes import ROOT, labels, parse_label, profiled_call

#: the stage of ops outside every stage label (the forward's own glue between stages)
BETWEEN = "between stages"
SCHEMA = "depthpro_fast.bench.breakdown/1"


@dataclasses.dataclass
class Profiled:
    """One profiled forward: its event tree, wall time and what the labels recorded."""

    root: Event
    wall_ms: float
    op_bytes: list[int]
    #: median wall time of the unprofiled forwards just before (None: not measured)
    unprofiled_ms: float | None = None


def profile_forward(fn: Callable[[torch.Tensor], Any], model: torch.nn.Module,
                    inputs: Sequence[torch.Tensor], *, warmup: int = 1,
                    unprofiled: int = 1) -> Profiled:
    """``warmup`` forwards, ``unprofiled`` timed ones (their median is ``unprofiled_ms``: what
    the profiler added is the difference), then one forward under the profiler with the
    breakdown's labels installed. CPU only: on a GPU the profiler's CPU times would be launch
    times."""
    from torch.profiler import ProfilerActivity, profile

    x = inputs[-1]
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times = []
    for _ in range(unprofiled):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    plain = statistics.median(times) if times else None
    with labels(model) as log, profile(activities=[ProfilerActivity.CPU],
                                       record_shapes=True) as prof:
        t0 = time.perf_counter()
        profiled_call(fn, x)
        wall = (time.perf_counter() - t0) * 1e3
    roots = [e for e in prof.events() if e.name == ROOT and e.cpu_parent is None]
    if len(roots) != 1:
        raise RuntimeError(f"the profile holds {len(roots)} '{ROOT}' ranges, expected one")
    return Profiled(Event.from_profiler(roots[0]), wall, log.op_bytes, plain)


def aggregate(root: Event, op_bytes: Sequence[int] = (), *, list_elem: int = 4,
              ) -> tuple[dict[str, Tally], dict[str, Tally]]:
    """(by category, by stage) of the forward under ``root``; every microsecond of ``root``
    lands in exactly one category and one stage."""
    categories = {key: Tally() for key, _, _ in CATEGORIES}
    stages: dict[str, Tally] = {}

    def add(category: str, stage: str, time_us: float, fl: dict[str, int] | None = None,
            n_bytes: int = 0, ops: int = 0) -> None:
        categories[category].add(time_us, fl, n_bytes, ops)
        stages.setdefault(stage, Tally()).add(time_us, fl, n_bytes, ops)

    def inside(e: Event, tally: Tally, python: str) -> None:
        """The ops a labelled op ran (by name), its Python as ``python``."""
        tally.add_op(python, e.self_us, 0)
        for c in e.children:
            if c.is_op():
                tally.add_op(c.name, c.total_us)
            else:
                inside(c, tally, python)

    def visit(e: Event, stage: str) -> None:
        label = parse_label(e.name)
        if label is not None and label[0] == "op":
            _, op, index = label
            fl: dict[str, int] = {}
            for c in e.children:
                for dt, n in flops_by_dtype(c).items():
                    fl[dt] = fl.get(dt, 0) + n
            ideal = op_bytes[index] if index is not None and index < len(op_bytes) else 0
            category = scope_category(op, stage)
            add(category, stage, e.total_us, fl, ideal, 1)
            inside(e, categories[category], f"(Python in ops.{op})")
            return
        if label is not None or not e.is_op():
            # the root, a stage, or another range: its own time is Python between ops
            if label is not None and label[0] == "stage":
                stage = label[1]
            add("python", stage, e.self_us)
            categories["python"].add_op(f"(in {stage})", e.self_us)
            for c in e.children:
                visit(c, stage)
            return
        category = classify(e, None if stage == BETWEEN else stage)
        add(category, stage, e.total_us, flops_by_dtype(e), bytes_moved(e, list_elem), 1)
        categories[category].add_op(e.name, e.total_us)

    visit(root, BETWEEN)
    return categories, stages


def _floor_ms(key: str, t: Tally, floor: Floor) -> tuple[float, str]:
    """(floor in ms, what it is based on) of category ``key``."""
    kind = FLOOR_KIND[key]
    if kind in ("gemm", "conv"):
        ms, parts = 0.0, []
        for dt, n in sorted(t.flops_by_dtype.items()):
            rate = floor.rate(kind, dt)
            if rate:
                ms += n / (rate * 1e9) * 1e3
                parts.append(f"{_dtype_word(dt)} {kind} {rate:.0f} GFLOP/s")
        return ms, ", ".join(parts) or "no FLOPs"
    if kind == "memory":
        return t.bytes / (floor.bandwidth_gbs * 1e9) * 1e3, f"copy {floor.bandwidth_gbs:.1f} GB/s"
    return 0.0, "none (ideally 0)"


def _dtype_word(profiler_dtype: str) -> str:
    return {"float": "fp32", "c10::BFloat16": "bf16", "c10::Half": "fp16"}.get(
        profiler_dtype, profiler_dtype)


def breakdown(profiled: Profiled, floor: Floor, *, row: Mapping[str, Any] | None = None,
              expected_flops: Mapping[str, int] | None = None,
              list_elem: int = 4) -> dict[str, Any]:
    """The breakdown of one profiled forward as a JSON-ready dict (``SCHEMA``): categories
    sorted by gap, stages, totals; ``expected_flops``: ``count_flops(...).by_stage()`` for the
    stage cross-check."""
    categories, stages = aggregate(profiled.root, profiled.op_bytes, list_elem=list_elem)
    total_us = profiled.root.total_us
    summed_us = sum(t.time_us for t in categories.values())
    rows = []
    for key, t in categories.items():
        if t.time_us <= 0 and not t.ops:
            continue
        floor_ms, basis = _floor_ms(key, t, floor)
        ms = t.time_us / 1e3
        rows.append({
            "key": key, "label": LABELS[key], "time_ms": ms,
            "share": t.time_us / total_us if total_us else None, "ops": t.ops,
            "flops": t.flops, "flops_by_dtype": dict(t.flops_by_dtype),
            "gflops_achieved": t.flops / (ms * 1e6) if t.flops and ms > 0 else None,
            "bytes": t.bytes,
            "gbs_achieved": t.bytes / (ms * 1e6) if t.bytes and ms > 0 else None,
            "floor_kind": FLOOR_KIND[key], "floor_ms": floor_ms, "floor_basis": basis,
            "gap_ms": ms - floor_ms, "top_ops": t.top_ops()})
    rows.sort(key=lambda r: -r["gap_ms"])
    stage_rows = []
    for name, t in stages.items():
        expected = (expected_flops or {}).get(name)
        stage_rows.append({"stage": name, "time_ms": t.time_us / 1e3,
                           "share": t.time_us / total_us if total_us else None,
                           "flops": t.flops, "flops_expected": expected,
                           "flops_ratio": (t.flops / expected) if expected else None})
    wall = profiled.wall_ms
    return {
        "schema": SCHEMA, "row": dict(row or {}),
        "wall_ms": wall, "profiled_ms": total_us / 1e3, "categories_ms": summed_us / 1e3,
        "unaccounted_ms": wall - summed_us / 1e3,
        "unaccounted_share": (wall - summed_us / 1e3) / wall if wall else None,
        "unprofiled_ms": profiled.unprofiled_ms,
        "floor_ms": sum(r["floor_ms"] for r in rows),
        "flops": sum(r["flops"] for r in rows),
        "categories": rows, "stages": stage_rows, "floor": floor.to_dict()}


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_breakdown(data: Mapping[str, Any]) -> str:
    """The text table of one :func:`breakdown` (categories by gap, then the stages)."""
    row = data.get("row") or {}
    title = " ".join(str(row[k]) for k in ("name", "dtype") if row.get(k))
    if row.get("batch"):
        title += f", batch {row['batch']}"
    head = (f"{'category':<46} {'ms':>9} {'share':>6} {'GFLOP':>9} {'GFLOP/s':>8} "
            f"{'MB moved':>9} {'floor ms':>9} {'gap ms':>9}  floor basis")
    lines = [f"Where the time goes: {title}" if title else "Where the time goes", head]
    for r in data["categories"]:
        lines.append(
            f"{r['label']:<46} {r['time_ms']:>9.1f} {_num(100 * (r['share'] or 0), '5.1f')}% "
            f"{r['flops'] / 1e9:>9.2f} {_num(r['gflops_achieved'], '8.1f')} "
            f"{r['bytes'] / 1e6:>9.1f} {r['floor_ms']:>9.1f} {r['gap_ms']:>9.1f}  "
            f"{r['floor_basis']}")
    wall, summed = data["wall_ms"], data["categories_ms"]
    lines.append(f"{'sum of the categories':<46} {summed:>9.1f}   of the profiled forward's "
                 f"wall time {wall:.1f} ms; unaccounted {data['unaccounted_ms']:.1f} ms "
                 f"({100 * (data['unaccounted_share'] or 0):.1f} %)")
    lines.append(f"{'floor (all categories)':<46} {data['floor_ms']:>9.1f}   "
                 f"{data['flops'] / 1e9:.2f} GFLOP")
    lines.append("the ops of the three largest gaps:")
    for r in data["categories"][:3]:
        ops = ", ".join(f"{o['op']} {o['time_ms']:.1f} ms ({o['calls']}x)"
                        for o in r.get("top_ops", [])[:3])
        lines.append(f"  {r['label']}: {ops}")
    if data.get("unprofiled_ms") is not None:
        lines.append(f"unprofiled forward just before: {data['unprofiled_ms']:.1f} ms (the "
                     f"profiler added {100 * (wall / data['unprofiled_ms'] - 1):+.0f} %)")
    lines.append("")
    lines.append(f"{'stage':<22} {'ms':>9} {'share':>6} {'GFLOP':>9} {'flops.py':>9}")
    for s in data["stages"]:
        expected = s["flops_expected"]
        lines.append(f"{s['stage']:<22} {s['time_ms']:>9.1f} "
                     f"{_num(100 * (s['share'] or 0), '5.1f')}% {s['flops'] / 1e9:>9.3f} "
                     f"{_num(None if expected is None else expected / 1e9, '9.3f')}")
    return "\n".join(lines)
