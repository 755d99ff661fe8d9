"""The CPU race's JSON as a markdown table (the README's CPU section): what machine (CPU model,
AVX2 / AVX-512 / AVX512_BF16 / AMX, threads), which software (torch, OpenVINO, ONNX Runtime,
transformers), which code (commit, date), the machine's verdict, the GEMM floor, one row per
contestant, and what was skipped or failed, with why.

``depthpro-fast bench --peers`` prints it; ``python bench/make_table.py --race FILE`` makes it
from a file.
"""

from __future__ import annotations

from typing import Any

from .race_summary import NOT_IDLE


def _n(value: Any, spec: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


def _yes(value: bool | None) -> str:
    return "?" if value is None else ("yes" if value else "no")


def header(data: dict[str, Any]) -> list[str]:
    """The lines above the table."""
    env = data.get("environment", {})
    flags = env.get("cpu_flags") or {}
    commit = (env.get("commit") or "unknown")[:10] + (" (modified)" if env.get("dirty") else "")
    cfg = data.get("config", {}).get("name", "?")
    s = data.get("settings", {})
    soft = [f"torch {env.get('torch', '?')}",
            f"OpenVINO {env.get('openvino') or 'not installed'}",
            f"ONNX Runtime {env.get('onnxruntime') or 'not installed'}",
            f"transformers {env.get('transformers') or 'not installed'}"]
    lines = [
        f"**CPU race**, config {cfg} ({data.get('flops_per_image', 0) / 1e9:,.1f} GFLOP per "
        f"image), seeded random weights and input (seed {s.get('seed', '?')}); "
        f"{str(env.get('date', '?'))[:10]}, commit `{commit}`"
        + (" (**partial**: the race was cut short)" if data.get("partial") else ""),
        f"CPU: {env.get('cpu', '?')}, {s.get('threads', env.get('cpu_threads', '?'))} threads "
        f"({env.get('os_cpu_count', '?')} logical CPUs); "
        + ", ".join(f"{k} {_yes(v)}" for k, v in flags.items()),
        "; ".join(soft),
        f"{s.get('rounds', '?')} rounds, each contestant in a fresh process per round: "
        f"{s.get('warmup', '?')} warm-up + {s.get('runs', '?')} timed run(s); order "
        + " / ".join(" ".join(o) for o in data.get("order", [])[:2])
        + (" ..." if len(data.get("order", [])) > 2 else ""),
        machine_line(data.get("machine")),
    ]
    floor = floor_line(data.get("gemm_floor"))
    if floor:
        lines.append(floor)
    return lines


def machine_line(machine: dict[str, Any] | None) -> str:
    if not machine:
        return "machine: not recorded"
    if machine["verdict"] == NOT_IDLE:
        return f"**machine NOT IDLE: timings not comparable** ({'; '.join(machine['reasons'])})"
    runs = machine.get("timed_runs") or {}
    bits = []
    if runs.get("others_cores") is not None and runs.get("cores"):
        bits.append(f"others used {runs['others_cores']:.2f} of {runs['cores']} cores during "
                    "the timed runs")
    if runs.get("load_before") is not None:
        bits.append(f"load average {runs['load_before']:.1f} -> {runs.get('load_after', 0):.1f}")
    extra = "; ".join(machine.get("reasons") or [])
    return f"machine: {machine['verdict']}" + (f" ({', '.join(bits)})" if bits else "") + (
        f": {extra}" if extra else "")


def floor_line(floor: dict[str, Any] | None) -> str | None:
    if not floor:
        return None
    if floor.get("status") == "failed":
        return f"floor: not measured ({floor.get('error')})"
    times = ", ".join(f"{v:.2f} s ({k})" for k, v in floor.get("floor_s", {}).items())
    rates = ", ".join(f"{r['block_gflops']:.0f} GFLOP/s {k}"
                      for k, r in floor.get("rates", {}).items())
    line = (f"floor: {times} at the measured GEMM rate ({rates}: a ViT block's linears, "
            f"{floor.get('rows')} token rows, best of F.linear and oneDNN prepacked)")
    if floor.get("bf16_why_not"):
        line += f"; no bf16 floor: {floor['bf16_why_not']}"
    return line


def _what(rec: dict[str, Any]) -> str:
    words = rec.get("label") or rec.get("kind", "")
    info = rec.get("info") or {}
    if rec.get("kind") == "ours" and rec.get("dtype") == "auto" and info.get("dtype"):
        engine = info.get("fast")
        words += f" -> {info['dtype']}, " + ("fast engine" if engine else "reference modules")
        changed = (engine or {}).get("options_changed")
        if changed:
            words += " " + ", ".join(f"{k}={v}" for k, v in changed.items())
    elif rec.get("kind") == "openvino" and info.get("compiled_precision"):
        words += f" (compiled for {info['compiled_precision']})"
    elif rec.get("kind") not in ("openvino", "onnxruntime"):
        words += f", {info.get('dtype') or rec.get('dtype')}"
    return words


def _others(rec: dict[str, Any]) -> str:
    load = rec.get("machine_load") or {}
    if load.get("others_cores") is None or not load.get("cores"):
        return "–"
    mark = " (shared)" if load.get("state") == "shared" else ""
    return f"{load['others_cores']:.2f} of {load['cores']}{mark}"


def table(data: dict[str, Any]) -> str:
    head = ("contestant", "what", "timed runs s", "median s", "spread", "speed-up",
            "first call s", "peak RSS", "MARE vs ours fp32 ref", "FOV err °", "others' CPU")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 9) + "|"]
    for rec in data.get("contestants", []):
        if not rec.get("runs_s"):
            continue
        rss = rec.get("peak_rss_bytes")
        mare = _n(rec.get("mare"), ".1e") if rec.get("comparable", True) else "n/a (own weights)"
        lines.append("| " + " | ".join([
            rec["name"] + ("" if rec["status"] == "ok" else f" ({rec['status']})"), _what(rec),
            ", ".join(f"{s:.2f}" for s in rec["runs_s"]), _n(rec.get("median_s"), ".2f"),
            _n(rec.get("spread_pct"), ".0f", " %"), _n(rec.get("speedup"), ".2f", "x"),
            _n(rec.get("first_call_s"), ".1f"),
            "–" if rss is None else f"{rss / 2**30:.2f} GiB", mare,
            _n(rec.get("fov_err_deg"), ".3f"), _others(rec)]) + " |")
    return "\n".join(lines)


