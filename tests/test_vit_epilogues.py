"""The fused ViT's epilogue switches (``fast/vit.py``, ``cpu_gemm.py``):
``fold_layerscale``, ``residual_in_gemm``, ``fc1_gelu="tanh"``, ``residual_fp32``.

Against the reference modules (``VisionTransformer.forward_with_hooks``, hooks included) and the
whole tiny model, fp32, with LayerScale and biases made large enough to matter (the model's
init has LayerScale 1e-5, which would hide a misplaced scale or bias). The tanh option changes
the function: it is checked against a reference whose GELU is the tanh form, and its error in
fp16 / bf16 against the fp32 (erf) reference is held to the accuracy budget. Every run draws
fresh random weights / inputs from its own seed.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from depthpro_fast.accuracy import FOV_BUDGET_DEG, MARE_BUDGET, mean_abs_rel_error
from depthpro_fast.fast import FastOptions
from depthpro_fast.fast.cpu_gemm import CpuGemm, addmm_fp32_out_available
from depthpro_fast.fast.fp8 import Fp8Gemm
from depthpro_fast.fast.vit import (
    LayerScaleFold,
    ViTEpilogues,
    fold_layerscale,
    fused_forward_with_hooks,
)
from tests.conftest import requires_triton
from tests.model_helpers import MICRO, max_rel, model_input, model_with_large_layerscale

_SEED = itertools.count(100)

#: (fold_layerscale, ViTEpilogues) combinations that compute the model's own function
EXACT = {
    "fold": (True, ViTEpilogues()),
    "fold+residual_in_gemm": (True, ViTEpilogues(residual_in_gemm=True)),
    # fp32 model: residual_fp32 is a no-op, but the path (out_dtype plumbing) runs
    "fold+residual_in_gemm+residual_fp32": (True, ViTEpilogues(True, "erf", True)),
}


def _vit_input(batch: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(next(_SEED))
    return torch.randn(batch, 3, 384, 384, generator=g).to(dtype)


def _vit_err(out, hooks, ref, ref_hooks) -> float:
    assert len(hooks) == len(ref_hooks)
    for a, b in zip(hooks, ref_hooks, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
    return max(max_rel(a, b) for a, b in zip([out, *hooks], [ref, *ref_hooks], strict=True))


# ---------------------------------------------------------------------------------------------
# the fold itself
# ---------------------------------------------------------------------------------------------


def test_fold_layerscale_is_exact_and_leaves_the_model_alone():
    model = model_with_large_layerscale(seed=next(_SEED))
    vit = model.encoder.patch_encoder
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        v = copy.deepcopy(vit).to(dtype)
        fold = fold_layerscale(v)
        assert len(fold.blocks) == len(v.blocks)
        carried = torch.zeros(v.blocks[0].ls1.gamma.shape, dtype=torch.float64)
        for blk, f in zip(v.blocks, fold.blocks, strict=True):
            g1, g2 = blk.ls1.gamma.double(), blk.ls2.gamma.double()
            want = (g1[:, None] * blk.attn.proj.weight.double()).to(dtype)
            assert f.proj_weight.dtype == dtype and torch.equal(f.proj_weight, want)
            want = (g2[:, None] * blk.mlp.fc2.weight.double()).to(dtype)
            assert torch.equal(f.fc2_weight, want)
            pb, fb = g1 * blk.attn.proj.bias.double(), g2 * blk.mlp.fc2.bias.double()
            assert torch.equal(f.proj_bias, pb.float()) and torch.equal(f.fc2_bias, fb.float())
            carried = carried + pb
            assert torch.allclose(f.shift_attn.double(), carried, rtol=1e-6, atol=1e-6)
            carried = carried + fb
            assert torch.allclose(f.shift_mlp.double(), carried, rtol=1e-6, atol=1e-6)
    for k, t in vit.state_dict().items():  # prepared copies: the model is untouched
        assert torch.equal(t, before[k]), k


# ---------------------------------------------------------------------------------------------
# the fused ViT vs the reference modules (fp32, hooks)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXACT))
@pytest.mark.parametrize("gemm_name", ["aten", "onednn"])
def test_fused_vit_switches_match_reference(name, gemm_name):
    from depthpro_fast.fast.cpu_gemm import onednn_linear_available

    if gemm_name == "onednn" and not onednn_linear_available(torch.float32)[0]:
        pytest.skip("no oneDNN here")
    use_fold, epilogues = EXACT[name]
    model = model_with_large_layerscale(seed=next(_SEED))
    vit = model.encoder.patch_encoder
    x = _vit_input(3)
    hook_ids = (len(vit.blocks) - 1, 0)  # out of order: the contract keeps the order asked
    with torch.no_grad():
        ref, ref_hooks = vit.forward_with_hooks(x, hook_ids)
        base, base_hooks = fused_forward_with_hooks(vit, x, hook_ids, backend="reference",
                                                    epilogue_backend="reference",
                                                    gemm=CpuGemm(gemm_name, "reference"))
        out, hooks = fused_forward_with_hooks(
            vit, x, hook_ids, backend="reference", epilogue_backend="reference",
            gemm=CpuGemm(gemm_name, "reference"),
            fold=fold_layerscale(vit) if use_fold else None, epilogues=epilogues)
    assert out.dtype == torch.float32
    base_err = _vit_err(base, base_hooks, ref, ref_hooks)
    err = _vit_err(out, hooks, ref, ref_hooks)
    # exact up to rounding: within a few fp32 ulps, as the unfolded fused path is
    assert err <= 2e-6 and err <= 10 * max(base_err, 1e-7), (err, base_err)
    # the hooked outputs are tensors of their own (the stream is updated in place)
    assert hooks[0].data_ptr() != hooks[1].data_ptr()


@requires_triton
def test_fused_vit_residual_in_gemm_triton_interpreter():
    """The same with the LayerNorm passes (shift, out_dtype) in the Triton kernel."""
    model = model_with_large_layerscale(MICRO, seed=next(_SEED))
    vit = model.encoder.patch_encoder
    x = _vit_input(2)
    with torch.no_grad():
        ref, ref_hooks = vit.forward_with_hooks(x, (0, 1))
        out, hooks = fused_forward_with_hooks(vit, x, (0, 1), backend="reference",
                                              epilogue_backend="triton",
                                              fold=fold_layerscale(vit),
                                              epilogues=ViTEpilogues(residual_in_gemm=True))
    assert _vit_err(out, hooks, ref, ref_hooks) <= 2e-6


def _with_tanh_gelu(vit):
    vit = copy.deepcopy(vit)
    for blk in vit.blocks:
        blk.mlp.act = torch.nn.GELU(approximate="tanh")
    return vit


@pytest.mark.parametrize("residual_in_gemm", [False, True])
def test_fc1_gelu_tanh_matches_a_tanh_reference(residual_in_gemm):
    """``fc1_gelu="tanh"`` is the model with the tanh GELU (what the GPU's epilogue computes;
    on a CPU ``_addmm_activation`` is exact, so the CPU path is addmm + tanh GELU)."""
    model = model_with_large_layerscale(seed=next(_SEED))
    vit = model.encoder.patch_encoder
    x = _vit_input(2)
    with torch.no_grad():
        ref, ref_hooks = _with_tanh_gelu(vit).forward_with_hooks(x, (1,))
        erf_ref, _ = vit.forward_with_hooks(x, (1,))
        out, hooks = fused_forward_with_hooks(
            vit, x, (1,), backend="reference", epilogue_backend="reference",
            fold=fold_layerscale(vit) if residual_in_gemm else None,
            epilogues=ViTEpilogues(residual_in_gemm=residual_in_gemm, fc1_gelu="tanh"))
    assert _vit_err(out, hooks, ref, ref_hooks) <= 2e-6
    assert max_rel(out, erf_ref) > 1e-6  # and it is not the erf model (the test can fail)


def test_cpu_gemm_tanh_gelu_both_libraries():
    from depthpro_fast.fast.cpu_gemm import onednn_linear_available

    g = torch.Generator().manual_seed(next(_SEED))
    x, w, b = (torch.randn(37, 64, generator=g), torch.randn(96, 64, generator=g) * 0.2,
               torch.randn(96, generator=g))
    want = F.gelu(F.linear(x, w, b), approximate="tanh")
    names = ["aten"] + (["onednn"] if onednn_linear_available(torch.float32)[0] else [])
    for name in names:
        out = CpuGemm(name).linear_bias_gelu(x, w, b, approximate="tanh")
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, F.gelu(F.linear(x, w, b)), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="approximate must be one of"):
        CpuGemm("aten").linear_bias_gelu(x, w, b, approximate="erf")


def test_residual_addmm_in_place_and_fp32_stream():
    g = torch.Generator().manual_seed(next(_SEED))
    h = torch.randn(2, 7, 48, generator=g)
    x = torch.randn(2, 7, 32, generator=g)
    w = torch.randn(48, 32, generator=g)
    want = h + x @ w.t()
    ptr = h.data_ptr()
    CpuGemm("aten").residual_addmm(h, x, w)
    assert h.data_ptr() == ptr and torch.allclose(h, want, rtol=1e-5, atol=1e-5)
    # fp32 stream, bf16 operands: on a CPU the bf16 product then an fp32 add
    ok, why = addmm_fp32_out_available(torch.device("cpu"))
    assert not ok and "fp32 add" in why
    h16 = torch.randn(14, 48, generator=g)
    xb, wb = x.reshape(14, 32).bfloat16(), w.bfloat16()
    want = h16 + (xb @ wb.t()).float()
    CpuGemm("aten").residual_addmm(h16, xb, wb)
    assert h16.dtype == torch.float32 and torch.equal(h16, want)
    with pytest.raises(ValueError, match="contiguous"):
        CpuGemm("aten").residual_addmm(torch.randn(48, 14).t(), xb, wb)


# ---------------------------------------------------------------------------------------------
# the engine: whole tiny model, options, freshness
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model = model_with_large_layerscale(seed=21)
    x = model_input(seed=5)
    with torch.no_grad():
        cid, fov = model(x)
    return model, x, cid, fov


SWITCHES = {
    "fold": dict(fold_layerscale=True),
    "fold+residual_in_gemm": dict(fold_layerscale=True, residual_in_gemm=True),
    "all exact": dict(fold_layerscale=True, residual_in_gemm=True, residual_fp32=True,
                      fuse_layer_norm=False),
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_engine_switches_match_reference(tiny, name):
    model, x, cid, fov = tiny
    fast = copy.deepcopy(model).prepare_fast(SWITCHES[name])
    with torch.no_grad():
        out_cid, out_fov = fast(x)
    assert max_rel(out_cid, cid) <= 1e-5 and abs(float(out_fov) - float(fov)) <= 1e-4
    status = fast.fast_engine.status()
    assert "LayerScale folded" in status["vit_epilogues"]
    assert ("residual add in the proj / fc2 GEMMs" in status["vit_epilogues"]) == \
        SWITCHES[name].get("residual_in_gemm", False)


def fast_and_reference(fast, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth from the fast model and from a copy of it without the fast path (its weights as
    they are now): the engine is up to date if the two agree."""
    ref = copy.deepcopy(fast)
    ref.prepare_fast(False)
    with torch.no_grad():
        return fast(x)[0], ref(x)[0]


