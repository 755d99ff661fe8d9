"""``depthpro_fast.export(model, path, format=...)``: the network as ONNX, OpenVINO IR or a
torch.export .pt2.

What is exported is ``model(x)``, the network forward: one input ``image``, a (B, 3, 1536, 1536)
float tensor normalised as ``transform`` does (``2 * rgb - 1``, resized to 1536x1536), and the
outputs ``canonical_inverse_depth`` (B, 1, 1536, 1536) and ``fov_deg`` (B, 1, 1, 1); a model
without its FOV network (``load(..., use_fov=False)``) or ``include_fov=False`` gives a
depth-only graph. The batch is dynamic. Turning those outputs into metric depth (the focal
length, the resize back, the clamp) is ``infer``'s job; docs/export.md shows it in numpy for users
of ONNX Runtime or TensorRT (``metric_depth.py`` holds the same recipe, tested against
``infer``).

Formats:

- ``onnx`` (``to_onnx.py``): torch's dynamo-based exporter, opset >= 18, the reference path's
  plain math (fp32 attention math in every dtype, as the reference), fp32 or fp16. Weights
  above 2 GB (the protobuf limit; the official model in fp32 is 3.8 GB) go to a ``.data`` file
  beside the ``.onnx`` (ONNX external data), which must stay next to it.
- ``openvino`` (``to_openvino.py``): the reference path's math, torch.export'ed and converted by
  ``openvino.convert_model``, saved as IR: a ``.xml`` graph and a ``.bin`` of fp32 weights
  beside it (same stem). fp32 models only: OpenVINO picks its arithmetic when it compiles the
  model (bf16 on CPUs with bf16 arithmetic by default). Run with :func:`load_exported` or
  ``openvino.Core().compile_model``.
- ``pt2`` (``to_pt2.py``): ``torch.export`` of the model as it runs, fast engine and backend
  included, so the graph holds the package's custom ops (``depthpro_fast::*``) where the backend
  has them (``triton``, ``cuda``); reload with :func:`load_exported`.
- ``aoti``: the same program compiled by AOTInductor into a ``.pt2`` package
  (``torch._inductor.aoti_compile_and_package``); reload with :func:`load_exported`.

Every check (format, opset, dtype, path) runs before any work, and the files are written
atomically: under a hidden temporary name in the destination folder, renamed into place when
complete (``.onnx`` / ``.xml`` last), removed on failure or Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from .checks import FORMATS, MIN_OPSET, ExportError, check_export

__all__ = ["FORMATS", "MIN_OPSET", "ExportError", "ExportResult", "export", "load_exported"]


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote."""

    format: str
    path: Path
    files: tuple[Path, ...]        # every file written (.onnx [+ .data], .xml + .bin, or .pt2)
    bytes: int                     # their total size
    seconds: float                 # wall time of the export
    dtype: str
    outputs: tuple[str, ...]       # output names, in order
    opset: int | None = None       # ONNX only
    custom_ops: tuple[str, ...] = ()  # pt2 / aoti: the depthpro_fast:: ops in the graph
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        size = f"{self.bytes / 2**20:,.1f} MiB" + (f" in {len(self.files)} files"
                                                   if len(self.files) > 1 else "")
        extra = f", opset {self.opset}" if self.opset is not None else ""
        ops = (f"; custom ops: {', '.join(self.custom_ops)}" if self.custom_ops
               else ("; plain ATen graph (no custom ops)" if self.format in ("pt2", "aoti")
                     else ""))
        return (f"{self.format} ({self.dtype}{extra}) -> {self.path} ({size}), "
                f"{self.seconds:.1f} s; outputs {', '.join(self.outputs)}{ops}")


def export(model: Any, path: str | os.PathLike, format: str | None = None, *,
           opset: int = MIN_OPSET, include_fov: bool | None = None, optimize: bool = True,
           external_data: bool | None = None, overwrite: bool = True) -> ExportResult:
    """Export ``model`` (a ``DepthPro`` from ``load``) to ``path``.

    ``format``: ``"onnx"``, ``"pt2"``, ``"aoti"`` or ``"openvino"``; None takes it from the
    suffix (``.onnx``, ``.pt2``, ``.xml``). ``opset``: ONNX opset, >= 18. ``include_fov``:
    None (the default) exports the FOV output when the model has its FOV network; False gives
    a depth-only graph.
    ``optimize``: the ONNX exporter's graph optimisation (constant folding, fewer nodes).
    ``external_data``: ONNX weights in a ``.data`` file beside the ``.onnx``; None: only when
    they would pass 2 GB. ``overwrite``: False refuses an existing ``path``.
    """
    plan = check_export(model, path, format, opset=opset, include_fov=include_fov,
                        external_data=external_data, overwrite=overwrite)
    t0 = time.perf_counter()
    if plan.format == "onnx":
        from .to_onnx import export_onnx

        files, notes = export_onnx(model, plan, optimize=optimize)
        custom: tuple[str, ...] = ()
    elif plan.format == "openvino":
        from .to_openvino import export_openvino

        files, notes = export_openvino(model, plan)
        custom = ()
    else:
        from .to_pt2 import export_pt2

        files, custom, notes = export_pt2(model, plan)
    seconds = time.perf_counter() - t0
    return ExportResult(format=plan.format, path=plan.path, files=tuple(files),
                        bytes=sum(f.stat().st_size for f in files), seconds=seconds,
                        dtype=str(plan.dtype).removeprefix("torch."), outputs=plan.outputs,
                        opset=plan.opset if plan.format == "onnx" else None,
                        custom_ops=tuple(custom), notes=tuple(notes))


def load_exported(path: str | os.PathLike, device: Any = None, *,
                  precision: str | None = None,
                  options: dict[str, Any] | None = None) -> Any:
    """Reload a ``.pt2`` or ``.xml`` written by :func:`export`: a callable ``f(image) ->
    outputs``.

    A ``pt2`` file gives ``torch.export.load(path).module()``, an ``aoti`` package its compiled
    runner. The package's custom ops are registered first (importing their modules), so a
    graph that holds them loads in a fresh process. An OpenVINO ``.xml`` is compiled on
    ``device`` (OpenVINO's name, default ``CPU``) with ``precision`` (its
    ``INFERENCE_PRECISION_HINT``: ``f32``, ``bf16``; None: no hint at all, OpenVINO's default
    for the device) and ``options`` (more compile properties, e.g.
    ``{"INFERENCE_NUM_THREADS": 2}``), and returns an ``OpenVINORunner`` (torch tensors or numpy
    in, torch tensors out).
    """
    if Path(path).suffix.lower() == ".xml":
        from .to_openvino import load_openvino

        return load_openvino(path, device, precision, options)
    if precision is not None or options:
        raise ExportError("precision= and options= apply to an OpenVINO .xml only (a .pt2 runs "
                          "in the dtype it was exported in)")
    from .to_pt2 import load_pt2

    return load_pt2(path, device)
