"""The decoder and head epilogue switches of the fast engine (issue 13 item 2:
``FastOptions.decoder_epilogues`` and ``head_tail``, ``fast/decoder.py``) against the reference
modules: float64 (exact up to rounding, 1e-12) and float32 on the prepared decoder and head,
the Triton kernels (interpreter) inside them, and the whole engine on the tiny config."""

from __future__ import annotations

import copy

import pytest
import torch

from depthpro_fast.fast import FastOptions
from depthpro_fast.fast.engine import PreparedLayers
from tests.conftest import requires_triton
from tests.model_helpers import MICRO, fast_copy, max_rel, random_model

SWITCHES = dict(decoder_epilogues=True, head_tail=True)


@pytest.fixture(scope="module")
def micro_model():
    model, _ = random_model(MICRO, seed=21)
    return model


def _encodings(config, dtype, seed, side=3):
    """Random decoder inputs of the right channels, each level twice the next's size."""
    g = torch.Generator().manual_seed(seed)
    d = config.decoder_features
    chans = [d, *config.encoder_feature_dims]
    n = len(chans)
    return [torch.randn(1, c, side * 2 ** (n - 1 - i), side * 2 ** (n - 1 - i), generator=g)
            .to(dtype) for i, c in enumerate(chans)]


def _run_prepared(model, options, encodings, backend):
    p = PreparedLayers(model, FastOptions(epilogues="torch", **options))
    cl = options.get("channels_last", True)
    if cl:
        encodings = [e.contiguous(memory_format=torch.channels_last) for e in encodings]
    if p.epilogue_decoder is not None:
        features, lowres = p.epilogue_decoder(encodings, backend)
    else:
        raise AssertionError("decoder_epilogues did not prepare the epilogue decoder")
    t = p.head0(features)
    cid = p.fused_tail(t, backend) if p.fused_tail is not None else p.subpixel(t)
    return features, lowres, cid


@pytest.mark.parametrize("options", [
    {}, {"fold_convs": False}, {"channels_last": False}, {"head_tail": False}],
    ids=["defaults", "no-folds", "nchw", "decoder-only"])
def test_prepared_decoder_and_head_float64(micro_model, options):
    model = copy.deepcopy(micro_model).double()
    encs = _encodings(MICRO, torch.float64, seed=1)
    with torch.no_grad():
        want_f, want_low = model.decoder(encs)
        want = model.head(want_f)
        f, low, cid = _run_prepared(model, {**SWITCHES, **options}, encs, "reference")
    assert max_rel(low, want_low) <= 1e-12
    if options.get("fold_convs") is False:  # else fusions[0].out_conv is folded into head[0]
        assert max_rel(f, want_f) <= 1e-12
    assert cid.shape == want.shape and max_rel(cid, want) <= 1e-12


@requires_triton
@pytest.mark.parametrize("channels_last", [True, False])
def test_prepared_decoder_and_head_triton_fp32(micro_model, channels_last):
    """The Triton kernels (interpreter on a CPU) in the decoder and head, fp32."""
    encs = _encodings(MICRO, torch.float32, seed=2, side=2)
    with torch.no_grad():
        want = micro_model.head(micro_model.decoder(encs)[0])
        _, _, cid = _run_prepared(micro_model, {**SWITCHES, "channels_last": channels_last},
                                  encs, "triton")
    assert max_rel(cid, want) <= 1e-5


def test_tail_biases_are_carried(micro_model):
    p = PreparedLayers(micro_model, FastOptions(epilogues="torch", **SWITCHES))
    # fusions 1..4 end in a deconv whose bias moves into the fusion below
    assert p.epilogue_decoder.carried == len(micro_model.decoder.fusions) - 1
    assert all(block[2] == [] or block[2][-1].bias is None
               for block in p.epilogue_decoder.blocks)
    off = PreparedLayers(micro_model, FastOptions(epilogues="torch", head_subpixel=False,
                                             **SWITCHES))
    assert off.fused_tail is None  # the fused tail is the sub-pixel head's


def test_whole_engine_switches_on_and_off_fp32():
    """Tiny config, fp32: the engine with the switches on equals the one without and the
    reference modules, up to float32 rounding."""
    model, _ = random_model("tiny", seed=11)
    from tests.model_helpers import model_input

    x = model_input(seed=1)
    with torch.no_grad():
        cid, fov = model(x)
        off_cid, off_fov = fast_copy(model)(x)
        on = fast_copy(model, **SWITCHES)
        on_cid, on_fov = on(x)
    assert any("fused epilogue" in f for f in on.fast_engine.status()["folds"])
    assert max_rel(on_cid, cid) <= 1e-5 and abs(float(on_fov) - float(fov)) <= 1e-4
    assert max_rel(on_cid, off_cid) <= 1e-5 and abs(float(on_fov) - float(off_fov)) <= 1e-4
