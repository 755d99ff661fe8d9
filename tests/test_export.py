"""``depthpro_fast.export``: ONNX run in ONNX Runtime against the reference path, the .pt2
round trip, the numpy metric-depth recipe against ``infer``, and every bad input (refused
before any work; nothing half-written).

The exports are the slow part (about a minute each for the tiny model on 2 cores), so each is
made once per module and shared by the tests that read it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import depthpro_fast
from depthpro_fast.exporters import ExportError, export, load_exported
from depthpro_fast.exporters import metric_depth as recipe
from depthpro_fast.exporters.to_pt2 import is_aoti_package
from depthpro_fast.install_hints import EXPORT_HINT

ort = pytest.importorskip("onnxruntime", reason=f"the ONNX tests need onnxruntime ({EXPORT_HINT})")
onnx = pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[1]
SEED = 1234


def tiny_model(dtype: torch.dtype = torch.float32, **kw):
    torch.manual_seed(SEED)
    model, transform = depthpro_fast.load(None, config="tiny", dtype=dtype, **kw)
    return model, transform


def network_inputs(batch: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, 1536, 1536, generator=g) * 2 - 1).to(dtype)


def max_rel(a, b) -> float:
    """max |a - b| / max |b| (the package's convention for whole maps)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def mean_abs_rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float((np.abs(a - b) / np.abs(b)).mean())


def outputs_side_by_side(model, exported, batches: tuple[int, ...]) -> list[tuple]:
    """(exported outputs, model outputs) on a fresh input per batch size (seeds 41, 42, ...)."""
    pairs = []
    for i, batch in enumerate(batches):
        x = network_inputs(batch, 41 + i)
        with torch.no_grad():
            pairs.append((exported(x), model(x)))
    return pairs


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def fp32_model():
    model, _ = tiny_model(backend="reference")
    return model


@pytest.fixture(scope="module")
def fp32_onnx(fp32_model, tmp_path_factory):
    """fp32, opset 18, optimised, with the FOV, weights as external data (as the official
    model's 3.8 GB need); the model has the fast engine attached (the ONNX graph is the
    reference math all the same)."""
    path = tmp_path_factory.mktemp("onnx32") / "depth_pro.onnx"
    fp32_model.prepare_fast()
    try:
        result = export(fp32_model, path, external_data=True)
    finally:
        fp32_model.prepare_fast(False)
    return result


@pytest.fixture(scope="module")
def fp16_depth_only(tmp_path_factory):
    """fp16, depth only, through the command line, over an earlier export's files."""
    from depthpro_fast.cli import main

    path = tmp_path_factory.mktemp("onnx16") / "depth16.onnx"
    path.write_bytes(b"an earlier export")
    stale = path.parent / "depth16.onnx.data"  # its weights file (external data)
    stale.write_bytes(b"old weights")
    torch.manual_seed(SEED)
    rc = main(["export", "--config", "tiny", "--random-weights", "--dtype", "fp16",
               "--no-fov", "-o", str(path), "--overwrite"])
    assert rc == 0
    # the tiny weights fit in the .onnx: the earlier weights file is removed, not left stale
    assert sorted(p.name for p in path.parent.iterdir()) == ["depth16.onnx"]
    return path


# ----------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------


def test_onnx_fp32_matches_reference_at_every_batch(fp32_model, fp32_onnx):
    s = session(fp32_onnx.path)
    for batch, seed in ((1, 11), (3, 13)):  # the traced example's batch was 2
        x = network_inputs(batch, seed)
        cid, fov = s.run(None, {"image": x.numpy()})
        with torch.no_grad():
            ref_cid, ref_fov = fp32_model(x)
        assert cid.shape == (batch, 1, 1536, 1536) and fov.shape == (batch, 1, 1, 1)
        assert max_rel(cid, ref_cid) <= 1e-4, batch
        assert np.abs(fov - ref_fov.numpy()).max() <= 1e-3, batch  # degrees
        assert np.isfinite(cid).all()


def test_onnx_graph_names_opset_and_result(fp32_onnx):
    m = onnx.load(str(fp32_onnx.path), load_external_data=False)
    assert [i.name for i in m.graph.input] == ["image"]
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 1536, 1536]
    assert [o.name for o in m.graph.output] == ["canonical_inverse_depth", "fov_deg"]
    out_dims = [d.dim_param or d.dim_value
                for d in m.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == ["batch", 1, 1536, 1536]
    opsets = {o.domain: o.version for o in m.opset_import}
    assert opsets[""] >= 18
    # plain ONNX operators only: nothing that needs a custom runtime
    assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}
    r = fp32_onnx
    assert r.format == "onnx" and r.opset == 18 and r.dtype == "float32"
    # the weights file first, the .onnx last (it appears only when complete)
    assert [p.name for p in r.files] == ["depth_pro.onnx.data", "depth_pro.onnx"]
    assert r.bytes == sum(p.stat().st_size for p in r.files)
    assert r.files[0].stat().st_size > 10_000_000  # the tiny model's fp32 weights
    assert any("reference path's math" in n for n in r.notes)  # the engine was attached
    # no staging folder left beside it
    assert sorted(p.name for p in r.path.parent.iterdir()) == [p.name for p in r.files][::-1]


