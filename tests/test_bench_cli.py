"""``depthpro-fast bench`` and the timing machinery (CPU, tiny config: a few forwards)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from depthpro_fast.api import load
from depthpro_fast.bench.results import SCHEMA
from depthpro_fast.bench.runner import RowResult, Runner
from depthpro_fast.bench.stages import STAGE_NAMES, staged_forward
from depthpro_fast.bench.tables import format_table
from depthpro_fast.bench.timing import Stats, dtype_name, random_inputs, time_callable
from depthpro_fast.bench.variants import Variant, default_variants
from depthpro_fast.cli import main
from depthpro_fast.config import IMG_SIZE, OFFICIAL, resolve_config
from depthpro_fast.flops import count_flops

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
MICRO = {"embed_dim": 64, "depth": 2, "num_heads": 1, "mlp_ratio": 2.0,
         "encoder_feature_layer_ids": [0, 1], "encoder_feature_dims": [8, 16, 32, 64],
         "decoder_features": 16, "use_fov": True}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One CLI run shared by the tests below: its stdout, exit code and JSON.

    The model is a config file of knobs smaller than the tiny preset (a quarter of its FLOPs:
    the run is CPU-bound) with the same structure."""
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "results.json"
    (folder / "micro.json").write_text(json.dumps(MICRO))
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["bench", "--config", str(folder / "micro.json"), "--runs", "2", "--warmup",
                   "0", "--stages",
                   "--quiet", "--json", str(out)])
    return rc, buf.getvalue(), json.loads(out.read_text()), out


def test_cli_prints_the_table(bench_run):
    rc, text, _, _ = bench_run
    assert rc == 0
    assert "median ms" in text and "speed-up" in text and "% floor" in text
    assert "reference eager" in text and "fast engine" in text and "MARE" in text
    # unavailable backends are rows with a reason, not crashes
    assert "fast cuda" in text and "skipped" in text
    assert "GPU numbers" in text and "need a GPU" in text
    assert "patch encoder" in text and "decoder" in text  # --stages
    # the fp32 reference is true fp32 and says so; the first-call column and its meaning
    ref_line = next(line for line in text.splitlines() if line.startswith("reference eager"))
    assert "TF32 off" in ref_line
    assert "1st call c/w" in text and "1st call cold/warm: time to first depth map" in text
    engine_line = next(line for line in text.splitlines() if line.startswith("fast engine "))
    assert re.search(r"\d+\.\d\d/\d+\.\d\d s", engine_line), engine_line
    # how much CPU each row got, and the machine's state under the table (this machine may be
    # idle or shared: either line, never none)
    assert "CPU got" in text.splitlines()[text.splitlines().index(ref_line) - 2]
    assert re.search(r"\d+ %", ref_line), ref_line
    assert ("WARNING: the machine was shared: others used" in text
            or re.search(r"machine: idle \(others \d\.\d\d of \d+ cores", text)), text


