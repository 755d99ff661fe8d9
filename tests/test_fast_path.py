"""The fast path end to end (depthpro_fast/fast/): accuracy budget against the fp32 reference
on the same random weights, the FOV skip, option switches, weight-change detection, CUDA graphs.

CPU: what a CPU can run (folds, fused epilogue ops — reference and, on a smaller config, the
Triton kernels under the interpreter — channels_last) on the tiny config. GPU (@gpu): the
official config in bf16 / fp16, graph replay identical to eager, streams, threads.
"""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch

import depthpro_fast
from depthpro_fast.accuracy import FOV_BUDGET_DEG, MARE_BUDGET, mean_abs_rel_error
from depthpro_fast.fast import FastEngine, FastOptions
from depthpro_fast.fast.graphs import GraphRunner
from tests.conftest import HAS_CUDA, requires_cuda, requires_triton
from tests.model_helpers import MICRO, fast_copy, max_rel, model_input, random_model

# Accuracy budget: one definition, in depthpro_fast.accuracy.
mare = mean_abs_rel_error


@pytest.fixture(scope="module")
def tiny_reference():
    """The tiny config with plausible random weights, fp32 reference modules, one input."""
    model, _ = random_model("tiny", seed=11)
    x = model_input(seed=1)
    with torch.no_grad():
        cid, fov = model(x)
    return model, x, cid, fov


@pytest.fixture(scope="module")
def micro_reference():
    model, _ = random_model(MICRO, seed=12)
    x = model_input(seed=2)
    with torch.no_grad():
        cid, fov = model(x)
    return model, x, cid, fov


def check_budget(fast, x: torch.Tensor, cid: torch.Tensor, fov: torch.Tensor,
                 dtype: torch.dtype) -> None:
    """``fast`` on ``x`` in ``dtype``: output in that dtype, MARE and FOV error within the
    budget of ``depthpro_fast.accuracy`` against the fp32 reference outputs."""
    with torch.no_grad():
        out_cid, out_fov = fast(x.to(dtype))
    assert out_cid.dtype == dtype
    assert mare(out_cid, cid) <= MARE_BUDGET[dtype]
    assert abs(float(out_fov) - float(fov)) <= FOV_BUDGET_DEG


# ---------------------------------------------------------------------------------------------
# accuracy (CPU)
# ---------------------------------------------------------------------------------------------


def test_fast_fp32_matches_reference(tiny_reference):
    """All CPU-runnable parts (folds, fused epilogue ops, channels_last): float32 rounding."""
    model, x, cid, fov = tiny_reference
    fast = fast_copy(model)
    with torch.no_grad():
        out_cid, out_fov = fast(x)
    assert fast.fast_engine.calls == 1
    assert out_cid.shape == cid.shape and out_fov.shape == fov.shape
    assert max_rel(out_cid, cid) <= 1e-5
    assert abs(float(out_fov) - float(fov)) <= 1e-4
    assert fast.fast_engine.status()["folds"]  # the folds were applied


def test_fast_fp16_accuracy_budget(tiny_reference):
    """Issue 6 budget in fp16: MARE <= 1e-3 and FOV within 0.05 deg of the fp32 reference."""
    model, x, cid, fov = tiny_reference
    fast = fast_copy(model, torch.float16)
    check_budget(fast, x, cid, fov, torch.float16)


@requires_triton
def test_fast_triton_epilogues_fp16_budget(micro_reference):
    """The Triton epilogue kernels (interpreter on CPU) inside the whole model, fp16."""
    model, x, cid, fov = micro_reference
    fast = fast_copy(model, torch.float16, epilogue_backend="triton")
    check_budget(fast, x, cid, fov, torch.float16)


@requires_triton
@pytest.mark.slow
def test_fast_triton_epilogues_fp32_tiny(tiny_reference):
    model, x, cid, fov = tiny_reference
    fast = fast_copy(model, epilogue_backend="triton")
    with torch.no_grad():
        out_cid, out_fov = fast(x)
    assert max_rel(out_cid, cid) <= 1e-5
    assert abs(float(out_fov) - float(fov)) <= 1e-4


