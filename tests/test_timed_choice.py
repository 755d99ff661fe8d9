"""Choices made by timing are made once (fast/timed_choice.py): the near-tie rule, the record
stored per device and reused by a later process without timing, a stored choice that can no
longer run measured again, $DEPTHPRO_FAST_REMEASURE; the CPU GEMM library under a noisy timer."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import pytest
import torch

from depthpro_fast import device_cache
from depthpro_fast.fast import cpu_gemm, timed_choice


def fresh_store(tmp_path, monkeypatch) -> Iterator[None]:
    """An empty device cache folder, nothing remembered in this process, no re-measure asked."""
    monkeypatch.setenv(device_cache.ENV_VAR, str(tmp_path))
    monkeypatch.delenv(timed_choice.REMEASURE_ENV, raising=False)
    device_cache.clear_memory()
    timed_choice.USED.clear()
    yield
    device_cache.clear_memory()
    timed_choice.USED.clear()


def as_another_process(monkeypatch, n: int = 1) -> None:
    """What a new process sees: nothing in memory, another process id; the disk stays."""
    device_cache.clear_memory()
    timed_choice.USED.clear()
    monkeypatch.setattr(timed_choice, "PROCESS", f"another-process-{n}")


def noisy_clock(seed: int):
    """A clock whose every interval is random (0-50 ms), whatever runs between two reads."""
    rng, now = random.Random(seed), [0.0]

    def clock() -> float:
        now[0] += rng.uniform(0.0, 0.05)
        return now[0]

    return clock


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    yield from fresh_store(tmp_path, monkeypatch)


# -- the near-tie rule ----------------------------------------------------------------------------

ORDER = ("a", "b", "c")


def test_near_tie_goes_to_the_fixed_order():
    # b is fastest, a within 10 % of it: a is earlier in the order and wins
    assert timed_choice.pick({"a": 1.09, "b": 1.0, "c": 3.0}, ORDER, 0.10) == "a"
    # the same timings in any dict order, and any timing noise inside the margin: the same pick
    assert timed_choice.pick({"c": 3.0, "b": 1.0, "a": 1.01}, ORDER, 0.10) == "a"


def test_a_real_difference_beats_the_order():
    assert timed_choice.pick({"a": 1.11, "b": 1.0}, ORDER, 0.10) == "b"
    assert timed_choice.pick({"a": 1.04, "b": 1.0}, ORDER, 0.03) == "b"
    # margin 0: the fastest; an exact tie still goes to the order, then the name
    assert timed_choice.pick({"c": 1.0, "b": 1.0}, ORDER, 0.0) == "b"
    assert timed_choice.pick({"y": 1.0, "x": 1.0}, ORDER, 0.0) == "x"


def test_failed_candidates_never_win_and_none_left_raises():
    assert timed_choice.pick({"a": None, "b": 5.0}, ORDER, 0.10) == "b"
    with pytest.raises(RuntimeError, match="no candidate qualified"):
        timed_choice.pick({"a": None}, ORDER, 0.10)
    with pytest.raises(ValueError, match="fraction >= 0"):
        timed_choice.pick({"a": 1.0}, ORDER, -0.1)


def test_margins_per_device_type():
    assert timed_choice.near_tie_margin("cpu") == 0.10
    assert timed_choice.near_tie_margin(torch.device("cuda", 0)) == 0.03


# -- decided once, stored, reused ---------------------------------------------------------------


class Measurer:
    def __init__(self, choice: str = "b"):
        self.calls, self.choice = 0, choice

    def __call__(self) -> dict:
        self.calls += 1
        return {"choice": self.choice, "timings_ms": {"a": 2.0, "b": 1.0}}


def decide(measure, usable=lambda r: None, key="k"):
    return timed_choice.decide("cpu_gemm", "cpu", key, f"label {key}", measure, usable)


def test_measured_once_per_process_then_read_from_the_cache_by_a_second_process(
        tmp_path, monkeypatch):
    m = Measurer()
    first = decide(m)
    assert m.calls == 1 and first["choice"] == "b" and first["source"] == "measured"
    assert "no stored choice" in first["why_measured"]
    again = decide(m)  # another engine in this process
    assert m.calls == 1 and again["source"] == "measured" and again["why_measured"] is None
    # on disk, keyed by the device fingerprint, without the per-use fields
    (path,) = tmp_path.glob("cpu_gemm-*.json")
    entry = json.loads(path.read_text())["entries"]["k"]
    assert entry["choice"] == "b" and entry["process"] == timed_choice.PROCESS
    assert "source" not in entry and "measured_at" in entry
    as_another_process(monkeypatch)
    second = decide(m)
    assert m.calls == 1, "the second process timed again instead of reading the device cache"
    assert second["source"] == "device cache" and second["choice"] == "b"
    assert "earlier process" in timed_choice.source_words(second)
    assert timed_choice.USED["cpu_gemm"]["label k"]["source"] == "device cache"


def test_a_stored_choice_that_cannot_run_here_is_measured_again(monkeypatch):
    decide(Measurer("b"))
    as_another_process(monkeypatch)
    m = Measurer("a")
    rec = decide(m, usable=lambda r: "b is unavailable in this process")
    assert m.calls == 1 and rec["choice"] == "a" and rec["source"] == "measured"
    assert "stored choice 'b' not usable: b is unavailable" in rec["why_measured"]
    as_another_process(monkeypatch, 2)
    assert decide(Measurer("x"))["choice"] == "a"  # the new measurement replaced the old one


def test_a_damaged_entry_is_measured_again(monkeypatch):
    device_cache.DeviceCache("cpu_gemm", "cpu").put("k", {"timings_ms": {}})  # no choice
    m = Measurer()
    rec = decide(m)
    assert m.calls == 1 and "damaged" in rec["why_measured"]


def test_remeasure_env_measures_once_more_in_this_process(monkeypatch):
    decide(Measurer("b"))
    as_another_process(monkeypatch)
    monkeypatch.setenv(timed_choice.REMEASURE_ENV, "attention_choice")  # another kind only
    assert decide(Measurer("a"))["choice"] == "b"
    monkeypatch.setenv(timed_choice.REMEASURE_ENV, "cpu_gemm,attention_choice")
    m = Measurer("a")
    rec = decide(m)
    assert m.calls == 1 and rec["choice"] == "a"
    assert "DEPTHPRO_FAST_REMEASURE" in rec["why_measured"]
    assert decide(m)["choice"] == "a" and m.calls == 1  # once per process, not once per call
    monkeypatch.setenv(timed_choice.REMEASURE_ENV, "cpu_gemms")
    with pytest.raises(ValueError, match="unknown kind.*cpu_gemms.*accepted"):
        decide(m)


def test_disk_off_still_decides_once_per_process(monkeypatch):
    monkeypatch.setenv(device_cache.ENV_VAR, "off")
    m = Measurer()
    assert decide(m)["cache_file"] is None
    decide(m)
    assert m.calls == 1


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown kind of timed choice 'gemm'"):
        timed_choice.decide("gemm", "cpu", "k", "k", Measurer(), lambda r: None)


# -- the CPU GEMM library -----------------------------------------------------------------------


def _onednn_or_skip() -> None:
    ok, why = cpu_gemm.onednn_linear_available(torch.float32)
    if not ok:
        pytest.skip(f"oneDNN's linear is not available in this build: {why}")


def test_cpu_gemm_near_tie_keeps_aten():
    _onednn_or_skip()
    # oneDNN 9 % faster: within the CPU's 10 % margin, aten (first in the order) is kept
    assert timed_choice.pick({"aten": 1.09, "onednn": 1.0}, cpu_gemm.PREFERENCE, 0.10) == "aten"


def test_cpu_gemm_noisy_timer_same_choice_in_every_process(monkeypatch):
    """A random timer picks a random library; once stored, every later "process" (memory
    cleared, however noisy its timer) uses the stored one and times nothing."""
    _onednn_or_skip()
    monkeypatch.setattr(cpu_gemm, "CLOCK", noisy_clock(1))
    shape = dict(rows=64, k=32, n=48)
    picks = {cpu_gemm.measure_cpu_gemm(torch.float32, **shape)["choice"] for _ in range(12)}
    assert picks == {"aten", "onednn"}, "the premise: this timer alone flips the choice"
    name, why = cpu_gemm.choose_cpu_gemm("auto", torch.float32, **shape)
    assert why.startswith(f"{name}: measured") and "measured in this process" in why
    timed = []
    monkeypatch.setattr(cpu_gemm, "measure_cpu_gemm",
                        lambda *a, **k: timed.append(1) or pytest.fail("timed again"))
    for n in range(3):
        as_another_process(monkeypatch, n)
        again, why = cpu_gemm.choose_cpu_gemm("auto", torch.float32, **shape)
        assert again == name and "stored by an earlier process" in why
    assert timed == []


def test_cpu_gemm_explicit_options_time_nothing(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "measure_cpu_gemm", lambda *a, **k: pytest.fail("timed"))
    assert cpu_gemm.choose_cpu_gemm("aten", torch.float32)[0] == "aten"
    assert "cpu_gemm" not in timed_choice.USED
