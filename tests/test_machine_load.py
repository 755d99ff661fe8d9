"""The bench's machine-load detector (bench/machine_load.py) with injected /proc contents: the
idle / shared judgement, the warning under the table, the "CPU got" column, the JSON fields,
the README caption made by bench/make_table.py, and the official-size CPU defaults."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from depthpro_fast.bench import machine_load as ml
from depthpro_fast.bench.runner import RowResult, Runner
from depthpro_fast.bench.tables import format_table
from depthpro_fast.bench.timing import Stats
from depthpro_fast.bench.variants import Variant
from depthpro_fast.config import OFFICIAL, TINY

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
HZ = 100  # jiffies per second in the fake /proc


class FakeProc:
    """/proc/stat, /proc/self/stat and /proc/loadavg of a machine whose counters advance as
    told: ``advance(seconds, own=..., others=..., steal=...)`` in cores' worth of CPU."""

    def __init__(self, cores: int = 2, load: float = 0.2):
        self.cores = cores
        self.now = 100.0
        self.user = self.system = self.idle = self.steal = 0
        self.own_user = self.own_system = 0
        self.load = [load, load, load]

    def advance(self, seconds: float, *, own: float = 0.0, others: float = 0.0,
                steal: float = 0.0, load: float | None = None) -> None:
        assert own + others + steal * self.cores <= self.cores  # (a real machine's limit)
        self.now += seconds
        total = round(seconds * HZ * self.cores)
        own_j, others_j = round(own * seconds * HZ), round(others * seconds * HZ)
        steal_j = round(steal * total)
        self.own_user += own_j - own_j // 4
        self.own_system += own_j // 4
        self.user += own_j - own_j // 4 + others_j
        self.system += own_j // 4
        self.steal += steal_j
        self.idle += total - own_j - others_j - steal_j
        if load is not None:
            self.load = [load, load, load]

    def read(self, path: str) -> str | None:
        if path == "/proc/stat":
            per = [f"cpu{i} 1 0 1 1 0 0 0 0 0 0" for i in range(self.cores)]
            return "\n".join([f"cpu  {self.user} 0 {self.system} {self.idle} 0 0 0 "
                              f"{self.steal} 0 0", *per, "intr 1 2 3", "ctxt 99"]) + "\n"
        if path == "/proc/self/stat":
            # the command name may hold spaces and parentheses: the parser splits after ")"
            fields = ["S", "1", "2", "3", "0", "-1", "4194304", "10", "0", "0", "0",
                      str(self.own_user), str(self.own_system), "0", "0", "20", "0", "3"]
            return f"4242 (python3 (x) y) {' '.join(fields)}\n"
        if path == "/proc/loadavg":
            return " ".join(f"{v:.2f}" for v in self.load) + " 3/700 4242\n"
        return None

    def reader(self) -> ml.ProcReader:
        return ml.ProcReader(read=self.read, clock=lambda: self.now, ticks_per_s=HZ)


def span(proc: FakeProc, seconds: float, threads: int | None = 2, **usage) -> ml.Load:
    reader = proc.reader()
    with ml.Span(reader, threads) as s:
        proc.advance(seconds, **usage)
    return s.load


def test_idle_machine():
    proc = FakeProc(load=0.3)
    load = span(proc, 10.0, own=1.96, others=0.04, load=1.9)
    assert load.state == "idle" and load.reasons == []
    assert load.cpu_got == pytest.approx(0.98)
    assert load.cpu_s == pytest.approx(19.6)
    assert load.others_cores == pytest.approx(0.04)
    assert load.steal_pct == 0.0
    assert (load.load_before, load.load_after) == (0.3, 1.9)
    assert ml.warning([load]) is None
    assert ml.format_pct(load.cpu_got) == "98 %"


def test_others_on_the_cores_make_it_shared():
    proc = FakeProc()
    load = span(proc, 20.0, own=0.7, others=1.3, load=4.0)
    assert load.state == "shared"
    assert load.reasons == ["others used 1.3 of 2 cores"]
    assert load.cpu_got == pytest.approx(0.35)
    # at the threshold (10 % of the cores) it is still idle; just above, shared
    assert span(FakeProc(), 10.0, own=1.8, others=0.2).state == "idle"
    assert span(FakeProc(), 10.0, own=1.7, others=0.22).state == "shared"


def test_steal_makes_it_shared():
    load = span(FakeProc(), 10.0, own=1.9, steal=0.05)
    assert load.state == "shared" and load.reasons == ["steal 5.0 % of the CPU time"]
    assert span(FakeProc(), 10.0, own=1.9, steal=0.01).state == "idle"


def test_short_spans_and_missing_proc_are_not_judged():
    assert span(FakeProc(), 0.2, own=1.0, others=1.0).state == "unknown"
    no_proc = ml.ProcReader(read=lambda path: None, clock=iter([0.0, 5.0]).__next__,
                            ticks_per_s=HZ)
    with ml.Span(no_proc, 2) as s:
        pass
    assert s.load.state == "unknown" and s.load.cpu_got is None
    assert s.load.to_dict()["reasons"] == ["/proc/stat not readable"]
    assert ml.warning([s.load]) is None
    assert ml.SystemTimes.parse("cpu  a b c\n") is None
    assert ml.parse_own_ticks("garbage") is None and ml.parse_loadavg("") is None


