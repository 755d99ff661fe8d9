"""``depthpro_fast.info()``: versions, devices, backends (and why not), checkpoint search."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

import torch

from . import _ext, backends, checkpoint, cpu_memory
from .cpu import cpu_default_precision, cpu_features


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _timed_choices(kind: str) -> dict[str, Any]:
    """The choices of ``kind`` made by timing that this process used (fast/timed_choice.py)."""
    from .fast.timed_choice import USED

    return {k: dict(v) for k, v in USED.get(kind, {}).items()}


def info() -> dict[str, Any]:
    """A report of what this installation can do, as a plain dict (see ``format_info``)."""
    from . import __version__

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                            "memory_gb": round(p.total_memory / 2**30, 1)})
    backend_report = {}
    for name in ("reference", "torch", "triton", "cuda"):
        ok, why = backends.backend_status(name)
        backend_report[name] = {"available": ok, "why_not": why}
    backend_report["auto"] = {
        "available": True,
        "chooses": "per op: " + " > ".join(backends.AUTO_ORDER_CUDA) + " on CUDA devices; "
                   + " > ".join(backends.AUTO_ORDER_CPU) + " on a CPU"}
    return {
        "depthpro_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "cuda_available": torch.cuda.is_available(),
        "devices": devices,
        "cpu": {**cpu_features().as_dict(), "threads": torch.get_num_threads(),
                "default_dtype": cpu_default_precision()},
        # glibc malloc tuning for repeated CPU forwards (cpu_memory.py) and huge pages
        "cpu_allocator": cpu_memory.allocator_state(),
        "extension": {"loaded": _ext.load() is not None, "why_not": _ext.unavailable_reason()},
        "backends": backend_report,
        "ops": backends.registered_ops(),
        "auto_fallbacks": backends.fallback_log(),
        # kernels that failed their qualification on a device (depthpro_fast/qualification.py)
        "disqualified": backends.disqualified(),
        # attention implementations chosen by fast engines in this process: timings, choice,
        # and its source ("measured" here or "device cache": stored by an earlier process)
        "attention_measurements": _timed_choices("attention_choice"),
        "cpu_gemm_choices": _timed_choices("cpu_gemm"),
        # one tiny Triton launch per CUDA device used (a C compiler is needed at the first)
        "triton_probes": backends.triton_probe_log(),
        "checkpoint_search": [
            {"where": what, "path": str(path) if path else None,
             "exists": bool(path and path.is_file())}
            for what, path in checkpoint.search_paths()],
        "checkpoint_url": checkpoint.CHECKPOINT_URL,
    }


def format_info(report: dict[str, Any] | None = None) -> str:
    """The report as aligned text lines."""
    r = report or info()
    lines = [f"depthpro_fast {r['depthpro_fast']}  (python {r['python']}, {r['platform']})",
             f"torch {r['torch']} (CUDA {r['torch_cuda'] or 'none'}), triton "
             f"{r['triton'] or 'not installed'}, numpy {r['numpy']}"]
    if r["devices"]:
        for d in r["devices"]:
            lines.append(f"device cuda:{d['index']}: {d['name']} (sm_{d['capability']}, "
                         f"{d['memory_gb']} GiB)")
    else:
        lines.append("device: CPU only (no CUDA device visible)")
    c = r.get("cpu")
    if c:
        lines.append(f"cpu: {c['capability']}, {c['threads']} threads; bf16 "
                     f"{'native' if c['bf16'] else 'slow (' + str(c['bf16_why_not']) + ')'}; "
                     f"fp16 {'native' if c['fp16'] else 'slow'}; CPU default dtype "
                     f"{c['default_dtype']}")
    if r.get("cpu_allocator"):
        lines += cpu_memory.describe(r["cpu_allocator"])
    ext = r["extension"]
    lines.append("extension depthpro_fast._C: " + ("loaded" if ext["loaded"] else
                                                   f"not available ({ext['why_not']})"))
    lines.append("backends:")
    for name, b in r["backends"].items():
        state = "available" if b["available"] else f"unavailable: {b.get('why_not')}"
        extra = f" ({b['chooses']})" if "chooses" in b else ""
        lines.append(f"  {name:<9} {state}{extra}")
    lines.append("ops: " + ", ".join(f"{op} [{'/'.join(impls)}]" for op, impls in r["ops"].items()))
    for key, why in r["auto_fallbacks"].items():
        lines.append(f"  skipped {key}: {why}")
    for key, why in r.get("disqualified", {}).items():
        lines.append(f"  disqualified {key}: {why}")
    for device, probe in r.get("triton_probes", {}).items():
        lines.append(f"  triton launch probe on {device}: "
                     + ("ok" if probe["ok"] else f"failed: {probe['why_not']}"))
    for kind, choices in (("attention", r.get("attention_measurements", {})),
                          ("cpu gemm", r.get("cpu_gemm_choices", {}))):
        for shape, m in choices.items():
            times = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} failed"
                              for k, v in m["timings_ms"].items())
            skipped = "".join(f"; {k} skipped" for k in m.get("skipped", {}))
            lines.append(f"  {kind} {shape}: {m['choice']} ({m.get('source', 'measured')}; "
                         f"ms: {times}{skipped})")
    lines.append("checkpoint search (load('auto')):")
    for c in r["checkpoint_search"]:
        lines.append(f"  {c['where']:<24} {c['path'] or '(not set)'}"
                     f"{'  [found]' if c['exists'] else ''}")
    lines.append(f"weights: {r['checkpoint_url']}")
    return "\n".join(lines)
