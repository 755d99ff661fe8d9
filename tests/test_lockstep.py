"""The ViTs in lock-step (``FastOptions.vit_lockstep``, depthpro_fast/fast/lockstep.py).

- the grouped LayerNorm ops (``ops/grouped_layer_norm.py``): the Triton kernel (interpreter on
  a CPU) against the pure-PyTorch reference, and that reference against the one-ViT ops applied
  group by group; odd widths, uneven and empty groups, fresh random inputs, NaN-poisoned outputs;
- the grouped linear (``grouped_mm`` and the per-ViT loop) with the bias lane against
  ``F.linear`` (fp32, and fp64 for the loop: the fast engine's epilogue ops take no fp64);
- ``lockstep.forward`` against each ViT's own ``forward_with_hooks`` (own hook ids per ViT);
- the whole model with the switch against the per-ViT fast path, fp32, batch 1 and 2, with and
  without the FOV; refusals and fallbacks; re-preparation after an in-place weight change.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import depthpro_fast
from depthpro_fast import ops
from depthpro_fast.fast import FastOptions, lockstep
from tests.conftest import poison_, requires_cuda, requires_triton
from tests.model_helpers import MICRO

TOL = {torch.float32: 2e-6, torch.float16: 2e-3}
_CASE = itertools.count()


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(7000 + next(_CASE))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert bool(torch.isfinite(out).all()), "output has NaN/Inf (unwritten elements?)"
    return float((out.double() - ref.double()).abs().max()
                 / ref.double().abs().max().clamp_min(1e-30))


def _case(sizes, c, dtype):
    g = _gen()
    m = sum(sizes)
    groups = len(sizes)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x, delta = r(m, c, scale=3.0), r(m, c)
    w, b, db = r(groups, c), r(groups, c), r(groups, c)
    gamma = r(groups, c, scale=0.5)
    ends = torch.tensor(list(itertools.accumulate(sizes)), dtype=torch.int32)
    return x, delta, w, b, db, gamma, ends


@pytest.fixture
def poisoned(monkeypatch):
    import depthpro_fast.triton.grouped_layer_norm as gln

    monkeypatch.setattr(gln, "_alloc", lambda *a, **k: poison_(torch.empty(*a, **k)))


SIZES = [(5,), (17, 1, 9), (3, 0, 12), (577, 40, 23)]
WIDTHS = (64, 130)


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("c", WIDTHS)
@pytest.mark.parametrize("slices", ["auto", None])
def test_reference_is_the_one_vit_ops_group_by_group(sizes, c, slices):
    """Both forms of the reference: group by group (CPU) and parameters gathered per row (the
    form a CUDA device runs, without host syncs)."""
    x, delta, w, b, db, gamma, ends = _case(sizes, c, torch.float32)
    r, n = ops.grouped_add_layer_norm_reference(x, delta, w, b, 1e-6, ends, db, gamma, c + 6,
                                                slices=slices)
    n0 = ops.grouped_layer_norm_reference(x, w, b, 1e-6, ends, slices=slices)
    start = 0
    for g, size in enumerate(sizes):
        s = slice(start, start + size)
        want_r, want_n = ops.add_layer_norm_reference(x[s], delta[s], w[g], b[g], 1e-6, db[g],
                                                      gamma[g])
        want_n0 = ops.layer_norm_reference(x[s], w[g], b[g], 1e-6)
        assert torch.equal(r[s], want_r)
        if slices is None:
            torch.testing.assert_close(n[s, :c], want_n, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(n0[s], want_n0, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(n[s, :c], want_n) and torch.equal(n0[s], want_n0)
        start += size
    assert torch.equal(n[:, c], torch.ones(sum(sizes)))
    assert not n[:, c + 1:].any()


@requires_triton
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("c", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("out_width", [None, 8])
def test_grouped_add_layer_norm_triton(sizes, c, dtype, out_width, poisoned):
    x, delta, w, b, db, gamma, ends = _case(sizes, c, dtype)
    width = None if out_width is None else lockstep.bias_lane_width(c)
    got = ops.grouped_add_layer_norm(x, delta, w, b, 1e-6, ends, delta_bias=db, gamma=gamma,
                                     out_width=width, backend="triton")
    want = ops.grouped_add_layer_norm(x, delta, w, b, 1e-6, ends, delta_bias=db, gamma=gamma,
                                      out_width=width, backend="reference")
    for o, ref in zip(got, want, strict=True):
        assert _rel(o, ref) <= TOL[dtype]
    if width is not None:  # the bias lanes are exact
        assert torch.equal(got[1][:, c:], want[1][:, c:])


@requires_triton
@pytest.mark.parametrize("sizes", [(17, 1, 9), (577, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_layer_norm_and_optional_vectors_triton(sizes, dtype, poisoned):
    x, delta, w, b, db, gamma, ends = _case(sizes, 130, dtype)
    got = ops.grouped_layer_norm(x, w, b, 1e-6, ends, out_width=136, backend="triton")
    want = ops.grouped_layer_norm(x, w, b, 1e-6, ends, out_width=136, backend="reference")
    assert _rel(got, want) <= TOL[dtype]
    for kw in ({}, {"delta_bias": db}, {"gamma": gamma}):
        got2 = ops.grouped_add_layer_norm(x, delta, w, b, 1e-6, ends, backend="triton", **kw)
        want2 = ops.grouped_add_layer_norm(x, delta, w, b, 1e-6, ends, backend="reference", **kw)
        for o, ref in zip(got2, want2, strict=True):
            assert _rel(o, ref) <= TOL[dtype]


@requires_triton
def test_strided_rows_triton(poisoned):
    x, delta, w, b, db, gamma, ends = _case((9, 14), 64, torch.float32)
    wide = torch.randn(23, 80)
    wide[:, :64] = x
    xs = wide[:, :64]  # rows with a stride of 80
    got = ops.grouped_add_layer_norm(xs, delta, w, b, 1e-6, ends, gamma=gamma, backend="triton")
    want = ops.grouped_add_layer_norm(x, delta, w, b, 1e-6, ends, gamma=gamma,
                                      backend="reference")
    for o, ref in zip(got, want, strict=True):
        assert _rel(o, ref) <= TOL[torch.float32]


def test_bad_input_says_what_is_wrong():
    x, delta, w, b, db, gamma, ends = _case((4, 5), 16, torch.float32)
    with pytest.raises(ValueError, match="2-D"):
        ops.grouped_layer_norm(x[None], w, b, 1e-6, ends)
    with pytest.raises(ValueError, match=r"stacked, shape \(2, 16\)"):
        ops.grouped_add_layer_norm(x, delta, w, b, 1e-6, ends, gamma=gamma[0])
    with pytest.raises(ValueError, match="entries"):
        ops.grouped_layer_norm(x, w, b, 1e-6, ends[:1])
    with pytest.raises(TypeError, match="int32 / int64"):
        ops.grouped_layer_norm(x, w, b, 1e-6, ends.float())
    with pytest.raises(ValueError, match="end at the row count 9"):
        ops.grouped_layer_norm(x, w, b, 1e-6, torch.tensor([4, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="out_width"):
        ops.grouped_layer_norm(x, w, b, 1e-6, ends, out_width=16)
    with pytest.raises(TypeError, match="float64"):
        ops.grouped_layer_norm(x.double(), w, b, 1e-6, ends)


# ---------------------------------------------------------------------------------------------
# the grouped linear and its choice
# ---------------------------------------------------------------------------------------------


def _rows(sizes) -> lockstep.RowGroups:
    ends = list(itertools.accumulate(sizes))
    return lockstep.RowGroups(tuple(zip([0, *ends[:-1]], ends, strict=True)),
                              torch.tensor(ends, dtype=torch.int32))


@pytest.mark.parametrize("gemm,dtype", [("grouped_mm", torch.float32), ("loop", torch.float32),
                                        ("loop", torch.float64)])
def test_grouped_linear_with_bias_lane_is_f_linear(gemm, dtype):
    if gemm == "grouped_mm" and lockstep.grouped_mm_function() is None:
        pytest.skip("this torch has no grouped_mm")
    g = _gen()
    sizes, c, n_out = (13, 4, 7), 24, 40
    kb = lockstep.bias_lane_width(c)
    linears = [torch.nn.Linear(c, n_out).to(dtype) for _ in sizes]
    x = torch.randn(sum(sizes), c, generator=g).to(dtype)
    x_lane = torch.cat([x, torch.ones(len(x), 1, dtype=dtype),
                        torch.zeros(len(x), kb - c - 1, dtype=dtype)], dim=1)
    w = torch.stack([lockstep._with_bias_lane(lin, kb) for lin in linears])
    out = lockstep.grouped_linear(gemm, x_lane, w, _rows(sizes))
    start = 0
    for lin, size in zip(linears, sizes, strict=True):
        want = F.linear(x[start:start + size], lin.weight.detach(), lin.bias.detach())
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out[start:start + size], want, rtol=tol, atol=tol)
        start += size


def test_grouped_gemm_choice_says_why():
    cpu = torch.device("cpu")
    assert lockstep.choose_grouped_gemm(cpu, torch.float64, (128,))[0] == "loop"
    assert "fp32" in lockstep.choose_grouped_gemm(cpu, torch.float64, (128,))[1]
    gemm, why = lockstep.choose_grouped_gemm(cpu, torch.float32, (130, 128))
    assert gemm == "loop" and "16 bytes" in why and "130" in why
    gemm, why = lockstep.choose_grouped_gemm(torch.device("meta"), torch.bfloat16, (128,))
    assert gemm == "loop" and "meta" in why
    if lockstep.grouped_mm_function() is not None:
        assert lockstep.choose_grouped_gemm(cpu, torch.float32, (136, 128))[0] == "grouped_mm"


# ---------------------------------------------------------------------------------------------
# the lock-stepped ViTs and the whole model
# ---------------------------------------------------------------------------------------------


def _random_model(config, seed):
    torch.manual_seed(seed)
    model, _ = depthpro_fast.load(None, config=config, device="cpu", backend="reference")
    # LayerScale far from its 1e-5 init, so that every block matters in the comparison
    for p in model.parameters():
        if p.dim() == 1 and torch.all(p == 1e-5):
            p.data.uniform_(0.2, 1.0)
    return model


def _input(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, 24, 24, generator=g) * 2 - 1
    x = F.interpolate(base, size=(1536, 1536), mode="bilinear", align_corners=False)
    return x + 0.05 * torch.randn(x.shape, generator=g)


def test_lockstep_forward_is_each_vit_forward():
    """Every ViT's tokens and its own hooks (image encoder hooks too), G = 3 and G = 2."""
    model = _random_model(MICRO, seed=3)
    vits = lockstep.model_vits(model)
    st = lockstep.LockstepViTs(vits)
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn(3, 3, 384, 384, generator=g), torch.randn(1, 3, 384, 384, generator=g),
              torch.randn(2, 3, 384, 384, generator=g)]
    hooks = [(1, 0), (0,), ()]
    with torch.no_grad():
        for groups in (3, 2):
            outs = lockstep.forward(st, inputs[:groups], hooks[:groups], backend="reference",
                                    epilogue_backend="reference")
            assert len(outs) == groups
            for vit, x, ids, (tokens, hooked) in zip(vits, inputs, hooks, outs, strict=False):
                want, want_hooks = vit.forward_with_hooks(x, ids)
                torch.testing.assert_close(tokens, want, rtol=1e-5, atol=1e-5)
                assert len(hooked) == len(want_hooks)
                for a, b in zip(hooked, want_hooks, strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one hook list each"):
        lockstep.forward(st, inputs, hooks[:2], backend=None, epilogue_backend=None)


@pytest.fixture(scope="module")
def tiny_pair():
    """The tiny config (random weights) and its per-ViT fast path in fp32."""
    model = _random_model("tiny", seed=21)
    per_vit = copy.deepcopy(model).prepare_fast(True)
    lock = copy.deepcopy(model).prepare_fast({"vit_lockstep": True})
    return model, per_vit, lock


@pytest.mark.parametrize("batch", [1, 2])
def test_whole_model_lockstep_matches_per_vit_fp32(tiny_pair, batch):
    model, per_vit, lock = tiny_pair
    x = _input(batch, seed=30 + batch)
    with torch.no_grad():
        want_cid, want_fov = per_vit(x)
        cid, fov = lock(x)
    assert cid.shape == want_cid.shape == (batch, 1, 1536, 1536)
    assert _rel(cid, want_cid) <= 1e-5
    torch.testing.assert_close(fov, want_fov, rtol=1e-5, atol=1e-4)
    if batch == 1:  # and the reference modules (the per-ViT path's own tests cover batch 2)
        with torch.no_grad():
            ref_cid, ref_fov = model(x)
        assert _rel(cid, ref_cid) <= 1e-5
        torch.testing.assert_close(fov, ref_fov, rtol=1e-5, atol=1e-4)
    status = lock.fast_engine.status()
    assert status["vit_lockstep"].startswith("on: patch, image, FOV")
    assert "grouped_mm" in status["vit_lockstep"] or "loop" in status["vit_lockstep"]
    assert per_vit.fast_engine.status()["vit_lockstep"] == "off: vit_lockstep=False"


def test_whole_model_lockstep_without_fov(tiny_pair):
    """need_fov=False: G = 2 (patch + image), the same depth as with the FOV."""
    _, per_vit, lock = tiny_pair
    x = _input(1, seed=40)
    with torch.no_grad():
        cid, fov = lock(x, need_fov=False)
        want, _ = per_vit(x, need_fov=False)
    assert fov is None
    assert _rel(cid, want) <= 1e-5


def test_whole_model_lockstep_bf16_budget(tiny_pair):
    from depthpro_fast.accuracy import MARE_BUDGET, mean_abs_rel_error

    model, _, _ = tiny_pair
    lock = copy.deepcopy(model).to(torch.bfloat16).prepare_fast({"vit_lockstep": True})
    x = _input(1, seed=41)
    with torch.no_grad():
        ref, _ = model(x)
        cid, _ = lock(x.to(torch.bfloat16))
    assert mean_abs_rel_error(cid, ref) <= MARE_BUDGET[torch.bfloat16]


@requires_triton
def test_whole_model_lockstep_triton_epilogues_micro():
    """The grouped LayerNorm and GELU kernels (interpreter on a CPU) inside the whole model."""
    model = _random_model(MICRO, seed=22)
    per_vit = copy.deepcopy(model).prepare_fast({"epilogue_backend": "triton"})
    lock = copy.deepcopy(model).prepare_fast({"vit_lockstep": True,
                                              "epilogue_backend": "triton"})
    x = _input(1, seed=42)
    with torch.no_grad():
        want_cid, want_fov = per_vit(x)
        cid, fov = lock(x)
    assert _rel(cid, want_cid) <= 1e-5
    torch.testing.assert_close(fov, want_fov, rtol=1e-5, atol=1e-4)


def test_in_place_vit_weight_change_re_prepares():
    model = _random_model(MICRO, seed=23)
    lock = copy.deepcopy(model).prepare_fast({"vit_lockstep": True})
    x = _input(1, seed=43)
    with torch.no_grad():
        before, _ = lock(x)
        for m in (model, lock):  # the image encoder's qkv and final norm changed in place
            m.encoder.image_encoder.blocks[0].attn.qkv.weight.mul_(1.5)
            m.encoder.image_encoder.norm.weight.mul_(-3.0)
        after, _ = lock(x)
        want, _ = model(x)
    st = lock.fast_engine._prepared.lockstep
    qkv = lock.encoder.image_encoder.blocks[0].attn.qkv.weight
    assert torch.equal(st.blocks[0].qkv[1, :, :qkv.shape[1]], qkv)
    assert torch.equal(st.blocks[-1].next_weight[1], lock.encoder.image_encoder.norm.weight)
    # (the image encoder weighs little in a random model's depth: the change is small, but
    # far above the rounding between the paths)
    assert _rel(after, want) <= 1e-5
    assert _rel(after, before) > 10 * _rel(after, want)


def test_refusals_and_fallback():
    with pytest.raises(ValueError, match="vit_lockstep and fp8 cannot be combined"):
        FastOptions(vit_lockstep=True, fp8=True)
    with pytest.raises(ValueError, match="epilogues='fused'"):
        FastOptions(vit_lockstep=True, epilogues="torch")
    with pytest.raises(ValueError, match="fuse_layer_norm=True"):
        FastOptions(vit_lockstep=True, fuse_layer_norm=False)
    with pytest.raises(TypeError, match="vit_lockstep must be True or False"):
        FastOptions(vit_lockstep=1)
    for item1 in ({"fold_layerscale": True}, {"fc1_gelu": "tanh"},
                  {"fold_layerscale": True, "residual_in_gemm": True}):
        with pytest.raises(ValueError, match="vit_lockstep cannot be combined with"):
            FastOptions(vit_lockstep=True, **item1)
    # ViTs of different depth: refused, the per-ViT path runs, status says why
    model = _random_model(MICRO, seed=24)
    del model.encoder.image_encoder.blocks[-1]
    with pytest.raises(ValueError, match="depth"):
        lockstep.LockstepViTs(lockstep.model_vits(model))
    fast = copy.deepcopy(model).prepare_fast({"vit_lockstep": True})
    x = _input(1, seed=44)
    with torch.no_grad():
        cid, _ = fast(x)
        want, _ = model(x)
    why = fast.fast_engine.status()["vit_lockstep"]
    assert why.startswith("off (per-ViT path)") and "depth" in why
    assert _rel(cid, want) <= 1e-5


def test_pt2_export_of_a_lockstep_model_traces_the_per_vit_path(tmp_path):
    """torch.export traces a symbolic batch: the lock-step (row groups per concrete batch)
    steps aside there and the exported graph is the per-ViT fast path; eager stays lock-step."""
    from depthpro_fast.exporters import export, load_exported

    model = _random_model(MICRO, seed=25).set_backend("torch")
    # (cpu_gemm="aten": oneDNN's linear, which "auto" may pick, does not serialise to .pt2)
    model.prepare_fast({"vit_lockstep": True, "cpu_gemm": "aten"})
    r = export(model, tmp_path / "lockstep.pt2")
    program = load_exported(r.path)
    x = _input(1, seed=45)
    with torch.no_grad():
        want = model(x)
        got = program(x)
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) <= 1e-5
    assert model.fast_engine.status()["vit_lockstep"].startswith("on:")