def test_cli_json_fields(bench_run):
    _, _, data, _ = bench_run
    assert data["schema"] == SCHEMA
    env = data["environment"]
    for key in ("date", "device", "torch", "torch_cuda", "triton", "commit", "python"):
        assert key in env
    assert data["config"]["name"] == "micro.json"
    assert data["config"]["embed_dim"] == MICRO["embed_dim"]
    assert data["flops_per_image"] == count_flops(resolve_config(MICRO)).per_image
    assert data["peak_matmul"]["tflops"] > 0
    assert data["settings"]["runs"] == 2
    rows = {(r["name"], r["dtype"]): r for r in data["rows"]}
    ref = rows[("reference eager", "fp32")]
    assert ref["status"] == "ok"
    assert ref["runs"] == 2 and len(ref["times_ms"]) == 2
    assert ref["min_ms"] <= ref["median_ms"] <= ref["max_ms"]
    assert ref["speedup"] == pytest.approx(1.0)
    assert 0 < ref["pct_floor"]
    assert ref["images_per_s"] == pytest.approx(1e3 / ref["median_ms"])
    assert set(ref["stages"]) == set(STAGE_NAMES) | {"total"}
    cuda_row = rows[("fast cuda", "fp32")]
    assert cuda_row["status"] == "skipped" and cuda_row["reason"]
    # the whole fast path runs on a CPU too (folds, fused epilogue ops, channels_last), and its
    # accuracy against the fp32 reference (same seeded weights) is in the row
    engine = rows[("fast engine", "fp32")]
    assert engine["status"] == "ok", engine["reason"]
    assert ref["mare_vs_fp32_reference"] == 0.0 and ref["fov_abs_err_deg"] == 0.0
    assert 0 <= engine["mare_vs_fp32_reference"] < 1e-5
    assert engine["fov_abs_err_deg"] < 1e-3
    assert engine["engine"]["folds"] and "options" in engine["engine"]
    assert rows[("fast engine + CUDA graph", "fp32")]["status"] == "skipped"
    # TF32: off in the fp32 reference row; the other rows run under torch's defaults
    assert ref["tf32"] == "off" and engine["tf32"] != "off"
    assert "TF32 off" in data["settings"]["fp32_reference"]
    # the first call (default: the fast engine row on a CPU): cold in a new process, warm a
    # second fresh model there; the other rows are not measured
    assert engine["first_call_cold_ms"] > 0 and engine["first_call_warm_ms"] > 0
    assert ref["first_call_cold_ms"] is None and "first_call_error" not in engine
    first = data["settings"]["first_call"]
    assert first["rows"] == "default" and first["disk_caches"] == "as found"
    assert "new process" in first["meaning"]
    # what the machine gave: per row and for the run
    load = ref["machine_load"]
    assert load["threads"] == torch.get_num_threads() and load["wall_s"] > 0
    assert 0 < load["cpu_got"] and load["others_cores"] >= 0 and load["state"] in (
        "idle", "shared", "unknown")
    run = data["machine_load"]
    assert run["state"] in ("idle", "shared") and run["thresholds"]["steal_pct"] == 2.0
    assert run["before"]["wall_s"] >= 0.9 and run["run"]["wall_s"] > run["rows"]["wall_s"]
    assert (run["warning"] is None) == (run["state"] == "idle")


def test_make_table(bench_run, tmp_path):
    _, _, _, path = bench_run
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench-table:start -->\nold\n<!-- bench-table:end -->\nend\n")
    script = REPO / "bench" / "make_table.py"
    out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True,
                         text=True, check=True).stdout
    assert "| reference eager | fp32 | 1 |" in out
    assert "CPU" in out and "commit" in out  # which device and when
    # the machine and its state during the timed rows (idle or shared, whichever it was)
    assert re.search(r"; (machine idle|\*\*machine shared\*\*) during the timed rows \("
                     r"others used \d\.\d\d of \d+ cores", out), out
    assert "| CPU got |" in out
    subprocess.run([sys.executable, str(script), str(path), "--readme", str(readme)],
                   check=True, capture_output=True)
    text = readme.read_text()
    assert "old" not in text and "| reference eager |" in text and text.endswith("end\n")


def test_staged_forward_is_the_forward():
    """The stage runner must compute exactly what DepthPro.forward computes."""
    torch.manual_seed(0)
    model, _ = load(None, config=MICRO, device="cpu", backend="reference")
    x = random_inputs((1, 3, IMG_SIZE, IMG_SIZE), count=1, device=CPU,
                         dtype=torch.float32)[0]
    seen = []
    with torch.no_grad():
        depth, fov = model(x)
        depth_s, fov_s = staged_forward(model, x, seen.append)
    assert seen == list(STAGE_NAMES)
    assert torch.equal(depth, depth_s) and torch.equal(fov, fov_s)