def test_own_ticks_parse_the_real_proc_self_stat():
    """The fields read from /proc/self/stat are this process's CPU time (checked against
    os.times, so a wrong field index fails here, not only in the fake)."""
    if ml.read_proc_file("/proc/self/stat") is None:
        pytest.skip("no /proc here (not Linux)")
    reader = ml.ProcReader()
    t0, a = os.times(), reader.snapshot()
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        pass
    t1, b = os.times(), reader.snapshot()
    own = (b.own_ticks - a.own_ticks) / reader.ticks_per_s
    cpu = (t1.user + t1.system) - (t0.user + t0.system)
    assert cpu > 0.05 and own == pytest.approx(cpu, abs=0.05)
    assert b.system is not None and b.system.cores >= 1 and b.loadavg is not None


def test_probe_before_the_run():
    proc = FakeProc(load=6.0)
    reader = proc.reader()
    load = ml.probe(reader, 1.0, sleep=lambda s: proc.advance(s, others=1.8))
    assert load.state == "shared" and load.others_cores == pytest.approx(1.8)
    assert load.cpu_got is None  # no threads judged while sleeping


def test_warning_text_and_report():
    proc = FakeProc(load=2.0)
    rows = [span(proc, 10.0, own=1.0, others=1.0, load=3.0),
            span(proc, 10.0, own=0.4, others=1.6, load=4.0),
            span(proc, 0.1, own=2.0)]  # too short: left out
    text = ml.warning(rows)
    assert text == ("WARNING: the machine was shared: others used 1.3 of 2 cores during these "
                    "rows (load average 2.0 -> 4.0): timings are not comparable; rerun on an "
                    "idle machine.")
    mixed = ml.warning([span(FakeProc(), 10.0, own=2.0), rows[1]])
    assert "(1 of 2 shared, load average" in mixed
    # the figures of the shared row, not of all rows (which could read "0.0 of 2 cores")
    assert "others used 1.6 of 2 cores during the shared rows of these rows" in mixed
    run = ml.combine(rows)
    data = ml.report(rows, run, ml.probe(proc.reader(), 1.0, sleep=lambda s: proc.advance(s)))
    assert data["state"] == "shared" and data["judged_on"] == "these rows"
    assert data["warning"] == text
    assert data["thresholds"] == {"others_share_of_cores": 0.1, "steal_pct": 2.0,
                                  "min_span_s": 0.5}
    assert data["rows"]["others_cores"] == pytest.approx(1.3, abs=0.01)
    assert data["rows"]["cores"] == 2 and data["before"]["state"] == "idle"
    # GPU rows time milliseconds: then the whole run's span is judged
    gpu_rows = [span(FakeProc(), 0.01, threads=None, others=2.0)]
    gpu_run = span(FakeProc(), 30.0, threads=None, own=1.0, others=1.0)
    gpu = ml.report(gpu_rows, gpu_run, None)
    assert gpu["state"] == "shared" and gpu["judged_on"] == "the run"
    assert "during the run" in gpu["warning"]
    idle = ml.report([span(FakeProc(), 10.0, own=2.0)], None, None)
    assert idle["state"] == "idle" and idle["warning"] is None


def _ok_row(load: ml.Load | None, name: str = "reference") -> RowResult:
    return RowResult(Variant(name, torch.float32, *(("auto",) if name == "engine" else ())),
                     1, "ok", device=Stats([5.0, 7.0]), host=Stats([5.0, 7.0]), load=load)


def test_row_json_and_table_column():
    shared = span(FakeProc(), 10.0, own=1.08, others=0.9)
    idle = span(FakeProc(), 10.0, own=1.96)
    rows = [_ok_row(idle), _ok_row(shared, "engine")]
    d = rows[1].to_dict()["machine_load"]
    assert d["state"] == "shared" and d["cpu_got"] == pytest.approx(0.54)
    assert d["others_cores"] == pytest.approx(0.9) and d["threads"] == 2 and d["cores"] == 2
    assert {"cpu_s", "wall_s", "steal_pct", "load_before", "load_after", "reasons"} <= set(d)
    lines = format_table(rows).splitlines()
    assert "CPU got" in lines[0] and lines[0].index("CPU got") > lines[0].index("min-max ms")
    assert "98 %" in lines[2] and "54 %" in lines[3]
    assert "machine shared" in lines[3] and "machine shared" not in lines[2]
    # rows without a CPU share (a GPU run) get no column
    assert "CPU got" not in format_table([_ok_row(None)])


