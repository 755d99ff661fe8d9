"""The optional whole-model check of kernel qualification (``FastOptions.verify_model``,
``python -m depthpro_fast.qualification --verify-model``): the first fast forward, on the
implementations that qualified, against the reference path (the same data flow with every op its
PyTorch reference) on the same input, within the dtype's budget of ``depthpro_fast.accuracy``.
A failure disqualifies every custom kernel the forward used (it cannot say which one is wrong).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import backends, dataflow
from .accuracy import (
    FOV_BUDGET_DEG,
    FP8_FOV_BUDGET_DEG,
    FP8_MARE_BUDGET,
    MARE_BUDGET,
    mean_abs_rel_error,
)
from .qualification import intercepted

#: fp32: the bound of the fp32 fast-path test (tests/test_fast_path.py: float32 rounding)
FP32_MARE_BUDGET = 1e-5
FP32_FOV_BUDGET_DEG = 1e-4


def budget(dtype_name: str) -> tuple[float, float]:
    """(MARE budget, FOV budget in degrees) of a precision (``record['dtype']`` names)."""
    if dtype_name == "fp8":
        return FP8_MARE_BUDGET, FP8_FOV_BUDGET_DEG
    dtype = getattr(torch, dtype_name)
    if dtype in MARE_BUDGET:
        return MARE_BUDGET[dtype], FOV_BUDGET_DEG
    return FP32_MARE_BUDGET, FP32_FOV_BUDGET_DEG


def verify_model(model: Any, forward: Callable[[], Any], x: torch.Tensor,
                 record: dict[str, Any]) -> dict[str, Any]:
    """Compare ``forward()`` (the fast path) with the reference path on ``x``; returns
    ``{"ok", "mare", "fov_error_deg", "budget"}`` and disqualifies on failure."""
    device = x.device
    with torch.no_grad():
        cid, fov = forward()
    with intercepted(lambda op, b, d: backends.load_implementation(op, "reference")):
        ref_cid, ref_fov = dataflow.run_network(model.stages(), x, compute_fov=fov is not None)
    dtype_name = "fp8" if model.fast_engine is not None and model.fast_engine.options.fp8 \
        else str(next(model.parameters()).dtype).removeprefix("torch.")
    mare_budget, fov_budget = budget(dtype_name)
    mare = mean_abs_rel_error(cid.float(), ref_cid.float())
    fov_err = 0.0 if fov is None or ref_fov is None else \
        float((fov.double() - ref_fov.double()).abs().max())
    ok = mare <= mare_budget and fov_err <= fov_budget
    out = {"ok": ok, "mare": mare, "fov_error_deg": fov_err,
           "budget": {"mare": mare_budget, "fov_deg": fov_budget}}
    if not ok:
        used = sorted({(r["op"], r["chosen"]) for r in record.get("results", [])
                       if r["chosen"] in backends.CUSTOM_BACKENDS})
        why = (f"the whole-model check failed: MARE {mare:.3g} (budget {mare_budget:g}), FOV "
               f"error {fov_err:.3g} deg (budget {fov_budget:g}) against the reference path")
        for op, b in used:
            backends.disqualify(op, b, device, why)
        out["disqualified"] = [f"{op}/{b}" for op, b in used]
    return out
