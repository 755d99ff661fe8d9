"""FP8 quantisation ops: the per-row e4m3 reference, and the fused quantising Triton kernels.

Ops: ``quantize_rows`` (stand-alone), ``layer_norm_fp8`` / ``add_layer_norm_fp8`` (LayerNorm
pass that writes e4m3 + row scales), ``bias_gelu_fp8`` (fc1's bias + GELU, quantised for fc2).

Triton's interpreter (the CPU runs of the kernels) does not convert fp32 to e4m3 as a GPU does:
it rounds values just below a power of two down a whole binade (124.7 -> 64) and ties away from
zero (measured with Triton 3.9). So the kernels' arithmetic is checked on the values *before*
that conversion: each kernel can store into an fp32 buffer instead of an e4m3 one (the same
code: the store converts to the buffer's element type), and those values are compared with the
reference's fp32 values, then rounded to e4m3 by PyTorch and compared with the reference's e4m3
tensor. The e4m3 store itself is compiled for sm_90 by the AOT check and runs on a GPU
(``-m gpu``). Every case draws fresh inputs and poisons the outputs (NaN) first.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from depthpro_fast import ops
from depthpro_fast.fp8_format import AMAX_FLOOR, E4M3, E4M3_MAX
from depthpro_fast.ops.quantize_fp8 import dequantize_rows, scaled_rows_reference
from tests.conftest import HAS_CUDA, poison_, requires_cuda, requires_triton

DEVICE = "cuda" if HAS_CUDA else "cpu"
# (rows, width): 577 tokens, 35 windows of them, odd widths, the ViT-L widths
SHAPES = [(1, 64), (577, 128), (577, 130), (3 * 577, 384), (35 * 577, 64), (577, 1024),
          (17, 4096)]
CPU_DTYPES = (torch.float32, torch.float16)
_SEED = itertools.count()


def _randn(shape, dtype, scale=1.0, device=DEVICE):
    g = torch.Generator().manual_seed(5000 + next(_SEED))
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def e4m3_step(v: torch.Tensor) -> torch.Tensor:
    """The spacing of e4m3 values around |v| (3 mantissa bits; subnormal step 2^-9)."""
    e = torch.floor(torch.log2(v.abs().float().clamp_min(2.0 ** -6)))
    return torch.exp2(e - 3)


@pytest.fixture
def poisoned(monkeypatch):
    """Every fp8 kernel writes into NaN-filled outputs."""
    import depthpro_fast.triton.bias_gelu_fp8 as bg
    import depthpro_fast.triton.layer_norm as ln
    import depthpro_fast.triton.quantize_fp8 as qr

    def alloc(*args, **kwargs):
        return poison_(torch.empty(*args, **kwargs))

    for mod in (ln, bg, qr):
        monkeypatch.setattr(mod, "_alloc", alloc)


# ---------------------------------------------------------------------------------------------
# the reference quantiser
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_reference_round_trip_and_scales(scale):
    x = _randn((577, 1024), torch.float32, scale, device="cpu")
    x[5] *= 100.0  # an outlier row changes only its own scale
    q, s = ops.quantize_rows_reference(x)
    assert q.dtype == E4M3 and q.shape == (577, 1024) and s.shape == (577, 1) and \
        s.dtype == torch.float32
    amax = x.abs().amax(dim=1, keepdim=True)
    assert torch.equal(s, amax / E4M3_MAX)
    # the largest element of each row lands on +-448 (up to the reciprocal's rounding)
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((577,), 448.0))
    err = (dequantize_rows(q, s) - x).abs()
    # round to nearest: half an e4m3 step (relative 2^-4 in the normal range; absolute
    # 2^-10 * 448 ... i.e. half the subnormal step 2^-9, times the scale, below it)
    bound = torch.maximum(x.abs() * 2.0 ** -4, s * 2.0 ** -10) * (1 + 1e-6)
    assert bool((err <= bound).all())
    rel = float(err.norm() / x.norm())
    assert 0.005 < rel < 0.03  # e4m3's rms relative error (~2.2 %), not zero, not more
    # per-row: the other rows do not see the outlier row
    q2, s2 = ops.quantize_rows_reference(torch.cat([x[:5], x[6:]]))
    assert torch.equal(q2.view(torch.uint8), torch.cat([q[:5], q[6:]]).view(torch.uint8))


def test_reference_all_zero_rows_and_tiny_rows():
    x = _randn((6, 40), torch.float32, device="cpu")
    x[1] = 0.0
    x[3] = 1e-35  # below the amax floor
    q, s = ops.quantize_rows_reference(x)
    assert float(s[1]) == float(torch.tensor(AMAX_FLOOR) / E4M3_MAX) and float(s[1]) > 0
    assert bool((q[1].float() == 0).all()) and bool((dequantize_rows(q, s)[1] == 0).all())
    assert torch.isfinite(s).all() and bool((s > 0).all())
    assert torch.isfinite(q.float()).all()


def test_reference_per_tensor_uses_one_scale():
    x = _randn((9, 32), torch.float32, device="cpu")
    # e4m3's exponent range absorbs a 100x row (tests/test_fp8.py measures it); at 1e5x the
    # other rows fall into the subnormals under one scale
    x[2] *= 1e5
    q, s = ops.quantize_rows(x, per_tensor=True)
    assert torch.equal(s, torch.full_like(s, float(x.abs().max()) / E4M3_MAX))
    q_row, _ = ops.quantize_rows(x)
    # the outlier row quantises alike; the other rows lose precision under one scale
    assert torch.equal(q[2].view(torch.uint8), q_row[2].view(torch.uint8))
    others = [i for i in range(9) if i != 2]
    err_t = (dequantize_rows(q, s) - x)[others].norm() / x[others].norm()
    err_r = (dequantize_rows(*ops.quantize_rows(x)) - x)[others].norm() / x[others].norm()
    assert err_t > 3 * err_r


def test_reference_half_inputs_and_leading_axes():
    x = _randn((2, 577, 64), torch.float16, device="cpu")
    q, s = ops.quantize_rows(x)
    q32, s32 = ops.quantize_rows(x.float())
    assert q.shape == (2 * 577, 64) and torch.equal(s, s32)
    assert torch.equal(q.view(torch.uint8), q32.view(torch.uint8))


def test_non_finite_is_refused_when_checked_and_never_becomes_finite():
    x = _randn((5, 16), torch.float32, device="cpu")
    x[3, 7] = float("nan")
    x[4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite .* 2 of 5 rows, the first at row 3"):
        ops.quantize_rows(x, check_finite=True)
    q, s = ops.quantize_rows(x)
    v = q.float()
    assert torch.isfinite(v[:3]).all()  # the healthy rows are untouched
    assert bool(v[3].isnan().all()) and bool(v[4, 0].isnan())  # never a finite value
    # through the GEMM: the broken rows come out non-finite
    w = torch.randn(8, 16)
    wq, ws = ops.quantize_rows(w)
    out = dequantize_rows(q, s) @ dequantize_rows(wq, ws).t()
    assert torch.isfinite(out[:3]).all() and not torch.isfinite(out[3:]).any()


# ---------------------------------------------------------------------------------------------
# the Triton kernels against the reference (fp32 values before the e4m3 conversion)
# ---------------------------------------------------------------------------------------------


def _check_case(v, s, v_ref, s_ref, q_ref, *, rtol: float) -> None:
    """Kernel fp32 values / scales against the reference's, then their e4m3 rounding."""
    assert v.dtype == torch.float32 and v.shape == v_ref.shape and s.shape == s_ref.shape
    assert torch.isfinite(v).all() and torch.isfinite(s).all(), "unwritten elements?"
    torch.testing.assert_close(s, s_ref, rtol=rtol, atol=0)
    # the values are relative to their row's amax (448): fp32 rounding of the LayerNorm /
    # GELU math gives absolute differences of a few 1e-7 of that
    torch.testing.assert_close(v, v_ref, rtol=rtol, atol=rtol * E4M3_MAX)
    q = v.to(E4M3).float()
    diff = (q - q_ref.float()).abs()
    # an fp32 ulp of difference can move a value across an e4m3 rounding boundary: one step
    assert bool((diff <= e4m3_step(q_ref.float()) * 1.0001).all())
    assert float((diff > 0).float().mean()) <= (0 if rtol == 0 else 2e-3)


