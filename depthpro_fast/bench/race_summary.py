"""The CPU race's bookkeeping: the order of each round, one contestant's rounds summed up, and
the machine's verdict (idle, or not: timings not comparable).

Order: round 1 runs the table's order (the fp32 reference first, so that its output is there
for the others to compare with); every even round runs it reversed (A B C, C B A, A B C, ...).
A slow drift of the machine (another job starting, the CPU's thermal state, the page cache)
then falls evenly on the contestants: over each pair of rounds every contestant's mean
position is the same, where a fixed order would always give the first contestant the freshest
machine and the last one the most worn.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from . import machine_load

ORDER_WHY = ("alternating: odd rounds in the table's order (the fp32 reference first), even "
             "rounds reversed, so that a drift of the machine during the race falls evenly "
             "on the contestants (over each pair of rounds every contestant's mean position "
             "is the same)")
NOT_IDLE = "not idle: timings not comparable"


def round_order(names: Sequence[str], round_no: int) -> list[str]:
    """The contestants of round ``round_no`` (1-based), in the order they run."""
    return list(names) if round_no % 2 == 1 else list(reversed(names))


def load_from_raw(raw: dict[str, Any]) -> machine_load.Load:
    """A :class:`machine_load.Load` from a child's ``dataclasses.asdict`` of one."""
    return machine_load.Load(**raw)


def summarise(record: dict[str, Any], reference_median: float | None) -> None:
    """Fill a contestant's summary fields from its ``rounds`` (in place): every timed run,
    median, min, max, spread (% of the median), first call (the first round's and every
    round's), peak resident memory (the largest), MARE and FOV error (the worst round),
    speed-up over the fp32 reference's median, the machine load over its timed runs."""
    if record["status"] == "skipped":
        return
    ok = [r for r in record["rounds"] if r["status"] == "ok" and r.get("runs_s")]
    runs = [s for r in ok for s in r["runs_s"]]
    record["runs_s"] = runs
    failed = [r for r in record["rounds"] if r["status"] != "ok"]
    record["status"] = "ok" if ok and not failed else ("partial" if ok else "failed")
    record["errors"] = [f"round {r['round']}: {r.get('error')}" for r in failed]
    if not runs:
        return
    median = statistics.median(runs)
    record.update(median_s=median, min_s=min(runs), max_s=max(runs),
                  spread_pct=100.0 * (max(runs) - min(runs)) / median if median else None)
    record["first_call_by_round_s"] = [r.get("first_call_s") for r in ok]
    record["first_call_s"] = ok[0].get("first_call_s")
    record["first_output_s"] = ok[0].get("first_output_s")
    rss = [r["peak_rss_bytes"] for r in ok if r.get("peak_rss_bytes")]
    record["peak_rss_bytes"] = max(rss) if rss else None
    for key in ("mare", "fov_err_deg"):
        values = [r[key] for r in ok if r.get(key) is not None]
        record[key] = max(values) if values else None
    record["speedup"] = (reference_median / median
                         if reference_median and median else None)
    loads = [load_from_raw(raw) for r in ok for raw in r.get("loads_raw", [])]
    together = machine_load.combine(loads)
    record["machine_load"] = together.to_dict() if together is not None else None
    record["info"] = ok[0].get("info")


def verdict(probe: machine_load.Load | None,
            runs: Sequence[machine_load.Load]) -> dict[str, Any]:
    """The race's machine verdict: ``idle``, ``not idle: timings not comparable`` (the probe
    before the race or any timed run had others using more than ``OTHERS_SHARE`` of the cores,
    or steal above ``STEAL_PCT``), or ``unknown`` (nothing could be judged)."""
    judged = [x for x in runs if x is not None and x.state != "unknown"]
    shared = [x for x in judged if x.state == "shared"]
    reasons = []
    if probe is not None and probe.state == "shared":
        reasons.append(f"before the race: {'; '.join(probe.reasons)}")
    if shared:
        total = machine_load.combine(shared)
        words = "; ".join(total.reasons) or "others used the cores"
        reasons.append(f"{len(shared)} of {len(judged)} timed runs shared ({words})")
    if reasons:
        state = NOT_IDLE
    elif not judged and (probe is None or probe.state == "unknown"):
        state = "unknown"
        reasons.append("the machine's load could not be judged (/proc unreadable or spans "
                       f"under {machine_load.MIN_SPAN_S:g} s)")
    else:
        state = "idle"
    together = machine_load.combine(judged)
    return {"verdict": state, "reasons": reasons,
            "probe": probe.to_dict() if probe is not None else None,
            "timed_runs": together.to_dict() if together is not None else None,
            "runs_judged": len(judged), "runs_shared": len(shared),
            "thresholds": machine_load.thresholds()}
