"""One row of the bench table: what the runner measured for a variant at a batch size."""

from __future__ import annotations

import dataclasses
from typing import Any

from .machine_load import Load
from .timing import Stats
from .variants import Variant


@dataclasses.dataclass
class RowResult:
    variant: Variant
    batch: int
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    device: Stats | None = None
    host: Stats | None = None
    first_call_ms: float | None = None  # the row's first call in this run (shared model)
    # "time to first depth map" of a fresh model (bench/first_call.py): in a new process
    # (cold), then a second fresh model in that process (warm); or why it was not measured
    first_call_cold_ms: float | None = None
    first_call_warm_ms: float | None = None
    first_call_error: str | None = None
    tf32: str | None = None  # TF32 during the row: "off", "on", or per library
    peak_mem_bytes: int | None = None
    ops: dict[str, str] | None = None
    stages: dict[str, Stats] | None = None
    # accuracy on the first input vs the fp32 reference eager row of the same batch (same
    # weights, same input before rounding to the row's dtype)
    mare: float | None = None
    fov_err_deg: float | None = None
    engine: dict[str, Any] | None = None  # FastEngine.status() of engine rows
    # what the machine gave during the timed runs (machine_load.py): this process's share of
    # its threads' time, other processes' CPU use, steal, load average
    load: Load | None = None
    # filled in by the runner once the baseline and the floor are known
    speedup: float | None = None
    pct_floor: float | None = None

    @property
    def images_per_s(self) -> float | None:
        return self.batch / (self.device.median * 1e-3) if self.device else None

    def to_dict(self) -> dict[str, Any]:
        v = self.variant
        d: dict[str, Any] = {
            "name": v.name, "path": v.path, "backend": v.backend, "mode": v.mode,
            "dtype": v.dtype_label, "batch": self.batch, "status": self.status,
            "reason": self.reason, "ops": self.ops, "first_call_ms": self.first_call_ms,
            "peak_mem_bytes": self.peak_mem_bytes, "images_per_s": self.images_per_s,
            "speedup": self.speedup, "pct_floor": self.pct_floor,
            "mare_vs_fp32_reference": self.mare, "fov_abs_err_deg": self.fov_err_deg,
            "tf32": self.tf32, "first_call_cold_ms": self.first_call_cold_ms,
            "first_call_warm_ms": self.first_call_warm_ms,
        }
        if v.options:
            d["fast_options"] = v.fast_options
        if self.first_call_error:
            d["first_call_error"] = self.first_call_error
        if self.engine is not None:
            d["engine"] = self.engine
        if self.device is not None:
            d.update(self.device.to_dict())
            d["host_median_ms"] = self.host.median if self.host else None
        if self.load is not None:
            d["machine_load"] = self.load.to_dict()
        if self.stages is not None:
            d["stages"] = {s: st.to_dict() for s, st in self.stages.items()}
        return d
