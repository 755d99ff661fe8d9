"""Attention chosen by measurement: the choice from injected timings (near-ties to the fixed
order), the real timing path on a CPU, the GPU's size limit for the candidates that materialise
the scores, the choice made once and stored per device (three models loaded under a noisy timer
give bitwise the same output; a second process times nothing), the engine's use of the choice
(status, info, the ViTs' attention)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import depthpro_fast
from depthpro_fast import device_cache
from depthpro_fast.fast import attention_choice as ac
from depthpro_fast.fast import cpu_gemm, timed_choice
from tests.model_helpers import MICRO, max_rel, model_input, random_model
from tests.test_timed_choice import as_another_process, fresh_store, noisy_clock

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # never touched: candidates() only reads its type


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    """Every test starts with an empty device cache: no choice stored by another test."""
    yield from fresh_store(tmp_path, monkeypatch)


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


def test_near_ties_go_to_the_fixed_preference_order():
    # torch (SDPA's own pick) 5 % faster than SDPA pinned to flash: a tie on a CPU (10 %), and
    # the pinned kernel is earlier in the order; on CUDA (3 %) the difference is real
    timings = {"torch": 1.0, "sdpa:flash": 1.05, "sdpa:math": 3.0, "reference": 4.0}
    assert ac.choose(timings, margin=timed_choice.near_tie_margin(CPU)) == "sdpa:flash"
    assert ac.choose(timings, margin=timed_choice.near_tie_margin(CUDA)) == "torch"
    # our CUDA kernel 2.5 % slower than Triton on a GPU: kept (first in the order)
    assert ac.choose({"cuda": 1.015, "sdpa:cudnn": 1.0, "triton": 0.99},
                     margin=timed_choice.near_tie_margin(CUDA)) == "cuda"
    assert ac.PREFERENCE.index("sdpa:flash") < ac.PREFERENCE.index("triton") \
        < ac.PREFERENCE.index("torch") < ac.PREFERENCE.index("reference")


def test_candidates_come_in_preference_order():
    names = [c.name for c in ac.candidates(CPU)[0]]
    assert names == [n for n in ac.PREFERENCE if n in names]
    assert names == ["sdpa:flash", "torch", "sdpa:math", "reference"]


def test_gpu_skips_the_materialising_candidates_above_the_size_limit():
    """At batch 8 the patch encoder's (280, 16, 577, 64) would write 5.6 GiB of fp32 scores
    (twice, with the softmax) in ``reference`` and ``sdpa:math``: skipped, with the reason."""
    big = (280, 16, 577, 64)
    assert ac.scores_bytes(*big[:3]) > ac.SCORES_LIMIT_BYTES
    found, skipped = ac.candidates(CUDA, big)
    names = {c.name for c in found}
    assert not names & {"reference", "sdpa:math"}
    assert {"torch", "sdpa:flash", "sdpa:efficient"} <= names
    for name in ("reference", "sdpa:math"):
        assert "materialises 5690 MiB of fp32 attention scores" in skipped[name]
        assert "limit on CUDA: 512 MiB" in skipped[name]
    # the image / FOV encoders at batch 1 (21 MB): measured
    assert {"reference", "sdpa:math"} <= {c.name for c in ac.candidates(CUDA, (1, 16, 577, 64))[0]}
    # the limit is on the GPU only (a CPU's memory is the model's anyway) and on the shape
    assert {"reference", "sdpa:math"} <= {c.name for c in ac.candidates(CPU, big)[0]}
    assert {"reference", "sdpa:math"} <= {c.name for c in ac.candidates(CUDA)[0]}


def test_a_stored_choice_over_the_gpu_size_limit_is_measured_again(monkeypatch):
    """A stored ``sdpa:math`` (e.g. from a version without the limit) for a shape now over the
    limit is not reused: measured again, the reason recorded (a fake CUDA device throughout)."""
    monkeypatch.setattr(device_cache, "device_fingerprint",
                        lambda device: {"device_type": torch.device(device).type, "fake": 1})
    key = ac.shape_key(280, 16, 577, 64, torch.bfloat16)
    device_cache.DeviceCache("attention_choice", CUDA).put(key, {"choice": "sdpa:math"})
    device_cache.clear_memory()
    calls = []

    def measured(*args, **kwargs):
        calls.append(args)
        return {"choice": "sdpa:flash", "timings_ms": {"sdpa:flash": 1.0}, "errors": {},
                "skipped": dict(ac.candidates(CUDA, args[:4])[1])}

    monkeypatch.setattr(ac, "measure", measured)
    rec = ac.decide(280, 16, 577, 64, torch.bfloat16, CUDA)
    assert calls and rec["choice"] == "sdpa:flash" and rec["source"] == "measured"
    assert "stored choice 'sdpa:math' not usable: materialises" in rec["why_measured"]
    assert "materialises" in rec["skipped"]["reference"]


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
    assert rec["margin"] == 0.10 and rec["order"] == ["sdpa:flash", "torch", "sdpa:math",
                                                      "reference"]


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
    model, _ = random_model(MICRO, seed=31)
    x = model_input(seed=5)
    with torch.no_grad():
        ref, _ = model(x)
    fast = copy.deepcopy(model)
    fast.set_backend("auto")
    fast.prepare_fast(True)
    # inject the measurement: make SDPA's math kernel the "fastest" for both shapes
    real = ac.measure

    def rigged(*args, **kwargs):
        rec = real(*args, **{**kwargs, "repeats": 1})
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
    assert "35x1x577x64 float32: sdpa:math (measured in this process: no stored choice" \
        in status["notes"]["attention_choice_source"]
    info = depthpro_fast.info()
    assert info["attention_measurements"]["35x1x577x64 float32 cpu"]["source"] == "measured"
    assert "attention 35x1x577x64 float32 cpu: sdpa:math (measured; ms:" \
        in depthpro_fast.report.format_info(info)


def test_engine_keeps_an_explicit_backend():
    model, _ = random_model(MICRO, seed=32)
    fast = copy.deepcopy(model).prepare_fast(True)  # backend "reference"
    with torch.no_grad():
        fast(model_input(seed=6))
    status = fast.fast_engine.status()
    assert status["attention"] == {}
    assert "backend is 'reference'" in status["notes"]["attention_choice"]


def test_warm_up_runs_without_the_side_stream_before_the_graph_runner(monkeypatch):
    """On a device that autotunes: measurement, then one forward with streams off, then the
    graph runner (whose own warm-up and capture hit the tuned caches); once per input key."""
    from depthpro_fast.fast.engine import FastEngine

    model, _ = random_model(MICRO, seed=33)
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
    x = model_input(seed=7)
    with torch.no_grad():
        fast(x)
        fast(x)
    assert events == ["measure", "forward streams=False", "graphs", "forward streams=True",
                      "graphs", "forward streams=True"]


def test_decide_measures_once_then_a_second_process_reads_the_device_cache(monkeypatch):
    first = ac.decide(2, 2, 33, 16, torch.float32, CPU, repeats=1)
    assert first["source"] == "measured" and first["choice"] in ac.PREFERENCE

    def no_timing(*args):
        raise AssertionError("timed again: the stored choice was not reused")

    assert ac.decide(2, 2, 33, 16, torch.float32, CPU, timer=no_timing)["why_measured"] is None
    as_another_process(monkeypatch)
    second = ac.decide(2, 2, 33, 16, torch.float32, CPU, timer=no_timing)
    assert second["source"] == "device cache" and second["choice"] == first["choice"]
    assert second["timings_ms"] == first["timings_ms"]
    # another shape or dtype is another decision
    assert ac.decide(3, 2, 33, 16, torch.float32, CPU, repeats=1)["source"] == "measured"
    assert ac.decide(2, 2, 33, 16, torch.float16, CPU, repeats=1)["source"] == "measured"


def test_a_real_second_process_uses_the_stored_choice(tmp_path):
    """The same through a new Python process (the device cache folder is inherited)."""
    first = ac.decide(2, 2, 33, 16, torch.float32, CPU, repeats=1)
    script = (
        "import torch\n"
        "from depthpro_fast.fast import attention_choice as ac\n"
        "def no_timing(*a): raise AssertionError('timed again')\n"
        "r = ac.decide(2, 2, 33, 16, torch.float32, torch.device('cpu'), timer=no_timing)\n"
        "print(r['source'], r['choice'])\n")
    env = {**os.environ, device_cache.ENV_VAR: str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["device", "cache", first["choice"]]


def test_three_loads_under_a_noisy_timer_give_bitwise_identical_outputs(monkeypatch):
    """Every timing random (attention and CPU GEMM): the first model's measurement decides,
    the next two use the stored choice, and the three depth maps are bitwise equal. Before
    choices were stored, each new engine measured again and picked its own kernels."""
    clock = noisy_clock(3)
    monkeypatch.setattr(ac, "CLOCK", clock)
    monkeypatch.setattr(cpu_gemm, "CLOCK", clock)
    # the premise: this timer alone picks different attention kernels for one shape
    winners = {ac.measure(2, 2, 33, 16, torch.float32, CPU)["choice"] for _ in range(8)}
    assert len(winners) > 1, winners
    x = model_input(seed=8)
    outs, notes = [], []
    for _ in range(3):
        torch.manual_seed(41)  # the same random weights each time
        model, _ = depthpro_fast.load(None, config=MICRO, device="cpu", fast=True)
        with torch.no_grad():
            outs.append(model(x))
        notes.append(model.fast_engine.status()["notes"]["attention_choice_source"])
    for cid, fov in outs[1:]:
        assert torch.equal(cid, outs[0][0]) and torch.equal(fov, outs[0][1])
    assert "measured in this process: no stored choice" in notes[0]
    assert notes[1] == notes[2] and "measured earlier in this process" in notes[1]
    assert timed_choice.USED["attention_choice"].keys() == {"35x1x577x64 float32 cpu",
                                                             "1x1x577x64 float32 cpu"}


def test_a_disqualified_kernel_is_no_candidate(monkeypatch):
    """A kernel that failed its qualification on this device is neither timed nor chosen."""
    from depthpro_fast import backends
    from depthpro_fast.fast import attention_choice

    dev = torch.device("cuda", 0)
    monkeypatch.setattr(backends, "backend_status", lambda name, device=None: (True, None))
    monkeypatch.setattr(backends, "triton_interpreting", lambda: False)
    names = [c.name for c in attention_choice.candidates(dev)[0]]
    assert "triton" in names and "cuda" in names
    monkeypatch.setattr(backends, "is_disqualified",
                        lambda op, b, d: "wrong result" if (op, b) == ("attention", "triton")
                        else None)
    found, skipped = attention_choice.candidates(dev)
    assert "triton" not in [c.name for c in found] and "cuda" in [c.name for c in found]
    assert "disqualified" in skipped["triton"] and "wrong result" in skipped["triton"]