def test_onnx_fp16_depth_only_from_the_command_line(fp16_depth_only, fp32_model):
    s = session(fp16_depth_only)
    assert [o.name for o in s.get_outputs()] == ["canonical_inverse_depth"]
    assert s.get_inputs()[0].type == "tensor(float16)"
    x = network_inputs(2, 21)
    (cid,) = s.run(None, {"image": x.half().numpy()})
    assert cid.dtype == np.float16 and cid.shape == (2, 1, 1536, 1536)
    with torch.no_grad():
        ref32, _ = fp32_model(x.half().float())  # same weights (seed) before rounding
    # the fast path's fp16 budget (MARE 1e-3; the fp16 reference path measures 2.5e-4)
    assert mean_abs_rel(cid, ref32) <= 1e-3
    assert np.isfinite(cid.astype(np.float32)).all()


# ----------------------------------------------------------------------------------------------
# the numpy recipe (docs/export.md) against infer
# ----------------------------------------------------------------------------------------------


def test_metric_depth_recipe_matches_infer(fp32_model, fp32_onnx):
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, size=(300, 451, 3), dtype=np.uint8)  # odd, not square
    transform = depthpro_fast.Transform(torch.device("cpu"), torch.float32)
    with torch.no_grad():
        want = fp32_model.infer(transform(rgb))
        want_f = fp32_model.infer(transform(rgb), f_px=700.0)
    x = recipe.network_input(rgb)
    assert x.shape == (1, 3, 1536, 1536) and x.dtype == np.float32
    resized = torch.nn.functional.interpolate(transform(rgb)[None], size=(1536, 1536),
                                              mode="bilinear", align_corners=False)
    # float32 source coordinates near 450 carry ~3e-5 of rounding, in torch's kernel and here
    assert np.abs(x - resized.numpy()).max() <= 1e-4
    cid, fov = session(fp32_onnx.path).run(None, {"image": x})
    depth, f_px = recipe.metric_depth(cid, fov, 300, 451)
    assert depth.shape == (1, 300, 451)
    assert max_rel(depth[0], want["depth"]) <= 1e-4
    assert abs(float(f_px[0]) - float(want["focallength_px"])) <= 1e-3 * float(f_px[0])
    depth_f, f_given = recipe.metric_depth(cid, None, 300, 451, f_px=700.0)
    assert float(f_given[0]) == 700.0 and max_rel(depth_f[0], want_f["depth"]) <= 1e-4
    with pytest.raises(ValueError, match="pass f_px"):
        recipe.metric_depth(cid, None, 300, 451)


