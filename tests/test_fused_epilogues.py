"""Fused ViT epilogue ops: Triton kernels against their pure-PyTorch references.

Ops: ``layer_norm`` (with its optional ``shift`` and ``out_dtype``), ``add_layer_norm`` (bias +
LayerScale + residual + LayerNorm), ``residual_layerscale`` (bias + LayerScale + residual),
``bias_gelu`` (bias + exact GELU).
On CPU the kernels run under Triton's interpreter (fp32 and fp16; bf16 on GPU only). Every case
draws fresh random inputs and poisons the outputs with NaN first, so unwritten elements fail.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from depthpro_fast import ops
from depthpro_fast.tolerances import EPILOGUE_REL_TOL
from tests.conftest import HAS_CUDA, poison_, requires_cuda, requires_triton

ROWS = (1, 17, 577)
WIDTHS = (64, 128, 130, 1024)
CPU_DTYPES = (torch.float32, torch.float16)
# Max |out - ref| allowed, relative to max |ref|: fp32 is summation order only; half
# precision outputs are one rounding of the same fp32 value, so at most ~1 ulp apart.
TOL = EPILOGUE_REL_TOL  # shared with kernel qualification (depthpro_fast/tolerances.py)
DEVICE = "cuda" if HAS_CUDA else "cpu"

_CASE = itertools.count()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + seed)


def _randn(shape, dtype, g, scale=1.0, device=DEVICE):
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert bool(torch.isfinite(out).all()), "output has NaN/Inf (unwritten elements?)"
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max()
                 .clamp_min(1e-30))


@pytest.fixture
def poisoned(monkeypatch):
    """Make every Triton epilogue kernel write into NaN-filled outputs."""
    import depthpro_fast.triton.bias_gelu as bg
    import depthpro_fast.triton.layer_norm as ln
    import depthpro_fast.triton.residual_layerscale as rl

    def alloc(*args, **kwargs):
        return poison_(torch.empty(*args, **kwargs))

    for mod in (ln, bg, rl):
        monkeypatch.setattr(mod, "_alloc", alloc)


CASES = [(m, n, dt) for dt in CPU_DTYPES for m in ROWS for n in WIDTHS]
IDS = [f"{m}x{n}-{str(dt)[6:]}" for m, n, dt in CASES]


def _ln_params(n, dtype, g):
    return (1 + 0.5 * _randn(n, dtype, g), 0.5 * _randn(n, dtype, g))


# ---------------------------------------------------------------------------------------------
# references are the unfused PyTorch chains
# ---------------------------------------------------------------------------------------------


def test_references_equal_unfused_chains():
    g = _gen(0)
    x, d = _randn((5, 33, 96), torch.float32, g, device="cpu"), _randn((5, 33, 96),
                                                                       torch.float32, g, 3.0,
                                                                       device="cpu")
    b, gam = _randn(96, torch.float32, g, device="cpu"), _randn(96, torch.float32, g,
                                                                device="cpu")
    w, bb = _ln_params(96, torch.float32, g)
    w, bb = w.cpu(), bb.cpu()
    ln = torch.nn.LayerNorm(96, eps=1e-6)
    with torch.no_grad():
        ln.weight.copy_(w)
        ln.bias.copy_(bb)
        r = x + gam * (d + b)
        torch.testing.assert_close(ops.residual_layerscale_reference(x, d, b, gam), r,
                                   rtol=0, atol=0)
        torch.testing.assert_close(ops.layer_norm_reference(x, w, bb, 1e-6), ln(x), rtol=0,
                                   atol=0)
        res, normed = ops.add_layer_norm_reference(x, d, w, bb, 1e-6, delta_bias=b, gamma=gam)
        torch.testing.assert_close(res, r, rtol=0, atol=0)
        torch.testing.assert_close(normed, ln(r), rtol=0, atol=0)
        torch.testing.assert_close(ops.bias_gelu_reference(d, b), F.gelu(d + b), rtol=0, atol=0)


def test_half_references_round_once():
    # fp16 in, fp32 math, one rounding: equals the fp32 chain on the same (fp16) values, cast
    g = _gen(1)
    x, d = _randn((7, 64), torch.float16, g, device="cpu"), _randn((7, 64), torch.float16, g,
                                                                   device="cpu")
    b = _randn(64, torch.float16, g, device="cpu")
    out = ops.bias_gelu_reference(d, b)
    assert out.dtype == torch.float16
    assert torch.equal(out, F.gelu(d.float() + b.float()).half())
    r = ops.residual_layerscale_reference(x, d, b, None)
    assert torch.equal(r, (x.float() + d.float() + b.float()).half())


# ---------------------------------------------------------------------------------------------
# Triton kernels vs references (interpreter on CPU)
# ---------------------------------------------------------------------------------------------


@requires_triton
@pytest.mark.parametrize("m, n, dtype", CASES, ids=IDS)
def test_add_layer_norm_triton(m, n, dtype, poisoned):
    g = _gen(next(_CASE))
    # a residual stream of a ViT: large x, a small update, a LayerScale
    x = _randn((m, n), dtype, g, 4.0)
    delta = _randn((m, n), dtype, g)
    dbias, gamma = _randn(n, dtype, g), 0.1 * _randn(n, dtype, g)
    w, b = _ln_params(n, dtype, g)
    res, normed = ops.add_layer_norm(x, delta, w, b, 1e-6, delta_bias=dbias, gamma=gamma,
                                     backend="triton")
    ref_res, ref_normed = ops.add_layer_norm_reference(x, delta, w, b, 1e-6, dbias, gamma)
    assert _rel_err(res, ref_res) <= TOL[dtype]
    assert _rel_err(normed, ref_normed) <= 2 * TOL[dtype]


@requires_triton
@pytest.mark.parametrize("m, n, dtype", CASES, ids=IDS)
def test_layer_norm_triton(m, n, dtype, poisoned):
    g = _gen(next(_CASE))
    x = _randn((m, n), dtype, g, 3.0) + 2.0  # an offset: the mean must really be removed
    w, b = _ln_params(n, dtype, g)
    out = ops.layer_norm(x, w, b, 1e-6, backend="triton")
    assert _rel_err(out, ops.layer_norm_reference(x, w, b, 1e-6)) <= 2 * TOL[dtype]


@requires_triton
@pytest.mark.parametrize("m, n, dtype", CASES, ids=IDS)
def test_bias_gelu_triton(m, n, dtype, poisoned):
    g = _gen(next(_CASE))
    x, bias = _randn((m, n), dtype, g, 2.0), _randn(n, dtype, g)
    out = ops.bias_gelu(x, bias, backend="triton")
    assert _rel_err(out, ops.bias_gelu_reference(x, bias)) <= TOL[dtype]


@requires_triton
@pytest.mark.parametrize("m, n, dtype", CASES, ids=IDS)
def test_residual_layerscale_triton(m, n, dtype, poisoned):
    g = _gen(next(_CASE))
    x, delta = _randn((m, n), dtype, g, 4.0), _randn((m, n), dtype, g)
    bias, gamma = _randn(n, dtype, g), 0.1 * _randn(n, dtype, g)
    out = ops.residual_layerscale(x, delta, bias, gamma, backend="triton")
    assert _rel_err(out, ops.residual_layerscale_reference(x, delta, bias, gamma)) <= TOL[dtype]


@requires_triton
@pytest.mark.parametrize("optional", ["none", "bias", "gamma"])
def test_optional_vectors_triton(optional, poisoned):
    """Without a bias and/or LayerScale, on 3-D (batch, tokens, channels) inputs."""
    g = _gen(next(_CASE))
    shape, n = (3, 37, 130), 130
    x, delta = _randn(shape, torch.float32, g), _randn(shape, torch.float32, g)
    bias = _randn(n, torch.float32, g) if optional == "bias" else None
    gamma = _randn(n, torch.float32, g) if optional == "gamma" else None
    w, b = _ln_params(n, torch.float32, g)
    res, normed = ops.add_layer_norm(x, delta, w, b, 1e-5, delta_bias=bias, gamma=gamma,
                                     backend="triton")
    ref = ops.add_layer_norm_reference(x, delta, w, b, 1e-5, bias, gamma)
    assert res.shape == shape and normed.shape == shape
    assert _rel_err(res, ref[0]) <= TOL[torch.float32]
    assert _rel_err(normed, ref[1]) <= 2 * TOL[torch.float32]
    out = ops.residual_layerscale(x, delta, bias, gamma, backend="triton")
    assert _rel_err(out, ops.residual_layerscale_reference(x, delta, bias, gamma)) <= 2e-6
    out = ops.bias_gelu(x, bias, backend="triton")
    assert _rel_err(out, ops.bias_gelu_reference(x, bias)) <= 2e-6


# layer_norm's shift (the fused ViT's carried biases) and out_dtype (an fp32 residual stream
# feeding a 16-bit GEMM): ViT-shaped rows (577 tokens, batch 1 and 35), odd widths
SHIFT_CASES = [((1, 577, 130), torch.float32, None), ((1, 577, 1024), torch.float16, None),
               ((35, 577, 64), torch.float32, torch.float16), ((1, 577, 130), torch.float32,
                                                               torch.float16),
               ((3, 17, 96), torch.float16, torch.float32)]


@requires_triton
@pytest.mark.parametrize("shape, dtype, out_dtype", SHIFT_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}-{str(o)[6:]}"
                              for s, d, o in SHIFT_CASES])
def test_layer_norm_shift_out_dtype_triton(shape, dtype, out_dtype, poisoned):
    g = _gen(next(_CASE))
    n = shape[-1]
    # the stored stream lacks a large per-channel constant, which the shift restores
    x = _randn(shape, dtype, g, 3.0)
    shift = _randn(n, torch.float32, g, 5.0) + 2.0
    w, b = _ln_params(n, dtype, g)
    out = ops.layer_norm(x, w, b, 1e-6, shift=shift, out_dtype=out_dtype, backend="triton")
    ref = ops.layer_norm_reference(x, w, b, 1e-6, shift, out_dtype)
    assert out.dtype == (out_dtype or dtype) and out.shape == x.shape
    tol = max(TOL[dtype], TOL[out_dtype or dtype])
    assert _rel_err(out, ref) <= 2 * tol
    # and the shift matters (the test can fail): without it the result is far off
    assert _rel_err(ops.layer_norm(x, w, b, 1e-6, out_dtype=out_dtype, backend="triton"),
                    ref) > 0.1


def test_layer_norm_shift_reference_is_the_unfused_chain():
    g = _gen(2)
    x = _randn((4, 9, 96), torch.bfloat16, g, 3.0, device="cpu")
    shift = _randn(96, torch.float32, g, 4.0, device="cpu")
    w, b = _ln_params(96, torch.float32, g)
    out = ops.layer_norm(x, w, b, 1e-6, shift=shift, out_dtype=torch.float16)
    want = F.layer_norm(x.float() + shift, (96,), w, b, 1e-6).half()  # fp32, no rounding between
    assert out.dtype == torch.float16 and torch.equal(out, want)
    assert torch.equal(ops.layer_norm(x, w, b, 1e-6),
                       F.layer_norm(x.float(), (96,), w, b, 1e-6).bfloat16())


@requires_triton
def test_strided_inputs_triton(poisoned):
    """Non-contiguous inputs (a transposed view) give the same result as contiguous ones."""
    g = _gen(next(_CASE))
    base = _randn((64, 9, 3), torch.float32, g)
    x = base.transpose(0, 2)  # (3, 9, 64), channel stride 27
    delta = _randn((64, 9, 3), torch.float32, g).transpose(0, 2)
    w, b = _ln_params(64, torch.float32, g)
    res, normed = ops.add_layer_norm(x, delta, w, b, 1e-6, backend="triton")
    ref = ops.add_layer_norm_reference(x.contiguous(), delta.contiguous(), w, b, 1e-6)
    assert _rel_err(res, ref[0]) <= 2e-6 and _rel_err(normed, ref[1]) <= 4e-6
    assert _rel_err(ops.bias_gelu(x, w, backend="triton"), ops.bias_gelu_reference(x, w)) <= 2e-6


@requires_triton
def test_fake_registrations():
    """The custom ops have fake (meta) kernels: torch.compile / graph tracing see one op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import depthpro_fast.triton.bias_gelu  # noqa: F401  (registers the ops)
    import depthpro_fast.triton.layer_norm  # noqa: F401
    import depthpro_fast.triton.residual_layerscale  # noqa: F401

    with FakeTensorMode():
        x = torch.empty(2, 5, 64, dtype=torch.float16)
        v = torch.empty(64, dtype=torch.float16)
        res, normed = torch.ops.depthpro_fast.add_layer_norm_triton(x, x, v, v, 1e-6, v, None)
        assert res.shape == normed.shape == x.shape and normed.dtype == x.dtype
        assert torch.ops.depthpro_fast.layer_norm_triton(x, v, v, 1e-6).shape == x.shape
        out = torch.ops.depthpro_fast.layer_norm_triton(x.float(), v, v, 1e-6, v, torch.float16)
        assert out.shape == x.shape and out.dtype == torch.float16
        assert torch.ops.depthpro_fast.bias_gelu_triton(x, v).shape == x.shape
        assert torch.ops.depthpro_fast.residual_layerscale_triton(x, x, v, v).shape == x.shape


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_says_what_is_wrong():
    x = torch.zeros(4, 8)
    v = torch.ones(8)
    with pytest.raises(ValueError, match="length 8"):
        ops.layer_norm(x, torch.ones(7), v, 1e-6)
    with pytest.raises(TypeError, match="dtype"):
        ops.bias_gelu(torch.zeros(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.residual_layerscale(x, [0.0] * 8)
    with pytest.raises(ValueError, match="shape of x"):
        ops.add_layer_norm(x, torch.zeros(4, 9), v, v, 1e-6)
    with pytest.raises(TypeError, match="dtype of x"):
        ops.add_layer_norm(x.half(), x, v, v, 1e-6)  # a wider delta than the stream
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm(x, v, v, 0.0)
    with pytest.raises(ValueError, match="shift must be 1-D of length 8"):
        ops.layer_norm(x, v, v, 1e-6, shift=torch.ones(4, 8))
    with pytest.raises(TypeError, match="out_dtype must be float32, float16 or bfloat16"):
        ops.layer_norm(x, v, v, 1e-6, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="non-empty"):
        ops.bias_gelu(torch.zeros(4, 0))
    with pytest.raises(ValueError, match="backend"):
        ops.bias_gelu(x, backend="fastest")


def test_ops_registered_with_backends():
    from depthpro_fast import backends

    reg = backends.registered_ops()
    for op in ("layer_norm", "residual_layerscale", "bias_gelu"):
        assert reg[op] == ("reference", "triton")
    assert set(reg["add_layer_norm"]) == {"reference", "torch", "triton"}
    # auto on CPU is the reference
    x = torch.randn(3, 8)
    assert torch.equal(ops.bias_gelu(x), ops.bias_gelu_reference(x))


# ---------------------------------------------------------------------------------------------
# GPU: bf16 and the real ViT-L widths
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, n", [(1, 1024), (577, 1024), (35 * 577, 1024), (35 * 577, 4096),
                                  (577, 130)])
