"""Attention chosen by measurement (issue 13 item 3): the choice from injected timings, the
real timing path on a CPU, the engine's use of the choice (status, info, the ViTs' attention)."""

from __future__ import annotations

import copy

import pytest
import torch

import depthpro_fast
from depthpro_fast.fast import attention_choice as ac
from tests.test_fast_path import MICRO, _input, _random_model, max_rel

CPU = torch.device("cpu")


def test_choose_takes_the_fastest_that_qualified():
    assert ac.choose({"reference": 9.0, "torch": 2.0, "sdpa:flash": 1.5, "triton": None}) \
        == "sdpa:flash"
    # a failed or wrong candidate (None) is never chosen, however "fast"
    assert ac.choose({"cuda": None, "torch": 3.0}) == "torch"
    # ties: the earlier candidate in the given order, deterministically
    assert ac.choose({"torch": 1.0, "sdpa:math": 1.0}, order=["sdpa:math", "torch"]) \
        == "sdpa:math"
    with pytest.raises(RuntimeError, match="no attention implementation qualified"):
        ac.choose({"torch": None})


def test_measure_with_injected_timings_records_and_excludes():
    """The measurement logic with a fake timer: a candidate that raises, one whose output is
    wrong and the fastest correct one."""
    fake_ms = {"reference": 5.0, "torch": 0.7, "sdpa:flash": 0.2, "sdpa:math": 0.1}

    def timer(c, q, k, v, scale, repeats):
        out = depthpro_fast.ops.attention_reference(q, k, v, scale)
        if c.name == "sdpa:math":
            out = out + 1.0  # fastest, but wrong: excluded by the check against the reference
        if c.name == "torch":
            raise RuntimeError("no kernel for this shape")
        return fake_ms[c.name], out

    rec = ac.measure(3, 2, 17, 16, torch.float32, CPU, timer=timer)
    assert rec["choice"] == "sdpa:flash"
    assert rec["timings_ms"]["sdpa:math"] is None and "tolerance" in rec["errors"]["sdpa:math"]
    assert rec["timings_ms"]["torch"] is None and "no kernel" in rec["errors"]["torch"]
    assert "triton" in rec["skipped"] and "cuda" in rec["skipped"]
    assert ac.MEASURED["3x2x17x16 float32 cpu"]["choice"] == "sdpa:flash"


def test_real_timing_path_on_cpu():
    rec = ac.measure(2, 2, 33, 16, torch.float32, CPU, repeats=1)
    names = {c.name for c in ac.candidates(CPU)[0]}
    assert {"reference", "torch", "sdpa:math"} <= names
    assert all(rec["timings_ms"][n] is not None and rec["timings_ms"][n] > 0
               for n in ("reference", "torch"))
    assert rec["choice"] in names and rec["timings_ms"][rec["choice"]] is not None


def test_pinned_sdpa_backend_is_what_runs():
    q, k, v = ac.qkv_like_the_model(1, 2, 9, 8, torch.float32, CPU)
    c = ac.Candidate("sdpa:math", "torch", "math")
    with ac.pinned(c):
        out = depthpro_fast.ops.attention(q, k, v, backend="torch")
    ref = depthpro_fast.ops.attention_reference(q, k, v, 8 ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_engine_measures_with_auto_and_uses_the_choice(monkeypatch):
    model, _ = _random_model(MICRO, seed=31)
    x = _input(seed=5)
    with torch.no_grad():
        ref, _ = model(x)
    fast = copy.deepcopy(model)
    fast.set_backend("auto")
    fast.prepare_fast(True)
    # inject the measurement: make SDPA's math kernel the "fastest" for both shapes
    real = ac.measure

    def rigged(*args, **kwargs):
        rec = real(*args, repeats=1, **kwargs)
        rec["choice"] = "sdpa:math"
        return rec

    monkeypatch.setattr(ac, "measure", rigged)
    used = []
    real_pinned = ac.pinned

    def spy(c):
        used.append(None if c is None else c.name)
        return real_pinned(c)

    monkeypatch.setattr(ac, "pinned", spy)
    with torch.no_grad():
        out, _ = fast(x)
    status = fast.fast_engine.status()
    assert set(status["attention"]) == {"35x1x577x64 float32", "1x1x577x64 float32"}
    assert all(r["choice"] == "sdpa:math" for r in status["attention"].values())
    # the measurement pins each candidate in turn; then the three ViTs run the chosen one
    assert used[-3:] == ["sdpa:math"] * 3 and len(used) > 3
    assert max_rel(out, ref) <= 1e-5
    info = depthpro_fast.info()
    assert "35x1x577x64 float32 cpu" in info["attention_measurements"]
    assert "attention 35x1x577x64" in depthpro_fast.report.format_info(info)


def test_engine_keeps_an_explicit_backend():
    model, _ = _random_model(MICRO, seed=32)
    fast = copy.deepcopy(model).prepare_fast(True)  # backend "reference"
    with torch.no_grad():
        fast(_input(seed=6))
    status = fast.fast_engine.status()
    assert status["attention"] == {}
    assert "backend is 'reference'" in status["notes"]["attention_choice"]


def test_warm_up_runs_without_the_side_stream_before_the_graph_runner(monkeypatch):
    """On a device that autotunes: measurement, then one forward with streams off, then the
    graph runner (whose own warm-up and capture hit the tuned caches); once per input key."""
    from depthpro_fast.fast.engine import FastEngine

    model, _ = _random_model(MICRO, seed=33)
    fast = copy.deepcopy(model)
    fast.set_backend("auto")
    fast.prepare_fast(True)
    engine = fast.fast_engine
    events = []
    monkeypatch.setattr(FastEngine, "_tunes", staticmethod(lambda device: True))
    monkeypatch.setattr(engine, "uses_graphs", lambda device: True)
    monkeypatch.setattr(engine, "_choose_attention",
                        lambda x, compute_fov=True: events.append("measure"))
    real_forward = engine._forward

    def forward(x, p, compute_fov, *, streams=True):
        events.append(f"forward streams={streams}")
        return real_forward(x, p, compute_fov, streams=streams)

    def graphs_run(key, fn, x, keep_alive=None):
        events.append("graphs")
        return fn(x)

    monkeypatch.setattr(engine, "_forward", forward)
    monkeypatch.setattr(engine.graphs, "run", graphs_run)
    x = _input(seed=7)
    with torch.no_grad():
        fast(x)
        fast(x)
    assert events == ["measure", "forward streams=False", "graphs", "forward streams=True",
                      "graphs", "forward streams=True"]