@pytest.mark.parametrize("gemm", ["aten", "onednn"])
def test_cpu_gemm_libraries_match_reference(tiny_reference, gemm):
    """Both CPU GEMM libraries (oneDNN with fc1's bias + GELU as post-ops) with the torch
    backend's SDPA attention: the reference function up to float32 rounding."""
    from depthpro_fast.fast.cpu_gemm import onednn_linear_available

    if gemm == "onednn" and not onednn_linear_available(torch.float32)[0]:
        pytest.skip(onednn_linear_available(torch.float32)[1])
    model, x, cid, fov = tiny_reference
    fast = fast_copy(model, cpu_gemm=gemm)
    fast.set_backend("torch")
    with torch.no_grad():
        out_cid, out_fov = fast(x)
    assert max_rel(out_cid, cid) <= 1e-5
    assert abs(float(out_fov) - float(fov)) <= 1e-4
    assert fast.fast_engine.status()["cpu_gemm"].startswith(gemm)


def test_cpu_gemm_auto_measures_and_says_why(tiny_reference):
    model, x, cid, _ = tiny_reference
    fast = fast_copy(model)  # cpu_gemm="auto" is the default
    why = fast.fast_engine.status()["cpu_gemm"]
    assert why.split(":")[0] in ("aten", "onednn")
    assert "measured" in why or "unavailable" in why
    with torch.no_grad():
        assert max_rel(fast(x)[0], cid) <= 1e-5


def test_fast_bf16_on_cpu_accuracy_budget(tiny_reference):
    """bf16 on a CPU (slow where the CPU has no bf16 arithmetic, but it must stay in budget)."""
    model, x, cid, fov = tiny_reference
    fast = fast_copy(model, torch.bfloat16)
    fast.set_backend("auto")
    check_budget(fast, x, cid, fov, torch.bfloat16)


def test_everything_off_matches_reference(micro_reference):
    """The unfused variants (kept to measure each step) compute the same function."""
    model, x, cid, fov = micro_reference
    fast = fast_copy(model, epilogues="torch", fold_convs=False, head_subpixel=False,
                      channels_last=False)
    with torch.no_grad():
        out_cid, out_fov = fast(x)
    assert max_rel(out_cid, cid) <= 1e-5 and abs(float(out_fov) - float(fov)) <= 1e-4
    assert fast.fast_engine.status()["folds"] == []


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    {"fold_convs": False}, {"head_subpixel": False}, {"channels_last": False},
    {"fuse_layer_norm": False}, {"fold_deconv_chains": True}, {"epilogues": "torch"},
    {"fold_layerscale": True}, {"fold_layerscale": True, "residual_in_gemm": True},
    {"epilogues": "torch", "fold_layerscale": True, "residual_in_gemm": True}])
def test_each_option_matches_reference(micro_reference, options):
    model, x, cid, fov = micro_reference
    fast = fast_copy(model, **options)
    with torch.no_grad():
        out_cid, out_fov = fast(x)
    assert max_rel(out_cid, cid) <= 1e-5 and abs(float(out_fov) - float(fov)) <= 1e-4


# ---------------------------------------------------------------------------------------------
# infer: the FOV branch is skipped when f_px is given
# ---------------------------------------------------------------------------------------------


def test_infer_with_f_px_skips_the_fov_branch(micro_reference, monkeypatch):
    model, *_ = micro_reference
    image = torch.rand(3, 40, 60) * 2 - 1
    with torch.no_grad():
        expected = model.infer(image, f_px=50.0)  # reference: computes the FOV anyway
    fast = fast_copy(model)

    def boom(*args):
        raise AssertionError("the FOV encoder ran although f_px was given")

    from depthpro_fast.fast.stages import FastStages

    monkeypatch.setattr(FastStages, "_fov_tokens", boom)
    out = fast.infer(image, f_px=50.0)
    assert torch.equal(out["focallength_px"], expected["focallength_px"])
    torch.testing.assert_close(out["depth"], expected["depth"], rtol=1e-5, atol=0)
    # fov_deg: the FOV implied by the given focal length (W = 60 px)
    implied = math.degrees(2 * math.atan(0.5 * 60 / 50.0))
    assert abs(float(out["fov_deg"]) - implied) < 1e-4
    # without f_px the FOV branch is needed: here it raises, proving it runs
    with pytest.raises(AssertionError, match="FOV encoder ran"):
        fast.infer(image)


