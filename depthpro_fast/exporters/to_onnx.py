"""ONNX export: torch.export of the reference math, translated by torch's dynamo exporter."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .checks import ExportPlan
from .network import NetworkForward, dynamic_batch, example_input, traced_as
from .staging import staged

BATCH_DIM = "batch"
#: The logger of torch's ONNX op registry, which says "torchvision is not installed. Skipping
#: torchvision::nms" (and three more) on every export without torchvision: DepthPro uses no
#: torchvision op, so the lines only alarm.
REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"


class _NoTorchvisionNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("torchvision is not installed")


@contextlib.contextmanager
def quiet_torchvision_notes() -> Iterator[None]:
    """Within the block, drop the registry's torchvision lines (and only those)."""
    logger = logging.getLogger(REGISTRY_LOGGER)
    quiet = _NoTorchvisionNotes()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _name_batch_dim(onnx_program: Any) -> None:
    """Give the dynamic batch axis of the inputs and outputs the name ``batch`` (the exporter
    calls it after its internal symbol, e.g. ``s40``)."""
    import onnx_ir as ir

    graph = onnx_program.model.graph
    first = graph.inputs[0].shape[0]
    if not isinstance(first, ir.SymbolicDim):
        return
    old = first.value
    for value in (*graph.inputs, *graph.outputs):
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(BATCH_DIM) if isinstance(d, ir.SymbolicDim) and d.value == old
                else d for d in value.shape]
        value.shape = ir.Shape(dims)


def export_onnx(model: Any, plan: ExportPlan, *, optimize: bool = True,
                ) -> tuple[list[Path], list[str]]:
    """Write ``plan.path`` (and its ``.data`` file with external data); returns the files and
    notes for the result."""
    notes = []
    if model.fast_engine is not None or model.backend != "reference":
        notes.append("the ONNX graph is the reference path's math (the fast engine and the "
                     f"{model.backend} backend are PyTorch-side; ONNX Runtime / TensorRT fuse "
                     "on their own)")
    x = example_input(plan.device, plan.dtype)
    with traced_as(model, reference=True, include_fov=plan.include_fov), torch.no_grad(), \
            warnings.catch_warnings(), quiet_torchvision_notes():
        # the exporter's own chatter (deprecated pytree names, torchvision ops not installed)
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.export(NetworkForward(model, plan.include_fov), (x,),
                                      dynamic_shapes=dynamic_batch(), strict=False)
        onnx_program = torch.onnx.export(program, opset_version=plan.opset, dynamo=True,
                                         optimize=optimize, input_names=["image"],
                                         output_names=list(plan.outputs), verbose=False)
    _name_batch_dim(onnx_program)
    name = plan.path.name
    with staged(plan.path) as stage:
        onnx_program.save(stage.path(name), external_data=plan.external_data)
        # the weights file (external data: its name is recorded inside the .onnx) first
        data = sorted(p.name for p in stage.folder.iterdir() if p.name != name)
        files = stage.commit([*data, name])
    if not data:  # an earlier export's weights file beside it is no longer referenced
        for stale in (plan.path.parent / (name + ".data"), plan.path.with_suffix(".data")):
            if stale.exists():
                stale.unlink()
    return files, notes
