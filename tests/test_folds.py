"""Exact folds of linear conv chains (depthpro_fast/fast/folds.py) against the unfolded modules.

Random weights and inputs (fresh per case), odd map sizes including 1-pixel-wide maps (the
border-aware biases), fp32 to 1e-5 and float64 to 1e-12 relative to the largest output.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from depthpro_fast.fast import folds

_SEED = itertools.count()
SIZES = [(1, 1), (1, 5), (4, 1), (2, 2), (7, 5), (12, 12)]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float((out - ref).abs().max() / ref.abs().max())


def _randomize(*modules: nn.Module) -> None:
    """Weights and biases of magnitude ~1/sqrt(fan-in), biases large enough to matter."""
    with torch.no_grad():
        for m in modules:
            for name, p in m.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 1.0)
                else:
                    p.normal_(0.0, 1.0 / max(1, p[0].numel()) ** 0.5)


def _input(c: int, h: int, w: int, dtype: torch.dtype, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(next(_SEED))
    return torch.randn(batch, c, h, w, generator=g, dtype=torch.float64).to(dtype)


def _cast(dtype):
    return dict(dtype=dtype, device=torch.device("cpu"), channels_last=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(next(_SEED))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("deconv_bias", [False, True])
def test_deconv_then_1x1(dtype, deconv_bias):
    deconv = nn.ConvTranspose2d(12, 10, 2, stride=2, bias=deconv_bias).to(dtype)
    conv = nn.Conv2d(10, 9, 1, bias=True).to(dtype)
    _randomize(deconv, conv)
    folded = folds.fold_deconv_1x1(deconv, conv, **_cast(dtype))
    for h, w in SIZES[:4]:
        x = _input(12, h, w, dtype)
        with torch.no_grad():
            ref = conv(deconv(x))
        assert _rel(folded(x), ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, fold_1x1, chain", [(1, True, False), (2, True, False),
                                                 (3, False, True), (3, True, True),
                                                 (2, None, False)])
def test_project_upsample(dtype, n, fold_1x1, chain):
    from depthpro_fast.model import project_upsample

    block = project_upsample(16, 12, 8, n).to(dtype)
    _randomize(block)
    layers = folds.fold_project_upsample(block, fold_1x1=fold_1x1, fold_chain=chain,
                                         **_cast(dtype))
    expected_layers = (0 if fold_1x1 or fold_1x1 is None and folds.conv1x1_deconv_pays(
        16, 12, 8) else 1) + (1 if chain else n)
    assert len(layers) == expected_layers
    x = _input(16, 3, 5, dtype)
    y = x
    for layer in layers:
        y = layer(y)
    with torch.no_grad():
        ref = block(x)
    assert _rel(y, ref) <= TOL[dtype]


def test_fold_1x1_profitability_on_the_official_sizes():
    pays = folds.conv1x1_deconv_pays
    assert pays(1024, 1024, 1024)  # upsample1, upsample2
    assert not pays(1024, 512, 512)  # upsample0
    assert not pays(1024, 256, 256)  # upsample_latent0 / 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lowres_fusion(dtype):
    from depthpro_fast.model import project_upsample

    e, o2, o3, p = 16, 12, 12, 10
    up2 = project_upsample(e, o2, o2, 1).to(dtype)
    lowres = nn.ConvTranspose2d(e, o3, 2, stride=2, bias=True).to(dtype)
    fuse = nn.Conv2d(o2 + o3, p, 1, bias=True).to(dtype)
    _randomize(up2, lowres, fuse)
    folded = folds.fold_lowres(up2, lowres, fuse, **_cast(dtype))
    x2, g = _input(e, 5, 5, dtype), _input(e, 5, 5, dtype)
    with torch.no_grad():
        ref = fuse(torch.cat([up2(x2), lowres(g)], dim=1))
    assert _rel(folded(torch.cat([x2, g], dim=1)), ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("h, w", SIZES)
def test_1x1_then_conv3x3_border_bias(dtype, h, w):
    conv1 = nn.Conv2d(10, 12, 1, bias=True).to(dtype)
    conv3 = nn.Conv2d(12, 7, 3, padding=1, bias=True).to(dtype)
    _randomize(conv1, conv3)
    folded = folds.fold_1x1_conv3x3(conv1, conv3, **_cast(dtype))
    x = _input(10, h, w, dtype)
    with torch.no_grad():
        ref = conv3(conv1(x))
    assert _rel(folded(x), ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("h, w", SIZES)
def test_subpixel_head(dtype, h, w):
    deconv = nn.ConvTranspose2d(8, 8, 2, stride=2, bias=True).to(dtype)
    conv3 = nn.Conv2d(8, 6, 3, padding=1, bias=True).to(dtype)
    conv_out = nn.Conv2d(6, 1, 1, bias=True).to(dtype)
    _randomize(deconv, conv3, conv_out)
    head = nn.Sequential(deconv, conv3, nn.ReLU(), conv_out, nn.ReLU())
    with torch.no_grad():
        # positive weights and a small negative bias: a good part of the output stays above
        # the final ReLU
        conv_out.weight.abs_()
        conv_out.bias.fill_(-0.2)
    folded = folds.SubpixelHead(deconv, conv3, conv_out, **_cast(dtype))
    x = _input(8, h, w, dtype)
    with torch.no_grad():
        ref = head(x)
    assert float((ref > 0).double().mean()) > 0.1
    assert _rel(folded(x), ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subpixel_conv_before_relu(dtype):
    """The linear part alone (deconv -> 3x3), checked without the ReLUs hiding anything."""
    deconv = nn.ConvTranspose2d(5, 6, 2, stride=2, bias=True).to(dtype)
    conv3 = nn.Conv2d(6, 3, 3, padding=1, bias=True).to(dtype)
    _randomize(deconv, conv3)
    w, b, border = folds.deconv_then_conv3x3(*(folds._f64(t) for t in (
        deconv.weight, deconv.bias, conv3.weight, conv3.bias)))
    conv = folds.Conv(w, b, padding=1, border=border, **_cast(dtype))
    x = _input(5, 4, 3, dtype)
    with torch.no_grad():
        ref = conv3(deconv(x))
    out = torch.nn.functional.pixel_shuffle(
        conv(x).view(2, 4, 3, 4, 3).transpose(1, 2).reshape(2, 12, 4, 3), 2)
    assert _rel(out, ref) <= TOL[dtype]


def test_channels_last_layers_match():
    deconv = nn.ConvTranspose2d(8, 8, 2, stride=2, bias=False)
    conv = nn.Conv2d(8, 8, 1)
    _randomize(deconv, conv)
    cast = dict(dtype=torch.float32, device=torch.device("cpu"))
    a = folds.fold_deconv_1x1(deconv, conv, channels_last=False, **cast)
    b = folds.fold_deconv_1x1(deconv, conv, channels_last=True, **cast)
    x = _input(8, 6, 6, torch.float32)
    torch.testing.assert_close(b(x.contiguous(memory_format=torch.channels_last)), a(x),
                               rtol=1e-5, atol=1e-6)


def test_folds_reject_what_they_cannot_fold():
    with pytest.raises(ValueError, match="kernel = stride"):
        folds.fold_deconv_1x1(nn.ConvTranspose2d(4, 4, 3, stride=2), nn.Conv2d(4, 4, 1))
    with pytest.raises(ValueError, match="1x1"):
        folds.fold_deconv_1x1(nn.ConvTranspose2d(4, 4, 2, stride=2), nn.Conv2d(4, 4, 3))
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        folds.fold_deconv_1x1(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1))


def test_folds_on_the_tiny_model():
    """Each fold on the real module layout of the (tiny) DepthPro, fp32, to 1e-5."""
    import depthpro_fast

    torch.manual_seed(3)
    model, _ = depthpro_fast.load(None, config="tiny", device="cpu", backend="reference")
    cast = _cast(torch.float32)
    enc, dec = model.encoder, model.decoder
    with torch.no_grad():
        fb = dec.fusions[2]
        x = _input(32, 6, 6, torch.float32)
        assert _rel(folds.fold_deconv_1x1(fb.deconv, fb.out_conv, **cast)(x),
                    fb.out_conv(fb.deconv(x))) <= 1e-5
        x2, g = _input(128, 3, 3, torch.float32), _input(128, 3, 3, torch.float32)
        ref = enc.fuse_lowres(torch.cat([enc.upsample2(x2), enc.upsample_lowres(g)], 1))
        out = folds.fold_lowres(enc.upsample2, enc.upsample_lowres, enc.fuse_lowres, **cast)(
            torch.cat([x2, g], 1))
        assert _rel(out, ref) <= 1e-5
        f = _input(32, 9, 9, torch.float32)
        ref = model.head[0](dec.fusions[0].out_conv(f))
        assert _rel(folds.fold_1x1_conv3x3(dec.fusions[0].out_conv, model.head[0], **cast)(f),
                    ref) <= 1e-5
        t = _input(16, 9, 9, torch.float32)
        ref = model.head[1:](t)
        out = folds.SubpixelHead(model.head[1], model.head[2], model.head[4], **cast)(t)
        assert _rel(out, ref) <= 1e-5
        for name in ("upsample_latent0", "upsample_latent1", "upsample0", "upsample1"):
            block = getattr(enc, name)
            x = _input(128, 4, 4, torch.float32)
            y = x
            for layer in folds.fold_project_upsample(block, fold_1x1=True, fold_chain=True,
                                                     **cast):
                y = layer(y)
            assert _rel(y, block(x)) <= 1e-5, name
