"""The contestants of the CPU race (``depthpro-fast bench --peers``): one table, and how each
builds the function it times.

A :class:`Contestant` is one line of :data:`CONTESTANTS`; a new precision mode of the fast
engine is one more line (``fast`` carries its ``FastOptions`` fields). Each ``kind`` has a
builder (:data:`BUILDERS`) that runs in the contestant's own child process
(``race_child.py``) and an applicability check (:func:`why_not`) that runs in the race's
process before anything starts, so that a contestant that cannot run here is listed as
skipped with the reason instead of failing in every round.

Every contestant runs the same network: ``load(None, seed=...)``'s seeded random weights (the
exports are made from the fp32 reference model of the same seed), on the same seeded input.
transformers' DepthPro is the exception: it draws its own random weights (its accuracy is not
compared, and the table says so).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

#: the kinds of contestant; ``factory``: built by an importable ``module:function``
KINDS = ("ours", "torch-compile", "openvino", "onnxruntime", "transformers", "factory")
#: the export each kind runs from (made once per race, before round 1)
EXPORT_OF_KIND = {"openvino": "openvino", "onnxruntime": "onnx"}
EXPORT_FILE = {"openvino": "depth_pro.xml", "onnx": "depth_pro.onnx"}


class Skip(Exception):
    """A contestant that cannot run here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Contestant:
    """One contestant of the race.

    ``dtype``: ``load``'s dtype (``float32``, ``bfloat16``, ``auto``), or for the exports the
    dtype of the model exported (always float32: OpenVINO picks its arithmetic at compile
    time). ``fast``: ``load``'s ``fast`` (False: the reference modules; True / a dict of
    ``FastOptions`` fields; None: ``load``'s default). ``precision``: OpenVINO's
    ``INFERENCE_PRECISION_HINT`` (None: no hint at all). ``reference``: the accuracy reference
    (our fp32 reference path); every other contestant's MARE and FOV error are against its
    output. ``comparable``: False where the weights differ (transformers' own init).
    ``factory``: ``"module:function"`` of a ``factory`` contestant, called as
    ``function(contestant, context)`` in the child, returning a :class:`Built`.
    """

    name: str
    kind: str
    label: str
    dtype: str = "float32"
    fast: bool | Mapping[str, Any] | None = None
    precision: str | None = None
    reference: bool = False
    comparable: bool = True
    factory: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"contestant {self.name!r}: kind must be one of {', '.join(KINDS)}, "
                             f"got {self.kind!r}")
        if (self.kind == "factory") != (self.factory is not None):
            raise ValueError(f"contestant {self.name!r}: a factory (module:function) goes with "
                             "kind 'factory' and only with it")

    @property
    def export(self) -> str | None:
        """The export format this contestant runs (``openvino``, ``onnx``), or None."""
        return EXPORT_OF_KIND.get(self.kind)

    @property
    def needs_bf16(self) -> bool:
        """Whether it computes in bf16 (and so needs a CPU with bf16 arithmetic)."""
        gemm = self.fast.get("gemm_dtype") if isinstance(self.fast, Mapping) else None
        return self.dtype == "bfloat16" or gemm == "bf16"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["fast"] = dict(self.fast) if isinstance(self.fast, Mapping) else self.fast
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Contestant:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


#: The race, in the order of its first round (the reference first: its output is the others'
#: accuracy reference). One line per contestant.
CONTESTANTS: tuple[Contestant, ...] = (
    Contestant("ours-ref-fp32", "ours", "ours reference eager (load(fast=False))", "float32",
               fast=False, reference=True),
    Contestant("ours-fast-fp32", "ours", "ours fast", "float32", fast=True),
    Contestant("ours-fast-bf16", "ours", "ours fast", "bfloat16", fast=True),
    Contestant("ours-mixed", "ours", "ours fast, bf16 GEMM inputs, fp32 activations",
               "float32", fast={"gemm_dtype": "bf16"}),
    Contestant("ours-default", "ours", "ours default (load(dtype='auto'))", "auto"),
    Contestant("openvino-f32", "openvino", "OpenVINO, INFERENCE_PRECISION_HINT=f32",
               precision="f32"),
    Contestant("openvino-default", "openvino", "OpenVINO, no precision hint (its own choice)"),
    Contestant("compile-bf16", "torch-compile",
               "torch.compile of our reference (Inductor, freezing)", "bfloat16", fast=False),
    Contestant("compile-fp32", "torch-compile",
               "torch.compile of our reference (Inductor, freezing)", "float32", fast=False),
    Contestant("onnxruntime-fp32", "onnxruntime", "ONNX Runtime (CPU provider) of our ONNX export"),
    Contestant("transformers-fp32", "transformers", "transformers DepthProForDepthEstimation",
               comparable=False),
    Contestant("transformers-bf16", "transformers", "transformers DepthProForDepthEstimation",
               "bfloat16", comparable=False),
)