def test_reference_infer_keeps_estimated_fov_with_f_px(micro_reference):
    """Default (reference) models keep the official behaviour: the FOV network runs even with
    f_px, and its estimate is returned as fov_deg_estimated."""
    model, *_ = micro_reference
    assert model.skip_unused_fov is False
    assert model.fast_engine is None
    image = torch.rand(3, 40, 60) * 2 - 1
    out = model.infer(image, f_px=50.0)
    with torch.no_grad():
        _, fov = model(torch.nn.functional.interpolate(image[None], size=(1536, 1536),
                                                       mode="bilinear", align_corners=False))
    assert torch.equal(out["fov_deg_estimated"], fov.reshape(()))


def test_one_fov_rule_on_reference_and_fast_paths(micro_reference):
    """fov_deg is the FOV of the focal length used, identical on both paths when it is given;
    fov_deg_estimated is there exactly when the FOV network ran."""
    model, *_ = micro_reference
    fast = fast_copy(model)
    image = torch.rand(3, 45, 600) * 2 - 1  # 600 px wide, as in the issue
    implied = math.degrees(2 * math.atan(0.5 * 600 / 833.3))  # 39.60 degrees
    ref_given, fast_given = model.infer(image, f_px=833.3), fast.infer(image, f_px=833.3)
    assert torch.equal(ref_given["fov_deg"], fast_given["fov_deg"])  # bit for bit
    assert float(ref_given["fov_deg"]) == pytest.approx(implied, abs=1e-4)
    assert "fov_deg_estimated" in ref_given  # the reference path ran the FOV network ...
    assert "fov_deg_estimated" not in fast_given  # ... the fast path skipped it
    assert float(ref_given["fov_deg_estimated"]) != pytest.approx(implied, abs=1e-3)

    ref_est, fast_est = model.infer(image), fast.infer(image)
    for out in (ref_est, fast_est):
        assert torch.equal(out["fov_deg"], out["fov_deg_estimated"])
        # fov_deg is the FOV of focallength_px
        assert float(out["fov_deg"]) == pytest.approx(
            math.degrees(2 * math.atan(300 / float(out["focallength_px"]))), rel=1e-5)
    assert abs(float(ref_est["fov_deg"]) - float(fast_est["fov_deg"])) <= FOV_BUDGET_DEG
    # a batch of two with one focal length for both: the same rule per image
    batch = model.infer(torch.stack([image, image.flip(-1)]), f_px=833.3)
    assert batch["fov_deg"].shape == (2,) and batch["fov_deg_estimated"].shape == (2,)
    assert torch.equal(batch["fov_deg"], ref_given["fov_deg"].expand(2))


# ---------------------------------------------------------------------------------------------
# engine mechanics (cheap: no forward)
# ---------------------------------------------------------------------------------------------


def test_engine_is_not_in_the_state_dict_and_copies(micro_reference):
    model, *_ = micro_reference
    keys = list(model.state_dict())
    fast = fast_copy(model)
    assert list(fast.state_dict()) == keys
    assert isinstance(fast.fast_engine, FastEngine)
    dup = copy.deepcopy(fast)
    assert dup.fast_engine is not fast.fast_engine and dup.fast_engine.model is dup
    fast.prepare_fast(False)
    assert fast.fast_engine is None and fast.skip_unused_fov is False


def test_weight_change_in_place_re_prepares(micro_reference):
    model, *_ = micro_reference
    fast = fast_copy(model)
    engine = fast.fast_engine
    before = engine._ensure_prepared()
    assert engine._ensure_prepared() is before  # nothing changed: nothing rebuilt
    with torch.no_grad():
        fast.decoder.fusions[1].out_conv.weight.mul_(2.0)
    after = engine._ensure_prepared()
    assert after is not before
    # and after a dtype change too
    fast.half()
    assert engine._ensure_prepared().head0.weight.dtype == torch.float16


def test_forward_routes_to_engine_only_without_grad(micro_reference, monkeypatch):
    model, x, *_ = micro_reference
    fast = fast_copy(model)
    calls = []

    class Spy(FastEngine):
        def __call__(self, x, *, need_fov=True):
            calls.append(need_fov)
            return "engine"

    fast._fast_engine = Spy(fast, FastOptions(), lazy=True)
    with torch.no_grad():
        assert fast(x, need_fov=False) == "engine"
    assert calls == [False]

    def boom(*a, **k):
        raise RuntimeError("reference path")

    monkeypatch.setattr(fast.encoder.patch_encoder, "forward_with_hooks", boom)
    with pytest.raises(RuntimeError, match="reference path"):  # grad enabled: reference
        fast(x)
    with torch.no_grad(), pytest.raises(RuntimeError, match="reference path"):
        fast(x, intermediates={})  # intermediates: reference


