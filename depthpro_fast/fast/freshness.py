"""What identifies the state of a weight tensor, for the engine's "prepare again?" check.

A normal tensor: its storage (``data_ptr``) and its version counter (``_version``, bumped by
every in-place change, e.g. ``load_state_dict``). An inference tensor (made inside
``torch.inference_mode()``, e.g. a model loaded there) has no version counter: reading
``_version`` raises. It cannot be changed in place outside inference mode, but it can be
replaced by another tensor, so it is identified by the tensor object itself, held weakly (a
replaced tensor that was freed never compares equal to its successor, even if the successor
got the same address). Changes made in place to an inference tensor *inside* inference mode
cannot be seen: call ``model.prepare_fast()`` after them.
"""

from __future__ import annotations

import weakref

import torch


class SameTensor:
    """Equal to another ``SameTensor`` of the very same, still living, tensor object."""

    __slots__ = ("ref",)

    def __init__(self, t: torch.Tensor):
        self.ref = weakref.ref(t)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SameTensor):
            return NotImplemented
        t = self.ref()
        return t is not None and t is other.ref()

    __hash__ = None  # type: ignore[assignment]  # compared, never hashed

    def __repr__(self) -> str:
        t = self.ref()
        return f"SameTensor({'freed' if t is None else hex(id(t))})"


def tensor_state(t: torch.Tensor) -> tuple:
    """A value that changes when ``t`` is changed in place (normal tensors) or replaced."""
    if t.is_inference():
        return (t.data_ptr(), SameTensor(t))
    return (t.data_ptr(), t._version)
