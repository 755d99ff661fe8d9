"""The CPU's capabilities (depthpro_fast.cpu) and what the CPU path does with them."""

from __future__ import annotations

import dataclasses
import mmap
import sys

import pytest
import torch

from depthpro_fast import cpu
from depthpro_fast.bench import runner as runner_module
from depthpro_fast.bench.runner import Runner
from depthpro_fast.bench.timing import CpuPeakRss
from depthpro_fast.bench.variants import Variant
from depthpro_fast.config import OFFICIAL

CPU = torch.device("cpu")


def test_features_are_consistent_with_the_flags():
    f = cpu.cpu_features()
    assert f.capability and isinstance(f.bf16, bool) and isinstance(f.fp16, bool)
    assert (f.bf16_why_not is None) == f.bf16 and (f.fp16_why_not is None) == f.fp16
    flags = cpu.cpu_flags()
    if flags is not None and cpu.native_from_flags(torch.bfloat16, flags):
        assert f.bf16  # a flag that says bf16 is never overruled
    assert cpu.fastest_cpu_dtype() == (torch.bfloat16 if f.bf16 else torch.float32)


@pytest.mark.parametrize("bf16, fp16", [(False, False), (True, False), (True, True)])
def test_half_precision_warning_follows_the_features(monkeypatch, bf16, fp16):
    fake = dataclasses.replace(cpu.cpu_features(), capability="AVX2", bf16=bf16, fp16=fp16,
                               bf16_why_not=None if bf16 else "no bf16 here",
                               fp16_why_not=None if fp16 else "no fp16 here")
    monkeypatch.setattr(cpu, "cpu_features", lambda: fake)
    assert cpu.half_precision_warning(torch.float32) is None
    w16 = cpu.half_precision_warning(torch.float16)
    assert (w16 is None) == fp16
    if w16:
        assert "no fp16 here" in w16 and "float32" in w16
        assert ("bfloat16" in w16) == bf16  # bf16 suggested only where it is native
    wbf = cpu.half_precision_warning(torch.bfloat16)
    assert (wbf is None) == bf16
    assert cpu.fastest_cpu_dtype() == (torch.bfloat16 if bf16 else torch.float32)


def test_native_from_flags():
    assert cpu.native_from_flags(torch.bfloat16, frozenset({"avx2", "avx512_bf16"}))
    assert cpu.native_from_flags(torch.bfloat16, frozenset({"amx_bf16"}))
    assert not cpu.native_from_flags(torch.bfloat16, frozenset({"avx2", "fma"}))
    assert cpu.native_from_flags(torch.float16, frozenset({"avx512_fp16"}))
    assert not cpu.native_from_flags(torch.float32, frozenset({"avx2"}))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_rss_sees_an_allocation_and_resets():
    rss = CpuPeakRss()
    rss.reset()
    if not rss.resettable:
        pytest.skip("/proc/self/clear_refs is not writable here")
    before = rss.read()
    # 64 MiB of fresh pages, each touched (an anonymous mapping: the process's allocator may
    # hand out a tensor from memory that is already resident after other tests)
    size = 64 * 2**20
    big = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        big[offset] = 1
    peak = rss.read()
    big.close()
    assert before is not None and peak is not None and peak - before >= 60 * 2**20
    rss.reset()
    assert rss.read() < peak  # the high-water mark went back down to the current RSS


def test_bench_skips_an_emulated_bf16_row_unless_asked(monkeypatch):
    monkeypatch.setattr(runner_module, "half_precision_warning",
                        lambda dtype: "this CPU has no bf16" if dtype == torch.bfloat16 else None)
    row = Runner(OFFICIAL, CPU, batches=[1], runs=1, warmup=0).run_row(
        Variant("engine", torch.bfloat16, backend="auto"), 1)
    assert row.status == "skipped" and "this CPU has no bf16" in row.reason
    assert "--dtype bf16" in row.reason

    # asked for (--dtype bf16): it runs (here a stand-in callable, not the 19 TFLOP model)
    r = Runner(OFFICIAL, CPU, batches=[1], runs=1, warmup=0, cpu_opt_in=["bf16"],
               accuracy=False)
    monkeypatch.setattr(r, "model", lambda dtype: None)
    monkeypatch.setattr(r, "inputs", lambda dtype, batch: [torch.zeros(1)])
    monkeypatch.setattr(r, "_callable", lambda v, b: (lambda x: (x, None), None,
                                                      lambda: None))
    row = r.run_row(Variant("engine", torch.bfloat16, backend="auto"), 1)
    assert row.status == "ok", row.reason


def test_bench_leaves_kernel_rows_to_backends_on_a_big_cpu_model():
    r = Runner(OFFICIAL, CPU, batches=[1], runs=1, warmup=0, cpu_engine_rows_only=True)
    row = r.run_row(Variant("fast", torch.float32, backend="auto"), 1)
    assert row.status == "skipped" and "--backends" in row.reason
