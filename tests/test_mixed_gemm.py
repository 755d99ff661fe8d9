"""``FastOptions(gemm_dtype="bf16")`` (``fast/mixed_gemm.py``): an fp32 model whose fused-ViT
linears take bf16 inputs, activations in fp32. Tiny model with LayerScale and biases made large
(``model_helpers.model_with_large_layerscale``) so that the ViT's GEMMs dominate the error."""

from __future__ import annotations

import copy

import pytest
import torch

from depthpro_fast.accuracy import mean_abs_rel_error
from depthpro_fast.fast import FastOptions
from tests.model_helpers import model_input, model_with_large_layerscale


@pytest.fixture(scope="module")
def tiny():
    model = model_with_large_layerscale(seed=31)
    x = model_input(seed=7)
    with torch.no_grad():
        cid, _ = model(x)
    return model, x, cid


def test_mixed_mare_well_below_the_bf16_fast_path(tiny):
    model, x, ref = tiny
    mixed = copy.deepcopy(model).prepare_fast(dict(gemm_dtype="bf16"))
    bf16 = copy.deepcopy(model).to(torch.bfloat16).prepare_fast(True)
    with torch.no_grad():
        got = mixed(x)[0]
        low = bf16(x.bfloat16())[0].float()
    e_mixed, e_bf16 = mean_abs_rel_error(got, ref), mean_abs_rel_error(low, ref)
    # the bf16 rounding is really applied (not the fp32 GEMMs), yet far below all-bf16's error
    assert 1e-7 < e_mixed < e_bf16 / 5, (e_mixed, e_bf16)
    assert "gemm_dtype=bf16: 48 ViT linears" in mixed.fast_engine.status()["cpu_gemm"]
    prepared = mixed.fast_engine._ensure_prepared()
    assert any(t.dtype == torch.bfloat16 for t in prepared.tensors())


def test_refusals(tiny):
    model, *_ = tiny
    with pytest.raises(ValueError, match="gemm_dtype must be one of"):
        FastOptions(gemm_dtype="fp16")
    with pytest.raises(ValueError, match="needs epilogues='fused'"):
        FastOptions(gemm_dtype="bf16", epilogues="torch")
    for clash in (dict(fp8=True), dict(vit_lockstep=True), dict(fold_layerscale=True),
                  dict(fc1_gelu="tanh")):
        with pytest.raises(ValueError, match="cannot be combined with"):
            FastOptions(gemm_dtype="bf16", **clash)
    with pytest.raises(ValueError, match="this model is torch.bfloat16"):
        copy.deepcopy(model).to(torch.bfloat16).prepare_fast(dict(gemm_dtype="bf16"))
    from depthpro_fast.fast.mixed_gemm import check_mixed_model
    with pytest.raises(ValueError, match="CPU only for now"):
        check_mixed_model(torch.empty(1, device="meta"), "bf16")


def test_prepared_copies_refreshed_after_load_state_dict(tiny):
    model, x, _ = tiny
    fast = copy.deepcopy(model).prepare_fast(dict(gemm_dtype="bf16"))
    engine = fast.fast_engine
    before = engine._ensure_prepared()
    assert engine._ensure_prepared() is before
    other = model_with_large_layerscale(seed=32)
    fast.load_state_dict(other.state_dict())
    assert engine._ensure_prepared() is not before
    fresh = copy.deepcopy(other).prepare_fast(dict(gemm_dtype="bf16"))
    stale = copy.deepcopy(model).prepare_fast(dict(gemm_dtype="bf16"))
    with torch.no_grad():
        got, want, old = fast(x)[0], fresh(x)[0], stale(x)[0]
    # the refreshed copies are the new weights' (the same arithmetic as a fresh preparation)
    assert mean_abs_rel_error(got, want) < 1e-6
    assert mean_abs_rel_error(old, want) > 1e-5


