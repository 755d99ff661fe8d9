"""torch.export of the model as it runs (fast engine and backend included), saved as .pt2;
optionally compiled by AOTInductor (format ``aoti``)."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .checks import ExportError, ExportPlan
from .network import NetworkForward, dynamic_batch, example_input, traced_as
from .staging import staged

NAMESPACE = "depthpro_fast"


def custom_ops_in(program: torch.export.ExportedProgram) -> list[str]:
    """The package's custom ops called in the exported graph, e.g. ``attention_triton``."""
    names = set()
    for node in program.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and node.target.namespace == NAMESPACE:
            names.add(node.target._opname)
    return sorted(names)


@contextlib.contextmanager
def aten_gemms(engine: Any) -> Iterator[str | None]:
    """The fused ViT's CPU GEMMs through aten while tracing; yields the library replaced.

    Where ``cpu_gemm`` picked oneDNN (an AVX-512 / AMX CPU measures it faster), the graph would
    hold ``mkldnn._linear_pointwise``, which torch.export cannot serialise (its empty scalar
    list: "Empty list with type number nyi", found on such a CPU); ``aten.linear`` is the same
    function up to float32 rounding, and AOTInductor picks its own GEMM kernels anyway."""
    prepared = getattr(engine, "_prepared", None) if engine is not None else None
    name = getattr(prepared, "gemm_name", "aten")
    if name == "aten":
        yield None
        return
    prepared.gemm_name = "aten"
    try:
        yield name
    finally:
        prepared.gemm_name = name


def trace(model: Any, plan: ExportPlan, notes: list[str]) -> torch.export.ExportedProgram:
    """The exported program of the model as it runs; what the trace changed goes in ``notes``."""
    engine = model.fast_engine
    if engine is not None:
        engine.prepare()  # folds and GEMM choice are made eagerly, never inside a trace
    x = example_input(plan.device, plan.dtype)
    with traced_as(model, reference=False, include_fov=plan.include_fov), torch.no_grad(), \
            warnings.catch_warnings(), aten_gemms(engine) as replaced:
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.export(NetworkForward(model, plan.include_fov), (x,),
                                      dynamic_shapes=dynamic_batch(), strict=False)
    if replaced is not None:
        notes.append(f"the ViT GEMMs were traced through aten, not {replaced} (the engine's "
                     "CPU choice): torch.export cannot serialise oneDNN's linear op")
    return program


def export_pt2(model: Any, plan: ExportPlan) -> tuple[list[Path], list[str], list[str]]:
    notes: list[str] = []
    program = trace(model, plan, notes)
    custom = custom_ops_in(program)
    if not custom:
        notes.append(f"the {model.backend} backend runs no custom ops here, so the graph is "
                     "plain ATen; backend triton or cuda puts the package's kernels in it")
    name = plan.path.name
    with staged(plan.path) as stage:
        if plan.format == "aoti":
            from torch._inductor import aoti_compile_and_package

            aoti_compile_and_package(program, package_path=os.fspath(stage.path(name)))
        else:
            torch.export.save(program, stage.path(name))
        files = stage.commit([name])
    return files, custom, notes


def register_custom_ops() -> list[str]:
    """Import every module that defines one of the package's custom ops (a graph that calls
    them can then be loaded); returns what could not be registered, with the reason."""
    import importlib

    missing = []
    for op in ("attention", "split_patches", "merge_patches", "layer_norm", "bias_gelu",
               "residual_layerscale"):
        try:
            importlib.import_module(f"depthpro_fast.triton.{op}")
        except Exception as e:  # noqa: BLE001  (no Triton: those ops stay unregistered)
            missing.append(f"triton {op}: {e}")
    from .. import _ext

    if _ext.load() is None:
        missing.append(f"cuda ops: {_ext.unavailable_reason()}")
        return missing
    for op in ("attention", "split_patches", "merge_patches"):
        importlib.import_module(f"depthpro_fast.cuda.{op}")  # the C++ ops' fake kernels
    return missing


def is_aoti_package(path: str | os.PathLike) -> bool:
    """Whether a ``.pt2`` file is an AOTInductor package (compiled model code inside) rather
    than a saved exported program. Both are zip archives; only a package holds
    ``<name>/data/aotinductor/``. (``torch.export.load`` of a package fails with a generic
    deserialisation error, so the file is looked at instead of the error text.)"""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any("/data/aotinductor/" in n or n.startswith("data/aotinductor/")
                       for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_pt2(path: str | os.PathLike, device: Any = None) -> Any:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no exported program at {os.fspath(path)}")
    missing = register_custom_ops()
    extra = f" (not registered here: {'; '.join(missing)})" if missing else ""
    if is_aoti_package(p):
        from torch._inductor import aoti_load_package

        try:
            return aoti_load_package(os.fspath(p))
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"cannot load the AOTInductor package {os.fspath(path)}: {e}"
                              f"{extra}") from None
    try:
        return torch.export.load(p).module()
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"cannot load {os.fspath(path)}: {e}{extra}") from None