def test_epilogues_gpu(m, n, dtype, poisoned):
    g = _gen(next(_CASE))
    x, delta = _randn((m, n), dtype, g, 4.0), _randn((m, n), dtype, g)
    bias, gamma = _randn(n, dtype, g), 0.1 * _randn(n, dtype, g)
    w, b = _ln_params(n, dtype, g)
    res, normed = ops.add_layer_norm(x, delta, w, b, 1e-6, delta_bias=bias, gamma=gamma,
                                     backend="triton")
    ref = ops.add_layer_norm_reference(x, delta, w, b, 1e-6, bias, gamma)
    assert _rel_err(res, ref[0]) <= TOL[dtype]
    assert _rel_err(normed, ref[1]) <= 2 * TOL[dtype]
    assert _rel_err(ops.layer_norm(x, w, b, 1e-6, backend="triton"),
                    ops.layer_norm_reference(x, w, b, 1e-6)) <= 2 * TOL[dtype]
    # the carried-bias shift, and an fp32 stream normalised into this dtype
    xf = x.float()
    assert _rel_err(ops.layer_norm(xf, w, b, 1e-6, shift=bias.float(), out_dtype=dtype,
                                   backend="triton"),
                    ops.layer_norm_reference(xf, w, b, 1e-6, bias.float(), dtype)) <= 2 * TOL[dtype]
    assert _rel_err(ops.bias_gelu(x, bias, backend="triton"),
                    ops.bias_gelu_reference(x, bias)) <= TOL[dtype]
    assert _rel_err(ops.residual_layerscale(x, delta, bias, gamma, backend="triton"),
                    ops.residual_layerscale_reference(x, delta, bias, gamma)) <= TOL[dtype]
    # auto on CUDA picks the Triton kernel (no CUDA C++ implementation of these ops)
    from depthpro_fast import backends

    assert backends.implementation("bias_gelu", "auto", x.device).__name__ == "bias_gelu_triton"


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias, with_gamma", [(True, True), (False, True), (True, False),
                                                   (False, False)])