def test_recipe_resize_is_torch_bilinear():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 1, 37, 53)).astype(np.float32)
    for h, w in ((1536, 1536), (20, 100), (37, 53), (1, 1), (75, 7)):
        want = torch.nn.functional.interpolate(torch.from_numpy(a), size=(h, w),
                                               mode="bilinear", align_corners=False).numpy()
        assert np.abs(recipe.resize_bilinear(a, h, w) - want).max() <= 1e-5, (h, w)


def test_recipe_file_needs_numpy_only():
    """Users of ONNX Runtime copy the file as it is: it must import nothing else."""
    tree = ast.parse(Path(recipe.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    assert imported <= {"numpy", "__future__"}
    with pytest.raises(ValueError, match="RGB uint8"):
        recipe.network_input(np.zeros((4, 4), np.uint8))


# ----------------------------------------------------------------------------------------------
# torch.export (.pt2)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cpu_gemm", ["aten", "onednn"])
def test_pt2_of_the_fast_path_round_trips(tmp_path, cpu_gemm):
    """``onednn`` is what ``cpu_gemm="auto"`` picks on an AVX-512 / AMX CPU: its linear op does
    not serialise, so the export traces aten GEMMs and says so (found on such a CPU)."""
    model, _ = tiny_model(backend="torch", fast={"cpu_gemm": cpu_gemm})
    r = export(model, tmp_path / "fast.pt2")
    assert r.format == "pt2" and r.files == (r.path,)
    assert r.custom_ops == () and any("plain ATen" in n for n in r.notes)
    assert any("traced through aten, not onednn" in n for n in r.notes) == (cpu_gemm == "onednn")
    assert model.fast_engine._prepared.gemm_name == cpu_gemm  # put back after the trace
    for got, want in outputs_side_by_side(model, load_exported(r.path), batches=(1, 3)):
        assert len(got) == 2
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and torch.allclose(g, w, rtol=1e-6, atol=1e-6)
    # what ran was the fast engine, and it is still attached after the export
    assert model.fast_engine is not None and model.backend == "torch"
    assert not is_aoti_package(r.path)  # a saved program, loaded by torch.export.load


def test_aoti_package_is_told_from_a_saved_program_by_its_contents(tmp_path):
    """torch.export.load of an AOTInductor package fails with a generic deserialisation error
    (found by loading a real package), so load_exported looks inside the zip instead."""
    import zipfile

    pkg = tmp_path / "m.pt2"
    with zipfile.ZipFile(pkg, "w") as z:
        z.writestr("m/data/aotinductor/model/abc.wrapper.so", b"not a library")
        z.writestr("m/archive_format", "pt2")
    assert is_aoti_package(pkg)
    other = tmp_path / "other.pt2"
    other.write_bytes(b"not a zip")
    assert not is_aoti_package(other)
    with pytest.raises(ExportError, match="cannot load the AOTInductor package .*m.pt2"):
        load_exported(pkg)  # routed to aoti_load_package, whose failure is named
    with pytest.raises(ExportError, match="cannot load .*other.pt2"):
        load_exported(other)


@pytest.mark.slow
def test_aoti_package_of_the_fast_path_round_trips(tmp_path):
    """AOTInductor compiles C++ for minutes even at a small config (on 2 cores about 10 min
    when idle), so this is a slow test: a micro config, the batch axis dynamic."""
    cfg = {"embed_dim": 64, "depth": 2, "num_heads": 1, "mlp_ratio": 2.0,
           "encoder_feature_layer_ids": [0, 1], "encoder_feature_dims": [16, 32, 64, 128],
           "decoder_features": 32}
    torch.manual_seed(SEED)
    model, _ = depthpro_fast.load(None, config=cfg, fast=True)
    r = export(model, tmp_path / "m.pt2", format="aoti")
    assert r.format == "aoti" and is_aoti_package(r.path)
    for got, want in outputs_side_by_side(model, load_exported(r.path), batches=(1, 2)):
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and max_rel(g, w) <= 1e-5


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs Triton (GPU, or TRITON_INTERPRET=1)")
def test_pt2_graph_holds_our_triton_ops_and_loads_in_a_fresh_process(tmp_path):
    model, _ = tiny_model(backend="triton", fast=True)
    r = export(model, tmp_path / "triton.pt2", include_fov=False)
    assert {"attention_triton", "split_patches_triton", "merge_patches_triton",
            "add_layer_norm_triton", "bias_gelu_triton"} <= set(r.custom_ops)
    assert r.outputs == ("canonical_inverse_depth",)
    code = ("import sys, torch; from depthpro_fast import load_exported; "
            "m = load_exported(sys.argv[1]); "
            "ops = {n.target._opname for n in m.graph.nodes if n.op == 'call_function' "
            "and getattr(n.target, 'namespace', '') == 'depthpro_fast'}; print(sorted(ops))")
    out = subprocess.run([sys.executable, "-c", code, str(r.path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "attention_triton" in out.stdout


# ----------------------------------------------------------------------------------------------
# bad input: one clear error each, before any work
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if an export starts tracing."""
    def refuse(*a, **k):
        raise AssertionError("the export started work before refusing")

    monkeypatch.setattr(torch.export, "export", refuse)


@pytest.mark.parametrize("kwargs, path, match", [
    ({"format": "tflite"}, "m.onnx", "unknown export format 'tflite'; accepted: onnx, pt2"),
    ({}, "m.bin", "cannot tell the export format"),
    ({"format": "onnx"}, "m.pt2", "onnx export writes a .onnx file"),
    ({"opset": 17}, "m.onnx", "opset 17 is too old: the export needs opset >= 18"),
    ({"opset": 999}, "m.onnx", "newer than the installed onnx"),
    ({"opset": "18"}, "m.onnx", "must be an integer >= 18"),
    ({"include_fov": "yes"}, "m.onnx", "include_fov must be True, False or None"),
])
def test_bad_arguments(fp32_model, tmp_path, no_work, kwargs, path, match):
    fmt = kwargs.pop("format", None)
    with pytest.raises(ExportError, match=match):
        export(fp32_model, tmp_path / path, fmt, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_bad_paths(fp32_model, tmp_path, no_work):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="is a file, not a folder"):
        export(fp32_model, blocker / "m.onnx")
    with pytest.raises(ExportError, match="is a folder; give a file name"):
        export(fp32_model, tmp_path)
    existing = tmp_path / "m.onnx"
    existing.write_bytes(b"old")
    with pytest.raises(ExportError, match="exists"):
        export(fp32_model, existing, overwrite=False)
    assert existing.read_bytes() == b"old"
    with pytest.raises(ExportError, match="export path must be a file name"):
        export(fp32_model, 42)


def test_unwritable_folder(fp32_model, tmp_path, no_work, monkeypatch):
    import tempfile as tf

    def read_only(*a, **k):  # root writes anywhere: simulate a read-only file system
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tf, "mkdtemp", read_only)
    with pytest.raises(ExportError, match="cannot write to export folder"):
        export(fp32_model, tmp_path / "m.onnx")


def test_bad_models(fp32_model, tmp_path, no_work):
    with pytest.raises(ExportError, match="expects the model returned by depthpro_fast.load"):
        export(torch.nn.Linear(2, 2), tmp_path / "m.onnx")
    with warnings.catch_warnings():  # (a CPU without bf16 arithmetic warns that it is slow)
        warnings.simplefilter("ignore", RuntimeWarning)
        bf16, _ = tiny_model(torch.bfloat16, backend="reference")
    with pytest.raises(ExportError, match="ONNX export of a bfloat16 model is not offered"):
        export(bf16, tmp_path / "m.onnx")
    no_fov, _ = tiny_model(backend="reference", use_fov=False)
    with pytest.raises(ExportError, match="has no FOV network"):
        export(no_fov, tmp_path / "m.onnx", include_fov=True)


def test_fp8_model_is_refused(fp32_model, tmp_path, no_work, monkeypatch):
    from depthpro_fast.exporters import checks

    monkeypatch.setattr(checks, "_is_fp8", lambda model: True)
    with pytest.raises(ExportError, match="FP8 model does not export to onnx: its ViT GEMMs"):
        export(fp32_model, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="FP8 model does not export to pt2: the fast engine"):
        export(fp32_model, tmp_path / "m.pt2")


def test_a_real_fp8_model_is_refused(tmp_path, no_work):
    with warnings.catch_warnings():  # (fp8 on a CPU is an emulation, and says so)
        warnings.simplefilter("ignore")
        torch.manual_seed(SEED)
        model, _ = depthpro_fast.load(None, config="tiny", dtype="fp8")
    for name in ("m.onnx", "m.pt2"):
        with pytest.raises(ExportError, match="FP8 model does not export"):
            export(model, tmp_path / name)


def test_missing_exporter_packages(fp32_model, tmp_path, no_work, monkeypatch):
    import importlib.util

    from depthpro_fast.exporters import checks

    real = importlib.util.find_spec
    monkeypatch.setattr(checks.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ExportError, match=r"needs the Python package\(s\) onnxscript"):
        export(fp32_model, tmp_path / "m.onnx")


def test_failed_export_leaves_nothing(fp32_model, tmp_path, monkeypatch):
    """An error (or Ctrl-C) while the files are written: no file, no temporary folder, and the
    earlier export untouched. (The tracing is replaced by a program whose save writes half of
    its two files and is interrupted.)"""
    from depthpro_fast.exporters import to_onnx

    class HalfWritten:
        def save(self, destination, external_data=None):
            Path(str(destination) + ".data").write_bytes(b"some weights")
            Path(destination).write_bytes(b"half an onnx file")
            raise KeyboardInterrupt

    monkeypatch.setattr(torch.export, "export", lambda *a, **k: None)
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: HalfWritten())
    monkeypatch.setattr(to_onnx, "_name_batch_dim", lambda program: None)
    existing = tmp_path / "m.onnx"
    existing.write_bytes(b"the previous export")
    with pytest.raises(KeyboardInterrupt):
        export(fp32_model, existing, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert existing.read_bytes() == b"the previous export"


def test_cli_refuses_before_loading(tmp_path, capsys, monkeypatch):
    from depthpro_fast import api
    from depthpro_fast.cli import main

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(api, "load", no_load)
    cases = [
        (["--opset", "16", "-o", str(tmp_path / "m.onnx")], "opset 16 is too old"),
        (["--dtype", "bf16", "-o", str(tmp_path / "m.onnx")], "bfloat16 model is not offered"),
        (["-o", str(tmp_path / "m.tflite")], "cannot tell the export format"),
        (["--format", "pt2", "-o", str(tmp_path / "m.onnx")], "pt2 export writes a .pt2"),
    ]
    for extra, match in cases:
        rc = main(["export", "--config", "tiny", "--random-weights", *extra])
        err = capsys.readouterr().err
        assert rc == 1 and "depthpro-fast export: error:" in err and match in err, err
    rc = main(["export", "--random-weights", "-o", str(tmp_path / "m.onnx")])
    assert rc == 1 and "--random-weights needs --config" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# full size (slow: minutes on a CPU; 3.8 GB of weights, written as external data)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_onnx_official_size_fp32_matches_reference(tmp_path):
    torch.manual_seed(SEED)
    model, _ = depthpro_fast.load(None, config="official", backend="reference")
    r = export(model, tmp_path / "depth_pro.onnx")
    assert len(r.files) == 2 and r.bytes > 3.7e9  # the .onnx and its .data (fp32 weights)
    x = network_inputs(1, 51)
    with torch.no_grad():
        ref_cid, ref_fov = model(x)
    del model
    cid, fov = session(r.path).run(None, {"image": x.numpy()})
    err, fov_err = max_rel(cid, ref_cid), float(np.abs(fov - ref_fov.numpy()).max())
    print(f"\nofficial fp32 ONNX Runtime vs reference: max relative error {err:.2e}, "
          f"FOV error {fov_err:.2e} deg, {r.bytes / 2**20:,.1f} MiB")
    assert err <= 1e-4
    assert fov_err <= 1e-3
