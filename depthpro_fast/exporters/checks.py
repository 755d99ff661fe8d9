"""Every check of an export, made before any work: one clear error each (``ExportError``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .._spelling import option
from ..install_hints import EXPORT_HINT, OPENVINO_HINT

#: format -> the file suffix it writes
FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "aoti": ".pt2", "openvino": ".xml"}
MIN_OPSET = 18
#: ONNX's protobuf limit is 2 GiB; weights above this go to an external .data file
EXTERNAL_DATA_BYTES = 1_900_000_000
ONNX_DTYPES = (torch.float32, torch.float16)
_ONNX_PACKAGES = ("onnx", "onnxscript")


class ExportError(ValueError):
    """An export that cannot be made as asked: the message says why and what is accepted."""


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    format: str
    path: Path
    dtype: torch.dtype
    device: torch.device
    opset: int
    include_fov: bool
    external_data: bool
    outputs: tuple[str, ...]


def _model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _is_fp8(model: Any) -> bool:
    """An FP8 model: its fast engine runs the ViT GEMMs in float8."""
    options = getattr(getattr(model, "fast_engine", None), "options", None)
    return bool(getattr(options, "fp8", False))


def resolve_format(path: Path, fmt: str | None) -> str:
    if fmt is None:
        by_suffix = {".onnx": "onnx", ".pt2": "pt2", ".xml": "openvino"}
        if path.suffix.lower() not in by_suffix:
            raise ExportError(f"cannot tell the export format from {os.fspath(path)!r}: name "
                              "the file .onnx, .pt2 or .xml (OpenVINO), or pass "
                              + option("format=", "--format") + " (onnx, pt2, aoti, openvino)")
        return by_suffix[path.suffix.lower()]
    if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; accepted: {', '.join(FORMATS)} "
                          "(onnx: ONNX opset >= 18 for ONNX Runtime / TensorRT; pt2: "
                          "torch.export; aoti: AOTInductor-compiled .pt2; openvino: OpenVINO IR, "
                          ".xml + .bin)")
    fmt = fmt.lower()
    if path.suffix.lower() != FORMATS[fmt]:
        raise ExportError(f"{fmt} export writes a {FORMATS[fmt]} file; {os.fspath(path)!r} "
                          f"ends in {path.suffix or 'no suffix'!r}: name it "
                          f"{path.stem}{FORMATS[fmt]}")
    return fmt


def _check_path(path: Path, overwrite: bool) -> Path:
    from ..outputs import check_output_folder

    if path.exists() and not overwrite:
        raise ExportError(f"export path {os.fspath(path)} exists (pass "
                          + option("overwrite=True", "--overwrite") + " to replace it)")
    try:
        check_output_folder(path.parent if str(path.parent) else Path("."),
                            "export folder")
    except OSError as e:
        raise ExportError(str(e)) from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ExportError(f"cannot replace {os.fspath(path)}: the file is read-only")
    return path.absolute()


def _check_opset(opset: Any) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ExportError(f"{option('opset', '--opset')} must be an integer >= {MIN_OPSET}, "
                          f"got {opset!r}")
    if opset < MIN_OPSET:
        raise ExportError(f"ONNX opset {opset} is too old: the export needs opset >= "
                          f"{MIN_OPSET} (LayerNormalization and the Resize / ReduceMean forms "
                          "it uses); ONNX Runtime >= 1.14 and TensorRT >= 8.6 read opset 18")
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ExportError(f"ONNX opset {opset} is newer than the installed onnx {onnx.__version__}"
                          f" knows (up to {newest}); accepted: {MIN_OPSET} to {newest}")
    return opset


def _need_packages(fmt: str) -> None:
    if fmt == "onnx":
        missing = [p for p in _ONNX_PACKAGES if importlib.util.find_spec(p) is None]
        if missing:
            raise ExportError(f"ONNX export needs the Python package(s) {', '.join(missing)}: "
                              f"{EXPORT_HINT} (onnx, onnxscript, and onnxruntime to "
                              "run the result)")
    if fmt == "openvino" and importlib.util.find_spec("openvino") is None:
        raise ExportError(f"OpenVINO export needs the Python package openvino: {OPENVINO_HINT}")
    if fmt == "aoti" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise ExportError("aoti export compiles C++ with AOTInductor and needs a C++ compiler "
                          "(c++, g++ or clang++ on PATH); none was found. The pt2 format "
                          "needs none")


def check_request(path: Any, fmt: str | None, *, opset: Any, dtype: torch.dtype | None,
                  overwrite: bool, fp8: bool = False) -> tuple[str, Path, int]:
    """The checks that need no model (the command line makes them before loading one):
    returns (format, absolute path, opset)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ExportError(f"export path must be a file name (str or os.PathLike), got {path!r}")
    p = Path(path).expanduser()
    if p.is_dir():
        raise ExportError(f"export path {os.fspath(p)} is a folder; give a file name in it "
                          f"(e.g. {os.fspath(p / 'depth_pro.onnx')})")
    fmt = resolve_format(p, fmt)
    if fp8 and fmt != "openvino":  # (openvino: refused below, as any non-fp32 model)
        why = ("its ViT GEMMs are torch._scaled_mm with per-token scales, which the ONNX "
               "exporter does not translate" if fmt == "onnx" else
               "the fast engine finds its e4m3 weight copies by the identity of the model's "
               "weight tensors, which torch.export's tracing replaces")
        raise ExportError(f"an FP8 model does not export to {fmt}: {why}; export the model in "
                          "bfloat16 or float16 (" + option("dtype=", "--dtype") + "; TensorRT "
                          "can quantise an fp16 ONNX graph itself)")
    if fmt == "onnx" and dtype is not None and dtype not in ONNX_DTYPES:
        raise ExportError(f"ONNX export of a {str(dtype).removeprefix('torch.')} model is not "
                          "offered: ONNX Runtime has no bfloat16 kernels for most of its ops; "
                          "load the model in float32 or float16 ("
                          + option("dtype=", "--dtype") + ")")
    if fmt == "openvino" and dtype is not None and dtype != torch.float32:
        raise ExportError(f"OpenVINO export of a {str(dtype).removeprefix('torch.')} model is "
                          "not offered: the IR keeps fp32 weights and OpenVINO picks its "
                          "arithmetic when it compiles the model (bf16 on a CPU with bf16 "
                          "arithmetic, by itself); load the model in float32 ("
                          + option("dtype=", "--dtype") + ")")
    opset_ok = _check_opset(opset) if fmt == "onnx" else MIN_OPSET
    _need_packages(fmt)
    return fmt, _check_path(p, overwrite), opset_ok


