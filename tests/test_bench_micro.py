"""The GPU check's pieces on a CPU, tiny shapes: micro-benchmarks, smoke test, the journal that
isolates their cases, the bench runner's poisoned-context stop, the ablation's results file.

bench/gpu_check.sh: its step plan against its budget, and its qualify step alone (dry run);
the carried Triton cache's export / install and its hit counter. (The whole script is dry-run by
hand: GPU_CHECK_ALLOW_CPU=1 GPU_CHECK_CONFIG=tiny; it takes minutes here.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from depthpro_fast.bench import journal as journal_mod
from depthpro_fast.bench import micro, micro_cases, smoke
from depthpro_fast.bench.journal import INTERRUPTED, POISONED, Case, Journal, SkipCase, run_cases
from depthpro_fast.bench.micro_cases import Settings, build_cases
from depthpro_fast.cli import main as cli_main

CPU = torch.device("cpu")
TINY = Settings(size="tiny", warmup=0, runs=2, dtypes=(torch.float32,))


def _memory_journal(schema: str = "test/1") -> Journal:
    return Journal(None, schema=schema, header=lambda: {})


def _run(cases: list[Case]) -> dict[str, dict]:
    j = _memory_journal()
    assert run_cases(cases, j, device=CPU) == 0
    return {(r["problem"], r["impl"]): r for r in j.rows}


def test_micro_cli_writes_every_case(tmp_path, capsys):
    path = tmp_path / "micro.json"
    rc = micro.main(["--group", "gemm", "conv", "--size", "tiny", "--runs", "2", "--warmup", "0",
                     "--json", str(path), "--quiet"])
    assert rc == 0
    data = json.loads(path.read_text())
    assert data["schema"] == micro.SCHEMA
    for key in ("device", "torch", "triton", "commit", "date"):
        assert key in data["environment"]
    assert data["settings"]["size"] == "tiny" and data["settings"]["dtypes"] == ["fp32"]
    rows = data["rows"]
    assert len(rows) == 4 * 2 + 4  # 4 GEMMs with / without bias, 4 conv layouts
    for r in rows:
        assert r["status"] == "ok", r
        assert r["runs"] == 2 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["tflops"] > 0 and r["flops"] > 0
    assert {r["problem"] for r in rows if r["group"] == "gemm"} == {
        "qkv 130x128->384", "proj 130x128->128", "fc1 130x128->512", "fc2 130x512->128"}
    text = capsys.readouterr().out
    assert "vs best" in text and "1.00x" in text and "TFLOP/s" in text
    # --show prints the same table from the file; a second group keeps the first one's rows
    assert micro.main(["--group", "patches", "--size", "tiny", "--runs", "1", "--warmup", "0",
                       "--json", str(path), "--quiet"]) == 0
    assert len(json.loads(path.read_text())["rows"]) > len(rows)
    assert micro.main(["--show", str(path)]) == 0
    assert "merge level1" in capsys.readouterr().out


def test_micro_attention_against_sdpa():
    wanted = {"reference", "sdpa math", "sdpa cudnn", "cuda", "triton"}
    cases = [c for c in build_cases(["attention"], TINY, CPU)
             if c.info["problem"] == "1x2x65x64" and c.info["impl"] in wanted]
    rows = _run(cases)
    assert len(rows) == len(wanted)
    ref = rows[("1x2x65x64", "reference")]
    assert ref["status"] == "ok" and ref["max_err"] == 0.0 and ref["tflops"] > 0
    assert rows[("1x2x65x64", "sdpa math")]["status"] == "ok"
    assert rows[("1x2x65x64", "sdpa cudnn")]["status"] == "skipped"  # refused on a CPU
    assert "refused" in rows[("1x2x65x64", "sdpa cudnn")]["reason"]
    assert rows[("1x2x65x64", "cuda")]["status"] == "skipped"
    triton = rows[("1x2x65x64", "triton")]  # the interpreter (conftest sets TRITON_INTERPRET)
    assert triton["status"] == "ok" and triton["max_err"] < 1e-4


def test_micro_wrong_kernel_fails_and_copy_is_the_peer(monkeypatch):
    monkeypatch.setattr(micro_cases, "_kernel",
                        lambda op, backend, device: lambda t, **kw: torch.zeros(1))
    cases = [c for c in build_cases(["patches"], TINY, CPU)
             if c.info["problem"].startswith("merge level1")
             and c.info["impl"] in ("reference", "triton", "copy")]
    rows = _run(cases)
    problem = next(p for p, _ in rows)
    assert rows[(problem, "reference")]["status"] == "ok"
    assert rows[(problem, "copy")]["status"] == "ok" and rows[(problem, "copy")]["gb_per_s"] > 0
    assert rows[(problem, "reference")]["bytes"] == rows[(problem, "copy")]["bytes"]
    bad = rows[(problem, "triton")]
    assert bad["status"] == "failed" and "wrong output" in bad["reason"]
    assert "wrong output" in micro.format_table(list(rows.values()))


def test_micro_bad_input(tmp_path, capsys):
    assert micro.main(["--runs", "0"]) == 2
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "something/1", "rows": []}))
    assert micro.main(["--show", str(other)]) == 2
    with pytest.raises(SystemExit):
        micro.main(["--group", "everything"])
    with pytest.raises(ValueError, match="unknown micro-benchmark groups"):
        build_cases(["everything"], TINY, CPU)
    # a results file of another kind is not overwritten
    with pytest.raises(ValueError, match="name another file"):
        micro.main(["--group", "gemm", "--json", str(other), "--quiet"])


def test_bench_cli_forwards_micro(monkeypatch):
    seen = []
    monkeypatch.setattr(micro, "main", lambda argv: seen.append(argv) or 0)
    assert cli_main(["bench", "--micro", "--dtype", "bfloat16", "fp16", "--runs", "3",
                     "--json", "x.json", "--quiet"]) == 0
    assert seen == [["--dtype", "bf16", "fp16", "--runs", "3", "--json", "x.json", "--quiet"]]


# -------------------------------------------------------------------------------------------
# the journal: a crash or a poisoned CUDA context costs only its own case


def _cases(log: list[str], behaviour: dict[str, object]) -> list[Case]:
    def make(key: str):
        def run() -> dict:
            log.append(key)
            what = behaviour.get(key)
            if isinstance(what, BaseException):
                raise what
            return {"value": key}

        return Case(key, {"group": "g"}, run)

    return [make(k) for k in ("a", "b", "c")]


def test_journal_poisoned_context_then_resume(tmp_path, monkeypatch):
    path = tmp_path / "j.json"
    ran: list[str] = []
    monkeypatch.setattr(journal_mod, "cuda_context_usable", lambda device: False)
    j = Journal(path, schema="test/1", header=lambda: {"environment": {"device": "x"}})
    rc = run_cases(_cases(ran, {"b": RuntimeError("illegal memory access")}), j, device=CPU)
    assert rc == POISONED and ran == ["a", "b"]
    rows = {r["key"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["a"]["status"] == "ok" and "c" not in rows
    assert rows["b"]["status"] == "failed" and "unusable" in rows["b"]["reason"]
    # the next process goes on after the faulty case, and keeps the header
    ran.clear()
    j2 = Journal(path, schema="test/1", header=lambda: {"environment": "not used"})
    assert run_cases(_cases(ran, {}), j2, device=CPU, resume=True) == 0
    assert ran == ["c"] and j2.data["environment"] == {"device": "x"}
    assert len(j2.data["commands"]) == 2


def test_journal_crash_interrupt_and_time_limit(tmp_path):
    path = tmp_path / "j.json"
    j = Journal(path, schema="test/1", header=lambda: {})
    j.put({"key": "a", "group": "g", "status": "ok", "reason": None})
    j.put({"key": "b", "group": "g", "status": "running", "reason": None})  # its process died
    ran: list[str] = []
    j = Journal(path, schema="test/1", header=lambda: {})
    assert run_cases(_cases(ran, {}), j, device=CPU, resume=True) == 0
    assert ran == ["c"]
    assert j.get("b")["status"] == "failed" and "died" in j.get("b")["reason"]
    # without --resume the cases run again from scratch
    ran.clear()
    assert run_cases(_cases(ran, {"a": SkipCase("not here")}), j, device=CPU) == 0
    assert ran == ["a", "b", "c"] and j.get("a")["reason"] == "not here"
    # an interrupt (timeout --signal=INT) records the rest as skipped
    ran.clear()
    rc = run_cases(_cases(ran, {"b": KeyboardInterrupt()}), j, device=CPU)
    assert rc == INTERRUPTED and ran == ["a", "b"]
    assert j.get("c")["status"] == "skipped" and "interrupted" in j.get("c")["reason"]
    # a spent time limit: nothing starts
    ran.clear()
    assert run_cases(_cases(ran, {}), j, device=CPU, time_limit_s=-1) == 0
    assert ran == [] and "time limit" in j.get("a")["reason"]


# -------------------------------------------------------------------------------------------
# smoke test


def test_smoke_ops_triton(tmp_path, capsys):
    path = tmp_path / "smoke.json"
    rc = smoke.main(["--ops", "triton", "cuda", "--size", "tiny", "--dtype", "fp32",
                     "--json", str(path), "--quiet"])
    assert rc == 0
    rows = {r["key"]: r for r in json.loads(path.read_text())["rows"]}
    assert len(rows) == 2 * len(smoke.OPS)
    for op in ("attention", "merge_patches", "layer_norm", "add_layer_norm", "bias_gelu",
               "residual_layerscale"):
        r = rows[f"ops/triton/{op}/fp32"]
        assert r["status"] == "ok", r
        assert r["max_rel_err"] <= r["tolerance"] and r["first_call_s"] >= 0
    assert rows["ops/triton/split_patches/fp32"]["status"] == "skipped"
    assert all(rows[f"ops/cuda/{op}/fp32"]["status"] == "skipped" for op in smoke.OPS)
    assert "no cuda implementation" in rows["ops/cuda/layer_norm/fp32"]["reason"]
    assert smoke.main(["--show", str(path)]) == 0
    assert "residual_layerscale" in capsys.readouterr().out


class _FakeEngine:
    """Stands in for a DepthPro model in the engine check's budget logic."""

    def __init__(self, scale: float):
        self.scale = scale
        self.fast_engine = self

    def to(self, dtype):
        return self

    def set_backend(self, backend):
        return self

    def prepare_fast(self, options):
        return self

    def status(self):
        return {"graphs": {"captures": 1, "failures": {}}}

    def __call__(self, x):
        return torch.full((1, 1, 4, 4), self.scale), torch.full((1, 1, 1, 1), 60.0)