@requires_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("m, n", SHAPES)
def test_quantize_rows_triton(m, n, dtype, poisoned):
    from depthpro_fast.triton.quantize_fp8 import _launch

    x = _randn((m, n), dtype, 3.0)
    x[m // 2] = 0  # an all-zero row
    v, s = _launch(x, torch.float32)
    v_ref, s_ref = scaled_rows_reference(x.float())
    _check_case(v, s, v_ref, s_ref, v_ref.to(E4M3), rtol=0)  # the same fp32 operations
    q, s8 = ops.quantize_rows(x, backend="triton")  # the e4m3 store runs, same scales
    assert q.dtype == E4M3 and q.shape == (m, n) and torch.equal(s8, s)
    assert not q.float().isnan().any()


@requires_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("m, n", SHAPES)
@pytest.mark.parametrize("fused", [True, False], ids=["add_layer_norm", "layer_norm"])
def test_layer_norm_fp8_triton(m, n, dtype, fused, poisoned):
    from depthpro_fast.ops.layer_norm import residual_update_reference
    from depthpro_fast.triton.layer_norm import _launch

    x = _randn((m, n), dtype)
    w, b = 1 + 0.5 * _randn(n, dtype), 0.5 * _randn(n, dtype)
    delta, db, gam = (_randn((m, n), dtype, 2.0), _randn(n, dtype), _randn(n, dtype)) \
        if fused else (None, None, None)
    r, v, s = _launch(x, delta, db, gam, w, b, 1e-6, torch.float32)
    src = residual_update_reference(x, delta, db, gam) if fused else x
    if fused:
        assert torch.equal(r, src)  # the residual: the same single rounding
    ln = F.layer_norm(src.float(), (n,), w.float(), b.float(), 1e-6)
    v_ref, s_ref = scaled_rows_reference(ln)
    # fp32 LayerNorm in another summation order: a few ulps
    _check_case(v, s, v_ref, s_ref, v_ref.to(E4M3), rtol=2e-6)
    if fused:
        r8, q, s8 = ops.add_layer_norm_fp8(x, delta, w, b, 1e-6, delta_bias=db, gamma=gam,
                                           backend="triton")
        assert torch.equal(r8, r)
        q_ref = ops.add_layer_norm_fp8_reference(x, delta, w, b, 1e-6, db, gam)[1]
    else:
        q, s8 = ops.layer_norm_fp8(x, w, b, 1e-6, backend="triton")
        q_ref = ops.layer_norm_fp8_reference(x, w, b, 1e-6)[0]
    assert q.dtype == E4M3 and q.shape == (m, n) and torch.equal(s8, s)
    assert torch.equal(q_ref.view(torch.uint8), v_ref.to(E4M3).view(torch.uint8))


@requires_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("m, n", SHAPES)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
def test_bias_gelu_fp8_triton(m, n, dtype, has_bias, poisoned):
    from depthpro_fast.triton.bias_gelu_fp8 import _launch

    x = _randn((m, n), dtype, 2.0)
    bias = _randn(n, dtype) if has_bias else None
    v, s = _launch(x, bias, torch.float32)
    y = x.float() + (bias.float() if has_bias else 0.0)
    v_ref, s_ref = scaled_rows_reference(F.gelu(y))
    _check_case(v, s, v_ref, s_ref, ops.bias_gelu_fp8_reference(x, bias)[0], rtol=2e-6)
    q, s8 = ops.bias_gelu_fp8(x, bias, backend="triton")
    assert q.dtype == E4M3 and q.shape == (m, n) and torch.equal(s8, s)


@requires_triton
def test_kernels_keep_nan_and_inf_non_finite():
    from depthpro_fast.triton.bias_gelu_fp8 import _launch as gelu_launch
    from depthpro_fast.triton.quantize_fp8 import _launch as quant_launch

    x = _randn((4, 64), torch.float32)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    for v, _ in (quant_launch(x, torch.float32), gelu_launch(x, None, torch.float32)):
        assert torch.isfinite(v[[0, 3]]).all()
        assert bool(v[1, 3].isnan()) and not torch.isfinite(v[2]).all()


@requires_triton
def test_strided_and_batched_inputs_triton():
    from depthpro_fast.triton.quantize_fp8 import _launch

    base = _randn((3, 577, 200), torch.float32)
    x = base[..., 8:136]  # a strided view: copied to rows, same result
    v, s = _launch(x, torch.float32)
    v_ref, s_ref = scaled_rows_reference(x.reshape(-1, 128))
    assert torch.equal(v, v_ref) and torch.equal(s, s_ref)


@requires_triton
def test_fake_registrations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import depthpro_fast.triton.bias_gelu_fp8  # noqa: F401  (registers the ops)
    import depthpro_fast.triton.layer_norm  # noqa: F401
    import depthpro_fast.triton.quantize_fp8  # noqa: F401

    with FakeTensorMode():
        x = torch.empty(2, 5, 64, dtype=torch.bfloat16)
        v = torch.empty(64, dtype=torch.bfloat16)
        r, q, s = torch.ops.depthpro_fast.add_layer_norm_fp8_triton(x, x, v, v, 1e-6, v, None)
        assert r.shape == x.shape and q.shape == (10, 64) and q.dtype == E4M3
        assert s.shape == (10, 1) and s.dtype == torch.float32
        q, s = torch.ops.depthpro_fast.layer_norm_fp8_triton(x, v, v, 1e-6)
        assert q.shape == (10, 64) and s.shape == (10, 1)
        q, s = torch.ops.depthpro_fast.bias_gelu_fp8_triton(x, v)
        assert q.dtype == E4M3 and s.shape == (10, 1)
        q, s = torch.ops.depthpro_fast.quantize_rows_triton(x)
        assert q.dtype == E4M3 and s.shape == (10, 1)


def test_bad_input_says_what_is_wrong():
    x = torch.zeros(4, 8)
    v = torch.ones(8)
    with pytest.raises(TypeError, match="dtype"):
        ops.quantize_rows(torch.zeros(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="non-empty"):
        ops.quantize_rows(torch.zeros(4, 0))
    with pytest.raises(ValueError, match="length 8"):
        ops.layer_norm_fp8(x, torch.ones(7), v, 1e-6)
    with pytest.raises(ValueError, match="shape of x"):
        ops.add_layer_norm_fp8(x, torch.zeros(4, 9), v, v, 1e-6)
    with pytest.raises(ValueError, match="bias must be 1-D of length 8"):
        ops.bias_gelu_fp8(x, torch.ones(3))
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm_fp8(x, v, v, -1.0)


def test_ops_registered_with_backends():
    from depthpro_fast import backends

    reg = backends.registered_ops()
    for op in ("quantize_rows", "layer_norm_fp8", "add_layer_norm_fp8", "bias_gelu_fp8"):
        assert reg[op] == ("reference", "triton")
    x = torch.randn(3, 8)
    # auto on a CPU is the reference
    assert torch.equal(ops.bias_gelu_fp8(x)[0].view(torch.uint8),
                       ops.bias_gelu_fp8_reference(x)[0].view(torch.uint8))


# ---------------------------------------------------------------------------------------------
# GPU: the e4m3 store itself, bf16 inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, n", [(577, 1024), (35 * 577, 1024), (35 * 577, 4096), (577, 130)])
def test_fp8_kernels_gpu(m, n, dtype, poisoned):
    x = _randn((m, n), dtype, 2.0)
    bias = _randn(n, dtype)
    w, b = 1 + 0.5 * _randn(n, dtype), 0.5 * _randn(n, dtype)
    cases = [(ops.quantize_rows(x, backend="triton"), ops.quantize_rows_reference(x)),
             (ops.bias_gelu_fp8(x, bias, backend="triton"), ops.bias_gelu_fp8_reference(x, bias)),
             (ops.layer_norm_fp8(x, w, b, 1e-6, backend="triton"),
              ops.layer_norm_fp8_reference(x, w, b, 1e-6))]
    for (q, s), (q_ref, s_ref) in cases:
        torch.testing.assert_close(s, s_ref, rtol=2e-5, atol=0)
        diff = (q.float() - q_ref.float()).abs()
        assert bool((diff <= e4m3_step(q_ref.float()) * 1.0001).all())
        assert float((diff > 0).float().mean()) <= 2e-3
