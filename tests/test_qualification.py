"""Kernel qualification (depthpro_fast/qualification.py) on a CPU, with fake "triton" kernels
(tests/qualification_fakes.py; Triton's backend counts as available under TRITON_INTERPRET=1):
a wrong, a raising, an unwriting and a process-killing kernel are disqualified, the model's
output is then the reference path's, the warning names the op, the verdict is cached and a
second process (here: memory cleared) does no work. Also the fallback mechanism in
depthpro_fast/backends.py and the per-op checks' tolerances.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

import depthpro_fast
from depthpro_fast import backends, device_cache, ops, qualification
from depthpro_fast.fast import FastOptions
from depthpro_fast.qualification_cases import CHECKS, check
from depthpro_fast.qualification_child import blamed, describe_exit
from tests import qualification_fakes as fakes
from tests.conftest import requires_triton
from tests.model_helpers import MICRO

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean(monkeypatch, tmp_path):
    """A fresh device cache folder, no disqualification, the real kernels back afterwards."""
    monkeypatch.setenv("DEPTHPRO_FAST_DEVICE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(qualification.ENV_VAR, raising=False)
    device_cache.clear_memory()
    backends.requalify()
    installed: list[dict] = []
    yield installed
    for originals in installed:
        fakes.restore(originals)
    backends.requalify()
    device_cache.clear_memory()


def _install(clean, **kinds):
    clean.append(fakes.install(kinds))


@pytest.fixture(scope="module")
def tiny():
    """A micro config, plausible random weights (fp32), and one input."""
    torch.manual_seed(3)
    model, _ = depthpro_fast.load(None, config=MICRO, device="cpu", backend="reference")
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 3, 1536, 1536, generator=g) * 2 - 1
    return model, x


def _run(model, x, **options):
    fast = copy.deepcopy(model).prepare_fast(options)
    with torch.no_grad():
        cid, fov = fast(x)
    return cid, fov, fast.fast_engine.status()


@pytest.fixture(scope="module")
def reference_out(tiny):
    """The fast path on the reference ops (what every fake "ok" kernel reproduces exactly)."""
    model, x = tiny
    cid, fov, _ = _run(model, x, qualify="off")
    return cid, fov


def _only(status):
    (entry,) = status["qualification"].values()
    return entry


# ---------------------------------------------------------------------------------------------
# the model keeps the reference's output when a kernel is wrong, raises or leaves holes
# ---------------------------------------------------------------------------------------------


def test_bad_kernels_are_disqualified_and_output_is_the_reference(tiny, reference_out, clean):
    """A wrong, a raising and an unwriting kernel in one model: each op warns (naming itself,
    the error and what runs now), falls back, and the output is the reference path's."""
    model, x = tiny
    _install(clean, layer_norm="wrong", add_layer_norm="raise", bias_gelu="unwritten")
    with pytest.warns(RuntimeWarning) as w:
        cid, fov, status = _run(model, x, epilogue_backend="triton", qualify="inline")
    said = {m.split("'")[1]: m for m in (str(r.message) for r in w) if "qualification" in m}
    # each falls back to the next implementation: add_layer_norm has a torch one (the same
    # math in fewer passes), the others the reference
    now = {"layer_norm": "reference", "add_layer_norm": "torch", "bias_gelu": "reference"}
    for op, words in (("layer_norm", "relative error"),
                      ("add_layer_norm", "RuntimeError: fake add_layer_norm kernel"),
                      ("bias_gelu", "unwritten")):
        assert f"op '{op}': the triton implementation failed" in said[op]
        assert words in said[op] and f"now runs the {now[op]} implementation" in said[op]
    # the reference path's output to fp32 rounding (the torch form rounds in another order)
    torch.testing.assert_close(cid, reference_out[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fov, reference_out[1], rtol=1e-5, atol=1e-5)
    entry = _only(status)
    assert entry["state"].startswith("qualified inline")
    for op in ("layer_norm", "add_layer_norm", "bias_gelu"):
        assert entry["ops"][op]["implementations"] == [now[op]]
        assert "triton" in entry["ops"][op]["fallbacks"]
    assert set(backends.disqualified()) == {"layer_norm/triton@cpu",
                                            "add_layer_norm/triton@cpu", "bias_gelu/triton@cpu"}
    assert "layer_norm/triton@cpu" in depthpro_fast.info()["disqualified"]


def test_without_qualification_the_wrong_kernel_changes_the_output(tiny, reference_out, clean):
    """The guard of the test above: the fake is really used and really wrong."""
    model, x = tiny
    _install(clean, layer_norm="wrong")
    cid, _, status = _run(model, x, epilogue_backend="triton", qualify="off")
    assert not torch.equal(cid, reference_out[0])
    assert _only(status)["state"].startswith("off")


def test_cache_is_written_and_a_second_process_does_no_work(tiny, reference_out, clean,
                                                            monkeypatch):
    model, x = tiny
    _install(clean, bias_gelu="wrong")
    with pytest.warns(RuntimeWarning, match="'bias_gelu'"):
        _run(model, x, epilogue_backend="triton")  # default mode: inline
    files = list(Path(os.environ["DEPTHPRO_FAST_DEVICE_CACHE"]).glob("qualification-*.json"))
    assert len(files) == 1
    entries = json.loads(files[0].read_text())["entries"]
    (key, record), = entries.items()
    assert key.startswith("float32 batch 1 ")  # the dtype is part of the entry key
    assert "bias_gelu/triton" in record["disqualified"]
    # "a second process": nothing in memory, nothing disqualified; qualifying must not run
    device_cache.clear_memory()
    backends.requalify()

    def no_work(*a, **k):
        raise AssertionError("qualified again despite the cache")

    monkeypatch.setattr(qualification, "qualify_forward", no_work)
    with pytest.warns(RuntimeWarning, match="'bias_gelu'"):
        cid, fov, status = _run(model, x, epilogue_backend="triton")
    assert _only(status)["state"].startswith("from the device cache")
    assert torch.equal(cid, reference_out[0])
    assert "bias_gelu/triton@cpu" in backends.disqualified()


def test_subprocess_child_killed_by_a_kernel_marks_it_bad(tiny, reference_out, clean,
                                                         monkeypatch, tmp_path):
    """The child (python -m depthpro_fast.qualification) loads the fakes from a sitecustomize:
    its layer_norm kernel SIGKILLs it; the parent blames that kernel from the progress file,
    runs the child again without it, and reads the record."""
    model, x = tiny
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("from tests import qualification_fakes\n"
                                           "qualification_fakes.from_env()\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(ROOT)]))
    monkeypatch.setenv(fakes.ENV, "layer_norm=kill")
    _install(clean, layer_norm="wrong")  # here: must never run after the verdict
    with pytest.warns(RuntimeWarning, match=r"'layer_norm'.*crashed the qualifying process "
                                            r"\(killed by SIGKILL"):
        cid, fov, status = _run(model, x, epilogue_backend="triton", qualify="subprocess")
    entry = _only(status)
    assert "child process" in entry["state"] and "(2 runs)" in entry["state"], entry["state"]
    assert "layer_norm/triton" in entry["crashes"]
    assert entry["ops"]["add_layer_norm"]["implementations"] == ["triton"]
    assert torch.equal(cid, reference_out[0]) and torch.equal(fov, reference_out[1])
    device_cache.clear_memory()
    backends.requalify()
    with pytest.warns(RuntimeWarning, match="'layer_norm'"):
        _, _, status = _run(model, x, epilogue_backend="triton", qualify="subprocess")
    assert _only(status)["state"].startswith("from the device cache (subprocess run")


def test_explicit_backend_mode_env_and_cpu_noop(tiny, clean, monkeypatch):
    model, x = tiny
    _, _, status = _run(model, x)  # auto on a CPU: torch / reference only
    assert _only(status)["state"].startswith("nothing to qualify: no Triton / CUDA kernel")
    monkeypatch.setenv(qualification.ENV_VAR, "off")
    assert qualification.resolve_mode() == "off"
    assert qualification.resolve_mode("subprocess") == "subprocess"
    monkeypatch.setenv(qualification.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=r"\$DEPTHPRO_FAST_QUALIFY must be one of inline"):
        qualification.resolve_mode()
    with pytest.raises(ValueError, match="qualify must be one of inline, subprocess, off"):
        FastOptions(qualify="always")


def test_verify_model_passes_with_good_kernels(tiny, clean):
    model, x = tiny
    _install(clean)
    _, _, status = _run(model, x, epilogue_backend="triton", verify_model=True)
    v = _only(status)["verify_model"]
    assert v["ok"] and v["mare"] <= 1e-6 and v["budget"]["mare"] == 1e-5


def test_command_line_table_and_json(clean, tmp_path, capsys):
    from depthpro_fast.qualification_child import main

    _install(clean, bias_gelu="raise")
    out = tmp_path / "q.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        cfg = tmp_path / "micro.json"
        cfg.write_text(json.dumps(MICRO.to_dict()))
        assert main(["--device", "cpu", "--dtype", "fp32", "--config", str(cfg), "--batch", "1",
                     "--backend", "reference", "--options", '{"epilogue_backend": "triton"}',
                     "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:4] == ["op", "case", "qualified", "fallbacks"]
    assert "bias_gelu" in table and "RuntimeError: fake bias_gelu kernel" in table
    record = json.loads(out.read_text())
    assert "bias_gelu/triton" in record["disqualified"]


# ---------------------------------------------------------------------------------------------
# the fallback mechanism (backends.py) and the pieces
# ---------------------------------------------------------------------------------------------


@requires_triton
def test_disqualify_explicit_and_auto(clean):
    x = torch.randn(5, 16)
    w, b = torch.ones(16), torch.zeros(16)
    _install(clean, layer_norm="wrong")
    assert not torch.equal(ops.layer_norm(x, w, b, 1e-6, backend="triton"),
                           ops.layer_norm_reference(x, w, b, 1e-6))
    assert backends.fallback_chain("layer_norm", "triton", x.device) == ["triton", "reference"]
    with pytest.warns(RuntimeWarning, match="now runs the reference implementation"):
        backends.disqualify("layer_norm", "triton", x.device, "found wrong")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        backends.disqualify("layer_norm", "triton", x.device, "found wrong")
    assert torch.equal(ops.layer_norm(x, w, b, 1e-6, backend="triton"),
                       ops.layer_norm_reference(x, w, b, 1e-6))
    assert backends.disqualified() == {"layer_norm/triton@cpu": "found wrong"}
    with pytest.raises(ValueError, match="only the custom implementations"):
        backends.disqualify("layer_norm", "reference", x.device, "no")
    with pytest.raises(KeyError, match="no op named"):
        backends.disqualify("layer_nrm", "triton", x.device, "no")
    backends.requalify("layer_norm")
    assert not torch.equal(ops.layer_norm(x, w, b, 1e-6, backend="triton"),
                           ops.layer_norm_reference(x, w, b, 1e-6))


def test_auto_skips_a_disqualified_implementation(clean, monkeypatch):
    """``auto`` on a (pretended) CUDA device skips a disqualified kernel, with the reason."""
    monkeypatch.setattr(backends, "backend_status", lambda b, d=None: (True, None))
    dev = torch.device("cuda", 0)
    assert backends.fallback_chain("layer_norm", "auto", dev) == ["triton", "reference"]
    with pytest.warns(RuntimeWarning):
        backends.disqualify("layer_norm", "triton", dev, "wrong at 35x577x1024")
    assert backends.next_implementation("layer_norm", "triton", dev) == "reference"
    fn = backends.implementation("layer_norm", "auto", dev)
    assert fn is backends.load_implementation("layer_norm", "reference")
    assert "disqualified on cuda:0" in backends.fallback_log()["layer_norm/triton"]
    # another GPU keeps its kernel
    assert backends.is_disqualified("layer_norm", "triton", torch.device("cuda", 1)) is None


def test_every_registered_op_has_its_own_check():
    assert set(backends.registered_ops()) <= set(CHECKS)


def test_checks_use_the_tests_tolerances():
    x = torch.randn(7, 32)
    w, b = torch.ones(32), torch.zeros(32)
    ref = ops.layer_norm_reference(x, w, b, 1e-6)
    assert check("layer_norm", (x, w, b, 1e-6), {}, ref.clone(), ref) is None
    assert "relative error" in check("layer_norm", (x, w, b, 1e-6), {}, ref * 1.001, ref)
    half = x.half()
    refh = ops.layer_norm_reference(half, w.half(), b.half(), 1e-6)
    assert check("layer_norm", (half,), {}, refh * (1 + 1e-3), refh) is None  # < 2 x 2e-3
    assert check("layer_norm", (x,), {}, ref.double(), ref).startswith("output 0 is")


def test_clone_args_keeps_layouts_and_shared_storage():
    qkv = torch.randn(2, 5, 3, 2, 4)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    (q2, k2, v2), _ = qualification.clone_args((q, k, v), {})
    assert q2.stride() == q.stride() and k2.storage_offset() == k.storage_offset()
    assert q2.untyped_storage().data_ptr() == v2.untyped_storage().data_ptr() \
        != qkv.untyped_storage().data_ptr()
    assert torch.equal(q2, q) and torch.equal(v2, v)


def test_child_progress_and_exit_words(tmp_path):
    p = tmp_path / "progress.txt"
    p.write_text("start\tattention\tcuda\t2x1\nend\tattention\tcuda\n"
                 "start\tlayer_norm\ttriton\t35x577x1024 bfloat16\n")
    assert blamed(p) == ("layer_norm", "triton", "35x577x1024 bfloat16")
    p.write_text("start\tattention\tcuda\t2x1\nend\tattention\tcuda\n")
    assert blamed(p) is None
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(3) == "exit status 3"


def test_module_entry_is_runnable():
    assert (ROOT / "depthpro_fast" / "qualification.py").read_text().count("__main__") == 1
    assert sys.executable


def test_command_line_qualifies_in_a_child_unless_told(clean, monkeypatch):
    from depthpro_fast.commands import bench, predict

    seen = []
    for mod in (predict, bench):
        monkeypatch.setattr(mod, "_run", lambda args: seen.append(
            os.environ.get(qualification.ENV_VAR)) or 0)
        assert mod.run(None) == 0
    assert seen == ["subprocess", "subprocess"]
    assert qualification.ENV_VAR not in os.environ  # restored
    monkeypatch.setenv(qualification.ENV_VAR, "inline")
    predict.run(None)
    assert seen[-1] == "inline"


def test_meta_tensors_are_never_qualified(monkeypatch):
    """On meta tensors (torch.export, the Triton AOT capture) nothing has values: qualification
    must neither run nor disqualify anything (it once disqualified every kernel on "meta",
    so the AOT capture recorded no launch)."""
    from types import SimpleNamespace

    from depthpro_fast import backends, qualification

    called = []
    engine = SimpleNamespace(model=SimpleNamespace(backend="triton"),
                             options=SimpleNamespace(qualify="inline", epilogue_backend=None))
    monkeypatch.setattr(qualification, "qualify_forward",
                        lambda *a, **k: called.append(1) or {})
    x = torch.empty(1, 3, 8, 8, device="meta")
    out = qualification.qualify_engine(engine, x, True, lambda: called.append(2))
    assert "meta" in out["state"] and called == []
    assert not any("@meta" in k for k in backends.disqualified())
