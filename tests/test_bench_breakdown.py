"""``depthpro-fast bench --breakdown`` (``depthpro_fast/bench/breakdown*.py``): where one forward's
time goes, per category and stage, against a floor (CPU; tiny configs, a few forwards)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from depthpro_fast import dataflow
from depthpro_fast.api import load
from depthpro_fast.bench import breakdown_floor
from depthpro_fast.bench.breakdown import (
    SCHEMA,
    aggregate,
    breakdown,
    format_breakdown,
    profile_forward,
)
from depthpro_fast.bench.breakdown_categories import CATEGORIES, VIT_STAGES, classify
from depthpro_fast.bench.breakdown_events import Event, bytes_moved, flops
from depthpro_fast.bench.breakdown_floor import Floor, measure_floor
from depthpro_fast.bench.breakdown_scopes import ROOT, labels
from depthpro_fast.bench.timing import random_inputs
from depthpro_fast.bench.variants import Variant, default_variants, fast_options_key
from depthpro_fast.cli import main
from depthpro_fast.config import IMG_SIZE, resolve_config
from depthpro_fast.fast.cpu_gemm import onednn_linear_available
from depthpro_fast.flops import count_flops

CPU = torch.device("cpu")
# the tiny preset's structure at a quarter of its FLOPs (as tests/test_bench_cli.py)
MICRO = {"embed_dim": 64, "depth": 2, "num_heads": 1, "mlp_ratio": 2.0,
         "encoder_feature_layer_ids": [0, 1], "encoder_feature_dims": [8, 16, 32, 64],
         "decoder_features": 16, "use_fov": True}
#: made-up rates: the tests check the arithmetic, not this machine
FLOOR = Floor({"float": 100.0, "c10::BFloat16": 400.0}, {"float": 50.0, "c10::BFloat16": 200.0},
              10.0, {"runs": 1})
VIT_STAGE_NAMES = ("patch encoder", "image encoder", "FOV encoder")


def _forward(model):
    def fn(x):
        with torch.no_grad():
            return model(x)
    return fn


def _model(options=None, backend="reference"):
    torch.manual_seed(0)
    model, _ = load(None, config=resolve_config(MICRO), device="cpu", dtype=torch.float32,
                    backend=backend)
    if options is not None:
        model.set_backend("auto")
        model.prepare_fast({"cuda_graphs": False, **options})
    return model


def _input():
    return random_inputs((1, 3, IMG_SIZE, IMG_SIZE), count=1, device=CPU, dtype=torch.float32)


@pytest.fixture(scope="module")
def engine_run():
    """The fast engine in fp32 on the micro config: (model, inputs, its breakdown)."""
    model = _model({})
    x = _input()
    profiled = profile_forward(_forward(model), model, x, warmup=1, unprofiled=0)
    return model, x, breakdown(profiled, FLOOR, row={"name": "fast engine", "dtype": "fp32"},
                               expected_flops=count_flops(MICRO).by_stage())


def _category(data, key):
    return next((r for r in data["categories"] if r["key"] == key), None)


def _stage(data, name):
    return next(s for s in data["stages"] if s["stage"] == name)


# -- the whole forward --------------------------------------------------------------------------

def test_categories_add_up_to_the_forward(engine_run):
    _, _, data = engine_run
    wall = data["wall_ms"]
    assert data["categories_ms"] == pytest.approx(sum(r["time_ms"] for r in data["categories"]))
    assert data["categories_ms"] == pytest.approx(data["profiled_ms"], rel=1e-6)
    # the wall clock around the profiled forward saw at most a few % more than the categories
    assert 0 <= data["unaccounted_ms"] <= 0.05 * wall, data["unaccounted_ms"]
    assert sum(s["time_ms"] for s in data["stages"]) == pytest.approx(data["categories_ms"])
    keys = {r["key"] for r in data["categories"]}
    assert {"vit_gemm", "attention", "vit_elementwise", "conv", "split", "merge",
            "python"} <= keys, keys
    gaps = [r["gap_ms"] for r in data["categories"]]
    assert gaps == sorted(gaps, reverse=True)
    gemm = _category(data, "vit_gemm")
    assert gemm["floor_ms"] == pytest.approx(gemm["flops"] / 100e9 * 1e3)
    assert gemm["gap_ms"] == pytest.approx(gemm["time_ms"] - gemm["floor_ms"])
    conv = _category(data, "conv")  # which ops the time went to
    assert conv["top_ops"][0]["op"] == "aten::conv2d"
    assert sum(o["calls"] for o in conv["top_ops"]) <= conv["ops"]
    merge = _category(data, "merge")  # a labelled op: the ops it ran, and its Python
    assert {o["op"] for o in merge["top_ops"]} & {"(Python in ops.merge_patches)"}
    assert sum(o["time_ms"] for o in merge["top_ops"]) <= merge["time_ms"] + 1e-6
    split = _category(data, "split")  # memory-bound: bytes of the op's input and windows
    assert split["bytes"] >= 4 * 3 * (IMG_SIZE ** 2 + 35 * 384 ** 2)
    assert split["floor_ms"] == pytest.approx(split["bytes"] / 10e9 * 1e3)


def test_vit_flops_from_shapes_match_flops_py(engine_run):
    """The fast engine's ViT GEMMs + attention (+ the patch embedding conv) per ViT stage, from
    the profiler's recorded shapes, are flops.py's count of those modules."""
    _, _, data = engine_run
    for name in VIT_STAGE_NAMES:
        s = _stage(data, name)
        assert s["flops"] == s["flops_expected"] > 0, s
    vit = sum(_stage(data, n)["flops"] for n in VIT_STAGE_NAMES)
    cfg = resolve_config(MICRO)
    e, windows, tokens = cfg.embed_dim, 35 + 1 + 1, 577  # patch, image and FOV encoders
    gemm, attention = _category(data, "vit_gemm")["flops"], _category(data, "attention")["flops"]
    fov_linear = 2 * tokens * e * (cfg.decoder_features // 2)  # FOV's Linear(E, D / 2)
    assert gemm == (8 + 4 * cfg.mlp_ratio) * e * e * tokens * windows * cfg.depth + fov_linear
    assert attention == 4 * tokens * tokens * e * windows * cfg.depth
    patch_embed = 2 * e * 3 * 16 * 16 * 576 * windows  # 16x16 stride-16 convs (conv category)
    assert gemm + attention + patch_embed == vit


def test_reference_flops_on_the_tiny_config_match_flops_py():
    """The reference path on the meta device (shapes only, no arithmetic): every stage's FLOPs
    from the recorded shapes are flops.py's, and the ViT GEMMs are 24 E^2 per token."""
    cfg = resolve_config("tiny")
    from depthpro_fast.api import build_model

    model = build_model(cfg, device="meta").eval()
    model.set_backend("reference")
    x = torch.empty(1, 3, IMG_SIZE, IMG_SIZE, device="meta")
    profiled = profile_forward(_forward(model), model, [x], warmup=0, unprofiled=0)
    data = breakdown(profiled, FLOOR, expected_flops=count_flops(cfg).by_stage())
    for s in data["stages"]:
        if s["flops_expected"] is not None:
            assert s["flops"] == s["flops_expected"], s
    tokens = 577 * (35 + 1 + 1)  # patch, image and FOV encoders
    fov_linear = 2 * 577 * cfg.embed_dim * (cfg.decoder_features // 2)  # Linear(E, D / 2)
    assert _category(data, "vit_gemm")["flops"] == (24 * cfg.embed_dim ** 2 * tokens * cfg.depth
                                                     + fov_linear)
    # the reference attention's matmul-softmax-matmul is the attention category
    assert _category(data, "attention")["flops"] == (4 * 577 * 577 * cfg.embed_dim * 37
                                                     * cfg.depth)


def test_an_injected_copy_shows_up_in_the_copy_category(engine_run, monkeypatch):
    model, x, before = engine_run
    split = dataflow.Stages.split
    monkeypatch.setattr(dataflow.Stages, "split", lambda self, t: split(self, t).clone())
    profiled = profile_forward(_forward(model), model, x, warmup=0, unprofiled=0)
    after = breakdown(profiled, FLOOR)
    windows = 35 * 3 * 384 * 384 * 4  # bytes of the windows the clone copies
    copy_before = _category(before, "copy") or {"bytes": 0, "ops": 0, "time_ms": 0.0}
    copy_after = _category(after, "copy")
    assert copy_after["ops"] == copy_before["ops"] + 1
    assert copy_after["bytes"] - copy_before["bytes"] == 2 * windows  # read + written
    assert copy_after["time_ms"] > copy_before["time_ms"]
    assert _stage(after, "split")["time_ms"] > 0


@pytest.mark.skipif(not onednn_linear_available(torch.bfloat16)[0],
                    reason="this PyTorch has no oneDNN bf16 linear (the mode is refused)")
def test_mixed_mode_casts_and_bf16_gemms():
    """``gemm_dtype='bf16'``: the ViT GEMMs' FLOPs run in bf16 (floor at the bf16 rate), and
    the activation roundings are dtype casts."""
    model = _model({"gemm_dtype": "bf16"})
    profiled = profile_forward(_forward(model), model, _input(), warmup=1, unprofiled=0)
    data = breakdown(profiled, FLOOR, expected_flops=count_flops(MICRO).by_stage())
    gemm = _category(data, "vit_gemm")
    assert gemm["flops_by_dtype"].get("c10::BFloat16", 0) > 0.9 * gemm["flops"]
    bf16, fp32 = gemm["flops_by_dtype"]["c10::BFloat16"], gemm["flops_by_dtype"].get("float", 0)
    assert gemm["floor_ms"] == pytest.approx((bf16 / 400e9 + fp32 / 100e9) * 1e3)
    assert "bf16 gemm 400 GFLOP/s" in gemm["floor_basis"]
    casts = _category(data, "cast")
    assert casts is not None and casts["ops"] > 0 and casts["bytes"] > 0
    for name in VIT_STAGE_NAMES:
        assert _stage(data, name)["flops"] == _stage(data, name)["flops_expected"]


# -- the pieces ---------------------------------------------------------------------------------

def _profiled_ops(fn, counted=None):
    """(our events of what ``fn`` ran, FlopCounterMode's total for ``counted`` or ``fn``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        (counted or fn)()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with record_function(ROOT):
            fn()
    root = next(e for e in prof.events() if e.name == ROOT)
    return Event.from_profiler(root), counter.get_total_flops()


@pytest.mark.parametrize("case", ["conv", "conv_strided", "deconv", "linear", "matmul", "sdpa",
                                  "conv_same", "grouped"])
def test_flops_from_recorded_shapes_match_flop_counter(case):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 17, 19, generator=g)
    fns = {
        "conv": lambda: F.conv2d(x, torch.randn(6, 8, 3, 3), padding=1),
        "conv_strided": lambda: F.conv2d(x, torch.randn(6, 8, 3, 3), stride=2, padding=1,
                                         dilation=1),
        "conv_same": lambda: F.conv2d(x, torch.randn(6, 8, 3, 3), padding="same"),
        "grouped": lambda: F.conv2d(x, torch.randn(8, 4, 3, 3), padding=1, groups=2),
        "deconv": lambda: F.conv_transpose2d(x, torch.randn(8, 5, 2, 2), stride=2),
        "linear": lambda: F.linear(torch.randn(3, 7, 8), torch.randn(5, 8), torch.randn(5)),
        "matmul": lambda: torch.matmul(torch.randn(2, 3, 7, 8), torch.randn(2, 3, 8, 9)),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    q, k, v = (torch.randn(2, 3, 11, 8, generator=g) for _ in range(3))
    # (FlopCounterMode has no formula for SDPA's CPU kernel: it counts the math it computes)
    math_attention = lambda: torch.softmax(q @ k.transpose(-2, -1), -1) @ v  # noqa: E731
    root, expected = _profiled_ops(fns[case], math_attention if case == "sdpa" else None)
    assert expected > 0
    assert flops(root) == expected


def test_classification():
    copy_ = Event("aten::copy_", [[4, 4], [4, 4]], ["c10::BFloat16", "float"])
    cast = Event("aten::to", [[4, 4]], ["float"], children=[
        Event("aten::_to_copy", [[4, 4]], ["float"], children=[
            Event("aten::empty_strided"), copy_])])
    assert classify(cast, "patch encoder") == "cast"
    same = Event("aten::copy_", [[4, 4], [4, 4]], ["float", "float"])
    assert classify(same, "decoder") == "copy"
    assert classify(Event("aten::contiguous", [[4, 4]], ["float"]), "decoder") == "view"
    contiguous = Event("aten::contiguous", [[4, 4]], ["float"],
                       children=[Event("aten::clone", [[4, 4]], ["float"], children=[same])])
    assert classify(contiguous, "decoder") == "copy"
    assert bytes_moved(contiguous) == 2 * 16 * 4
    linear = Event("aten::linear", [[5, 8], [3, 8]], ["float", "float"])
    assert classify(linear, "patch encoder") == "vit_gemm"
    assert classify(linear, "decoder") == "other_gemm"
    four_d = Event("aten::matmul", [[1, 2, 5, 8], [1, 2, 8, 5]], ["float", "float"])
    assert classify(four_d, "image encoder") == "attention"
    assert classify(Event("aten::conv_transpose2d"), "head") == "deconv"
    assert classify(Event("aten::convolution", concrete=[None] * 6 + [True]), "head") == "deconv"
    assert classify(Event("aten::conv2d"), "decoder") == "conv"
    assert classify(Event("aten::upsample_bilinear2d"), "FOV encoder") == "resize"
    assert classify(Event("aten::gelu_"), "patch encoder") == "vit_elementwise"
    assert classify(Event("aten::relu_"), "decoder") == "elementwise"
    assert classify(Event("depthpro_fast::merge_patches"), "merge + upsample") == "merge"
    assert {"patch encoder", "image encoder", "FOV encoder"} <= VIT_STAGES


def test_aggregate_splits_python_time_and_labels():
    """Every microsecond of the root lands in one category and one stage: the labels' own
    time is Python between ops, a labelled op's whole time is its category."""
    gemm = Event("aten::linear", [[5, 8], [3, 8]], ["float", "float"], total_us=30.0)
    attn = Event("depthpro_fast.op:attention#0", total_us=20.0,
                 children=[Event("aten::scaled_dot_product_attention",
                                 [[1, 1, 4, 2], [1, 1, 4, 2], [1, 1, 4, 2]],
                                 ["float"] * 3, total_us=15.0)])
    stage = Event("depthpro_fast.stage:patch encoder", total_us=60.0, children=[gemm, attn])
    root = Event(ROOT, total_us=70.0, children=[stage])
    cats, stages = aggregate(root, [123])
    assert cats["vit_gemm"].time_us == 30.0 and cats["vit_gemm"].flops == 2 * 5 * 8 * 3
    assert cats["attention"].time_us == 20.0 and cats["attention"].bytes == 123
    assert cats["attention"].flops == 2 * 4 * 4 * 4
    assert cats["python"].time_us == 20.0  # 10 in the root, 10 in the stage
    assert sum(t.time_us for t in cats.values()) == 70.0
    assert stages["patch encoder"].time_us == 60.0 and stages["between stages"].time_us == 10.0


def test_labels_are_removed_afterwards():
    from depthpro_fast import ops
    from depthpro_fast.model import VisionTransformer

    model = _model()
    before = (ops.attention, dataflow.Stages.split, VisionTransformer.forward)
    with labels(model) as log:
        assert ops.attention is not before[0] and dataflow.Stages.split is not before[1]
        assert log.op_bytes == []
    assert (ops.attention, dataflow.Stages.split, VisionTransformer.forward) == before
    with pytest.raises(RuntimeError, match="boom"), labels(model):
        raise RuntimeError("boom")
    assert ops.attention is before[0]


def test_floor_measures_each_dtype():
    floor = measure_floor([torch.bfloat16], gemm_shape=(64, 32, 48), conv_shape=(1, 8, 12, 12),
                          copy_bytes=1 << 20, runs=1)
    assert floor.gemm_gflops["float"] > 0 and floor.gemm_gflops["c10::BFloat16"] > 0
    assert floor.conv_gflops["float"] > 0 and floor.conv_gflops["c10::BFloat16"] > 0
    assert floor.bandwidth_gbs > 0
    bf16 = floor.details["gemm_bf16"]
    assert {"F.linear", "onednn prepacked", "best"} <= set(bf16)
    assert floor.rate("gemm", "c10::Half") == floor.gemm_gflops["float"]  # not measured
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        measure_floor([torch.float64], gemm_shape=(8, 8, 8), conv_shape=(1, 2, 4, 4),
                      copy_bytes=1024, runs=1)


def test_fast_options_rows():
    rows = default_variants(CPU, dtypes=[torch.float32], fast_backends=("auto",),
                            compile=False, cuda_graph=False, hf=False, onnxruntime=False,
                            openvino=False, fast_options=[{}, {"gemm_dtype": "bf16"}])
    engine = [v for v in rows if v.path == "engine"]
    assert [v.options for v in engine] == ["", '{"gemm_dtype": "bf16"}']
    # gemm_dtype on the fp32 model is the bf16-mixed mode: said by the dtype column
    assert engine[1].name == "fast engine" and engine[1].dtype_label == "bf16-mixed"
    assert engine[1].fast_options == {"gemm_dtype": "bf16"}
    with pytest.raises(ValueError, match="gemm_dtype must be one of"):
        fast_options_key({"gemm_dtype": "fp16"})
    with pytest.raises(ValueError, match="fields: epilogues"):
        fast_options_key({"no_such_option": 1})
    assert Variant("engine", torch.float32).fast_options == {}
    from depthpro_fast.bench.runner import Runner
    from depthpro_fast.bench.variants import SkipRow

    runner = Runner(resolve_config(MICRO), CPU, batches=[1], runs=1, warmup=0,
                    cpu_opt_in=["bf16"])
    bf16_mixed = Variant("engine", torch.bfloat16, backend="auto", options=engine[1].options)
    with pytest.raises(SkipRow, match="the fp32 rows only"):
        runner.admit(bf16_mixed)


# -- the command line ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("breakdown")
    (folder / "micro.json").write_text(json.dumps(MICRO))
    out = folder / "breakdown.json"
    real = breakdown_floor.measure_floor
    mp = pytest.MonkeyPatch()
    # a small floor probe: the command's arithmetic is what is checked here
    mp.setattr(breakdown_floor, "measure_floor", lambda dtypes: real(
        dtypes, gemm_shape=(256, 64, 128), conv_shape=(1, 16, 24, 24), copy_bytes=4 << 20,
        runs=1))
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            rc = main(["bench", "--breakdown", "engine", "--config", str(folder / "micro.json"),
                       "--dtype", "fp32", "--backends", "auto", "--quiet",
                       "--json", str(out)])
    finally:
        mp.undo()
    return rc, buf.getvalue(), json.loads(out.read_text())


def test_cli_prints_the_table(cli_run):
    rc, text, _ = cli_run
    assert rc == 0, text
    assert "Where the time goes: fast engine fp32, batch 1" in text
    assert "floor, measured now" in text and "GFLOP/s" in text and "GB/s" in text
    for label in ("ViT GEMMs", "attention", "convolutions", "split (patch windows)",
                  "sum of the categories", "unaccounted", "gap ms", "patch encoder",
                  "the ops of the three largest gaps"):
        assert label in text, label
    assert "reference eager" not in text  # --breakdown engine: the engine's rows only
    assert ("machine during this row" in text
            or "WARNING: the machine was shared during this row" in text)


def test_cli_json_schema(cli_run):
    _, _, data = cli_run
    assert data["schema"] == SCHEMA
    assert {"environment", "config", "settings", "floor", "rows", "command"} <= set(data)
    assert {"gemm_gflops", "conv_gflops", "bandwidth_gbs", "details"} <= set(data["floor"])
    row = data["rows"][0]
    assert row["status"] == "ok" and row["row"]["path"] == "engine"
    assert {"wall_ms", "profiled_ms", "categories_ms", "unaccounted_ms", "floor_ms", "flops",
            "categories", "stages", "machine_load", "engine"} <= set(row)
    keys = {k for k, _, _ in CATEGORIES}
    for c in row["categories"]:
        assert c["key"] in keys
        assert {"label", "time_ms", "share", "ops", "flops", "flops_by_dtype",
                "gflops_achieved", "bytes", "gbs_achieved", "floor_kind", "floor_ms",
                "floor_basis", "gap_ms", "top_ops"} <= set(c)
        assert all({"op", "time_ms", "calls"} == set(o) for o in c["top_ops"])
    for s in row["stages"]:
        assert {"stage", "time_ms", "share", "flops", "flops_expected", "flops_ratio"} <= set(s)


def test_cli_refuses_a_gpu_and_bad_options(capsys):
    assert main(["bench", "--breakdown", "--device", "meta"]) == 1
    assert "--breakdown profiles the CPU path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--breakdown", "--fast-options", "gemm_dtype=bf16"])
    assert "expected a JSON object of FastOptions fields" in capsys.readouterr().err