@pytest.mark.parametrize("native, rates, want", [
    (True, {"fp32": 0.3, "bf16": 1.8}, "bf16"),   # an AMX CPU: the bf16 rate sets the floor
    (True, {"fp32": 0.3, "bf16": 0.2}, "fp32"),   # bf16 slower: the fp32 rate stays
    (False, {"fp32": 0.3, "bf16": 9.9}, "fp32"),  # no bf16 arithmetic: bf16 not measured
    (None, {"fp32": 0.3, "bf16": 9.9}, "fp32"),   # unknown CPU: no claim
])
def test_floor_peak_on_a_cpu(monkeypatch, native, rates, want):
    from depthpro_fast import api
    from depthpro_fast.bench import timing

    asked = []

    def fake_peak(device, dtype=None, n=None, runs=None):
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        asked.append(name)
        return {"tflops": rates[name], "dtype": name, "n": 2048, "median_ms": 1.0}

    monkeypatch.setattr(api, "cpu_has_native", lambda dtype: native)
    monkeypatch.setattr(timing, "peak_matmul_tflops", fake_peak)
    floor, fp32 = timing.floor_peak(CPU)
    assert floor["dtype"] == want and fp32["dtype"] == "fp32"
    assert asked == (["fp32", "bf16"] if native else ["fp32"])


def test_time_callable_and_stats():
    calls = []
    inputs = random_inputs((4,), count=3, device=CPU, dtype=torch.float32)
    assert all((t != 0).all() for t in inputs)  # never zeros
    assert not torch.equal(inputs[0], inputs[1])
    device_stats, host_stats = time_callable(calls.append, inputs, warmup=2, runs=5,
                                                device=CPU)
    assert len(calls) == 7 and device_stats.runs == 5 and host_stats.runs == 5
    assert calls[2] is inputs[2] and calls[3] is inputs[0]  # rotation
    s = Stats([3.0, 1.0, 2.0])
    assert (s.median, s.min, s.max) == (2.0, 1.0, 3.0)
    with pytest.raises(ValueError):
        time_callable(calls.append, inputs, warmup=0, runs=0, device=CPU)


def test_default_variants():
    cpu = default_variants(CPU)
    assert [v.name for v in cpu] == [
        "reference eager", "reference torch.compile", "fast auto", "fast triton", "fast cuda",
        "fast auto + CUDA graph", "fast engine", "fast engine + CUDA graph",
        "transformers DepthPro", "onnxruntime", "openvino", "openvino", "fast engine",
        "fast engine + CUDA graph", "fast engine", "fast engine"]
    assert [v.dtype_label for v in cpu[-6:]] == ["fp32", "bf16", "fp8", "fp8", "bf16",
                                                 "bf16-mixed"]
    assert {v.dtype for v in cpu[:-5]} == {torch.float32} and cpu[-2].dtype == torch.bfloat16
    # bf16-mixed: the fp32 model with bf16 GEMM inputs; CPU only, and only when asked for
    # once dtypes are named
    assert cpu[-1].dtype == torch.float32 and cpu[-1].gemm_dtype == "bf16"
    assert not any(v.gemm_dtype for v in default_variants(torch.device("cuda")))
    named = default_variants(CPU, dtypes=[], bf16_mixed=True, fp8=False, compile=False,
                             hf=False, onnxruntime=False, openvino=False)
    assert [v.dtype_label for v in named] == ["bf16-mixed"]
    gpu = default_variants(torch.device("cuda"))  # a plan only: nothing touches CUDA
    names = [(v.name, dtype_name(v.dtype)) for v in gpu]
    for expected in [("reference eager", "fp32"), ("reference eager", "bf16"),
                     ("reference eager", "fp16"), ("reference torch.compile", "bf16"),
                     ("fast auto", "bf16"), ("fast triton", "bf16"), ("fast cuda", "bf16"),
                     ("fast auto + CUDA graph", "bf16"), ("fast engine", "bf16"),
                     ("fast engine + CUDA graph", "bf16"), ("transformers DepthPro", "bf16"),
                     ("onnxruntime", "fp16"), ("fast engine", "fp16"),
                     ("fast engine + CUDA graph", "fp16")]:
        assert expected in names
    # fp16 beside bf16 for the fast engine only, within the GPU check's budget
    assert {n for n, d in names if d == "fp16" and n.startswith("fast")} == {
        "fast engine", "fast engine + CUDA graph"}
    assert [(v.name, v.dtype_label) for v in gpu if v.fp8] == [
        ("fast engine", "fp8"), ("fast engine + CUDA graph", "fp8")]
    only = default_variants(torch.device("cuda"), dtypes=[torch.bfloat16], compile=False,
                               hf=False, cuda_graph=False, onnxruntime=False)
    assert {v.dtype for v in only} == {torch.bfloat16} and all(v.mode == "eager" for v in only)
    assert "onnxruntime" not in [v.name for v in only]


