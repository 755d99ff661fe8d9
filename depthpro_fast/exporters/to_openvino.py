"""OpenVINO export: torch.export of the reference math, converted by ``openvino.convert_model``
and written as IR (``.xml`` graph + ``.bin`` weights) with fp32 weights.

The weights stay fp32 (``save_model(..., compress_to_fp16=False)``): OpenVINO chooses the
arithmetic when the model is compiled, not when it is saved (``INFERENCE_PRECISION_HINT``: bf16
by default on CPUs with bf16 arithmetic, AMX or AVX512_BF16; ``f32`` asks for fp32). A bf16 /
fp16 model is refused before any work (``checks.py``): its IR would hold fp32 copies of rounded
weights, a worse model than the fp32 one with nothing gained.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import IMG_SIZE
from .checks import ExportError, ExportPlan
from .network import NetworkForward, dynamic_batch, example_input, traced_as
from .staging import staged

#: the compile-time setting that picks OpenVINO's arithmetic; ``f32`` matches the reference
PRECISION_KEY = "INFERENCE_PRECISION_HINT"


def to_ov_model(model: Any, plan: ExportPlan) -> Any:
    """The ``openvino.Model`` of the network: input ``image`` (batch dynamic), outputs named
    as ``plan.outputs``."""
    import openvino as ov

    x = example_input(plan.device, plan.dtype)
    with traced_as(model, reference=True, include_fov=plan.include_fov), torch.no_grad(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.export(NetworkForward(model, plan.include_fov), (x,),
                                      dynamic_shapes=dynamic_batch(), strict=False)
        ov_model = ov.convert_model(program)
    # the converter leaves every input dimension dynamic and names the outputs after internal
    # nodes (``relu_19:0``): fix the image size, keep the batch dynamic, name the outputs
    ov_model.reshape({ov_model.inputs[0]: ov.PartialShape([-1, 3, IMG_SIZE, IMG_SIZE])})
    ov_model.inputs[0].get_tensor().set_names({"image"})
    for port, name in zip(ov_model.outputs, plan.outputs, strict=True):
        port.get_tensor().set_names({name})
    return ov_model


def export_openvino(model: Any, plan: ExportPlan) -> tuple[list[Path], list[str]]:
    """Write ``plan.path`` (.xml) and its .bin; returns the files and notes for the result."""
    import openvino as ov

    notes = ["OpenVINO picks its arithmetic when it compiles the model (bf16 by default on a "
             "CPU with bf16 arithmetic); compile_model(..., {'INFERENCE_PRECISION_HINT': "
             "'f32'}) for fp32"]
    if model.fast_engine is not None or model.backend != "reference":
        notes.append("the OpenVINO graph is the reference path's math (the fast engine and the "
                     f"{model.backend} backend are PyTorch-side; OpenVINO fuses on its own)")
    ov_model = to_ov_model(model, plan)
    xml = plan.path.name
    bin_name = plan.path.with_suffix(".bin").name
    with staged(plan.path) as stage:
        # the .bin's name is recorded in nothing: OpenVINO reads <stem>.bin beside the .xml
        ov.save_model(ov_model, os.fspath(stage.path(xml)), compress_to_fp16=False)
        files = stage.commit([bin_name, xml])  # the .xml last: it appears only complete
    return files, notes


class OpenVINORunner:
    """A compiled OpenVINO model called like the network: ``runner(image)`` (a torch tensor or
    numpy array, (B, 3, 1536, 1536)) -> a tuple of torch tensors, in the order of the outputs
    (``canonical_inverse_depth``, then ``fov_deg`` when exported)."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.outputs = tuple(next(iter(o.get_names())) for o in compiled.outputs)

    @property
    def precision(self) -> str:
        """The arithmetic OpenVINO compiled for (``f32``, ``bf16``, ...)."""
        return self.compiled.get_property(PRECISION_KEY).get_type_name()

    def __call__(self, image: Any) -> tuple[torch.Tensor, ...]:
        if isinstance(image, torch.Tensor):
            image = image.detach().to("cpu", torch.float32).numpy()
        result = self.request.infer({0: image})
        # copies: the request's buffers are reused by its next call
        return tuple(torch.from_numpy(result[o].copy()) for o in self.compiled.outputs)


def load_openvino(path: str | os.PathLike, device: Any = None,
                  precision: str | None = None,
                  options: dict[str, Any] | None = None) -> OpenVINORunner:
    """Compile the IR at ``path`` on OpenVINO ``device`` (default ``CPU``; a torch ``cpu``
    device is accepted) with ``precision`` (``INFERENCE_PRECISION_HINT``: ``f32``, ``bf16``,
    ``f16``; None: no hint, OpenVINO's choice for the device) and ``options`` (more compile
    properties, e.g. ``{"INFERENCE_NUM_THREADS": 2}``; the precision goes in ``precision``)."""
    import openvino as ov

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no OpenVINO model at {os.fspath(path)}")
    if not p.with_suffix(".bin").is_file():
        raise ExportError(f"{os.fspath(path)} has no weights file beside it (expected "
                          f"{p.with_suffix('.bin').name}, written with it by export)")
    name = "CPU" if device is None else str(device)
    name = "CPU" if name.lower() == "cpu" else name
    if options and PRECISION_KEY in options:
        raise ExportError(f"pass the precision as precision=, not as options[{PRECISION_KEY!r}]")
    options = {**(options or {}), **({} if precision is None else {PRECISION_KEY: precision})}
    try:
        compiled = ov.Core().compile_model(os.fspath(p), name, options)
    except Exception as e:  # noqa: BLE001  (OpenVINO raises its own RuntimeError flavours)
        raise ExportError(f"OpenVINO cannot compile {os.fspath(path)} on {name!r} with "
                          f"{options or 'its defaults'}: {e}") from None
    return OpenVINORunner(compiled)