def notes(data: dict[str, Any]) -> list[str]:
    """The lines under the table: exports, skipped and failed contestants, the legend."""
    out = []
    for fmt, e in (data.get("exports") or {}).items():
        if e.get("status") == "ok":
            out.append(f"{fmt} export (once for the race, not in the timings): "
                       f"{_n(e.get('seconds'), '.1f')} s, {(e.get('bytes') or 0) / 2**20:,.1f} MiB")
        else:
            out.append(f"{fmt} export FAILED: {e.get('error')}")
    ref = data.get("reference") or {}
    if (ref.get("source") or "").startswith("computed once"):
        out.append(f"accuracy reference: {ref['contestant']} {ref['source']}"
                   + (f", FAILED: {ref.get('error')}" if ref.get("status") == "failed" else ""))
    for rec in data.get("contestants", []):
        if rec["status"] == "skipped":
            out.append(f"skipped {rec['name']}: {rec.get('reason')}")
        for err in rec.get("errors") or []:
            out.append(f"failed {rec['name']} {err}")
    out.append("timed runs: wall time of each timed call, every round; median over them; "
               "spread: (max - min) / median; speed-up: the fp32 reference's median over the "
               "contestant's; first call: round 1's first call in a fresh process (torch.compile's "
               "compile included; exports not); peak RSS: the child process's peak resident "
               "memory; MARE / FOV err: mean absolute relative error of the canonical inverse "
               "depth and |FOV error| against our fp32 reference on the same weights and input; "
               "others' CPU: other processes' CPU use during the timed runs (cores)")
    return out


def markdown(data: dict[str, Any]) -> str:
    """The whole block: header lines, the table, the notes."""
    return ("\n".join(f"{line}  " for line in header(data)).rstrip() + "\n\n" + table(data)
            + "\n\n" + "\n".join(f"- {n}" for n in notes(data)))