def reference_contestant(contestants: Sequence[Contestant] = CONTESTANTS,
                         ) -> Contestant | None:
    """The accuracy reference of the table (None: it has none)."""
    return next((c for c in contestants if c.reference), None)


def select(contestants: tuple[Contestant, ...], only: list[str] | None,
           skip: list[str] | None) -> list[Contestant]:
    """The contestants ``--only`` / ``--skip`` leave, in the table's order; an unknown name is
    an error that lists the known ones."""
    known = [c.name for c in contestants]
    for name in [*(only or []), *(skip or [])]:
        if name not in known:
            raise ValueError(f"unknown contestant {name!r}; the contestants are: "
                             f"{', '.join(known)}")
    return [c for c in contestants
            if (not only or c.name in only) and c.name not in (skip or [])]


@dataclasses.dataclass(frozen=True)
class Context:
    """What a builder needs: the config (preset or JSON path), seed, threads and the race's
    exports (format -> path)."""

    config: str
    seed: int
    threads: int
    exports: Mapping[str, str]


@dataclasses.dataclass
class Built:
    """A contestant ready to run: ``run(x)`` -> (canonical inverse depth, FOV or None), the
    dtype its input is given in, and what it resolved to (``info``; ``after_first`` may add
    to it once the first call has run, e.g. the fast engine's measured choices)."""

    run: Callable[[torch.Tensor], Any]
    input_dtype: torch.dtype
    info: dict[str, Any]
    after_first: Callable[[], dict[str, Any]] | None = None


def why_not(c: Contestant, config: Any) -> str | None:
    """Why ``c`` cannot run on this machine with ``config`` (a ``DepthProConfig``), or None:
    its software first (not installed, wrong config), then the CPU (bf16 arithmetic)."""
    from ..cpu import cpu_features

    reason = _kind_unavailable(c, config)
    if reason is None and c.needs_bf16 and not cpu_features().bf16:
        reason = f"bf16: {cpu_features().bf16_why_not}"
    return reason


def _kind_unavailable(c: Contestant, config: Any) -> str | None:
    if c.kind == "openvino":
        from .openvino_row import openvino_unavailable

        return openvino_unavailable(torch.device("cpu"))
    if c.kind == "onnxruntime":
        from .onnxruntime_row import onnxruntime_unavailable

        return onnxruntime_unavailable(torch.device("cpu"))
    if c.kind == "transformers":
        from .variants import hf_unavailable

        return hf_unavailable(config)
    if c.kind == "torch-compile":
        # Inductor's CPU code is C++ compiled at the first call
        if not any(shutil.which(cxx) for cxx in ("g++", "clang++", "c++")):
            return "torch.compile on a CPU needs a C++ compiler (g++ or clang++) on the PATH"
    if c.kind == "factory":
        module = c.factory.partition(":")[0]
        if importlib.util.find_spec(module) is None:
            return f"factory module {module} not importable"
    return None


def _load_ours(c: Contestant, ctx: Context, **kw: Any) -> torch.nn.Module:
    from ..api import load

    model, _ = load(None, config=ctx.config, device="cpu", dtype=c.dtype, seed=ctx.seed, **kw)
    return model