# ---------------------------------------------------------------------------------------------
# GPU: the official config in bf16 (grouped_mm's CUTLASS kernel on sm90 / sm100), CUDA graphs
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("batch", [1, 2])
def test_gpu_lockstep_budget_and_graph_replay(batch):
    from depthpro_fast.accuracy import FOV_BUDGET_DEG, MARE_BUDGET, mean_abs_rel_error

    torch.manual_seed(21)
    model, _ = depthpro_fast.load(None, device="cuda", backend="reference")
    x = _input(batch, seed=46).cuda()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            ref_cid, ref_fov = model(x)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    base = copy.deepcopy(model).to(torch.bfloat16).set_backend("auto")
    del model
    graphed = copy.deepcopy(base).prepare_fast({"vit_lockstep": True})
    eager = copy.deepcopy(base).prepare_fast({"vit_lockstep": True, "cuda_graphs": False})
    xb = x.bfloat16()
    with torch.no_grad():
        cid, fov = graphed(xb)
        again = graphed(xb)
        e_cid, e_fov = eager(xb)
        skipped = graphed(xb, need_fov=False)
    status = graphed.fast_engine.status()
    assert not status["graphs"]["failures"], status["graphs"]
    assert status["vit_lockstep"].startswith("on:")
    major = torch.cuda.get_device_capability()[0]
    if major in (9, 10):  # the CUTLASS grouped kernel, capturable
        assert "linears: grouped_mm" in status["vit_lockstep"], status["vit_lockstep"]
    assert torch.equal(cid, e_cid) and torch.equal(fov, e_fov) and torch.equal(again[0], cid)
    assert skipped[1] is None
    assert mean_abs_rel_error(cid, ref_cid) <= MARE_BUDGET[torch.bfloat16]
    assert float((fov.float() - ref_fov).abs().max()) <= FOV_BUDGET_DEG


def test_model_without_fov_network_runs_two_vits_in_lockstep():
    torch.manual_seed(26)
    model, _ = depthpro_fast.load(None, config=MICRO, device="cpu", backend="reference",
                                  use_fov=False)
    lock = copy.deepcopy(model).prepare_fast({"vit_lockstep": True})
    x = _input(1, seed=47)
    with torch.no_grad():
        cid, fov = lock(x)
        want, want_fov = model(x)
    assert fov is None and want_fov is None
    assert _rel(cid, want) <= 1e-5
    why = lock.fast_engine.status()["vit_lockstep"]
    assert why.startswith("on: patch, image (no FOV network)") and "G=2" in why
