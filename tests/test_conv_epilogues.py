"""The decoder / head epilogue ops: ``bias_relu``, ``bias_residual``,
``subpixel_tail``. References against the unfused PyTorch chains they replace; the Triton
kernels (interpreter on CPU: fp32 and fp16) against the references, on odd shapes, channels_last
and contiguous inputs, fresh random inputs per case, outputs poisoned with NaN first."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from depthpro_fast import ops
from depthpro_fast.fast import folds
from depthpro_fast.tolerances import EPILOGUE_REL_TOL
from tests.conftest import HAS_CUDA, poison_, requires_triton

DEVICE = "cuda" if HAS_CUDA else "cpu"
CPU_DTYPES = (torch.float32, torch.float16)
# max |out - ref| / max |ref|: fp32 is summation order only, half is one rounding apart
TOL = EPILOGUE_REL_TOL  # shared with kernel qualification (depthpro_fast/tolerances.py)
# (N, C, H, W): odd sizes, one channel, one pixel, a batch of 35
SHAPES = ((1, 16, 7, 9), (2, 3, 5, 1), (1, 1, 4, 6), (35, 8, 1, 1), (1, 256, 12, 12))
_CASE = itertools.count()


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(2000 + next(_CASE))


def _randn(shape, dtype, g, channels_last=False, scale=1.0):
    t = (torch.randn(shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert bool(torch.isfinite(out).all()), "output has NaN/Inf (unwritten elements?)"
    return float((out.double() - ref.double()).abs().max()
                 / ref.double().abs().max().clamp_min(1e-30))


@pytest.fixture
def poisoned(monkeypatch):
    import depthpro_fast.triton.bias_relu as br
    import depthpro_fast.triton.bias_residual as bres
    import depthpro_fast.triton.subpixel_tail as st

    def alloc(*args, **kwargs):
        return poison_(torch.empty(*args, **kwargs))

    for mod in (br, bres, st):
        monkeypatch.setattr(mod, "_alloc", alloc)


# ---------------------------------------------------------------------------------------------
# references = the unfused chains
# ---------------------------------------------------------------------------------------------


def test_references_equal_the_unfused_chains():
    g = _gen()
    x, r, r2 = (torch.randn(2, 6, 5, 7, generator=g) for _ in range(3))
    b = torch.randn(6, generator=g)
    s = x + b.view(1, -1, 1, 1)
    assert torch.equal(ops.bias_relu_reference(x, b), F.relu(s))
    s_out, relu_out = ops.bias_relu_reference(x, b, keep_sum=True)
    assert torch.equal(s_out, s) and torch.equal(relu_out, F.relu(s))
    assert torch.equal(ops.bias_relu_reference(x), F.relu(x))
    t = s + r + r2
    out, relu = ops.bias_residual_reference(x, b, r, r2, with_relu=True)
    assert torch.equal(out, t) and torch.equal(relu, F.relu(t))
    assert torch.equal(ops.bias_residual_reference(x, None, r), x + r)


def test_half_references_round_once():
    g = _gen()
    x, r = (torch.randn(1, 4, 3, 3, generator=g).half() for _ in range(2))
    b = torch.randn(4, generator=g).half()
    out = ops.bias_residual_reference(x, b, r)
    assert out.dtype == torch.float16
    assert torch.equal(out, (x.float() + b.float().view(1, -1, 1, 1) + r.float()).half())


def test_outputs_keep_the_memory_format():
    x = torch.randn(1, 4, 3, 5).contiguous(memory_format=torch.channels_last)
    r = torch.randn(1, 4, 3, 5)  # other format: accepted, the result follows x
    assert ops.bias_relu(x, backend="reference").is_contiguous(memory_format=torch.channels_last)
    out = ops.bias_residual(x, None, r, backend="reference")
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, x + r, rtol=0, atol=0)


def _subpixel_modules(d: int, g: torch.Generator):
    """head[1] (deconv), head[2] (3x3 to 32), head[4] (1x1 to 1), random weights and biases."""
    deconv = torch.nn.ConvTranspose2d(d, d, 2, stride=2)
    conv3 = torch.nn.Conv2d(d, 32, 3, padding=1)
    conv1 = torch.nn.Conv2d(32, 1, 1)
    with torch.no_grad():
        for m in (deconv, conv3, conv1):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return deconv, conv3, conv1


def tail_arguments(head: folds.SubpixelHead) -> dict:
    """The op's arguments from a prepared SubpixelHead (as the engine builds them)."""
    w = head.out.weight.reshape(-1)
    return dict(weight=w, out_bias=head.out.bias, bias=head.conv.bias,
                border=torch.stack([getattr(head.conv.border, f)
                                    for f in folds.BorderBias.FIELDS]))