def test_fast_options_validation():
    assert FastOptions.resolve(False) is None and FastOptions.resolve(None) is None
    assert FastOptions.resolve(True) == FastOptions()
    assert FastOptions.resolve({"streams": False}).streams is False
    with pytest.raises(ValueError, match="unknown fast options"):
        FastOptions.resolve({"stream": False})
    with pytest.raises(TypeError, match="fast must be"):
        FastOptions.resolve("yes")
    with pytest.raises(ValueError, match="epilogues"):
        FastOptions(epilogues="triton")
    with pytest.raises(TypeError, match="cuda_graphs"):
        FastOptions(cuda_graphs=1)
    with pytest.raises(ValueError, match="backend"):
        FastOptions(epilogue_backend="fastest")
    with pytest.raises(ValueError, match="cpu_gemm must be one of auto, aten, onednn"):
        FastOptions(cpu_gemm="mkl")


def test_load_rejects_bad_fp8_and_fast_options():
    # fp8 (e4m3) is the fast path's precision mode: tests/test_fp8.py; other FP8 formats are not
    for dtype in ("float8_e5m2", torch.float8_e5m2):
        with pytest.raises(ValueError, match="only e4m3 is supported"):
            depthpro_fast.load(None, config="tiny", device="cpu", dtype=dtype)
    with pytest.raises(ValueError, match="unknown fast options"):
        depthpro_fast.load(None, config="tiny", device="cpu", fast={"graphs": True})


def test_load_fast_prepares_once():
    torch.manual_seed(0)
    model, _ = depthpro_fast.load(None, config=MICRO, device="cpu", fast={"streams": False})
    assert model.fast_engine is not None and model.skip_unused_fov
    assert model.fast_engine.options.streams is False
    assert model.fast_engine._prepared is not None  # folded at load


