"""Fake "triton" implementations for the kernel-qualification tests (tests/test_qualification.py).

Each op with a Triton implementation gets a fake of one kind: ``ok`` (its reference, so the
model's output is the reference path's bit for bit), ``wrong`` (off by 0.5), ``raise``,
``unwritten`` (half its first output NaN: elements a kernel never wrote) or ``kill`` (SIGKILLs
its own process, as an illegal address takes a CUDA context down). ``from_env()`` installs the
kinds named in ``$DEPTHPRO_FAST_TEST_FAKES`` (``op=kind,...``; every other op ``ok``): the
qualifying child process runs it from a ``sitecustomize`` module the test puts on its path.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import torch

import depthpro_fast.ops  # noqa: F401  (registers every op)
from depthpro_fast import backends

ENV = "DEPTHPRO_FAST_TEST_FAKES"
KINDS = ("ok", "wrong", "raise", "unwritten", "kill")


def triton_ops() -> list[str]:
    return [op for op, impls in backends.registered_ops().items() if "triton" in impls]


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def fake(op: str, kind: str) -> Callable[..., Any]:
    ref = backends.load_implementation(op, "reference")

    def run(*args: Any, **kwargs: Any) -> Any:
        if kind == "raise":
            raise RuntimeError(f"fake {op} kernel: launch failed")
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        out = ref(*args, **kwargs)
        if kind == "wrong":
            _first(out).add_(0.5)
        elif kind == "unwritten":
            first = _first(out)
            first.view(-1)[: first.numel() // 2] = float("nan")
        return out

    run.kind = kind  # type: ignore[attr-defined]
    return run


def install(kinds: dict[str, str]) -> dict[str, Callable[[], Any]]:
    """Register a fake for every op with a Triton implementation (``ok`` unless named);
    returns the original loaders (for :func:`restore`)."""
    unknown = sorted(set(kinds) - set(triton_ops()))
    if unknown or set(kinds.values()) - set(KINDS):
        raise ValueError(f"fakes: unknown ops {unknown} or kinds {set(kinds.values())}")
    originals = {}
    for op in triton_ops():
        originals[op] = backends._REGISTRY[op]["triton"]
        f = fake(op, kinds.get(op, "ok"))
        backends.register(op, "triton", lambda f=f: f)
    return originals


def restore(originals: dict[str, Callable[[], Any]]) -> None:
    for op, loader in originals.items():
        backends.register(op, "triton", loader)


def from_env() -> None:
    spec = os.environ.get(ENV)
    if spec is not None:
        install(dict(item.split("=", 1) for item in spec.split(",") if item))