@pytest.mark.parametrize("scale, ok", [(1.0002, True), (1.01, False)])
def test_smoke_engine_budget(monkeypatch, scale, ok):
    ref = (_FakeEngine(scale), torch.zeros(1), torch.ones(1, 1, 4, 4),
           torch.full((1, 1, 1, 1), 60.0))
    monkeypatch.setattr(smoke, "_reference", lambda config, device: ref)
    cases = smoke.build_cases([], True, "tiny", (torch.float16,), CPU)
    j = _memory_journal()
    run_cases(cases, j, device=CPU)
    (row,) = j.rows
    assert row["mare"] == pytest.approx(scale - 1, rel=1e-3)
    assert row["status"] == ("ok" if ok else "failed")
    if not ok:
        assert "over budget" in row["reason"]


# -------------------------------------------------------------------------------------------
# the bench runner stops after a row that poisons the CUDA context; the ablation's file


def test_runner_stops_after_a_poisoned_context(monkeypatch):
    from depthpro_fast.bench.runner import RowResult, Runner
    from depthpro_fast.bench.variants import Variant
    from depthpro_fast.config import OFFICIAL

    runner = Runner(OFFICIAL, CPU, batches=[1], runs=1, warmup=0)

    def fake_row(v, batch):
        row = RowResult(v, batch, "failed", "illegal memory access")
        runner.poisoned_by = row  # what run_row does when the context is unusable
        return row

    monkeypatch.setattr(runner, "run_row", fake_row)
    rows = runner.run([Variant("fast", torch.float32, "cuda"),
                       Variant("engine", torch.float32, "auto")])
    assert [r.status for r in rows] == ["failed", "skipped"]
    assert "unusable after fast cuda fp32" in rows[1].reason


