"""Golden parity: the reference path reproduces the official implementation (tiny config).

The fixtures in tests/fixtures/official_tiny/ were produced by Apple's code (float32, CPU,
random fp16 weights). Expected agreement: about 1e-5 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

RTOL = 1e-5


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |a - e| relative to the largest |e| (robust where e crosses zero)."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def check_stats(full: torch.Tensor, stats: dict, rtol: float = RTOL) -> None:
    assert list(full.shape) == list(stats["shape"])
    f = full.double()
    scale = max(abs(stats["min"]), abs(stats["max"]), 1e-12)
    for name, value in (("mean", f.mean()), ("std", f.std()), ("min", f.min()),
                        ("max", f.max())):
        assert abs(float(value) - stats[name]) <= rtol * scale, (name, float(value), stats[name])


@pytest.fixture(scope="module")
def estimated_run(tiny_model, tiny_image):
    model, transform = tiny_model
    return model.infer(transform(tiny_image), return_inverse_depth=True)


@pytest.fixture(scope="module")
def intermediates_run(tiny_model, expected_estimated):
    """forward() on the exact network input, collecting every intermediate."""
    model, transform = tiny_model
    return _network_input_and_forward(model, transform, expected_estimated)


def _network_input_and_forward(model, transform, expected):
    import torch.nn.functional as F

    from tests.conftest import TINY_DIR

    image = torch.load(TINY_DIR / "image.pt", weights_only=True)
    x = transform(image).unsqueeze(0)
    x = F.interpolate(x, size=(1536, 1536), mode="bilinear", align_corners=False)
    inter: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        cid, fov = model(x, intermediates=inter)
    return x, cid, fov, inter


def test_network_input_matches(intermediates_run, expected_estimated):
    x, *_ = intermediates_run
    ni = expected_estimated["network_input"]
    s = ni["stride"]
    assert rel_err(x[..., ::s, ::s], ni["values"]) < 1e-6
    check_stats(x, ni["stats"], 1e-6)


def test_canonical_inverse_depth_matches(intermediates_run, expected_estimated):
    _, cid, fov, _ = intermediates_run
    exp = expected_estimated["canonical_inverse_depth"]
    s = exp["stride"]
    assert rel_err(cid[..., ::s, ::s], exp["values"]) < RTOL
    check_stats(cid, exp["stats"])
    assert fov.shape == (1, 1, 1, 1)
    assert rel_err(fov, expected_estimated["fov_deg"]) < RTOL


@pytest.mark.parametrize("name", [
    "encoder.outputs.0", "encoder.outputs.1", "encoder.outputs.2", "encoder.outputs.3",
    "encoder.outputs.4", "decoder.outputs.0", "decoder.outputs.1", "fov.downsample"])
def test_spatial_intermediates_match(intermediates_run, expected_estimated, name):
    *_, inter = intermediates_run
    exp = expected_estimated["intermediates"][name]
    s = exp["stride"]
    ours = inter[name]
    assert rel_err(ours[..., ::s, ::s], exp["values"]) < RTOL, name
    check_stats(ours, exp["stats"])


def test_token_intermediates_match(intermediates_run, expected_estimated):
    *_, inter = intermediates_run
    exp = expected_estimated["intermediates"]
    tokens = inter["encoder.patch_encoder.tokens"]
    assert tokens.shape == (35, 577, 128)
    assert rel_err(tokens[[0, 24, 34]], exp["encoder.patch_encoder.tokens.windows_0_24_34"]) < RTOL
    for i in (0, 1):
        hook = inter[f"encoder.patch_encoder.hook{i}"]
        assert rel_err(hook[[0, 24]], exp[f"encoder.backbone_highres_hook{i}.windows_0_24"]) < RTOL
    image_tokens = inter["encoder.image_encoder.tokens"]
    assert rel_err(image_tokens, exp["encoder.image_encoder.tokens"]) < RTOL
    assert rel_err(inter["fov.encoder.tokens"], exp["fov.encoder.tokens"]) < RTOL


def test_infer_estimated_focal_length(estimated_run, expected_estimated):
    out = estimated_run
    assert out["depth"].shape == (240, 320)
    assert out["depth"].dtype == torch.float32
    assert out["focallength_px"].shape == ()
    assert rel_err(out["depth"], expected_estimated["depth"]) < RTOL
    assert math.isclose(float(out["focallength_px"]), float(expected_estimated["focallength_px"]),
                        rel_tol=RTOL)
    assert math.isclose(float(out["fov_deg"]), float(expected_estimated["fov_deg"]), rel_tol=RTOL)
    # estimated focal length: fov_deg is its FOV, which is the network's estimate itself
    assert torch.equal(out["fov_deg_estimated"], out["fov_deg"])
    # the reciprocal relation of the returned inverse depth
    torch.testing.assert_close(out["depth"], 1 / out["inverse_depth"].clamp(1e-4, 1e4))


def test_infer_given_focal_length(tiny_model, tiny_image, expected_given):
    model, transform = tiny_model
    f_px = expected_given["meta"]["f_px_given"]
    out = model.infer(transform(tiny_image), f_px=f_px)
    assert rel_err(out["depth"], expected_given["depth"]) < RTOL
    assert float(out["focallength_px"]) == f_px
    # fov_deg is the FOV of the focal length used; the official infer's fov_deg (the network's
    # estimate, which it computes even when f_px is given) is fov_deg_estimated
    implied = math.degrees(2 * math.atan(0.5 * 320 / f_px))
    assert math.isclose(float(out["fov_deg"]), implied, rel_tol=1e-6)
    assert math.isclose(float(out["fov_deg_estimated"]), float(expected_given["fov_deg"]),
                        rel_tol=RTOL)