def test_failing_row_does_not_stop_the_others(monkeypatch):
    runner = Runner(OFFICIAL, CPU, batches=[1], runs=1, warmup=0)

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(runner, "_callable", broken)
    monkeypatch.setattr(runner, "model", lambda dtype: None)
    monkeypatch.setattr(runner, "inputs", lambda dtype, batch: [])
    row = runner.run_row(Variant("reference", torch.float32), 1)
    assert row.status == "failed" and "kernel exploded" in row.reason
    graph = runner.run_row(Variant("fast", torch.float32, "auto", "cudagraph"), 1)
    assert graph.status == "skipped"
    hf = Variant("hf", torch.float32, "-")
    table = format_table([row, graph, RowResult(hf, 1, "skipped", "not installed")])
    assert "failed: RuntimeError: kernel exploded" in table and "not installed" in table


def test_onnxruntime_row_beside_the_reference():
    """The onnxruntime row on a CPU: listed but skipped (saying how to run it) unless opted
    in; opted in, it exports the tiny model, runs it in ONNX Runtime and gets the accuracy
    columns against the fp32 reference row of the same run."""
    pytest.importorskip("onnxruntime")
    from depthpro_fast.config import TINY

    ort_row = Variant("onnxruntime", torch.float32, "-")
    plain = Runner(TINY, CPU, batches=[1], runs=1, warmup=0)
    skipped = plain.run_row(ort_row, 1)
    assert skipped.status == "skipped" and "--onnxruntime" in skipped.reason
    runner = Runner(TINY, CPU, batches=[1], runs=1, warmup=0, cpu_opt_in=["onnxruntime"])
    rows = runner.run([Variant("reference", torch.float32), ort_row])
    ref, row = rows
    assert row.variant.name == "onnxruntime" and row.status == "ok", row.reason
    assert row.mare is not None and row.mare <= 1e-5 and row.fov_err_deg <= 1e-3
    assert row.device.median > 0 and row.peak_mem_bytes > 0


def test_bad_arguments():
    with pytest.raises(SystemExit):
        main(["bench", "--batch", "0"])
    with pytest.raises(SystemExit):
        main(["bench", "--dtype", "fp64"])
    assert main(["bench", "--config", "nope"]) == 1  # clear error, exit code 1


def test_interrupted_run_keeps_what_it_measured(monkeypatch):
    """A time limit (timeout --signal=INT) mid-run: rows done so far are kept and saved."""
    runner = Runner(OFFICIAL, CPU, batches=[1], runs=1, warmup=0)
    variants = [Variant("reference", torch.float32),
                Variant("reference", torch.float32, mode="compile"),
                Variant("engine", torch.float32, "auto")]
    ran, saved = [], []

    def fake_row(v, batch):
        ran.append(v.name)
        if len(ran) == 3:
            raise KeyboardInterrupt
        return RowResult(v, batch, "ok", device=Stats([5.0]), host=Stats([5.0]))

    monkeypatch.setattr(runner, "run_row", fake_row)
    rows = runner.run(variants, on_row=lambda rs: saved.append([r.variant.name for r in rs]))
    assert runner.interrupted
    # torch.compile rows run last in their dtype group (a slow compile must not cost the rest)
    assert ran == ["reference eager", "fast engine", "reference torch.compile"]
    assert [r.variant.name for r in rows] == [v.name for v in variants]  # table order
    assert [r.status for r in rows] == ["ok", "skipped", "ok"]
    assert "interrupted" in rows[1].reason
    assert saved == [["reference eager"], ["reference eager", "fast engine"]]