def test_ablation_json_and_bad_input(tmp_path, monkeypatch):
    from depthpro_fast.fast import ablation

    with pytest.raises(ValueError, match="repeats"):
        ablation.run(repeats=0, allow_cpu=True)
    rows = [{"variant": "reference", "ms": 10.0, "p10": 9.0, "p90": 11.0, "images_per_s": 100.0,
             "mare": 0.0, "fov_err_deg": 0.0}]

    def fake_run(**kwargs):
        assert kwargs["compile"] is False and kwargs["allow_cpu"] is True
        kwargs["on_row"](rows)
        return rows

    monkeypatch.setattr(ablation, "run", fake_run)
    path = tmp_path / "ablation.json"
    assert ablation.main(["--allow-cpu", "--no-compile", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["schema"] == ablation.SCHEMA and not data["partial"]
    assert data["environment"]["device"] and "commit" in data["environment"]
    assert data["rows"][0]["variant"] == "reference"


# ---- bench/gpu_check.sh: its step plan, and its steps on a CPU -----------------------------

GPU_CHECK = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
#: The device call's limit (600 s) less the machine's start and the transfers.
DEVICE_CALL_S, START_AND_TRANSFERS_S = 600, 60
#: Time outside the steps before the first one: the environment probe (torch imports).
SETUP_S = 20


def _gpu_check_plan() -> tuple[dict[str, int], list[str], int, int, dict[str, int]]:
    """(run_step limits in order, ALL_STEPS, BUDGET_S default, RESERVE_S, header table)."""
    text = GPU_CHECK.read_text()
    steps = {m[1]: int(m[2]) for m in re.finditer(
        r"^(?:[A-Z_]+=\S+\s+)*run_step\s+(\w+)\s+(\d+)\s+\w+\s*$", text, re.M)}
    all_steps = re.search(r'^ALL_STEPS="([^"]+)"', text, re.M)[1].split()
    budget = int(re.search(r"^BUDGET_S=\$\{BUDGET_S:-(\d+)\}", text, re.M)[1])
    reserve = int(re.search(r"^RESERVE_S=(\d+)", text, re.M)[1])
    header = text[:text.index("set -uo pipefail")]
    table = {m[1]: int(m[2]) for m in re.finditer(r"^#\s+(\w+)\s+(\d+)s\s", header, re.M)}
    return steps, all_steps, budget, reserve, table


def test_gpu_check_steps_fit_the_budget():
    """The step limits add up to well under the budget (no step is cut by design), the budget
    leaves the device call room for the machine's start and the transfers, the order puts
    the decisive numbers first, and the header's plan is the script's."""
    steps, all_steps, budget, reserve, table = _gpu_check_plan()
    assert list(steps) == all_steps  # every default step has a limit, in the run's order
    total = sum(steps.values())
    assert budget + START_AND_TRANSFERS_S <= DEVICE_CALL_S, budget
    assert total + SETUP_S + reserve <= budget - 15, (total, budget)
    assert all_steps[:3] == ["build", "qualify", "bench8"]  # throughput before the rest
    assert all_steps.index("bench8") < min(all_steps.index("micro"),
                                           all_steps.index("ablation"))
    assert all_steps[-1] == "tests" and all(limit >= 20 for limit in steps.values())
    assert {k: v for k, v in table.items() if k in steps} == steps  # the header says the same
    assert f"add up to {total} s" in GPU_CHECK.read_text()
    plan = subprocess.run(["bash", str(GPU_CHECK), "--plan"], capture_output=True, text=True,
                          check=True).stdout
    assert re.search(rf"^total\s+{total}s of a {budget}s budget", plan, re.M), plan
    assert [line.split()[0] for line in plan.splitlines()[:-1]] == all_steps


def test_gpu_check_qualify_step_fails_when_its_module_is_missing(tmp_path):
    """A dry run of the qualify step alone: the missing module is a FAILED step that says so
    (never a silent pass), in the log and in the summary's step table."""
    env = {**os.environ, "GPU_CHECK_ALLOW_CPU": "1", "GPU_CHECK_CONFIG": "tiny",
           "STEPS": "qualify", "GPU_CHECK_WORK": str(tmp_path / "work"),
           "GPU_CHECK_QUALIFY_MODULE": "depthpro_fast.no_such_module"}
    env.pop("DEPTHPRO_FAST_DEVICE_CACHE", None)  # (the tests' own: the script sets its own)
    proc = subprocess.run(["bash", str(GPU_CHECK), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert re.search(r"^qualify\s+FAILED \(module missing\)", summary, re.M), summary
    assert "module missing: depthpro_fast.no_such_module" in (
        tmp_path / "out" / "gpu_check.log").read_text()
    # the device cache points at the run's scratch folder
    assert f"device cache {tmp_path / 'work' / 'device-cache'}" in proc.stdout


# ---- the carried Triton cache ---------------------------------------------------------------

PARTS = {"triton": "3.6.0", "python": "3.12.1", "triton_key": "k1", "backend": "b1",
         "ptxas": "release 12.8", "arch": 90, "env": {}}


def _fake_triton_cache(root: Path, entries: int) -> None:
    """Triton's layout: <key>/<files>, and a group file naming them by absolute path."""
    for i in range(entries):
        d = root / f"KEY{i}"
        d.mkdir(parents=True)
        names = [f"_k{i}.source", f"_k{i}.ttir", f"_k{i}.ptx", f"_k{i}.cubin", f"_k{i}.json"]
        for n in names:
            (d / n).write_text(f"{n} contents")
        (d / f"__grp___k{i}.json").write_text(json.dumps(
            {"child_paths": {n: str(d / n) for n in names}}))
    (root / "autotune").mkdir()  # an entry without a binary: not exported
    (root / "autotune" / "__grp__x.json").write_text(json.dumps({"child_paths": {}}))


def test_triton_cache_export_and_install(tmp_path):
    """export keeps the binaries and the metadata, by name; install puts them in a new folder
    with group files that point at the copies (Triton drops paths that do not exist)."""
    from depthpro_fast.bench import triton_cache

    _fake_triton_cache(tmp_path / "aot", 3)
    carried = tmp_path / "carried"
    manifest = triton_cache.export(tmp_path / "aot", carried, parts=PARTS)
    assert manifest["kernels"] == 3 and manifest["triton_key"] == "k1"
    assert sorted(p.name for p in (carried / "KEY1").iterdir()) == [
        "__grp___k1.json", "_k1.cubin", "_k1.json"]
    assert json.loads((carried / "KEY1" / "__grp___k1.json").read_text()) == {
        "child_paths": {"_k1.cubin": "_k1.cubin", "_k1.json": "_k1.json"}}
    cache = tmp_path / "elsewhere" / "triton-cache"
    lines = triton_cache.install(carried, cache, parts=PARTS)
    assert "3 of 3 kernels installed" in lines[0] and "expect hits" in lines[1]
    group = json.loads((cache / "KEY2" / "__grp___k2.json").read_text())["child_paths"]
    assert set(group) == {"_k2.cubin", "_k2.json"}
    assert all(Path(p).is_absolute() and Path(p).read_text() == f"{n} contents"
               for n, p in group.items())
    assert "0 of 3 kernels installed" in triton_cache.install(carried, cache, parts=PARTS)[0]
    # a key part that differs is named, with what follows
    other = {**PARTS, "python": "3.11.7", "triton_key": "k2"}
    lines = triton_cache.install(carried, tmp_path / "c2", parts=other)
    assert "triton_key DIFFERENT" in lines[1] and "3.11.7" in lines[1]
    assert "expect misses" in lines[-1]
    assert "no manifest.json" in triton_cache.install(tmp_path / "aot", cache)[0]
    assert triton_cache.main(["install", str(tmp_path / "nothing"), str(cache)]) == 1


def test_triton_cache_counting_manager(tmp_path, monkeypatch):
    """The counting manager is Triton's file cache, logging each lookup as a hit or a miss."""
    pytest.importorskip("triton")
    from depthpro_fast.bench import triton_cache
    from depthpro_fast.bench.triton_cache_counter import LOG_ENV, CountingCacheManager

    assert LOG_ENV == triton_cache.LOG_ENV
    log = tmp_path / "lookups.txt"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(LOG_ENV, str(log))
    m = CountingCacheManager("SOMEKEY")
    assert m.get_group("k.json") is None
    path = m.put(b"\x00cubin", "k.cubin")
    m.put_group("k.json", {"k.cubin": path})
    assert m.get_group("k.json") == {"k.cubin": path}
    assert log.read_text().splitlines() == ["miss SOMEKEY/k.json", "hit SOMEKEY/k.json"]
    assert triton_cache.count(log) == (1, 1)
    assert triton_cache.count(tmp_path / "none.txt") == (0, 0)
    parts = triton_cache.key_parts()  # this Triton's key parts (its bundled ptxas)
    assert set(parts) == set(PARTS) and parts["arch"] == 90