@pytest.mark.parametrize("h, w", [(5, 7), (1, 1), (1, 4), (6, 1)])
def test_subpixel_tail_reference_is_the_head(h, w):
    """conv without bias + the tail op = the unfolded head[1:] modules (float64: exact)."""
    g = _gen()
    deconv, conv3, conv1 = (m.double() for m in _subpixel_modules(8, g))
    x = torch.randn(2, 8, h, w, generator=g, dtype=torch.float64)
    with torch.no_grad():
        want = F.relu(conv1(F.relu(conv3(deconv(x)))))
        head = folds.SubpixelHead(deconv, conv3, conv1, dtype=torch.float64,
                                  device=torch.device("cpu"))
        z = F.conv2d(x, head.conv.weight, None, padding=1)
        got = ops.subpixel_tail(z, **tail_arguments(head), backend="reference")
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bad_inputs_are_named():
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="bias must be 1-D of length 4"):
        ops.bias_relu(x, torch.zeros(3))
    with pytest.raises(ValueError, match="4-D"):
        ops.bias_relu(torch.zeros(4, 3))
    with pytest.raises(TypeError, match="residual must have the dtype of x"):
        ops.bias_residual(x, None, x.double())
    with pytest.raises(ValueError, match="residual2 must have the shape of x"):
        ops.bias_residual(x, None, x, torch.zeros(1, 4, 3, 2))
    with pytest.raises(ValueError, match="4P channels"):
        ops.subpixel_tail(torch.zeros(1, 6, 2, 2), torch.zeros(6), torch.zeros(4))
    with pytest.raises(ValueError, match=r"border must be an \(8, 8\) tensor"):
        ops.subpixel_tail(torch.zeros(1, 8, 2, 2), torch.zeros(8), torch.zeros(4),
                          border=torch.zeros(4, 8))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        ops.bias_relu(torch.zeros(1, 1, 1, 1, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Triton kernels vs references
# ---------------------------------------------------------------------------------------------

CASES = [(s, dt, cl) for dt in CPU_DTYPES for s in SHAPES for cl in (False, True)]
IDS = [f"{'x'.join(map(str, s))}-{str(dt)[6:]}-{'cl' if cl else 'nchw'}" for s, dt, cl in CASES]


@requires_triton
@pytest.mark.parametrize("shape, dtype, cl", CASES, ids=IDS)
def test_bias_relu_triton(shape, dtype, cl, poisoned):
    g = _gen()
    x, b = _randn(shape, dtype, g, cl, 2.0), _randn(shape[1], dtype, g)
    for bias in (b, None):
        s, r = ops.bias_relu(x, bias, keep_sum=True, backend="triton")
        ref_s, ref_r = ops.bias_relu_reference(x, bias, keep_sum=True)
        assert _rel_err(s, ref_s) <= TOL[dtype] and _rel_err(r, ref_r) <= TOL[dtype]
        assert r.is_contiguous(memory_format=torch.channels_last if cl else
                               torch.contiguous_format)
        only = ops.bias_relu(x, bias, backend="triton")
        assert _rel_err(only, ref_r) <= TOL[dtype]


@requires_triton
@pytest.mark.parametrize("shape, dtype, cl", CASES, ids=IDS)
def test_bias_residual_triton(shape, dtype, cl, poisoned):
    g = _gen()
    x, r, r2 = (_randn(shape, dtype, g, cl, 2.0) for _ in range(3))
    b = _randn(shape[1], dtype, g)
    out, relu = ops.bias_residual(x, b, r, r2, with_relu=True, backend="triton")
    ref, ref_relu = ops.bias_residual_reference(x, b, r, r2, with_relu=True)
    assert _rel_err(out, ref) <= TOL[dtype] and _rel_err(relu, ref_relu) <= TOL[dtype]
    # one residual, no bias, a residual in the other memory format
    other = r.contiguous(memory_format=torch.contiguous_format if cl else torch.channels_last)
    out1 = ops.bias_residual(x, None, other, backend="triton")
    assert _rel_err(out1, ops.bias_residual_reference(x, None, r)) <= TOL[dtype]


TAIL_CASES = [(n, h, w, dt, cl) for dt in CPU_DTYPES for (n, h, w) in
              ((1, 5, 7), (2, 1, 1), (1, 1, 6), (3, 4, 1), (1, 17, 9)) for cl in (False, True)]


@requires_triton
@pytest.mark.parametrize("n, h, w, dtype, cl", TAIL_CASES,
                         ids=[f"{n}x{h}x{w}-{str(dt)[6:]}-{'cl' if cl else 'nchw'}"
                              for n, h, w, dt, cl in TAIL_CASES])
def test_subpixel_tail_triton(n, h, w, dtype, cl, poisoned):
    g = _gen()
    c = 4 * 32
    z = _randn((n, c, h, w), dtype, g, cl, 2.0)
    weight, out_bias = _randn(c, dtype, g, scale=0.3), _randn(4, dtype, g)
    bias, border = _randn(c, dtype, g), _randn((8, c), torch.float32, g, scale=0.5)
    for b, bd in ((bias, border), (None, None), (bias, None)):
        out = ops.subpixel_tail(z, weight, out_bias, bias=b, border=bd, backend="triton")
        ref = ops.subpixel_tail_reference(z, weight, out_bias, b, bd)
        assert out.shape == (n, 1, 2 * h, 2 * w)
        assert _rel_err(out, ref) <= TOL[dtype]


@requires_triton
def test_subpixel_tail_triton_other_phase_width():
    """P other than 32 (not a power of two): the masked channel lanes add nothing."""
    g = _gen()
    z = _randn((1, 4 * 5, 3, 4), torch.float32, g)
    args = (_randn(20, torch.float32, g), _randn(4, torch.float32, g))
    out = ops.subpixel_tail(z, *args, bias=_randn(20, torch.float32, g), backend="triton")
    ref = ops.subpixel_tail_reference(z, *args, bias=None)
    assert out.shape == ref.shape  # (different bias on purpose below)
    bias = _randn(20, torch.float32, g)
    out = ops.subpixel_tail(z, *args, bias=bias, backend="triton")
    assert _rel_err(out, ops.subpixel_tail_reference(z, *args, bias)) <= TOL[torch.float32]