def test_fp32_reference_rows_run_with_tf32_off(monkeypatch):
    """cuDNN's TF32 is on by default: the fp32 reference rows turn TF32 off (cuBLAS and cuDNN)
    while they run, and put the flags back afterwards; the other rows keep the defaults."""
    from depthpro_fast import model as model_mod

    seen: list[tuple[str, bool, bool]] = []
    forward = model_mod.DepthPro.forward
    current = {"row": "?"}

    def spy(self, *args, **kwargs):
        seen.append((current["row"], torch.backends.cuda.matmul.allow_tf32,
                     torch.backends.cudnn.allow_tf32))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(model_mod.DepthPro, "forward", spy)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    runner = Runner(resolve_config(MICRO), CPU, batches=[1], runs=1, warmup=1)
    rows = []
    for v in (Variant("reference", torch.float32), Variant("engine", torch.float32, "auto"),
              Variant("reference", torch.bfloat16)):
        current["row"] = f"{v.name} {v.dtype_label}"
        rows.append(runner.run_row(v, 1))
    assert [r.status for r in rows] == ["ok", "ok", "ok"], [r.reason for r in rows]
    by_row: dict[str, set] = {}
    for row, matmul, cudnn in seen:
        by_row.setdefault(row, set()).add((matmul, cudnn))
    assert by_row["reference eager fp32"] == {(False, False)}
    assert by_row["fast engine fp32"] == {(True, True)}
    assert by_row["reference eager bf16"] == {(True, True)}
    assert [r.tf32 for r in rows] == ["off", "on", "on"]
    # restored after the row
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    table = format_table(rows)
    assert "TF32 off" in table.splitlines()[2] and "TF32 off" not in table.splitlines()[3]


def test_first_call_rows_and_failures():
    """Which rows get the first-call column, and a failing measurement is reported, not fatal."""
    from depthpro_fast.bench import first_call

    ok = Stats([1.0])

    def row(v):
        return RowResult(v, 1, "ok", device=ok, host=ok)

    ref = row(Variant("reference", torch.float32))
    engine = row(Variant("engine", torch.bfloat16, "auto"))
    graph = row(Variant("engine", torch.bfloat16, "auto", "cudagraph"))
    fp8_graph = row(Variant("engine", torch.bfloat16, "auto", "cudagraph", fp8=True))
    hf = row(Variant("hf", torch.bfloat16, "-"))
    skipped = RowResult(Variant("engine", torch.float16, "auto"), 1, "skipped", "no")
    rows = [ref, engine, fp8_graph, graph, hf, skipped]
    assert first_call.select_rows(rows, "default", gpu=True) == [graph]
    assert first_call.select_rows(rows, "default", gpu=False) == [engine]
    assert first_call.select_rows(rows, "engine", gpu=True) == [engine, fp8_graph, graph]
    assert first_call.select_rows(rows, "all", gpu=True) == [ref, engine, fp8_graph, graph]
    assert first_call.select_rows(rows, "none", gpu=True) == []
    with pytest.raises(ValueError, match="accepted: default, engine, all, none"):
        first_call.select_rows(rows, "some", gpu=True)

    calls = []

    def fake_run(config, device, v, batch, *, seed, empty_disk_caches):
        calls.append((config, v.name, v.dtype_label, empty_disk_caches))
        if v.fp8:
            raise first_call.FirstCallError("exit 1: boom")
        return {"cold_ms": 2500.0, "warm_ms": 300.0}

    assert first_call.fill(rows, "engine", config="tiny", device=CPU, run=fake_run,
                           empty_disk_caches=True)
    assert [c[1:3] for c in calls] == [("fast engine", "bf16"),
                                       ("fast engine + CUDA graph", "fp8"),
                                       ("fast engine + CUDA graph", "bf16")]
    assert all(c[0] == "tiny" and c[3] for c in calls)
    assert (graph.first_call_cold_ms, graph.first_call_warm_ms) == (2500.0, 300.0)
    assert fp8_graph.first_call_cold_ms is None and "boom" in fp8_graph.first_call_error
    table = format_table(rows)
    assert "2.50/0.30 s" in table and "failed" in table
    assert graph.to_dict()["first_call_cold_ms"] == 2500.0
    assert fp8_graph.to_dict()["first_call_error"].endswith("boom")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    assert not first_call.fill([ref], "all", config="tiny", device=CPU, run=interrupted)
    assert ref.first_call_error == "interrupted"


