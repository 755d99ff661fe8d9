"""The text tables of ``depthpro-fast bench``: the side-by-side table and the stage breakdown.

:func:`fill_relative` derives the columns that need the whole run (speed-up over the reference
eager row of the same batch, % of the FLOP floor at the measured peak).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .machine_load import format_pct
from .rows import RowResult
from .stages import STAGE_NAMES


def fill_relative(rows: Sequence[RowResult], flops_per_image: float,
                  peak_tflops: float | None) -> RowResult | None:
    """Set speed-up (vs the first ok reference eager row of the same batch) and % of floor."""
    baselines: dict[int, RowResult] = {}
    for r in rows:
        if (r.status == "ok" and r.variant.path == "reference" and r.variant.mode == "eager"
                and r.batch not in baselines):
            baselines[r.batch] = r
    for r in rows:
        if r.status != "ok":
            continue
        base = baselines.get(r.batch)
        if base is not None:
            r.speedup = base.device.median / r.device.median
        if peak_tflops:
            floor_ms = flops_per_image * r.batch / (peak_tflops * 1e12) * 1e3
            r.pct_floor = 100.0 * floor_ms / r.device.median
    return next(iter(baselines.values()), None)


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _first_call(r: RowResult) -> str:
    """The first-call cell: ``cold/warm`` seconds, ``failed``, or ``-`` (not measured)."""
    if r.first_call_cold_ms is not None and r.first_call_warm_ms is not None:
        return f"{r.first_call_cold_ms / 1e3:.2f}/{r.first_call_warm_ms / 1e3:.2f} s"
    return "failed" if r.first_call_error else "-"


def format_table(rows: Sequence[RowResult], note_width: int = 60) -> str:
    """The side-by-side table; rows that did not run show their reason in the last column.

    Where rows carry a CPU share (``RowResult.load.cpu_got``, the CPU rows), a "CPU got"
    column after min-max says how much of its threads' time the process got during the row."""
    cpu_got = any(r.load is not None and r.load.cpu_got is not None for r in rows)
    header = ("variant", "dtype", "batch", "median ms", "min-max ms",
              *(("CPU got",) if cpu_got else ()), "img/s", "speed-up", "% floor", "peak mem",
              "MARE", "FOV err", "1st call c/w", "note")
    lines = []
    for r in rows:
        v = r.variant
        got = ((format_pct(r.load.cpu_got if r.load else None),) if cpu_got else ())
        if r.status == "ok":
            d = r.device
            note = ""
            if v.path == "fast" and r.ops:
                note = "ops: " + ", ".join(f"{op.split('_')[0]}={b}" for op, b in r.ops.items())
            if r.first_call_ms is not None and v.mode != "eager":
                note = (note + "; " if note else "") + f"first call {r.first_call_ms / 1e3:.1f} s"
            if v.tf32_off and r.tf32 == "off":
                note = (note + "; " if note else "") + "TF32 off"
            failures = ((r.engine or {}).get("graphs") or {}).get("failures")
            if failures:
                note = (note + "; " if note else "") + f"graph capture failed (eager): {failures}"
            if r.load is not None and r.load.state == "shared":
                note = (note + "; " if note else "") + "machine shared"
            is_ref = v.is_fp32_reference and r.mare == 0.0
            cells = (v.name, v.dtype_label, str(r.batch), f"{d.median:.1f}",
                     f"{d.min:.1f}-{d.max:.1f}", *got, _fmt(r.images_per_s, ".2f"),
                     _fmt(r.speedup, ".2f", "-") + ("x" if r.speedup else ""),
                     _fmt(r.pct_floor, ".1f") + ("%" if r.pct_floor is not None else ""),
                     _gib(r.peak_mem_bytes), "ref" if is_ref else _fmt(r.mare, ".1e"),
                     "ref" if is_ref else _fmt(r.fov_err_deg, ".3f"), _first_call(r), note)
        else:
            reason = (r.reason or "").replace("\n", " ")
            if len(reason) > note_width:
                reason = reason[:note_width - 3] + "..."
            cells = (v.name, v.dtype_label, str(r.batch), "-", "-", *got, "-", "-", "-", "-",
                     "-", "-", "-", f"{r.status}: {reason}")
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    right = set(range(2, len(header) - 1))  # every column between dtype and note

    def fmt_row(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt_row(header), sep, *(fmt_row(c) for c in lines)])


def format_stages(rows: Sequence[RowResult], flops_by_stage: dict[str, int] | None,
                  peak_tflops: float | None) -> str:
    """Per-stage medians of every row that has them, with each stage's share and TFLOP/s."""
    blocks = []
    for r in rows:
        if not r.stages:
            continue
        total = r.stages["total"].median
        lines = [f"{r.variant.name} {r.variant.dtype_label}, batch {r.batch} "
                 f"(staged total {total:.1f} ms, whole forward {r.device.median:.1f} ms):",
                 f"  {'stage':<18} {'median ms':>10} {'share':>7} {'GFLOP':>10} {'TFLOP/s':>9}"
                 + ("  % peak" if peak_tflops else "")]
        for stage in STAGE_NAMES:
            st = r.stages[stage]
            gflop = (flops_by_stage or {}).get(stage, 0) * r.batch / 1e9
            rate = gflop / st.median if st.median > 0 and gflop else None  # GFLOP/ms = TFLOP/s
            line = (f"  {stage:<18} {st.median:>10.2f} {100 * st.median / total:>6.1f}% "
                    f"{gflop:>10,.1f} {_fmt(rate, '.1f'):>9}")
            if peak_tflops:
                line += f"  {_fmt(rate and 100 * rate / peak_tflops, '.1f'):>6}"
            lines.append(line)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