def test_format_breakdown_without_rows_info():
    data = breakdown(
        profile_forward(lambda x: x.clone(), torch.nn.Identity(), [torch.ones(4)],
                        warmup=0, unprofiled=1), FLOOR)
    text = format_breakdown(data)
    assert text.startswith("Where the time goes\n")
    assert "layout conversions / copies" in text and "unprofiled forward just before" in text


def test_fast_options_reach_the_engine_and_the_first_call_process(monkeypatch):
    """An engine row's options go to ``prepare_fast`` (runner) and to the first-call process's
    command line (which rebuilds the same row)."""
    import subprocess

    from depthpro_fast.bench import first_call
    from depthpro_fast.bench.runner import Runner

    v = Variant("engine", torch.float32, backend="auto",
                options=fast_options_key({"cpu_gemm": "aten", "streams": False}))
    runner = Runner(resolve_config(MICRO), CPU, batches=[1], runs=1, warmup=0)
    _, module, cleanup = runner.row_callable(v, 1)
    options = module.fast_engine.options
    assert options.cpu_gemm == "aten" and options.streams is False
    assert options.cuda_graphs is False
    cleanup()
    assert module.fast_engine is None
    seen = {}

    def fake_run(argv, **kwargs):
        seen["argv"] = argv
        return subprocess.CompletedProcess(argv, 0, '{"cold_ms": 1, "warm_ms": 1}\n', "")

    monkeypatch.setattr(first_call.subprocess, "run", fake_run)
    first_call.in_subprocess("tiny", CPU, v, 1)
    argv = seen["argv"]
    assert json.loads(argv[argv.index("--fast-options") + 1]) == {"cpu_gemm": "aten",
                                                                  "streams": False}
