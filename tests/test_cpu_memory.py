"""glibc malloc tuning for repeated CPU forwards (depthpro_fast/cpu_memory.py)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap

import pytest

import depthpro_fast
from depthpro_fast import cpu_memory

GLIBC_SO = "/lib/x86_64-linux-gnu/libc.so.6"


class FakeLibc:
    """Records mallopt(param, value) calls; answers ``result`` to each."""

    def __init__(self, result: int = 1):
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, param: ctypes.c_int, value: ctypes.c_int) -> int:
        self.calls.append((param.value, value.value))
        return self.result


@pytest.fixture
def fake_glibc(monkeypatch):
    """A glibc whose mallopt is recorded, malloc from glibc, a clean environment, no record."""
    libc = FakeLibc()
    monkeypatch.setattr(cpu_memory, "load_glibc", lambda: (libc, "2.36", None))
    monkeypatch.setattr(cpu_memory, "malloc_provider", lambda lib: GLIBC_SO)
    for name in (cpu_memory.ENV_VAR, "GLIBC_TUNABLES", *cpu_memory.GLIBC_MALLOC_ENV):
        monkeypatch.delenv(name, raising=False)
    cpu_memory.forget()
    yield libc
    cpu_memory.forget()


def test_mallopt_gets_the_mmap_then_the_trim_threshold(fake_glibc):
    record = cpu_memory.tune_cpu_allocator()
    assert fake_glibc.calls == [(-3, 2**31 - 1), (-1, 2**31 - 1)]  # M_MMAP_, M_TRIM_THRESHOLD
    assert record["applied"] is True and record["why_not"] is None
    assert record["settings"] == {"M_MMAP_THRESHOLD": 2**31 - 1, "M_TRIM_THRESHOLD": 2**31 - 1}
    assert record["glibc"] == "2.36" and record["malloc"] == GLIBC_SO and record["mode"] == "auto"


def test_tuning_is_done_once_per_process(fake_glibc, monkeypatch):
    first = cpu_memory.tune_cpu_allocator()
    monkeypatch.setenv(cpu_memory.ENV_VAR, "off")  # a later change does not undo or redo it
    second = cpu_memory.tune_cpu_allocator()
    assert len(fake_glibc.calls) == 2 and second == first
    second["settings"].clear()  # callers get copies
    assert cpu_memory.tuning_record()["settings"]


def test_off_by_environment(fake_glibc, monkeypatch):
    monkeypatch.setenv(cpu_memory.ENV_VAR, " OFF ")
    record = cpu_memory.tune_cpu_allocator()
    assert fake_glibc.calls == [] and record["applied"] is False
    assert record["mode"] == "off" and "DEPTHPRO_FAST_MALLOC=off" in record["why_not"]


def test_unknown_switch_value_is_refused_with_the_accepted_ones(fake_glibc, monkeypatch):
    monkeypatch.setenv(cpu_memory.ENV_VAR, "jemalloc")
    with pytest.raises(ValueError, match=r"DEPTHPRO_FAST_MALLOC='jemalloc'.*auto, off"):
        cpu_memory.tune_cpu_allocator()
    assert fake_glibc.calls == []
    state = cpu_memory.allocator_state()  # info shows the problem instead of failing
    assert state["applied"] is False and "jemalloc" in state["why_not"]


def test_no_op_off_glibc_with_the_reason(monkeypatch):
    monkeypatch.delenv(cpu_memory.ENV_VAR, raising=False)
    monkeypatch.setattr(cpu_memory.sys, "platform", "darwin")
    lib, version, why = cpu_memory.load_glibc()
    assert lib is None and version is None and "not Linux (darwin)" in why
    cpu_memory.forget()
    try:
        record = cpu_memory.tune_cpu_allocator()
    finally:
        cpu_memory.forget()
    assert record["applied"] is False and record["settings"] == {}
    assert "not Linux" in record["why_not"]


def test_a_c_library_without_glibc_symbols_is_not_glibc(monkeypatch):
    class Musl:  # no gnu_get_libc_version
        pass

    monkeypatch.setattr(cpu_memory.sys, "platform", "linux")
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda name: Musl())
    lib, version, why = cpu_memory.load_glibc()
    assert lib is None and version is None and "not glibc" in why


def test_another_malloc_is_left_alone(fake_glibc, monkeypatch):
    monkeypatch.setattr(cpu_memory, "malloc_provider", lambda lib: "/opt/lib/libjemalloc.so.2")
    record = cpu_memory.tune_cpu_allocator()
    assert fake_glibc.calls == [] and record["applied"] is False
    assert "malloc is jemalloc" in record["why_not"] and "MALLOC_CONF" in record["why_not"]


@pytest.mark.parametrize("name,value", [("MALLOC_TRIM_THRESHOLD_", "1000000"),
                                        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1")])
def test_thresholds_set_by_the_environment_are_kept(fake_glibc, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    record = cpu_memory.tune_cpu_allocator()
    assert fake_glibc.calls == [] and record["applied"] is False
    assert "already tuned by the environment" in record["why_not"] and name in record["why_not"]


def test_unrelated_malloc_environment_does_not_block(fake_glibc, monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert cpu_memory.tune_cpu_allocator()["applied"] is True


def test_a_refused_setting_is_reported(fake_glibc):
    fake_glibc.result = 0
    record = cpu_memory.tune_cpu_allocator()
    assert record["applied"] is False and record["settings"]["M_MMAP_THRESHOLD"] is None
    assert "refused mallopt(M_MMAP_THRESHOLD, M_TRIM_THRESHOLD)" in record["why_not"]


def test_this_machines_glibc_and_malloc_are_found():
    lib, version, why = cpu_memory.load_glibc()
    assert why is None and version and version[0].isdigit()
    assert "libc" in os.path.basename(cpu_memory.malloc_provider(lib))


def test_info_shows_the_allocator(fake_glibc):
    report = depthpro_fast.info()
    state = report["cpu_allocator"]
    assert state["pending"] is True and state["would_set"] == cpu_memory.SETTINGS
    assert set(state["thp"]) == {"system", "torch_env", "process_bytes"}
    text = depthpro_fast.report.format_info(report)
    assert "cpu allocator: malloc from " + GLIBC_SO + " (glibc 2.36)" in text
    assert "would set M_MMAP_THRESHOLD=2147483647" in text
    assert "transparent huge pages: system" in text
    cpu_memory.tune_cpu_allocator()
    text = depthpro_fast.report.format_info(depthpro_fast.info())
    assert "tuned: M_MMAP_THRESHOLD=2147483647, M_TRIM_THRESHOLD=2147483647" in text


_FAULTS = textwrap.dedent("""
    import json, resource, torch
    from depthpro_fast import cpu_memory
    record = cpu_memory.tune_cpu_allocator()
    faults = []
    for _ in range(6):  # a 64 MiB activation made, written and freed, as in each forward
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 * 2**20).fill_(1.0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(json.dumps({"applied": record["applied"], "faults": faults}))
""")


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_freed_memory_is_reused_without_page_faults(mode):
    """The mechanism itself, in a fresh process: untuned, every 64 MiB block is a new mmap
    and faults its 16 384 pages in again; tuned, blocks come from the heap and, once it holds
    them (a small allocation may split a freed block once: the next block then comes from
    new pages, as a forward's fragmentation does), reuse its pages."""
    env = dict(os.environ, DEPTHPRO_FAST_MALLOC=mode)
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    pages = 64 * 2**20 // 4096
    assert result["applied"] is (mode == "auto")
    if mode == "auto":
        assert max(result["faults"][3:]) < pages // 20, result
    else:
        assert min(result["faults"]) > pages // 2, result


def test_preparing_a_cpu_model_tunes_the_allocator(monkeypatch):
    """The fast engine's preparation on a CPU calls tune_cpu_allocator (once per process, the
    function's own rule), before the prepared copies are allocated."""
    import depthpro_fast
    from depthpro_fast.fast import engine

    calls = []
    monkeypatch.setattr(engine, "tune_cpu_allocator", lambda: calls.append(1) or {})
    model, _ = depthpro_fast.load(None, config="tiny", device="cpu", fast=False)
    assert calls == []
    model.prepare_fast(True)
    assert calls == [1]
