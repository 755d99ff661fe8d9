"""One description of the data flow (DESIGN.md §7): the reference forward,
the fast engine and the bench's stage timer all run ``dataflow.run_network``, each with its own
stage implementations, so a change to the wiring is made once."""

from __future__ import annotations

import torch

import depthpro_fast
from depthpro_fast import dataflow
from depthpro_fast.bench.stages import staged_forward
from depthpro_fast.fast.stages import FastStages
from tests.model_helpers import MICRO, model_input


def _model():
    torch.manual_seed(5)
    model, _ = depthpro_fast.load(None, config=MICRO, device="cpu", backend="reference")
    return model


def test_every_path_runs_the_one_flow(monkeypatch):
    model = _model()
    x = model_input(seed=3)
    seen = []
    real = dataflow.run_network

    def spy(stages, x, **kwargs):
        seen.append(type(stages))
        return real(stages, x, **kwargs)

    monkeypatch.setattr(dataflow, "run_network", spy)
    with torch.no_grad():
        ref = model(x)
        staged = staged_forward(model, x)
        model.prepare_fast(True)
        fast = model(x)
    assert seen == [dataflow.Stages, dataflow.Stages, FastStages]
    assert torch.equal(ref[0], staged[0]) and torch.equal(ref[1], staged[1])
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-6)


def test_a_stage_swapped_in_the_flow_changes_both_paths(monkeypatch):
    """The wiring is shared: a change made in ``dataflow`` (here one encoder output replaced
    by zeros) shows on both paths alike."""
    model = _model()
    x = model_input(seed=4)
    with torch.no_grad():
        ref, _ = model(x)
        model.prepare_fast(True)
        fast, _ = model(x)
        model.prepare_fast(False)

    real_encode = dataflow.encode

    def encode_zeroing_latent0(stages, x, **kwargs):
        encodings, fov = real_encode(stages, x, **kwargs)
        return [torch.zeros_like(encodings[0]), *encodings[1:]], fov

    monkeypatch.setattr(dataflow, "encode", encode_zeroing_latent0)
    with torch.no_grad():
        ref2, _ = model(x)
        model.prepare_fast(True)
        fast2, _ = model(x)
    assert not torch.equal(ref2, ref) and not torch.equal(fast2, fast)
    torch.testing.assert_close(fast2, ref2, rtol=1e-5, atol=1e-6)


def test_decode_is_the_decoders_flow():
    calls = []

    def project(i, e):
        calls.append(("project", i))
        return e + i

    def fuse(i, f, skip):
        calls.append(("fuse", i, skip is None))
        return f if skip is None else f + skip

    encs = [torch.full((1,), float(i)) for i in range(3)]
    f, lowres = dataflow.decode(encs, project, fuse)
    assert calls == [("project", 2), ("fuse", 2, True), ("project", 1), ("fuse", 1, False),
                     ("project", 0), ("fuse", 0, False)]
    assert float(lowres) == 4.0 and float(f) == 4.0 + 2.0 + 0.0