def test_engine_refreshes_the_fold_when_weights_change(tiny):
    model, x, *_ = tiny
    fast = copy.deepcopy(model).prepare_fast(dict(fold_layerscale=True, residual_in_gemm=True))
    engine = fast.fast_engine
    before = engine._ensure_prepared()
    assert engine._ensure_prepared() is before
    with torch.no_grad():
        fast.encoder.patch_encoder.blocks[0].ls2.gamma.mul_(3.0)
        fast.encoder.image_encoder.blocks[-1].attn.proj.bias.add_(0.5)
    assert engine._ensure_prepared() is not before
    got, want = fast_and_reference(fast, x)
    assert max_rel(got, want) <= 1e-5


@pytest.mark.parametrize("options", [
    dict(fold_layerscale=True, residual_in_gemm=True),
    dict(vit_lockstep=True),
])
def test_engine_sees_a_replaced_vit_parameter_and_lists_its_slots_once(tiny, options):
    """The derived-weight check lists (module, name) slots once per preparation (walking the
    fp8 lists per call cost 1.56 ms on the official config), yet reads the tensors each call:
    a parameter replaced in its module (load_state_dict(assign=True) does this) still triggers
    re-preparation."""
    model, x, *_ = tiny
    fast = copy.deepcopy(model).prepare_fast(options)
    engine = fast.fast_engine
    before = engine._ensure_prepared()
    slots = engine._derived
    assert slots and engine._ensure_prepared() is before and engine._derived is slots
    blk = fast.encoder.image_encoder.blocks[-1]
    blk.attn.proj.weight = torch.nn.Parameter(blk.attn.proj.weight.detach() * 1.5)
    blk.ls1.gamma = torch.nn.Parameter(blk.ls1.gamma.detach() * 4.0)
    assert engine._ensure_prepared() is not before
    got, want = fast_and_reference(fast, x)
    with torch.no_grad():
        unchanged, _ = model(x)
    assert max_rel(got, want) <= 1e-6 < max_rel(unchanged, want)  # the change is seen


