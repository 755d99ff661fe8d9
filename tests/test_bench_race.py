"""The CPU race (``depthpro-fast bench --peers``): the JSON, the interleaving, failures that do
not stop it, accuracy against the fp32 reference, the machine's verdict, the table, OpenVINO.

Few children, each a Python start and at most one forward: one CLI race of the tiny config
(the reference, the fast engine in fp32 and bf16, OpenVINO f32; one round, no warm-up), and
races of fake contestants (``race_fakes.py``: quick, failing, crashing, hanging; a fake
reference computed once) for the interleaving of 2 rounds and what goes wrong.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from depthpro_fast.accuracy import MARE_BUDGET
from depthpro_fast.bench import machine_load as ml
from depthpro_fast.bench.race import SCHEMA, Race, RaceOptions, json_path_for, run_race
from depthpro_fast.bench.race_contestants import (
    BUILDERS,
    CONTESTANTS,
    KINDS,
    Contestant,
    select,
    why_not,
)
from depthpro_fast.bench.race_summary import NOT_IDLE, round_order, verdict
from depthpro_fast.bench.race_table import markdown
from depthpro_fast.cli import main
from depthpro_fast.config import resolve_config
from depthpro_fast.cpu import cpu_features
from depthpro_fast.device_cache import cpu_name
from tests.race_fakes import FakeProc, fake

REPO = Path(__file__).resolve().parents[1]

OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.fixture(scope="module")
def child_env():
    """The children import this checkout and the fakes (``tests.race_fakes``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        yield


@pytest.fixture(scope="module")
def cli_race(tmp_path_factory, child_env):
    """``depthpro-fast bench --peers`` on the tiny config: our reference, the fast engine in
    fp32 and bf16, and OpenVINO f32 (where installed); one round, no warm-up."""
    path = tmp_path_factory.mktemp("race") / "race.json"
    only = ["ours-ref-fp32", "ours-fast-fp32", "ours-fast-bf16"] + (
        ["openvino-f32"] if OPENVINO else [])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["bench", "--peers", "--config", "tiny", "--only", *only, "--rounds", "1",
                   "--warmup", "0", "--runs", "1", "--gemm-rows", "577", "--json", str(path),
                   "--quiet"])
    return rc, out.getvalue(), json.loads(path.read_text()), path


@pytest.fixture(scope="module")
def fake_race(tmp_path_factory, child_env):
    """Fakes, 2 rounds: a quick one, one that raises, one that aborts (the fake reference of
    the table left out by ``only``: computed once); the probe before the race reads a /proc
    where others keep 1.5 of 2 cores busy."""
    proc = FakeProc(load=3.0)
    path = tmp_path_factory.mktemp("fakes") / "fakes.json"
    table = (fake("fake-ref", "quick", reference=True), fake("quick", "quick"),
             fake("raises", "raises"), fake("aborts", "aborts"))
    data = run_race(RaceOptions(config="tiny", rounds=2, warmup=1, runs=2, json=str(path),
                                only=("quick", "raises", "aborts"), gemm_floor=False,
                                quiet=True, timeout_s=300),
                    table, reader=proc.reader(),
                    sleep=lambda s: proc.advance(s, own=0.0, others=1.5))
    return data, path


def _by_name_c() -> dict[str, Contestant]:
    return {c.name: c for c in CONTESTANTS}


def _by_name(data: dict) -> dict[str, dict]:
    return {c["name"]: c for c in data["contestants"]}


# -- the table of contestants and the small pieces ---------------------------------------------

def test_the_contestant_table():
    names = [c.name for c in CONTESTANTS]
    assert len(set(names)) == len(names)
    assert [c.name for c in CONTESTANTS if c.reference] == ["ours-ref-fp32"] == names[:1]
    assert set(BUILDERS) == set(KINDS)
    mixed = _by_name({"contestants": [c.to_dict() for c in CONTESTANTS]})["ours-mixed"]
    assert mixed["fast"] == {"gemm_dtype": "bf16"} and mixed["dtype"] == "float32"
    assert Contestant.from_dict(CONTESTANTS[3].to_dict()) == CONTESTANTS[3]
    assert CONTESTANTS[3].needs_bf16 and not CONTESTANTS[1].needs_bf16
    assert {c.export for c in CONTESTANTS} == {None, "openvino", "onnx"}
    with pytest.raises(ValueError, match="kind must be one of"):
        Contestant("x", "bogus", "x")
    with pytest.raises(ValueError, match="unknown contestant 'nope'.*ours-ref-fp32"):
        select(CONTESTANTS, ["nope"], None)
    assert [c.name for c in select(CONTESTANTS, ["ours-fast-bf16", "ours-ref-fp32"],
                                   None)] == ["ours-ref-fp32", "ours-fast-bf16"]


