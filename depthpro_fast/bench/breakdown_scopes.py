"""Labels for ``bench --breakdown``: ``torch.profiler.record_function`` ranges around the model's
stages and the ``depthpro_fast.ops`` calls, installed for the duration of one profiled forward.

Nothing in the model's or the engine's source changes: :func:`labels` wraps, and afterwards
restores, the stage methods of ``dataflow.Stages`` and of its subclasses (the fast engine's
``FastStages``), ``VisionTransformer.forward`` / ``forward_with_hooks``, ``FOVNetwork.encode``,
the attached engine's ``_vit`` / ``_lockstep_vits`` (instance attributes) and the functions of
the ``depthpro_fast.ops`` package (every caller looks them up there at call time). The names:

- ``depthpro_fast.forward``: the whole forward (the root of the breakdown);
- ``depthpro_fast.stage:<stage>``: a stage of ``depthpro_fast.flops.STAGES`` (``split``,
  ``patch encoder``, ..., ``head``), or ``ViTs`` / ``ViTs (lock-step)`` around the encoders;
- ``depthpro_fast.op:<op>#<i>``: the i-th call of a labelled op; ``ScopeLog.op_bytes[i]`` holds
  the bytes of its tensor arguments and results (the least that op must move).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.profiler import record_function

from .breakdown_categories import OP_SCOPES

PREFIX = "depthpro_fast."
ROOT = PREFIX + "forward"
STAGE = PREFIX + "stage:"
OP = PREFIX + "op:"

#: ``Stages`` method -> the stage its work belongs to (``fov``, the FOV network's head after
#: the decoder, is part of ``head`` in ``depthpro_fast.flops.STAGES``)
STAGE_METHODS = {"split": "split", "vits": "ViTs", "merge": "merge + upsample",
                 "upsample": "merge + upsample", "lowres": "merge + upsample",
                 "decoder": "decoder", "head": "head", "fov": "head",
                 "_fov_tokens": "FOV encoder"}


@dataclasses.dataclass
class ScopeLog:
    """What the labels recorded during the forward."""

    #: bytes of the tensor arguments and results of the i-th labelled op call
    op_bytes: list[int] = dataclasses.field(default_factory=list)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def tensor_bytes(*values: Any) -> int:
    """Bytes of every tensor in ``values`` (nested lists, tuples, dicts)."""
    return sum(t.numel() * t.element_size() for v in values for t in _tensors(v))


def parse_label(name: str) -> tuple[str, str, int | None] | None:
    """``(kind, value, index)`` of one of our labels (kind ``forward``, ``stage`` or ``op``),
    None for any other event name."""
    if name == ROOT:
        return "forward", "", None
    if name.startswith(STAGE):
        return "stage", name[len(STAGE):], None
    if name.startswith(OP):
        op, _, index = name[len(OP):].rpartition("#")
        return "op", op, int(index)
    return None


def _in_range(label: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def labelled(*args: Any, **kwargs: Any) -> Any:
        name = label(*args) if callable(label) else label
        with record_function(name):
            return fn(*args, **kwargs)

    return labelled


def _subclasses(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += [c for c in _subclasses(sub) if c not in out]
    return out


@contextlib.contextmanager
def labels(model: torch.nn.Module) -> Iterator[ScopeLog]:
    """Inside: ``model``'s stages, ViTs and ``depthpro_fast.ops`` calls run in labelled
    ``record_function`` ranges (module docstring); everything is restored on the way out."""
    from .. import dataflow, ops
    from ..model import FOVNetwork, VisionTransformer

    log = ScopeLog()
    restore: list[Callable[[], None]] = []

    def patch(owner: Any, name: str, new: Any) -> None:
        had_own = name in vars(owner)
        old = vars(owner).get(name)
        setattr(owner, name, new)
        if had_own:
            restore.append(lambda: setattr(owner, name, old))
        else:
            restore.append(lambda: delattr(owner, name))

    vit_names: dict[int, str] = {}
    enc = getattr(model, "encoder", None)
    if enc is not None:
        vit_names[id(enc.patch_encoder)] = "patch encoder"
        vit_names[id(enc.image_encoder)] = "image encoder"
    fov = getattr(model, "fov", None)
    if fov is not None:
        vit_names[id(fov.encoder[0])] = "FOV encoder"

    def vit_stage(vit: Any, *_: Any) -> str:
        return STAGE + vit_names.get(id(vit), "ViTs")

    try:
        for cls in _subclasses(dataflow.Stages):
            for method, stage in STAGE_METHODS.items():
                if method in vars(cls):
                    patch(cls, method, _in_range(STAGE + stage, vars(cls)[method]))
        for method in ("forward", "forward_with_hooks"):
            patch(VisionTransformer, method, _in_range(vit_stage, vars(VisionTransformer)[method]))
        patch(FOVNetwork, "encode", _in_range(STAGE + "FOV encoder", vars(FOVNetwork)["encode"]))
        engine = getattr(model, "fast_engine", None)
        if engine is not None:
            vit = engine._vit  # (bound methods of this engine object, wrapped on the instance)
            patch(engine, "_vit", _in_range(lambda v, *a: vit_stage(v), vit))
            if hasattr(engine, "_lockstep_vits"):
                patch(engine, "_lockstep_vits",
                      _in_range(STAGE + "ViTs (lock-step)", engine._lockstep_vits))
        for op in OP_SCOPES:
            fn = getattr(ops, op, None)
            if fn is not None:
                patch(ops, op, _op_scope(op, fn, log))
        yield log
    finally:
        for undo in reversed(restore):
            undo()


def _op_scope(op: str, fn: Callable[..., Any], log: ScopeLog) -> Callable[..., Any]:
    @functools.wraps(fn)
    def labelled(*args: Any, **kwargs: Any) -> Any:
        index = len(log.op_bytes)
        log.op_bytes.append(0)
        with record_function(f"{OP}{op}#{index}"):
            out = fn(*args, **kwargs)
        # read: the tensor arguments; written: the results (an in-place result counts again)
        log.op_bytes[index] = tensor_bytes(args, kwargs, out)
        return out

    return labelled


def profiled_call(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    """``fn(x)`` inside the root label (under an active profiler: the breakdown's root)."""
    with record_function(ROOT):
        return fn(x)