def test_runner_measures_each_row(monkeypatch):
    """The runner samples the machine around each row's timed runs (with torch's threads)."""
    proc = FakeProc()
    runner = Runner(OFFICIAL, CPU, batches=[1], runs=2, warmup=0, machine=proc.reader())

    def timed(x):
        proc.advance(5.0, own=0.5 * min(torch.get_num_threads(), 2), others=1.0)

    monkeypatch.setattr(runner, "_callable", lambda v, b: (timed, None, lambda: None))
    monkeypatch.setattr(runner, "model", lambda dtype: None)
    monkeypatch.setattr(runner, "inputs", lambda dtype, batch: [torch.zeros(1)])
    monkeypatch.setattr(runner, "accuracy", False)
    logged = []
    runner.log = logged.append
    (row,) = runner.run([Variant("reference", torch.float32)])
    assert row.status == "ok", row.reason
    assert row.load.threads == torch.get_num_threads()
    assert row.load.wall_s == pytest.approx(10.0) and row.load.state == "shared"
    assert any("CPU got" in line and "machine shared" in line for line in logged)


def _make_table():
    spec = importlib.util.spec_from_file_location("make_table", REPO / "bench" / "make_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(load_report: dict | None, cpu_got: float | None) -> dict:
    row = {"name": "fast engine", "dtype": "fp32", "batch": 1, "status": "ok",
           "median_ms": 2000.0, "min_ms": 1900.0, "max_ms": 2500.0}
    if cpu_got is not None:
        row["machine_load"] = {"cpu_got": cpu_got}
    data = {"schema": "depthpro_fast.bench/1",
            "environment": {"date": "2026-12-03T10:00:00+00:00", "device": "AMD EPYC",
                            "device_type": "cpu", "cpu": "AMD EPYC", "cpu_threads": 2,
                            "torch": "2.13.0", "commit": "abcdef1234567"},
            "config": {"name": "tiny"}, "flops_per_image": 1.587e11,
            "settings": {"runs": 2, "warmup": 1, "timer": "perf_counter"}, "rows": [row]}
    if load_report is not None:
        data["machine_load"] = load_report
    return data


def test_make_table_caption_names_the_machine_and_its_state():
    mt = _make_table()
    proc = FakeProc(load=0.4)
    idle_rows = [span(proc, 10.0, own=1.96, others=0.04, load=2.1)]
    idle = mt.describe(_results(ml.report(idle_rows, None, None), 0.98))
    assert idle.startswith("**CPU AMD EPYC (2 threads)**")
    assert idle.endswith("machine idle during the timed rows (others used 0.04 of 2 cores, "
                         "load average 0.4 -> 2.1)")
    shared_rows = [span(FakeProc(load=9.0), 10.0, own=0.7, others=1.3, load=10.0)]
    shared = mt.describe(_results(ml.report(shared_rows, None, None), 0.5))
    assert shared.endswith("**machine shared** during the timed rows (others used 1.30 of 2 "
                           "cores, load average 9.0 -> 10.0): timings not comparable with an "
                           "idle machine's")
    assert mt.describe(_results(None, None)).endswith("machine state not recorded")
    # the CPU got column where the file has it, none in older files
    table = mt.table(_results(None, 0.98))
    assert "| CPU got |" in table and "| 1900.0–2500.0 | 98 % |" in table
    assert table.splitlines()[1].count("---:") == 9
    assert "CPU got" not in mt.table(_results(None, None))
    # a GPU file names its host CPU too
    gpu = _results(None, None)
    gpu["environment"].update(device="NVIDIA H100", device_type="cuda", capability="9.0")
    assert "**NVIDIA H100 (sm_90) on CPU AMD EPYC (2 threads)**" in mt.describe(gpu)


def test_official_size_on_a_cpu_times_two_runs(monkeypatch):
    """The defaults, not a run: the official model on a CPU gets 1 warm-up and 2 timed runs
    (a spread), the tiny one 1 + 3, a GPU 5 + 20; and the CLI passes them to the Runner."""
    from depthpro_fast.bench import runner as runner_mod
    from depthpro_fast.bench import timing
    from depthpro_fast.cli import main
    from depthpro_fast.commands import bench
    from depthpro_fast.flops import count_flops

    assert count_flops(OFFICIAL).per_image > bench.CPU_BIG_MODEL_FLOPS
    assert count_flops(TINY).per_image <= bench.CPU_BIG_MODEL_FLOPS
    assert bench.default_runs_warmup(gpu=False, big=True) == (2, 1)
    assert bench.default_runs_warmup(gpu=False, big=False) == (3, 1)
    assert bench.default_runs_warmup(gpu=True, big=True) == (20, 5)

    class Stop(Exception):
        pass

    seen = {}

    def fake_runner(cfg, device, **kwargs):
        seen.update(kwargs)
        raise Stop

    peak = {"tflops": 0.1, "dtype": "fp32", "n": 2048, "median_ms": 1.0}
    monkeypatch.setattr(timing, "floor_peak", lambda device: (peak, peak))
    monkeypatch.setattr(runner_mod, "Runner", fake_runner)
    monkeypatch.setattr(ml, "probe", lambda reader, seconds=1.0: ml.Load(wall_s=1.0))
    with pytest.raises(Stop):
        main(["bench", "--config", "official", "--device", "cpu", "--quiet"])
    assert (seen["runs"], seen["warmup"]) == (2, 1)
    with pytest.raises(Stop):
        main(["bench", "--config", "official", "--device", "cpu", "--runs", "1", "--quiet"])
    assert seen["runs"] == 1