def test_options_validation():
    with pytest.raises(ValueError, match="needs fold_layerscale=True"):
        FastOptions(residual_in_gemm=True)
    with pytest.raises(ValueError, match="needs residual_in_gemm=True"):
        FastOptions(fold_layerscale=True, residual_fp32=True)
    with pytest.raises(ValueError, match="fc1_gelu must be one of erf, tanh"):
        FastOptions(fc1_gelu="exact")
    with pytest.raises(ValueError, match="fp8 cannot be combined with fold_layerscale"):
        FastOptions(fp8=True, fold_layerscale=True)
    with pytest.raises(ValueError, match="fp8 cannot be combined with fc1_gelu='tanh'"):
        FastOptions(fp8=True, fc1_gelu="tanh")
    with pytest.raises(TypeError, match="residual_fp32 must be True or False"):
        FastOptions(fold_layerscale=True, residual_in_gemm=True, residual_fp32=1)
    with pytest.raises(ValueError, match="residual_fp32 keeps the stream"):
        ViTEpilogues(residual_fp32=True)
    # the fused forward itself refuses the fp8 GEMM with these options, and a missing fold
    model = model_with_large_layerscale(MICRO, seed=next(_SEED))
    vit, x = model.encoder.patch_encoder, _vit_input(1)
    with pytest.raises(ValueError, match="fp8 mode"):
        fused_forward_with_hooks(vit, x, backend=None, epilogue_backend=None, gemm=Fp8Gemm({}),
                                 epilogues=ViTEpilogues(fc1_gelu="tanh"))
    with pytest.raises(ValueError, match="needs the LayerScale fold"):
        fused_forward_with_hooks(vit, x, backend=None, epilogue_backend=None,
                                 epilogues=ViTEpilogues(residual_in_gemm=True))
    with pytest.raises(ValueError, match="prepare the engine again"):
        fused_forward_with_hooks(vit, x, backend=None, epilogue_backend=None,
                                 fold=LayerScaleFold(()))


