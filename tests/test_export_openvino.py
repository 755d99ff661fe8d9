"""``depthpro_fast.export(..., format="openvino")``: the IR run in OpenVINO against the reference
path (fp32 arithmetic: ``INFERENCE_PRECISION_HINT=f32``, else OpenVINO computes in bf16 on a
CPU with bf16 arithmetic), the documented snippet, every refusal, and the bench row.

The export is the slow part (about 25 s for the tiny model on 2 cores), so it is made once per
module and shared by the tests that read it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import depthpro_fast
from depthpro_fast.exporters import ExportError, export, load_exported
from depthpro_fast.exporters import metric_depth as recipe
from depthpro_fast.install_hints import OPENVINO_HINT

ov = pytest.importorskip("openvino", reason=f"the OpenVINO tests need openvino ({OPENVINO_HINT})")

SEED = 1234
#: the accuracy budget of an fp32 export: max |error| / max |map|, and FOV degrees
MAX_REL, FOV_DEG = 1e-4, 1e-3


def tiny_model(dtype: torch.dtype = torch.float32, **kw):
    torch.manual_seed(SEED)
    model, _ = depthpro_fast.load(None, config="tiny", dtype=dtype, **kw)
    return model


def network_inputs(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 1536, 1536, generator=g) * 2 - 1


def max_rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def fp32_model():
    # with the fast engine attached: the IR is the reference math all the same
    return tiny_model()


@pytest.fixture(scope="module")
def ir(fp32_model, tmp_path_factory):
    return export(fp32_model, tmp_path_factory.mktemp("ov") / "depth_pro.xml")


def test_ir_files_and_summary(ir):
    assert ir.format == "openvino" and ir.dtype == "float32"
    assert [p.name for p in ir.files] == ["depth_pro.bin", "depth_pro.xml"]  # .xml last
    assert ir.path.name == "depth_pro.xml" and ir.bytes == sum(p.stat().st_size for p in ir.files)
    assert ir.outputs == ("canonical_inverse_depth", "fov_deg")
    assert "openvino (float32)" in ir.summary() and "2 files" in ir.summary()
    assert any("INFERENCE_PRECISION_HINT" in n for n in ir.notes)
    assert any("reference path's math" in n for n in ir.notes)  # the fast engine was attached
    # no staging folder left behind
    assert sorted(p.name for p in ir.path.parent.iterdir()) == ["depth_pro.bin", "depth_pro.xml"]
    m = ov.Core().read_model(str(ir.path))
    assert m.inputs[0].get_any_name() == "image"
    assert str(m.inputs[0].get_partial_shape()) == "[?,3,1536,1536]"  # batch dynamic
    assert [o.get_any_name() for o in m.outputs] == list(ir.outputs)
    # fp32 weights: save_model's fp16 compression was off
    consts = [op for op in m.get_ops() if op.get_type_name() == "Constant"
              and op.get_output_element_type(0).is_real()]
    assert consts and {op.get_output_element_type(0).get_type_name() for op in consts} == {"f32"}


def test_f32_matches_reference_at_batch_1_and_2(fp32_model, ir):
    runner = load_exported(ir.path, precision="f32")
    assert runner.precision == "f32" and runner.outputs == ir.outputs
    for batch, seed in ((1, 41), (2, 42)):
        x = network_inputs(batch, seed)
        with torch.no_grad():
            cid, fov = fp32_model(x)
        got_cid, got_fov = runner(x)
        assert got_cid.shape == cid.shape and got_fov.shape == fov.shape
        assert max_rel(got_cid, cid) <= MAX_REL, batch
        assert float((got_fov - fov).abs().max()) <= FOV_DEG, batch
    # numpy in, the same answer
    assert torch.equal(runner(x.numpy())[0], got_cid)


def test_documented_snippet(fp32_model, ir):
    """docs/export.md's snippet: OpenVINO alone, with the numpy recipe around it."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    core = ov.Core()
    compiled = core.compile_model(str(ir.path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out = compiled(recipe.network_input(rgb))
    depth, f_px = recipe.metric_depth(out["canonical_inverse_depth"], out["fov_deg"], 300, 400)
    with torch.no_grad():
        cid, fov = fp32_model(torch.from_numpy(recipe.network_input(rgb)))
    want, want_f = recipe.metric_depth(cid.numpy(), fov.numpy(), 300, 400)
    assert depth.shape == (1, 300, 400) and max_rel(depth, want) <= 1e-3
    assert abs(float(f_px[0] - want_f[0])) <= 1e-2


def test_default_precision_is_openvinos_choice(ir):
    """No hint: OpenVINO's own choice for the CPU (bf16 where it has bf16 arithmetic)."""
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    runner = load_exported(ir.path)
    assert runner.precision == ("bf16" if "BF16" in caps else "f32")


def test_compile_options_reach_openvino(ir, tmp_path):
    """``options``: more compile properties (the race sets the thread count with them)."""
    runner = load_exported(ir.path, precision="f32", options={"INFERENCE_NUM_THREADS": 1})
    assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert runner.precision == "f32"
    with pytest.raises(ExportError, match="pass the precision as precision="):
        load_exported(ir.path, options={"INFERENCE_PRECISION_HINT": "f32"})
    with pytest.raises(ExportError, match="precision= and options= apply to an OpenVINO .xml"):
        load_exported(tmp_path / "m.pt2", options={"INFERENCE_NUM_THREADS": 1})


def test_refusals(fp32_model, ir, tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="exists"):
        export(fp32_model, ir.path, overwrite=False)
    with pytest.raises(ExportError, match="openvino"):
        export(fp32_model, tmp_path / "m.xml", format="openvin")
    with pytest.raises(ExportError, match="openvino export writes a .xml file"):
        export(fp32_model, tmp_path / "m.onnx", format="openvino")
    with pytest.raises(ExportError, match="bfloat16 model is not offered.*float32"):
        export(tiny_model(torch.bfloat16), tmp_path / "m.xml")
    with pytest.raises(ExportError, match="precision= and options= apply to an OpenVINO .xml"):
        load_exported(tmp_path / "m.pt2", precision="f32")
    with pytest.raises(FileNotFoundError):
        load_exported(tmp_path / "none.xml")
    lonely = tmp_path / "lonely.xml"
    lonely.write_text(ir.path.read_text())
    with pytest.raises(ExportError, match="lonely.bin"):
        load_exported(lonely)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(ExportError, match=r"needs the Python package openvino: \./install\.sh "
                                          r"openvino"):
        export(fp32_model, tmp_path / "m.xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lonely.xml"]


def test_failed_save_leaves_nothing(fp32_model, tmp_path, monkeypatch):
    """Ctrl-C while the IR is written: the earlier file stays, no half-written .bin / .xml."""
    from depthpro_fast.exporters import to_openvino

    existing = tmp_path / "m.xml"
    existing.write_text("the previous export")

    def broken(model, path, **k):
        Path(path).write_text("half an IR")
        Path(path).with_suffix(".bin").write_bytes(b"half the weights")
        raise KeyboardInterrupt

    # (the conversion is not what this checks: skipped, to save its 20 s)
    monkeypatch.setattr(to_openvino, "to_ov_model", lambda model, plan: object())
    monkeypatch.setattr(ov, "save_model", broken)
    with pytest.raises(KeyboardInterrupt):
        export(fp32_model, existing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.xml"]
    assert existing.read_text() == "the previous export"


def test_cli(tmp_path, capsys, monkeypatch):
    from depthpro_fast import api
    from depthpro_fast.cli import main

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    with monkeypatch.context() as m:
        m.setattr(api, "load", no_load)
        rc = main(["export", "--config", "tiny", "--random-weights", "--format", "openvino",
                   "--dtype", "bf16", "-o", str(tmp_path / "m.xml")])
        assert rc == 1 and "bfloat16 model is not offered" in capsys.readouterr().err
    torch.manual_seed(SEED)
    rc = main(["export", "--config", "tiny", "--random-weights", "--no-fov",
               "-o", str(tmp_path / "d.xml")])
    out = capsys.readouterr().out
    assert rc == 0 and "openvino (float32)" in out
    assert out.rstrip().endswith("outputs canonical_inverse_depth")  # depth only
    runner = load_exported(tmp_path / "d.xml", "cpu", precision="f32")
    (cid,) = runner(network_inputs(1, 7))
    assert cid.shape == (1, 1, 1536, 1536)


# ----------------------------------------------------------------------------------------------
# the bench row
# ----------------------------------------------------------------------------------------------


def test_bench_rows(monkeypatch):
    """On a CPU the openvino rows are listed but skipped unless opted in (--openvino); opted
    in, the fp32 row (f32 hint) matches the fp32 reference of the same run; without openvino,
    or on a GPU, they are skipped with the reason."""
    from depthpro_fast.bench import openvino_row
    from depthpro_fast.bench.runner import Runner
    from depthpro_fast.bench.variants import Variant, default_variants
    from depthpro_fast.config import TINY

    cpu = torch.device("cpu")
    listed = [(v.name, v.dtype_label) for v in default_variants(cpu) if v.path == "openvino"]
    assert listed == [("openvino", "fp32"), ("openvino", "bf16")]
    assert not [v for v in default_variants(cpu, openvino=False) if v.path == "openvino"]
    assert not [v for v in default_variants(torch.device("cuda")) if v.path == "openvino"]
    assert [v.dtype_label for v in default_variants(torch.device("cuda"), openvino=True)
            if v.path == "openvino"] == ["fp32"]
    assert "GPU" in openvino_row.openvino_unavailable(torch.device("cuda"))

    row32 = Variant("openvino", torch.float32, "-")
    skipped = Runner(TINY, cpu, batches=[1], runs=1, warmup=0).run_row(row32, 1)
    assert skipped.status == "skipped" and "--openvino" in skipped.reason
    runner = Runner(TINY, cpu, batches=[1], runs=1, warmup=0, cpu_opt_in=["openvino"])
    ref, row = runner.run([Variant("reference", torch.float32), row32])
    assert row.status == "ok", row.reason
    assert row.mare is not None and row.mare <= 1e-5 and row.fov_err_deg <= FOV_DEG
    assert row.engine["openvino_precision"] == "f32" and row.device.median > 0
    assert row.peak_mem_bytes > 0

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    gone = runner.run_row(row32, 1)
    assert gone.status == "skipped" and "./install.sh openvino" in gone.reason


# ----------------------------------------------------------------------------------------------
# full size (slow: minutes on a CPU)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_official_size_f32_matches_reference(tmp_path):
    torch.manual_seed(SEED)
    model, _ = depthpro_fast.load(None, config="official", backend="reference")
    r = export(model, tmp_path / "depth_pro.xml")
    assert r.bytes > 3.5e9  # fp32 weights
    runner = load_exported(r.path, precision="f32")
    x = network_inputs(1, 5)
    with torch.no_grad():
        cid, fov = model(x)
    got_cid, got_fov = runner(x)
    assert max_rel(got_cid, cid) <= MAX_REL
    assert float((got_fov - fov).abs().max()) <= FOV_DEG
    assert Path(r.path).with_suffix(".bin").stat().st_size > 3.5e9