def test_bf16_contestants_are_skipped_without_bf16_arithmetic(monkeypatch):
    from depthpro_fast import cpu
    from depthpro_fast.bench import race_contestants

    no_bf16 = cpu.CpuFeatures("AVX2", False, False, "this CPU (AVX2) has no AVX512_BF16", "x")
    monkeypatch.setattr(cpu, "cpu_features", lambda: no_bf16)
    cfg = resolve_config("tiny")
    by_name = {c.name: race_contestants.why_not(c, cfg) for c in CONTESTANTS}
    assert "AVX512_BF16" in by_name["ours-fast-bf16"] and "AVX512_BF16" in by_name["ours-mixed"]
    assert by_name["ours-fast-fp32"] is None and by_name["ours-default"] is None
    # the software first: transformers in bf16 is skipped for not being installed (here)
    assert by_name["transformers-bf16"] == why_not(_by_name_c()["transformers-bf16"], cfg)
    if importlib.util.find_spec("transformers") is None:
        assert "transformers is not installed" in by_name["transformers-bf16"]


def test_rounds_interleave_forward_then_reversed():
    names = ["a", "b", "c"]
    assert [round_order(names, r) for r in (1, 2, 3, 4)] == [
        ["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"], ["c", "b", "a"]]
    race = Race(RaceOptions(config="tiny", quiet=True))
    assert race.rounds == 3 and race.timeout_s == 900.0  # tiny: 3 rounds by default
    assert json_path_for("out/", "tiny").startswith("out/") and json_path_for("x.json", "t") == \
        "x.json"


def test_verdict_from_an_injected_proc():
    proc = FakeProc()
    idle_probe = ml.probe(proc.reader(), 2.0, sleep=lambda s: proc.advance(s, others=0.05))
    idle_runs = [proc.span(5.0, own=1.95, others=0.05) for _ in range(2)]
    v = verdict(idle_probe, idle_runs)
    assert v["verdict"] == "idle" and v["reasons"] == [] and v["runs_judged"] == 2
    busy_run = proc.span(5.0, own=0.8, others=1.2)
    v = verdict(idle_probe, [*idle_runs, busy_run])
    assert v["verdict"] == NOT_IDLE and v["runs_shared"] == 1
    assert v["reasons"] == ["1 of 3 timed runs shared (others used 1.2 of 2 cores)"]
    busy_probe = ml.probe(proc.reader(), 2.0, sleep=lambda s: proc.advance(s, others=1.0))
    v = verdict(busy_probe, idle_runs)
    assert v["verdict"] == NOT_IDLE and v["reasons"][0].startswith("before the race: others")
    assert verdict(None, [])["verdict"] == "unknown"


# -- a real race from the command line -------------------------------------------------------

def test_race_json_schema(cli_race):
    rc, printed, data, path = cli_race
    assert rc == 0 and data["schema"] == SCHEMA and data["partial"] is False
    env = data["environment"]
    assert env["cpu"] == cpu_name() and set(env["cpu_flags"]) == {"AVX2", "AVX-512",
                                                                 "AVX512_BF16", "AMX"}
    for key in ("torch", "openvino", "onnxruntime", "transformers", "commit", "date"):
        assert key in env
    s = data["settings"]
    assert (s["rounds"], s["runs"], s["warmup"], s["seed"]) == (1, 1, 0, 0)
    assert s["threads"] == torch.get_num_threads()
    assert data["order"][0][:2] == ["ours-ref-fp32", "ours-fast-fp32"]
    assert data["config"]["name"] == "tiny" and data["flops_per_image"] > 1e11
    for rec in data["contestants"]:
        if rec["status"] == "skipped":  # (bf16 on a CPU without bf16 arithmetic)
            assert rec["name"] == "ours-fast-bf16" and not cpu_features().bf16
            continue
        assert rec["status"] == "ok" and len(rec["rounds"]) == 1
        assert [r["round"] for r in rec["rounds"]] == [1]
        assert len(rec["runs_s"]) == 1 and rec["min_s"] <= rec["median_s"] <= rec["max_s"]
        assert rec["spread_pct"] == 0.0
        assert rec["first_call_s"] > 0 and rec["peak_rss_bytes"] > 100 * 2**20
        assert len(rec["first_call_by_round_s"]) == 1 and rec["speedup"] > 0
        for r in rec["rounds"]:
            assert r["child_wall_s"] > r["runs_s"][0] and len(r["loads"]) == 1
            assert r["loads"][0]["state"] in ("idle", "shared", "unknown")
        assert rec["machine_load"]["wall_s"] == pytest.approx(sum(rec["runs_s"]), rel=0.05)
    assert data["machine"]["verdict"] in ("idle", NOT_IDLE)
    assert data["machine"]["probe"]["wall_s"] >= 1.9
    floor = data["gemm_floor"]
    assert floor["rows"] == 577 and floor["floor_s"]["fp32"] > 0
    assert ("bf16" in floor["floor_s"]) == cpu_features().bf16
    assert {r["best"] for r in floor["rates"]["fp32"]["shapes"]} <= {"F.linear",
                                                                     "onednn-prepacked"}
    # the printed table is the file's table
    assert markdown(data) in printed and f"wrote {path}" in printed
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temporary files


