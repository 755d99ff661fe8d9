"""The CUDA-graph runner's logic on a CPU (fake graph backend: tests/graph_fakes.py).

Static buffers in and out of inference mode, recapture thrash (more live shapes than
max_graphs), capture failures, and the ownership of capture / side streams (torch's pool of 32
streams per device, round-robin).
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

from depthpro_fast.fast import streams
from depthpro_fast.fast.graph_backend import (
    clone_out,
    copy_in,
    normal_tensors,
    static_input_like,
)
from depthpro_fast.fast.graphs import GraphRunner
from tests.graph_fakes import FakeGraphs, FakeStreamPool

DEV = torch.device("cpu")


def double(t: torch.Tensor):
    return (t * 2, None, t.sum().reshape(1))


def check(out, x):
    ref = double(x)
    assert out[1] is None
    assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[2])


# ---------------------------------------------------------------------------------------------
# static buffers and inference mode
# ---------------------------------------------------------------------------------------------


def test_static_input_made_in_inference_mode_is_a_normal_tensor():
    with torch.inference_mode():
        x = torch.randn(4)
        buf = static_input_like(x)
    assert not buf.is_inference() and torch.equal(buf, x)
    # a buffer made the plain way inside inference mode cannot take a copy outside it: the
    # failure of every later graph call of that shape made outside inference mode
    with torch.inference_mode():
        plain = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
        plain.copy_(torch.randn(4))
    y = torch.randn(4)
    copy_in(buf, y)  # outside, from a normal tensor
    assert torch.equal(buf, y)
    with torch.inference_mode():
        z = torch.randn(4)
        copy_in(buf, z)  # inside, from an inference tensor
    assert torch.equal(buf, z)


def test_normal_tensors_keeps_grad_mode_off():
    with torch.inference_mode():
        with normal_tensors():
            assert not torch.is_grad_enabled()  # inference_mode(False) alone turns it on
            assert not torch.empty(1).is_inference()
    with torch.no_grad(), normal_tensors():
        assert not torch.is_grad_enabled()


def test_clone_out_in_the_callers_mode():
    with normal_tensors():
        static = (torch.randn(3), None)
    with torch.inference_mode():
        inside = clone_out(static)
    outside = clone_out(static)
    assert inside[0].is_inference() and not outside[0].is_inference()
    assert inside[1] is None and torch.equal(inside[0], static[0])
    outside[0].add_(1)  # a caller outside inference mode may update its output in place
    assert not torch.equal(outside[0], static[0])


@pytest.mark.parametrize("first_inside", [True, False])
def test_runner_serves_calls_in_and_out_of_inference_mode(first_inside):
    be = FakeGraphs()
    runner = GraphRunner(backend=be, warmup=1)
    xs = [torch.randn(5) for _ in range(4)]
    modes = [first_inside, not first_inside, first_inside, not first_inside]
    for x, inside in zip(xs, modes, strict=True):
        if inside:
            with torch.inference_mode():
                out = runner.run("k", double, x)
            assert out[0].is_inference()
        else:
            with torch.no_grad():
                out = runner.run("k", double, x)
            assert not out[0].is_inference()
            out[0].add_(0)  # a normal tensor: the caller may update it
        check(out, x)
    assert runner.captures == 1 and runner.replays == 4 and not runner.failures
    cap = be.captures[0]
    assert not cap["static_in_inference"]
    assert not any(o is not None and o.is_inference() for o in be.graphs[0].static_out)


def test_runner_replays_the_new_input():
    runner = GraphRunner(backend=FakeGraphs(), warmup=1)
    a, b = torch.randn(6), torch.randn(6)
    first = runner.run("k", double, a)
    second = runner.run("k", double, b)
    check(first, a)
    check(second, b)
    assert runner.captures == 1


# ---------------------------------------------------------------------------------------------
# thrash: more live shapes than max_graphs
# ---------------------------------------------------------------------------------------------


def test_keys_within_max_graphs_never_recapture():
    runner = GraphRunner(backend=FakeGraphs(), warmup=1, max_graphs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(10):
            key = "ab"[i % 2]
            runner.run(key, double, torch.randn(3))
    s = runner.status()
    assert s["captures"] == 2 and s["recaptures"] == 0 and s["evictions"] == 0
    assert s["replays"] == 10 and not s["thrashing"]


def test_thrashing_key_runs_eagerly_after_max_recaptures():
    be = FakeGraphs()
    runner = GraphRunner(backend=be, warmup=1, max_graphs=2, max_recaptures=2)
    keys = "abc"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(60):
            x = torch.randn(3)
            check(runner.run(keys[i % 3], double, x), x)
    s = runner.status()
    thrash = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(thrash) == 1, [str(w.message) for w in caught]
    assert "max_graphs=2" in str(thrash[0].message) and "eagerly" in str(thrash[0].message)
    # a: captured, then recaptured twice after evictions; the third recapture is refused
    assert list(s["thrashing"]) == ["'a'"]
    assert "captured 3 times" in s["thrashing"]["'a'"]
    assert s["captures"] == 9 and s["recaptures"] == 6  # each key: 1 capture + 2 recaptures
    assert len(be.captures) == 9  # no capture after the thrashing mark
    assert s["eager_runs"] == len(range(9, 60, 3))  # every call of 'a' from the 10th on
    assert sorted(s["graphs"]) == ["'b'", "'c'"]  # the other two stay captured and replay
    assert s["replays"] == 60 - s["eager_runs"]


def test_max_recaptures_zero_and_validation():
    runner = GraphRunner(backend=FakeGraphs(), warmup=1, max_graphs=1, max_recaptures=0)
    with pytest.warns(RuntimeWarning, match="eagerly"):
        for key in "aba":
            runner.run(key, double, torch.randn(2))
    assert runner.captures == 2 and "'a'" in runner.status()["thrashing"]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_recaptures"):
            GraphRunner(max_recaptures=bad)


def test_reset_keeps_thrash_marks_and_streams():
    be = FakeGraphs()
    runner = GraphRunner(backend=be, warmup=1, max_graphs=1, max_recaptures=0)
    with pytest.warns(RuntimeWarning):
        for key in "aba":
            runner.run(key, double, torch.randn(2))
    stream = runner.capture_stream(DEV)
    runner.reset()  # weights changed: graphs dropped, but 'a' still thrashes with this workload
    assert runner.keys == [] and "a" in runner.thrashing
    runner.run("b", double, torch.randn(2))  # captured again after reset: not a recapture
    assert runner.recaptures == 0 and runner.capture_stream(DEV) is stream
    assert be.pool.drawn == 1


# ---------------------------------------------------------------------------------------------
# capture failures
# ---------------------------------------------------------------------------------------------


def test_capture_failure_runs_eagerly_and_redraws_the_stream():
    pool = FakeStreamPool()
    be = FakeGraphs(pool, fails_on=lambda t: t.numel() == 7)
    runner = GraphRunner(backend=be, warmup=1)
    held = streams.owned_count()
    with pytest.warns(RuntimeWarning, match="not used, running eagerly"):
        x = torch.randn(7)
        check(runner.run("bad", double, x), x)
    assert "capture failed" in runner.failures["bad"]
    assert streams.owned_count() == held  # the stream a failed capture used was given back
    x = torch.randn(7)
    check(runner.run("bad", double, x), x)  # eager, no second attempt
    assert len(be.captures) == 1 and runner.eager_runs == 2
    check(runner.run("good", double, torch.ones(3)), torch.ones(3))
    assert runner.captures == 1 and pool.drawn == 2


def test_cpu_tensors_with_the_cuda_backend_run_eagerly():
    runner = GraphRunner()
    x = torch.randn(3)
    check(runner.run("k", double, x), x)
    assert "CUDA" in runner.failures["k"] and runner.captures == 0


# ---------------------------------------------------------------------------------------------
# streams: owned per runner / engine, never shared
# ---------------------------------------------------------------------------------------------


class _Owner:
    """Stands for an engine or runner holding a stream."""


def test_runner_draws_its_capture_stream_once():
    be = FakeGraphs()
    runner = GraphRunner(backend=be, warmup=1, max_graphs=1, max_recaptures=100)
    for i in range(40):  # 40 captures: before, each drew fresh streams and cycled the pool
        runner.run(i % 2, double, torch.randn(2))
    assert runner.captures == 40 and be.pool.drawn == 1
    assert len({id(c["stream"]) for c in be.captures}) == 1
    assert streams.owner_of(be.captures[0]["stream"]) is runner


def test_capture_stream_is_never_anothers_stream():
    pool = FakeStreamPool(size=32)
    side_owner = _Owner()
    side = streams.own_stream(DEV, side_owner, pool)
    assert side is not None and streams.owner_of(side) is side_owner
    pool.drawn = 32  # the pool's next stream wraps onto the side stream's CUDA stream
    be = FakeGraphs(pool)
    runner = GraphRunner(backend=be, warmup=1)
    runner.run("k", double, torch.randn(2))
    cap = be.captures[0]["stream"]
    assert pool.handle(32) == side.cuda_stream  # it would have been the side stream
    assert cap.cuda_stream != side.cuda_stream and pool.drawn == 34  # so another was drawn
    assert streams.owner_of(cap) is runner


def test_full_pool_refuses_and_freed_owners_give_streams_back():
    pool = FakeStreamPool(size=4)
    owners = [_Owner() for _ in range(4)]
    got = [streams.own_stream(DEV, o, pool, tries=4) for o in owners]
    assert len({s.cuda_stream for s in got}) == 4
    assert streams.own_stream(DEV, _Owner(), pool, tries=4) is None
    be = FakeGraphs(pool)
    runner = GraphRunner(backend=be, warmup=1)
    with pytest.warns(RuntimeWarning, match="no stream of torch's pool"):
        x = torch.randn(2)
        check(runner.run("k", double, x), x)
    del owners[1], got
    gc.collect()
    freed = streams.own_stream(DEV, runner, pool, tries=4)
    assert freed is not None and freed.cuda_stream == pool.handle(1)
    streams.release_stream(freed, runner)
    assert streams.owner_of(freed) is None


def test_engine_side_stream_owned_and_kept(monkeypatch):
    """The engine's side stream: drawn once per device, never a runner's capture stream."""
    import depthpro_fast
    from depthpro_fast.fast import FastEngine, FastOptions

    model, _ = depthpro_fast.load(None, config="tiny", device="cpu")
    engine = FastEngine(model, FastOptions(), lazy=True)
    pool = FakeStreamPool(size=32)
    monkeypatch.setattr(torch.cuda, "Stream", pool)
    cuda0 = torch.device("cuda", 0)
    side = engine._side_stream(cuda0)
    assert engine._side_stream(cuda0) is side and pool.drawn == 1
    assert streams.owner_of(side) is engine
    # the engine's runner draws from the same pool after it wrapped: not the side stream
    engine.graphs.backend = FakeGraphs(pool)
    pool.drawn = 32
    cap = engine.graphs.capture_stream(cuda0)
    assert cap.cuda_stream != side.cuda_stream and streams.owner_of(cap) is engine.graphs
    # a second engine on a wrapped pool gets a stream of its own too
    other = FastEngine(model, FastOptions(), lazy=True)
    pool.drawn = 32
    assert other._side_stream(cuda0).cuda_stream not in (side.cuda_stream, cap.cuda_stream)
    assert FastEngine(model, FastOptions(streams=False), lazy=True)._side_stream(cuda0) is None