def test_add_layer_norm_fp32_stream_takes_16bit_deltas(backend, delta_dtype, with_bias,
                                                      with_gamma):
    """An fp32 residual stream with an fp32 or 16-bit delta (a bf16 GEMM's output): the
    result is the reference chain on the widened delta (torch: the same math in fewer passes,
    to fp32 rounding), and the inputs are left as they were."""
    g = torch.Generator().manual_seed(int(with_bias) * 2 + int(with_gamma))
    m, n = 37, 72
    x = torch.randn(m, n, generator=g)
    delta = torch.randn(m, n, generator=g).to(delta_dtype)
    w, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    db = torch.randn(n, generator=g) if with_bias else None
    gam = torch.randn(n, generator=g) if with_gamma else None
    x0, d0 = x.clone(), delta.clone()
    r, normed = ops.add_layer_norm(x, delta, w, b, 1e-6, delta_bias=db, gamma=gam,
                                   backend=backend)
    r_ref, n_ref = ops.add_layer_norm_reference(x, delta.float(), w, b, 1e-6, db, gam)
    assert r.dtype == normed.dtype == torch.float32
    torch.testing.assert_close(r, r_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normed, n_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x0) and torch.equal(delta, d0)


def test_add_layer_norm_torch_on_a_16bit_stream_is_the_reference():
    x = torch.randn(9, 16).bfloat16()
    d = torch.randn(9, 16).bfloat16()
    v = torch.randn(16)
    got = ops.add_layer_norm_torch(x, d, v, v, 1e-6, v, v)
    want = ops.add_layer_norm_reference(x, d, v, v, 1e-6, v, v)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