@pytest.mark.parametrize("kind", ["conv3x3", "conv1x1_s1", "deconv_k2", "grouped"])
def test_folded_conv_with_bf16_inputs_is_the_fp32_conv_of_rounded_operands(kind):
    """``folds.Conv`` / ``Deconv`` with ``gemm_dtype=bf16``: bf16 weight and input, fp32
    accumulation, the bias-less output rounded once to bf16 (oneDNN writes bf16), widened, then
    the fp32 bias: the fp64 conv of the bf16-rounded operands to within one bf16 rounding; and
    not the fp32 conv (the rounding is real)."""
    import torch.nn.functional as F

    from depthpro_fast.fast import folds

    g = torch.Generator().manual_seed(5)
    groups = 4 if kind == "grouped" else 1
    c_in, c_out = 24, 12 if kind != "grouped" else 8
    x = torch.randn(2, c_in, 13, 11, generator=g)
    if kind.startswith("deconv"):
        w = torch.randn(c_in, c_out, 2, 2, generator=g)
        b = torch.randn(c_out, generator=g)
        layer = folds.Deconv(w, b, dtype=torch.float32, device=torch.device("cpu"),
                             channels_last=True, gemm_dtype=torch.bfloat16)

        def exact(xx, ww):
            return F.conv_transpose2d(xx, ww, stride=2)
    else:
        k = 3 if kind in ("conv3x3",) else 1
        w = torch.randn(c_out, c_in // groups, k, k, generator=g)
        b = torch.randn(c_out, generator=g)
        layer = folds.Conv(w, b, padding=k // 2, groups=groups, dtype=torch.float32,
                           device=torch.device("cpu"), channels_last=True,
                           gemm_dtype=torch.bfloat16)

        def exact(xx, ww):
            return F.conv2d(xx, ww, padding=k // 2, groups=groups)
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.float32
    got = layer(x.contiguous(memory_format=torch.channels_last))
    assert got.dtype == torch.float32
    got = got.double() - b.double().view(1, -1, 1, 1)
    rounded = exact(x.bfloat16().double(), w.bfloat16().double())
    fp32 = exact(x, w).double()
    scale = rounded.abs().max()
    # one bf16 rounding of the output (2^-9 relative; an fp32-accumulation tie may take the
    # neighbour, 2^-8), plus fp32 accumulation noise
    assert ((got - rounded).abs() <= 2.0 ** -8 * rounded.abs() + 1e-6 * scale).all()
    assert (got - fp32).abs().max() / scale > 1e-4


def test_mixed_convs_prepare_bf16_conv_weights_and_keep_the_depth_writer_fp32(tiny):
    model, x, ref = tiny
    vit_only = copy.deepcopy(model).prepare_fast(dict(gemm_dtype="bf16", gemm_dtype_convs=False))
    both = copy.deepcopy(model).prepare_fast(dict(gemm_dtype="bf16"))
    bf16 = copy.deepcopy(model).to(torch.bfloat16).prepare_fast(True)
    prepared = both.fast_engine._ensure_prepared()
    assert prepared.head0.weight.dtype == torch.bfloat16
    assert prepared.subpixel.conv.weight.dtype == torch.bfloat16
    assert prepared.subpixel.out.weight.dtype == torch.float32  # writes the depth map
    assert vit_only.fast_engine._ensure_prepared().head0.weight.dtype == torch.float32
    with torch.no_grad():
        e_vit = mean_abs_rel_error(vit_only(x)[0], ref)
        e_both = mean_abs_rel_error(both(x)[0], ref)
        e_bf16 = mean_abs_rel_error(bf16(x.bfloat16())[0].float(), ref)
    assert e_vit < e_both < e_bf16 / 5, (e_vit, e_both, e_bf16)


def test_load_bf16_mixed_is_an_fp32_model_with_bf16_gemm_inputs():
    import depthpro_fast

    model, transform = depthpro_fast.load(None, config="tiny", device="cpu", dtype="bf16-mixed")
    assert next(model.parameters()).dtype == torch.float32 and transform.dtype == torch.float32
    assert model.fast_engine.options.gemm_dtype == "bf16"
    # options given with the mode are kept, the mode's own switch added
    model, _ = depthpro_fast.load(None, config="tiny", device="cpu", dtype="bf16_mixed",
                                  fast={"gemm_dtype_convs": False})
    assert model.fast_engine.options.gemm_dtype == "bf16"
    assert model.fast_engine.options.gemm_dtype_convs is False
    with pytest.raises(ValueError, match="fast path only"):
        depthpro_fast.load(None, config="tiny", device="cpu", dtype="bf16-mixed", fast=False)
    from depthpro_fast.api import resolve_dtype

    with pytest.raises(ValueError, match="bf16-mixed mode, not a tensor dtype"):
        resolve_dtype("bf16-mixed")
    with pytest.raises(ValueError, match="accepted: .*bf16-mixed"):
        resolve_dtype("bf17")


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_precision_on_a_cpu(monkeypatch, bf16):
    """dtype="auto" on a CPU: bf16-mixed where it has bf16 arithmetic and the fast path runs,
    bf16 there on the reference path, fp32 elsewhere."""
    from types import SimpleNamespace

    from depthpro_fast import api, cpu

    monkeypatch.setattr(cpu, "cpu_features", lambda: SimpleNamespace(bf16=bf16))
    dev = torch.device("cpu")
    assert api.auto_precision(dev) == ("bf16-mixed" if bf16 else torch.float32)
    assert api.auto_precision(dev, fast=False) == (torch.bfloat16 if bf16 else torch.float32)
    assert api.auto_precision(dev, backend="reference") == api.auto_precision(dev, fast=False)
    assert api.auto_precision(torch.device("cuda", 0)) == torch.float16
    assert cpu.cpu_default_precision() == ("bf16-mixed" if bf16 else "float32")
    from depthpro_fast.commands.predict import resolve_dtype_choice

    assert resolve_dtype_choice("auto", dev) == cpu.cpu_default_precision()
    assert resolve_dtype_choice("auto", dev, False) == ("bfloat16" if bf16 else "float32")
    assert resolve_dtype_choice("bf16-mixed", dev) == "bf16-mixed"


def test_bf16_mixed_has_its_own_provenance():
    from depthpro_fast.provenance import make_recipe

    mixed = make_recipe(None, config="tiny", dtype="bf16-mixed", fast=True)
    fp32 = make_recipe(None, config="tiny", dtype="float32", fast=True)
    assert mixed.dtype == "bf16-mixed" and fp32.dtype == "float32"
    assert mixed != fp32
