"""The GPU check's pieces on a CPU, tiny shapes: micro-benchmarks, smoke test, the journal that
isolates their cases, the bench runner's poisoned-context stop, the ablation's results file.

(bench/gpu_check.sh as a whole is dry-run by hand: GPU_CHECK_ALLOW_CPU=1 GPU_CHECK_CONFIG=tiny;
it takes minutes here.)
"""

from __future__ import annotations

import json

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