def test_first_call_process_reports_cold_and_warm(tmp_path):
    """The first-call process itself (a new Python process, two fresh models)."""
    from depthpro_fast.bench import first_call

    cfg = tmp_path / "micro.json"
    cfg.write_text(json.dumps(MICRO))
    out = first_call.in_subprocess(str(cfg), CPU, Variant("reference", torch.float32), 1,
                                   empty_disk_caches=True)
    assert out["cold_ms"] > 0 and out["warm_ms"] > 0 and out["row"] == "reference eager"
    with pytest.raises(first_call.FirstCallError, match="exit 2"):
        first_call.in_subprocess("tiny", CPU, Variant("hf", torch.float32, "-"), 1)


def test_engine_rows_first(monkeypatch):
    """--engine-first: the fast engine's rows are timed before the others (the table keeps its
    order), so a run cut by a time limit keeps the throughput rows."""
    variants = [Variant("reference", torch.bfloat16), Variant("fast", torch.bfloat16, "auto"),
                Variant("engine", torch.bfloat16, "auto"),
                Variant("engine", torch.bfloat16, "auto", "cudagraph")]
    for engine_first, want in ((False, [v.name for v in variants]),
                               (True, ["fast engine", "fast engine + CUDA graph",
                                       "reference eager", "fast auto"])):
        runner = Runner(OFFICIAL, CPU, batches=[8], runs=1, warmup=0,
                        engine_first=engine_first)
        ran = []

        def fake_row(v, batch, ran=ran):
            ran.append(v.name)
            return RowResult(v, batch, "ok", device=Stats([5.0]), host=Stats([5.0]))

        monkeypatch.setattr(runner, "run_row", fake_row)
        rows = runner.run(variants)
        assert ran == want
        assert [r.variant.name for r in rows] == [v.name for v in variants]


def test_bf16_mixed_row_runs_with_fp32_level_accuracy(tmp_path):
    """``--dtype bf16-mixed``: the fast engine's fp32 model with bf16 GEMM / conv inputs, timed
    beside the fp32 reference; its error is far below bf16's and its JSON row says the mode."""
    from depthpro_fast.cpu import cpu_features

    (tmp_path / "micro.json").write_text(json.dumps(MICRO))
    out = tmp_path / "r.json"
    rc = main(["bench", "--config", str(tmp_path / "micro.json"), "--dtype", "fp32",
               "bf16-mixed", "--runs", "1", "--warmup", "0", "--backends", "auto",
               "--no-compile", "--no-openvino", "--no-onnxruntime", "--quiet",
               "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    mixed = [r for r in rows if r["dtype"] == "bf16-mixed"]
    assert len(mixed) == 1
    if not cpu_features().bf16:  # emulated bf16 here: skipped, saying why
        assert mixed[0]["status"] == "skipped"
        assert "bf16-mixed times it anyway" in mixed[0]["reason"]
        return
    assert mixed[0]["status"] == "ok", mixed[0]["reason"]
    assert 0 < mixed[0]["mare_vs_fp32_reference"] < 1e-3
    with pytest.raises(SystemExit, match="precision mode of the whole model"):
        main(["bench", "--micro", "--dtype", "bf16-mixed"])