def test_fast_fp32_matches_the_reference_and_bf16_is_plausible(cli_race):
    _, _, data, _ = cli_race
    by = _by_name(data)
    assert by["ours-fast-fp32"]["mare"] < 1e-5 and by["ours-fast-fp32"]["fov_err_deg"] < 1e-3
    ref = by["ours-ref-fp32"]
    assert ref["rounds"][0]["wrote_reference"] and ref["speedup"] == 1.0
    assert ref["mare"] == 0.0  # (its own output, read back from the file)
    assert data["reference"]["source"] == "the reference contestant, round 1"
    assert by["ours-fast-fp32"]["info"]["fast"] is not None and ref["info"]["fast"] is None
    bf16 = by["ours-fast-bf16"]
    if cpu_features().bf16:
        # plausible: well above fp32 rounding, within the bf16 budget
        assert 1e-5 < bf16["mare"] < MARE_BUDGET[torch.bfloat16], bf16["mare"]
        assert bf16["info"]["dtype"] == "bfloat16"
    else:
        assert bf16["status"] == "skipped" and "bf16" in bf16["reason"]


@pytest.mark.skipif(not OPENVINO, reason="openvino not installed")
def test_openvino_runs_the_race_export(cli_race):
    _, printed, data, _ = cli_race
    ov = _by_name(data)["openvino-f32"]
    assert ov["status"] == "ok" and ov["info"]["compiled_precision"] == "f32"
    assert ov["info"]["precision_hint"] == "f32"
    assert ov["mare"] < 1e-4 and ov["fov_err_deg"] < 1e-2
    export = data["exports"]["openvino"]
    assert export["status"] == "ok" and export["seconds"] > 0 and export["bytes"] > 1e6
    assert "openvino export (once for the race" in printed


# -- failures, the verdict and the table with fakes ---------------------------------------------

def test_failing_and_crashing_contestants_are_recorded_and_the_race_goes_on(fake_race):
    data, _ = fake_race
    assert data["order"] == [["quick", "raises", "aborts"], ["aborts", "raises", "quick"]]
    by = _by_name(data)
    quick = by["quick"]  # ran after the crashes of round 2 as well
    assert quick["status"] == "ok" and len(quick["runs_s"]) == 4
    assert [r["position"] for r in quick["rounds"]] == [1, 3]
    assert [r["position"] for r in by["aborts"]["rounds"]] == [3, 1]
    assert quick["info"] == {"fake": "quick"}
    raised = by["raises"]
    assert raised["status"] == "failed" and len(raised["rounds"]) == 2
    assert all("deliberate failure while building" in r["error"] and r["exit_code"] == 1
               for r in raised["rounds"])
    crashed = by["aborts"]
    assert crashed["status"] == "failed"
    for r in crashed["rounds"]:
        assert r["error"] == "crashed (killed by signal 6) without a result"
        assert "about to abort" in r["output_tail"]
    # the reference was left out by only=: computed once, before the rounds
    assert data["reference"]["source"].startswith("computed once")
    assert data["reference"]["contestant"] == "fake-ref" and data["reference"]["status"] == "ok"
    assert quick["mare"] == 0.0 and quick["fov_err_deg"] == 0.0


def test_a_busy_machine_gives_the_not_idle_verdict(fake_race):
    data, path = fake_race
    m = data["machine"]
    assert m["verdict"] == NOT_IDLE
    assert m["reasons"][0] == "before the race: others used 1.5 of 2 cores"
    assert m["probe"]["others_cores"] == pytest.approx(1.5)
    assert "**machine NOT IDLE: timings not comparable**" in markdown(data)
    assert json.loads(path.read_text()) == json.loads(json.dumps(data))


def test_the_table_names_the_machine_and_the_failures(fake_race, tmp_path):
    data, path = fake_race
    text = markdown(data)
    assert f"CPU: {cpu_name()}, {torch.get_num_threads()} threads" in text
    assert "AVX2 " in text and "AVX512_BF16 " in text and "AMX " in text
    assert f"torch {torch.__version__}" in text and "commit `" in text
    assert "| quick | fake quick" in text and "| raises |" not in text
    assert "failed raises round 1: RuntimeError: deliberate failure while building" in text
    assert "failed aborts round 2: crashed (killed by signal 6)" in text
    # bench/make_table.py --race makes the same block, and puts it between its markers
    script = REPO / "bench" / "make_table.py"
    out = subprocess.run([sys.executable, str(script), "--race", str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == text.strip()
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- race-table:start -->\nold\n<!-- race-table:end -->\nb\n")
    subprocess.run([sys.executable, str(script), "--race", str(path), "--readme", str(readme)],
                   check=True, capture_output=True)
    assert readme.read_text() == f"a\n<!-- race-table:start -->\n{text.strip()}\n" \
                                 "<!-- race-table:end -->\nb\n"


def test_a_child_past_its_time_limit_is_killed(child_env):
    data = run_race(RaceOptions(config="tiny", rounds=1, gemm_floor=False, quiet=True,
                                timeout_s=2.0, probe_s=0.1), (fake("hangs", "hangs"),))
    rec = data["contestants"][0]
    assert rec["status"] == "failed"
    error = rec["rounds"][0]["error"]
    assert error.startswith("no result within the time limit") and error.endswith("killed")
    assert rec["rounds"][0]["child_wall_s"] < 30
