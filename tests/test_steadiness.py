"""The steadiness tool: one bench row in fresh processes (depthpro_fast/bench/steadiness.py)."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch

from depthpro_fast.bench import steadiness
from depthpro_fast.bench.variants import Variant


def record(pid: int, times: list[float], *, gemm: str = "aten", threads: int = 2,
           allocator: str = "glibc tuned: M_MMAP_THRESHOLD=2147483647") -> dict:
    return {"pid": pid, "row": "fast engine (auto)", "times_ms": times,
            "minor_faults": [10] * len(times), "peak_rss_bytes": 2**30,
            "choices": {"dtype": "fp32", "threads": threads,
                        "cpu_gemm": {"fp32 2308x1024x4096": gemm},
                        "attention": {"attention 35x2x577x64 float32": "torch"},
                        "allocator": allocator,
                        "sources": {"cpu_gemm": {}, "attention": {}}}}


def test_a_choice_that_differs_between_processes_is_flagged():
    summary = steadiness.summarize([record(1, [100.0, 110.0]), record(2, [200.0, 220.0],
                                                                      gemm="onednn")])
    assert summary["differs"] == {"cpu_gemm": [{"fp32 2308x1024x4096": "aten"},
                                               {"fp32 2308x1024x4096": "onednn"}]}
    assert summary["process_medians_ms"] == {"min": 105.0, "median": 157.5, "max": 210.0,
                                             "spread": 1.0}
    assert summary["all_runs_ms"]["min"] == 100.0 and summary["all_runs_ms"]["max"] == 220.0
    text = steadiness.format_report(summary)
    assert ("DIFFERS between processes: cpu_gemm: fp32 2308x1024x4096: aten | "
            "fp32 2308x1024x4096: onednn") in text
    assert "process medians: min 105.0 / median 157.5 / max 210.0 ms (spread 100 %)" in text


def test_threads_and_allocator_are_compared_too():
    summary = steadiness.summarize([record(1, [1.0]), record(2, [1.0], threads=1,
                                                             allocator="not tuned (off)")])
    assert set(summary["differs"]) == {"threads", "allocator"}


def test_same_choices_say_so():
    summary = steadiness.summarize([record(1, [10.0, 12.0]), record(2, [11.0])])
    assert summary["differs"] == {}
    text = steadiness.format_report(summary)
    assert "every process made the same choices" in text and "DIFFERS" not in text
    assert "process 2 (pid 2): median 11.0 ms" in text


def test_run_spawns_one_child_per_process_with_the_row():
    seen = []

    def spawn(argv):
        seen.append(list(argv))
        return record(len(seen), [5.0])

    summary = steadiness.run("tiny", torch.device("cpu"), Variant("engine", torch.bfloat16,
                                                                  backend="auto"),
                             processes=3, runs=2, warmup=1, spawn=spawn)
    assert len(seen) == 3 and [p["pid"] for p in summary["processes"]] == [1, 2, 3]
    argv = seen[0]
    assert argv[:3] == [sys.executable, "-m", "depthpro_fast.bench.steadiness"]
    for flag, value in (("--dtype", "bf16"), ("--path", "engine"), ("--backend", "auto"),
                        ("--runs", "2"), ("--warmup", "1"), ("--config", "tiny")):
        assert argv[argv.index(flag) + 1] == value
    assert "--child" in argv
    with pytest.raises(ValueError, match="processes must be >= 1"):
        steadiness.run("tiny", torch.device("cpu"), Variant("engine", torch.float32),
                       processes=0, runs=1, warmup=0, spawn=spawn)


def test_a_failing_child_says_how():
    with pytest.raises(steadiness.SteadinessError, match="child exit 3: broken"):
        steadiness.in_subprocess([sys.executable, "-c",
                                  "import sys; print('broken', file=sys.stderr); sys.exit(3)"])


def test_one_process_times_the_tiny_row_with_its_choices():
    ticks = itertools.count()
    clock = lambda: next(ticks) * 0.25  # noqa: E731  (each forward reads 250 ms)
    rec = steadiness.time_row("tiny", torch.device("cpu"), Variant("engine", torch.float32,
                                                                   backend="auto"),
                              runs=2, warmup=1, clock=clock)
    assert rec["times_ms"] == [250.0, 250.0] and len(rec["minor_faults"]) == 2
    c = rec["choices"]
    assert c["dtype"] == "fp32" and c["threads"] == torch.get_num_threads()
    assert c["allocator"].startswith(("glibc tuned: M_MMAP_THRESHOLD", "not tuned ("))
    assert c["cpu_gemm"] and all(v in ("aten", "onednn") for v in c["cpu_gemm"].values())
    assert set(c["sources"]) == {"cpu_gemm", "attention"}
    assert rec["peak_rss_bytes"] > 0 and rec["row"]


@pytest.mark.slow
def test_the_command_line_runs_fresh_processes(tmp_path, capsys):
    out = tmp_path / "steady.json"
    assert steadiness.main(["--config", "tiny", "--processes", "2", "--runs", "1",
                            "--warmup", "0", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "process 2 (pid" in text and "process medians:" in text
    assert out.read_text().startswith("{")
