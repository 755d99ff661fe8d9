"""The fp8 precision mode (``load(dtype="fp8")``): weights, GEMMs, the ViT, the whole model.

On a CPU this is the emulation (the GPU's e4m3 values and scales, fp32 accumulation through
``torch._scaled_mm``'s CPU kernel, or dequantised matmuls where PyTorch's CPU kernel lacks
row-wise scales), so the accuracy figures are the GPU's up to summation order. bf16 (the rest
of the model) is emulated on CPUs without bf16 arithmetic: these runs take tens of seconds.
Figures are printed (``-s``) for the notes.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import depthpro_fast
from depthpro_fast import ops
from depthpro_fast.accuracy import (
    FP8_FOV_BUDGET_DEG,
    FP8_MARE_BUDGET,
    mean_abs_rel_error,
    signal_rel_error,
)
from depthpro_fast.fast import fp8 as fp8_mod
from depthpro_fast.fast.vit import fused_forward_with_hooks
from depthpro_fast.fp8_format import E4M3, Fp8UnavailableError, fp8_problem
from depthpro_fast.ops.quantize_fp8 import dequantize_rows
from tests.model_helpers import MICRO, model_input


def _load(config, seed, **kw):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the CPU emulation / bf16 warnings
        return depthpro_fast.load(None, config=config, device="cpu", **kw)[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def tiny_fp8_run():
    """tiny config: fp32 reference, fp8 fast path (row and tensor scaling) on one input."""
    ref = _load("tiny", 11, backend="reference")
    x = model_input(seed=1)
    with torch.no_grad():
        cid, fov = ref(x)
    out = {}
    for scaling in ("row", "tensor"):
        m = _load("tiny", 11, dtype="fp8", fast={"fp8_scaling": scaling})
        with torch.no_grad():
            out[scaling] = m(x.bfloat16())
    return m, cid, fov, out


# ---------------------------------------------------------------------------------------------
# weights and the GEMM
# ---------------------------------------------------------------------------------------------


def test_weight_quantisation_per_output_channel():
    w = torch.randn(48, 32)
    w[7] *= 1e3
    w[9] = 0.0
    qw = fp8_mod.quantize_weight(w, "blk.fc1")
    assert qw.q.dtype == E4M3 and qw.q.shape == (48, 32) and qw.q.is_contiguous()
    assert qw.scale.shape == (1, 48) and qw.scale.dtype == torch.float32
    assert qw.q.t().stride() == (1, 32)  # the column-major operand _scaled_mm wants
    deq = qw.q.float() * qw.scale.t()
    assert torch.equal(deq[9], torch.zeros(32))
    assert bool(((deq - w).abs() <= w.abs() * 2 ** -4 + qw.scale.t() * 2 ** -10).all())
    w[3, 4] = float("inf")
    with pytest.raises(ValueError, match=r"fp8 weight blk\.fc1: .* at row 3"):
        fp8_mod.quantize_weight(w, "blk.fc1")


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_matmul_is_the_dequantised_product(bias, monkeypatch):
    """Both CPU routes (_scaled_mm's CPU kernel, the dequantised matmul) give the product of
    the dequantised operands, rounded once to bf16."""
    x, w = torch.randn(37, 64), torch.randn(80, 64)
    b = torch.randn(80).bfloat16() if bias else None
    q, s = ops.quantize_rows(x)
    qw = fp8_mod.quantize_weight(w)
    want = dequantize_rows(q, s) @ (qw.q.float() * qw.scale.t()).t()
    if bias:
        want = want + b.float()
    routes = [True, False] if fp8_mod.cpu_rowwise_scaled_mm()[0] else [False]
    for rowwise in routes:
        monkeypatch.setattr(fp8_mod, "cpu_rowwise_scaled_mm",
                            lambda r=rowwise: (r, "forced by the test"))
        out = fp8_mod.fp8_matmul(q, s, qw, b, torch.bfloat16)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), want, rtol=2 ** -8, atol=1e-5)


@pytest.mark.parametrize("factor", [100.0, 1e5])
def test_planted_outlier_rows_per_token_vs_per_tensor(factor):
    """A few tokens 100x (DINOv2-like high-norm rows) or 1e5x larger at a GEMM's input: with
    per-token scales the other rows' quantisation is bit for bit what it is without them; one
    scale per tensor costs them precision once the outliers push them into e4m3's subnormals
    (e4m3's exponent absorbs 100x: measured 3.73 % -> 3.74 % GEMM error; 1e5x: 3.7 % -> 52 %)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(577, 1024, generator=g)
    w = torch.randn(1024, 1024, generator=g) / 32
    qw = fp8_mod.quantize_weight(w)
    planted = [0, 100, 300, 576]
    others = [i for i in range(577) if i not in planted]
    xo = x.clone()
    xo[planted] *= factor
    exact = xo @ w.t()

    def gemm_err(inp, per_tensor):
        q, s = ops.quantize_rows(inp, per_tensor=per_tensor)
        out = fp8_mod.fp8_matmul(q, s, qw, None, torch.float32)
        return _rel(out[others], exact[others]), q

    clean, q_clean = gemm_err(x, False)
    row, q_row = gemm_err(xo, False)
    tensor, _ = gemm_err(xo, True)
    print(f"\nplanted {factor:g}x rows: other rows' GEMM error per-token {row:.4f} (without "
          f"the planted rows {clean:.4f}), per-tensor {tensor:.4f}")
    assert torch.equal(q_row[others].view(torch.uint8), q_clean[others].view(torch.uint8))
    assert row == pytest.approx(clean, rel=1e-6) and row < 0.05
    assert tensor >= row  # one scale is never better for the other rows
    if factor >= 1e5:
        assert tensor > 5 * row


# ---------------------------------------------------------------------------------------------
# the ViT and the whole model
# ---------------------------------------------------------------------------------------------


def test_fp8_vit_against_fp32_and_bf16():
    """The fused fp8 ViT (tiny): its output and hooks near the fp32 reference's, a little
    further than bf16's (the e4m3 branches are diluted by the bf16 residual stream)."""
    ref = _load("tiny", 11, backend="reference")
    m = _load("tiny", 11, dtype="fp8")
    x = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        n0, h0 = ref.encoder.patch_encoder.forward_with_hooks(x, (0, 1))
        vit = m.encoder.patch_encoder
        gemm = fp8_mod.Fp8Gemm(m.fast_engine._prepared.fp8_weights, "auto")
        n8, h8 = fused_forward_with_hooks(vit, x.bfloat16(), (0, 1), backend="auto",
                                          epilogue_backend="auto", gemm=gemm)
        nb, _ = fused_forward_with_hooks(vit, x.bfloat16(), (0, 1), backend="auto",
                                         epilogue_backend="auto")
    e8, eb = _rel(n8.float(), n0), _rel(nb.float(), n0)
    print(f"\ntiny patch-encoder output vs fp32: fp8 {e8:.4f}, bf16 {eb:.4f}; hook 0 fp8 "
          f"{_rel(h8[0].float(), h0[0]):.4f}")
    assert n8.dtype == torch.bfloat16 and e8 < 0.02 and e8 >= eb * 0.9


def test_fp8_tiny_model_within_budget(tiny_fp8_run):
    m, cid, fov, out = tiny_fp8_run
    figures = []
    for scaling, (c, f) in out.items():
        assert c.dtype == torch.bfloat16
        mare, fov_err = mean_abs_rel_error(c, cid), abs(float(f) - float(fov))
        figures.append(f"{scaling}: MARE {mare:.2e}, FOV error {fov_err:.4f} deg, signal "
                       f"error {signal_rel_error(c, cid):.3f}")
        assert mare <= FP8_MARE_BUDGET and fov_err <= FP8_FOV_BUDGET_DEG
    print("\ntiny fp8 vs fp32 reference: " + "; ".join(figures))
    status = m.fast_engine.status()
    assert status["options"]["fp8"] is True and "48 ViT linears in e4m3" in status["fp8"]


def test_fp8_runs_every_vit_linear_through_the_fp8_gemm(monkeypatch):
    m = _load(MICRO, 12, dtype="fp8")
    calls = []
    real = fp8_mod.fp8_matmul
    monkeypatch.setattr(fp8_mod, "fp8_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        m(model_input(seed=2).bfloat16())
    # 3 ViTs x 2 blocks x 4 linears
    assert len(calls) == 3 * MICRO.depth * 4


def test_fp8_reference_backend_works():
    """backend='reference': the engine with every op pure PyTorch and plain _scaled_mm (auto
    on a CPU differs only by PyTorch's flash attention)."""
    x = model_input(seed=2).bfloat16()
    outs = []
    for backend in ("reference", "auto"):
        m = _load(MICRO, 12, dtype="fp8", backend=backend)
        with torch.no_grad():
            outs.append(m(x))
    assert outs[0][0].dtype == torch.bfloat16
    assert mean_abs_rel_error(outs[0][0], outs[1][0]) < 5e-3
    assert abs(float(outs[0][1]) - float(outs[1][1])) < 0.1


def test_fp8_weight_change_in_place_re_prepares():
    m = _load(MICRO, 12, dtype="fp8")
    x = model_input(seed=2).bfloat16()
    with torch.no_grad():
        before = m(x)[0]
        m.encoder.patch_encoder.blocks[0].mlp.fc1.weight.mul_(3.0)
        after = m(x)[0]
    assert not torch.equal(before, after)
    w = m.encoder.patch_encoder.blocks[0].mlp.fc1.weight
    prepared = m.fast_engine._prepared.fp8_weights[id(w)]
    assert torch.equal(prepared.q.view(torch.uint8),
                       fp8_mod.quantize_weight(w).q.view(torch.uint8))


# ---------------------------------------------------------------------------------------------
# load / options: what fp8 means and where it is refused
# ---------------------------------------------------------------------------------------------


def test_load_fp8_implies_the_fast_path_and_warns_on_cpu():
    for spelling in ("fp8", "float8_e4m3fn", torch.float8_e4m3fn):
        torch.manual_seed(0)
        with pytest.warns(RuntimeWarning, match=r"on a CPU is an emulation for tests"):
            m, t = depthpro_fast.load(None, config=MICRO, device="cpu", dtype=spelling)
        assert m.fast_engine is not None and m.fast_engine.options.fp8
        assert next(m.parameters()).dtype == torch.bfloat16 and t.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fast path only.*drop fast=False"):
        depthpro_fast.load(None, config=MICRO, device="cpu", dtype="fp8", fast=False)
    with pytest.raises(ValueError, match="only e4m3 is supported"):
        depthpro_fast.load(None, config=MICRO, device="cpu", dtype="float8_e5m2")
    with pytest.raises(ValueError, match="only e4m3"):
        depthpro_fast.load(None, config=MICRO, device="cpu", dtype=torch.float8_e5m2)
    with pytest.raises(ValueError, match="fp8 runs in the fused ViT forward"):
        depthpro_fast.load(None, config=MICRO, device="cpu", dtype="fp8",
                           fast={"epilogues": "torch"})
    with pytest.raises(ValueError, match="fp8_scaling must be one of row, tensor"):
        depthpro_fast.load(None, config=MICRO, device="cpu", dtype="fp8",
                           fast={"fp8_scaling": "block"})
    with pytest.raises(ValueError, match="fp8 needs a bfloat16 model"):
        _load(MICRO, 0, fast=True).prepare_fast({"fp8": True})


def test_fp8_refused_below_compute_capability_8_9(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    why = fp8_problem(torch.device("cuda:0"))
    assert "compute capability 8.0" in why and ">= 8.9" in why and "A100" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 9))
    assert fp8_problem(torch.device("cuda:0")) is None
    assert fp8_problem(torch.device("cpu")) is None
    # load() refuses before reading any weight, naming the capability
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(depthpro_fast.api, "resolve_device", lambda d: torch.device("cuda:0"))
    with pytest.raises(Fp8UnavailableError, match=r"compute capability 7\.5.*dtype=torch"
                                                   r"\.bfloat16"):
        depthpro_fast.load(None, config=MICRO, device="cuda", dtype="fp8")


# ---------------------------------------------------------------------------------------------
# full size (slow: minutes of fp32 and emulated bf16 on a CPU; run under the big-model lock)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fp8_official_size_within_budget():
    """Official config, seeded random weights, one 1536x1536 input: fp8 vs the fp32 reference
    (the figures go in docs/fast_path.md). ``flock /tmp/depthpro_big.lock pytest ...``."""
    ref = _load("official", 0, backend="reference")
    x = model_input(seed=1)
    with torch.no_grad():
        cid, fov = ref(x)
    del ref
    m = _load("official", 0, dtype="fp8")  # the same seed: the same weights, in bf16
    with torch.no_grad():
        c, f = m(x.bfloat16())
    mare, fov_err = mean_abs_rel_error(c, cid), abs(float(f) - float(fov))
    print(f"\nofficial fp8 vs fp32 reference: MARE {mare:.3e}, FOV error {fov_err:.4f} deg, "
          f"signal error {signal_rel_error(c, cid):.4f}")
    assert c.dtype == torch.bfloat16
    assert mare <= FP8_MARE_BUDGET and fov_err <= FP8_FOV_BUDGET_DEG


# ---------------------------------------------------------------------------------------------
# command line and bench rows
# ---------------------------------------------------------------------------------------------


def test_bench_fp8_rows_and_their_skips():
    from depthpro_fast.bench.runner import Runner
    from depthpro_fast.bench.variants import default_variants

    gpu_rows = default_variants(torch.device("cuda"), hf=False)
    fp8_rows = [v for v in gpu_rows if v.fp8]
    assert [(v.name, v.dtype_label) for v in fp8_rows] == [
        ("fast engine", "fp8"), ("fast engine + CUDA graph", "fp8")]
    assert all(v.path == "engine" and v.dtype == torch.bfloat16 for v in fp8_rows)
    only = default_variants(torch.device("cuda"), dtypes=[], fp8=True)
    assert only == fp8_rows
    assert not any(v.fp8 for v in default_variants(torch.device("cuda"),
                                                    dtypes=[torch.float32]))
    cpu_rows = default_variants(torch.device("cpu"))
    runner = Runner(MICRO, torch.device("cpu"), batches=[1], runs=1, warmup=0)
    for v in (v for v in cpu_rows if v.fp8):
        row = runner.run_row(v, 1)
        assert row.status == "skipped"
        assert ("emulation" in row.reason and "--dtype fp8" in row.reason) or \
            "CUDA graphs" in row.reason


def test_predict_fp8_refuses_no_fast(tmp_path, capsys):
    from PIL import Image

    from depthpro_fast import cli

    img = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (120, 60, 30)).save(img)
    rc = cli.main(["predict", str(img), "-o", str(tmp_path / "o"), "--random-weights",
                   "--config", "tiny", "--dtype", "fp8", "--no-fast", "--device", "cpu"])
    assert rc != 0
    assert "--dtype fp8 runs on the fast path only" in capsys.readouterr().err