def engine_summary(model: Any) -> dict[str, Any] | None:
    """The fast engine's options that differ from the defaults and what it chose (GEMM
    library, ViT epilogues, folds); None for the reference modules."""
    engine = getattr(model, "fast_engine", None)
    if engine is None:
        return None
    status = engine.status()
    defaults = {f.name: f.default for f in dataclasses.fields(engine.options)}
    changed = {k: v for k, v in status["options"].items() if defaults.get(k, v) != v}
    return {"options_changed": changed, "cpu_gemm": status.get("cpu_gemm"),
            "vit_epilogues": status.get("vit_epilogues"), "folds": status.get("folds")}


def _dtype_of(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def build_ours(c: Contestant, ctx: Context) -> Built:
    """Our model as ``load`` gives it (the reference modules, the fast engine, a mode)."""
    model = _load_ours(c, ctx, fast=c.fast)

    def run(x: torch.Tensor) -> Any:
        with torch.no_grad():
            return model(x)

    dtype = _dtype_of(model)
    info = {"dtype": str(dtype).removeprefix("torch."), "fast": engine_summary(model)}
    return Built(run, dtype, info, after_first=lambda: {"fast": engine_summary(model)})


def build_compile(c: Contestant, ctx: Context) -> Built:
    """``torch.compile`` (Inductor) of our reference model with freezing (weights folded as
    constants: oneDNN's prepacked weights, constant folding); the compile runs at the first
    call, which the race times as the first call."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    model = _load_ours(c, ctx, fast=False)
    compiled = torch.compile(model)

    def run(x: torch.Tensor) -> Any:
        with torch.no_grad():
            return compiled(x)

    dtype = _dtype_of(model)
    return Built(run, dtype, {"dtype": str(dtype).removeprefix("torch."), "backend": "inductor",
                              "freezing": True})


def build_openvino(c: Contestant, ctx: Context) -> Built:
    """The race's OpenVINO IR, compiled with the contestant's precision hint (or none)."""
    from .openvino_row import openvino_run

    run, compiled = openvino_run(_export_path(ctx, "openvino"), c.precision, ctx.threads)
    return Built(run, torch.float32, {"precision_hint": c.precision,
                                      "compiled_precision": compiled})


def build_onnxruntime(c: Contestant, ctx: Context) -> Built:
    """The race's ONNX export in an ONNX Runtime session (CPU provider)."""
    from .onnxruntime_row import onnxruntime_run

    run, used = onnxruntime_run(_export_path(ctx, "onnx"), torch.device("cpu"), ctx.threads)
    return Built(run, torch.float32, {"providers": used})


def build_transformers(c: Contestant, ctx: Context) -> Built:
    """transformers' DepthProForDepthEstimation at the official shapes (its own random init)."""
    from ..api import resolve_dtype
    from ..config import resolve_config
    from .variants import SkipRow, build_hf_model

    try:
        model = build_hf_model(resolve_config(ctx.config), torch.device("cpu"),
                               resolve_dtype(c.dtype))
    except SkipRow as e:
        raise Skip(str(e)) from None

    def run(x: torch.Tensor) -> Any:
        with torch.no_grad():
            out = model(pixel_values=x)
        return out.predicted_depth, getattr(out, "field_of_view", None)

    return Built(run, resolve_dtype(c.dtype), {"dtype": c.dtype, "weights": "transformers' own "
                                                "random init (not comparable)"})


def build_factory(c: Contestant, ctx: Context) -> Built:
    module, _, name = c.factory.partition(":")
    return getattr(importlib.import_module(module), name)(c, ctx)


def _export_path(ctx: Context, fmt: str) -> Path:
    if fmt not in ctx.exports:
        raise RuntimeError(f"no {fmt} export in this race (its export failed or did not run)")
    return Path(ctx.exports[fmt])


BUILDERS: dict[str, Callable[[Contestant, Context], Built]] = {
    "ours": build_ours, "torch-compile": build_compile, "openvino": build_openvino,
    "onnxruntime": build_onnxruntime, "transformers": build_transformers,
    "factory": build_factory}


def build(c: Contestant, ctx: Context) -> Built:
    """Build ``c`` (in its child process)."""
    return BUILDERS[c.kind](c, ctx)
