"""What a result was measured with: device, driver, versions, torch flags, the git commit.

Every results file records :func:`environment`; :func:`default_results_name` names the files
committed under ``bench/results/`` (``<date>-<device>[-suffix].json``).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from ..device_cache import cpu_name, dist_version


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> dict[str, Any]:
    """The package's git commit and whether tracked files differ from it.

    Outside a git checkout (a copied working tree, as on a lent GPU machine) the commit comes
    from ``$DEPTHPRO_FAST_COMMIT`` when set (``dirty`` then unknown), else it is None.
    """
    root = str(Path(__file__).resolve().parents[2])
    commit = _run(["git", "rev-parse", "HEAD"], cwd=root)
    if commit is None:
        return {"commit": os.environ.get("DEPTHPRO_FAST_COMMIT") or None, "dirty": None}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return {"commit": commit, "dirty": bool(status)}


def environment(device: torch.device) -> dict[str, Any]:
    """Device, driver, versions, relevant torch flags and the git commit, as a plain dict."""
    from .. import __version__, _ext

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "depthpro_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": dist_version("triton"),
        "transformers": dist_version("transformers"),
        "extension": {"loaded": _ext.load() is not None, "why_not": _ext.unavailable_reason()},
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "device_type": device.type,
        **git_commit(),
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        env.update({
            "device": p.name,
            "capability": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        })
        smi = _run(["nvidia-smi", f"--id={idx}", "--query-gpu=driver_version,clocks.sm,"
                    "clocks.max.sm,power.limit,temperature.gpu", "--format=csv,noheader"])
        if smi:
            fields = [f.strip() for f in smi.splitlines()[0].split(",")]
            keys = ("driver", "clock_sm", "clock_sm_max", "power_limit", "temperature")
            env.update(dict(zip(keys, fields, strict=False)))
    else:
        env["device"] = env["cpu"]
    return env


def device_slug(env: dict[str, Any]) -> str:
    """A file-name-safe short name of the device: ``nvidia-h100-80gb-hbm3``, ``cpu``."""
    if env.get("device_type") != "cuda":
        return "cpu"
    name = "".join(c if c.isalnum() else "-" for c in str(env.get("device", "gpu")).lower())
    while "--" in name:
        name = name.replace("--", "-")
    return name.strip("-")


def default_results_name(env: dict[str, Any], suffix: str = "") -> str:
    """``<date>-<device>[-suffix].json`` as committed under ``bench/results/``."""
    date = str(env.get("date", ""))[:10] or datetime.date.today().isoformat()
    return f"{date}-{device_slug(env)}{('-' + suffix) if suffix else ''}.json"