def test_graph_runner_falls_back_on_cpu():
    runner = GraphRunner()
    x = torch.randn(3)
    out = runner.run("k", lambda t: (t * 2, None), x)
    assert torch.equal(out[0], x * 2) and out[1] is None
    assert "CUDA" in runner.failures["k"]
    assert runner.captures == 0


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official_reference():
    """Official config, plausible random weights, fp32 reference on the GPU."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    model, _ = random_model(None, seed=21, device="cuda")
    x = model_input(seed=3, device="cuda")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference (TF32 convs: ~1e-3 error)
    try:
        with torch.no_grad():
            cid, fov = model(x)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return model, x, cid, fov


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_accuracy_budget(official_reference, dtype):
    model, x, cid, fov = official_reference
    fast = copy.deepcopy(model).to(dtype).set_backend("auto").prepare_fast(True)
    with torch.no_grad():
        out_cid, out_fov = fast(x.to(dtype))
    err, fov_err = mare(out_cid, cid), abs(float(out_fov) - float(fov))
    print(f"{dtype}: MARE {err:.2e}, FOV error {fov_err:.4f} deg, "
          f"{fast.fast_engine.status()['graphs']}")
    assert err <= MARE_BUDGET[dtype]
    assert fov_err <= FOV_BUDGET_DEG


@pytest.mark.gpu
@requires_cuda
def test_gpu_graph_replay_identical_to_eager(official_reference):
    model, x, *_ = official_reference
    graphed = copy.deepcopy(model).to(torch.bfloat16).set_backend("auto").prepare_fast(True)
    eager = copy.deepcopy(graphed).prepare_fast({"cuda_graphs": False})
    xb = x.bfloat16()
    x2 = (xb.flip(-1) * 0.5).contiguous()
    with torch.no_grad():
        first = graphed(xb)  # capture + replay
        second = graphed(x2)  # replay with a new input in the static buffer
        third = graphed(xb)
        status = graphed.fast_engine.status()["graphs"]
        assert status["captures"] == 1 and not status["failures"], status
        ref1, ref2 = eager(xb), eager(x2)
    for got, ref in ((first, ref1), (second, ref2), (third, ref1)):
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert not torch.equal(first[0], second[0])


@pytest.mark.gpu
@requires_cuda
def test_gpu_streams_and_fov_skip_identical(official_reference):
    model, x, *_ = official_reference
    a = copy.deepcopy(model).to(torch.bfloat16).set_backend("auto")
    b = copy.deepcopy(a)
    a.prepare_fast({"cuda_graphs": False, "streams": True})
    b.prepare_fast({"cuda_graphs": False, "streams": False})
    xb = x.bfloat16()
    with torch.no_grad():
        ra, rb = a(xb), b(xb)
        skipped = a(xb, need_fov=False)
    assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1])
    assert skipped[1] is None and torch.equal(skipped[0], ra[0])


@pytest.mark.gpu
@requires_cuda
def test_gpu_threads_share_a_graph_runner(official_reference):
    model, x, *_ = official_reference
    fast = copy.deepcopy(model).to(torch.bfloat16).set_backend("auto").prepare_fast(True)
    inputs = [(x * s).bfloat16() for s in (1.0, 0.5, -0.7)]
    with torch.no_grad():
        expected = [fast(t)[0] for t in inputs]
    results: dict[int, list] = {}

    def worker(i):
        with torch.no_grad():
            results[i] = [fast(inputs[(i + j) % 3])[0] for j in range(4)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    for i, outs in results.items():
        for j, out in enumerate(outs):
            assert torch.equal(out, expected[(i + j) % 3])


@pytest.mark.gpu
@requires_cuda
def test_gpu_batch_of_two(official_reference):
    model, x, *_ = official_reference
    fast = copy.deepcopy(model).to(torch.bfloat16).set_backend("auto").prepare_fast(True)
    xb = torch.cat([x, x.flip(-1)]).bfloat16()
    with torch.no_grad():
        both = fast(xb)
        singles = [fast(xb[i:i + 1]) for i in range(2)]
    for i in range(2):
        assert mare(both[0][i:i + 1], singles[i][0]) <= 1e-3
        assert abs(float(both[1][i]) - float(singles[i][1])) <= 0.05


@pytest.mark.gpu
@requires_cuda
def test_gpu_capture_failure_falls_back():
    runner = GraphRunner()
    x = torch.randn(16, device="cuda")

    def syncs(t):
        return (t * float(t.sum()),)  # host sync: not capturable

    with pytest.warns(RuntimeWarning, match="not used"):
        out = runner.run("k", syncs, x)
    torch.testing.assert_close(out[0], x * float(x.sum()))
    assert "capture failed" in runner.failures["k"]
    out = runner.run("k", syncs, x)  # eager from now on, no second attempt
    assert runner.captures == 0


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_gpu_compiled_blocks_budget(official_reference, dtype):
    model, x, cid, fov = official_reference
    fast = copy.deepcopy(model).to(dtype).set_backend("auto").prepare_fast(
        {"epilogues": "compile"})
    check_budget(fast, x, cid, fov, dtype)


# ---------------------------------------------------------------------------------------------
# the ablation harness (GPU measurements of each step)
# ---------------------------------------------------------------------------------------------


def test_ablation_table_and_cpu_refusal():
    from depthpro_fast.fast import ablation

    rows = [{"variant": "reference", "ms": 100.0, "p10": 99.0, "p90": 101.0,
             "images_per_s": 10.0, "mare": 1e-3, "fov_err_deg": 0.01},
            {"variant": "fast", "ms": 30.0, "p10": 29.0, "p90": 31.0, "images_per_s": 33.3,
             "speedup_vs_reference": 3.33, "mare": 2e-3, "fov_err_deg": None},
            {"variant": "fast-epilogues=compile", "error": "RuntimeError: boom"}]
    text = ablation.format_table(rows)
    assert "reference" in text and "3.33" in text and "ERROR" in text
    if HAS_CUDA:
        with pytest.raises(ValueError, match="unknown variants"):
            ablation.run(variants=["fast-everything"])
    else:
        with pytest.raises(RuntimeError, match="CUDA"):
            ablation.run()


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
def test_gpu_ablation_runs():
    from depthpro_fast.fast import ablation

    rows = ablation.run(variants=["reference", "fast", "fast-cuda_graphs=False"], repeats=3,
                        warmup=1, inputs=2)
    assert all("error" not in r for r in rows), rows
    print(ablation.format_table(rows))


@requires_triton
@pytest.mark.slow
def test_fast_all_triton_fp16_budget(micro_reference):
    """Every op through Triton (split, attention, merge, epilogues; interpreter on CPU: ~4 min)."""
    model, x, cid, fov = micro_reference
    fast = fast_copy(model, torch.float16)
    fast.set_backend("triton")
    check_budget(fast, x, cid, fov, torch.float16)
