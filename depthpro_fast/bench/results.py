"""The results file of ``depthpro-fast bench --json`` (schema ``depthpro_fast.bench/1``).

``bench/results/README.md`` documents every field; ``bench/make_table.py`` turns these files into
the README's performance table.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import DepthProConfig
    from .rows import RowResult

SCHEMA = "depthpro_fast.bench/1"


def json_safe(value: Any) -> Any:
    """``value`` with every container made JSON-friendly (keys and unknown leaves as str)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def results_dict(*, env: dict[str, Any], config_name: str, config: DepthProConfig,
                 params: int, flops_per_image: float, flops_by_stage: dict[str, int],
                 peak: dict[str, Any] | None, settings: dict[str, Any],
                 rows: Sequence[RowResult], notes: Sequence[str]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "environment": env,
        "config": {"name": config_name, **config.to_dict()},
        "parameters": params,
        "flops_per_image": flops_per_image,
        "flops_by_stage": flops_by_stage,
        "peak_matmul": peak,
        "settings": settings,
        "rows": [r.to_dict() for r in rows],
        "notes": list(notes),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
    }
