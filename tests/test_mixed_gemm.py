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
    with torch.no_grad():
        got = fast(x)[0]
        want = other(x)[0]
    assert mean_abs_rel_error(got, want) < 1e-3
    stale = copy.deepcopy(model).prepare_fast(dict(gemm_dtype="bf16"))
    with torch.no_grad():
        assert mean_abs_rel_error(stale(x)[0], want) > 10 * mean_abs_rel_error(got, want)