# ---------------------------------------------------------------------------------------------
# 16-bit: the tanh GELU and the fp32 residual stream against the budget
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_tanh_gelu_and_fp32_residual_within_budget(tiny, dtype):
    """MARE / FOV of the tiny model vs the fp32 erf reference, and the patch encoder's own
    output error (the better view with random weights, docs/fast_path.md): the fp32 stream must
    not be worse than the 16-bit one."""
    model, x, cid, fov = tiny
    ref_vit = model.encoder.patch_encoder
    xv = _vit_input(2)
    with torch.no_grad():
        vit_ref, _ = ref_vit.forward_with_hooks(xv)
    vit_err = {}
    for name, opts in {
            "erf": {},
            "tanh": dict(fc1_gelu="tanh"),
            "rig": dict(fold_layerscale=True, residual_in_gemm=True),
            "rig+fp32": dict(fold_layerscale=True, residual_in_gemm=True, residual_fp32=True),
            "rig+fp32+tanh": dict(fold_layerscale=True, residual_in_gemm=True,
                                  residual_fp32=True, fc1_gelu="tanh")}.items():
        fast = copy.deepcopy(model).to(dtype).prepare_fast(opts or True)
        with torch.no_grad():
            out_cid, out_fov = fast(x.to(dtype))
            out, hooks = fast.fast_engine._vit(fast.encoder.patch_encoder, xv.to(dtype), (0,))
        assert out_cid.dtype == dtype and out.dtype == dtype and hooks[0].dtype == dtype
        assert mean_abs_rel_error(out_cid, cid) <= MARE_BUDGET[dtype], name
        assert abs(float(out_fov) - float(fov)) <= FOV_BUDGET_DEG, name
        vit_err[name] = float((out.double() - vit_ref.double()).norm() / vit_ref.double().norm())
    assert vit_err["rig+fp32"] <= vit_err["rig"] * 1.05, vit_err
    assert vit_err["tanh"] <= vit_err["erf"] * 1.5, vit_err
