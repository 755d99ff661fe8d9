"""The fast engine inside and outside ``torch.inference_mode()``, in any order (CPU).

A model loaded inside inference mode has inference tensors as weights (no version counter);
a CUDA graph's static buffers must take copies from calls made in either mode. The graph path
runs here with the fake graph backend of tests/graph_fakes.py.
"""

from __future__ import annotations

import gc

import pytest
import torch

import depthpro_fast
from depthpro_fast.fast.freshness import SameTensor, tensor_state
from depthpro_fast.fast.graphs import GraphRunner
from tests.graph_fakes import FakeGraphs
from tests.model_helpers import MICRO, model_input


def _load(config="tiny", seed: int = 5, fast=True):
    torch.manual_seed(seed)
    model, _ = depthpro_fast.load(None, config=config, device="cpu", fast=fast)
    return model


# ---------------------------------------------------------------------------------------------
# what identifies a weight's state
# ---------------------------------------------------------------------------------------------


def test_tensor_state_of_inference_tensors():
    with torch.inference_mode():
        a = torch.randn(4)
    assert a.is_inference()
    with pytest.raises(RuntimeError, match="version counter"):
        a._version  # noqa: B018  (what the freshness check used to read)
    state = tensor_state(a)
    assert tensor_state(a) == state  # the same tensor: fresh
    with torch.inference_mode():
        b = a.clone()
    assert tensor_state(b) != state  # a replacement: stale
    gone = SameTensor(b)
    del b
    gc.collect()
    assert gone.ref() is None
    assert gone != gone  # a freed tensor never matches, not even a successor at its address


def test_tensor_state_of_normal_tensors_sees_in_place_changes():
    t = torch.randn(3)
    state = tensor_state(t)
    assert tensor_state(t) == state
    with torch.inference_mode():
        t.add_(1)  # a normal tensor changed in place inside inference mode: version bumped
    assert tensor_state(t) != state


def test_loaded_in_inference_mode_prepares_once_and_sees_replacements():
    with torch.inference_mode():
        model = _load()
    engine = model.fast_engine
    prepared = engine._prepared
    assert next(model.parameters()).is_inference()
    assert engine._ensure_prepared() is prepared  # nothing changed: not prepared again
    with torch.no_grad():
        assert engine._ensure_prepared() is prepared
    with torch.inference_mode():
        w = model.head[0].weight
        model.head[0].weight = torch.nn.Parameter(w * 2, requires_grad=False)
    again = engine._ensure_prepared()  # outside inference mode: the replacement is seen
    assert again is not prepared and engine._ensure_prepared() is again


# ---------------------------------------------------------------------------------------------
# load + forward in either mode, then the other
# ---------------------------------------------------------------------------------------------


def test_load_and_run_inside_inference_mode_then_outside():
    x = model_input(seed=4)
    with torch.inference_mode():
        model = _load()
        prepared = model.fast_engine._prepared
        inside = model(x)
    with torch.no_grad():
        outside = model(x)
    assert model.fast_engine.calls == 2 and model.fast_engine._prepared is prepared
    assert inside[0].is_inference() and not outside[0].is_inference()
    assert torch.equal(inside[0], outside[0]) and torch.equal(inside[1], outside[1])
    outside[0].mul_(1)  # the caller outside inference mode owns a normal tensor


def test_load_outside_then_run_inside_and_outside():
    x = model_input(seed=6)
    model = _load()
    prepared = model.fast_engine._prepared
    with torch.inference_mode():
        inside = model(x)
    with torch.no_grad():
        outside = model(x)
    with torch.inference_mode():
        again = model(x)
    assert model.fast_engine.calls == 3 and model.fast_engine._prepared is prepared
    for out in (outside, again):
        assert torch.equal(inside[0], out[0]) and torch.equal(inside[1], out[1])


def test_graph_path_captured_inside_inference_mode_serves_calls_outside(monkeypatch):
    """The engine's CUDA-graph branch (fake graphs on the CPU): the capture happens inside
    inference mode (model loaded there too); later calls of the same key come from outside."""
    with torch.inference_mode():
        model = _load(MICRO, seed=7, fast={"cuda_graphs": True})
    engine = model.fast_engine
    engine.graphs = GraphRunner(backend=FakeGraphs(), warmup=1)
    monkeypatch.setattr(engine, "uses_graphs", lambda device: True)
    x1, x2 = model_input(seed=8), model_input(seed=9)
    with torch.inference_mode():
        first = model(x1)  # capture: static buffers allocated here
    with torch.no_grad():
        second = model(x2)  # used to fail: copy into an inference tensor outside the mode
    with torch.inference_mode():
        third = model(x1)
    status = engine.status()["graphs"]
    assert status["captures"] == 1 and status["replays"] == 3 and not status["failures"]
    assert not second[0].is_inference()
    assert torch.equal(first[0], third[0]) and torch.equal(first[1], third[1])
    assert not torch.equal(first[0], second[0])