def check_export(model: Any, path: str | os.PathLike, fmt: str | None, *, opset: Any,
                 include_fov: bool | None, external_data: bool | None,
                 overwrite: bool) -> ExportPlan:
    """All the checks; returns what to do. Raises ``ExportError`` (a ValueError)."""
    from ..model import DepthPro

    if not isinstance(model, DepthPro):
        raise ExportError("export expects the model returned by depthpro_fast.load(), got "
                          f"{type(model).__name__}")
    device, dtype = _model_device_dtype(model)
    if device.type == "meta":
        raise ExportError("the model is on the meta device (no weights): load it with a "
                          "checkpoint or random weights first")
    if include_fov is not None and not isinstance(include_fov, bool):
        raise ExportError(f"include_fov must be True, False or None, got {include_fov!r}")
    has_fov = model.fov is not None
    if include_fov and not has_fov:
        raise ExportError("include_fov=True but this model has no FOV network (loaded with "
                          "use_fov=False): export it depth-only, or load it with its FOV")
    include = has_fov if include_fov is None else include_fov
    if external_data is not None and not isinstance(external_data, bool):
        raise ExportError(f"external_data must be True, False or None, got {external_data!r}")
    fmt, p, opset_ok = check_request(path, fmt, opset=opset, dtype=dtype, overwrite=overwrite,
                                     fp8=_is_fp8(model))
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    if external_data is False and fmt == "onnx" and weight_bytes > EXTERNAL_DATA_BYTES:
        raise ExportError(f"the weights take {weight_bytes / 2**30:.1f} GiB, above ONNX's 2 GiB "
                          "single-file limit: keep external_data=None or True (a .data file "
                          "beside the .onnx)")
    external = weight_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
    outputs = ("canonical_inverse_depth", "fov_deg") if include else ("canonical_inverse_depth",)
    return ExportPlan(format=fmt, path=p, dtype=dtype, device=device, opset=opset_ok,
                      include_fov=include, external_data=external, outputs=outputs)
