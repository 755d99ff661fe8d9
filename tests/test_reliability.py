"""Reliability: bad input at the API boundary, numerical guards, long runs, threads."""

from __future__ import annotations

import gc
import threading
import warnings

import numpy as np
import pytest
import torch

import depthpro_fast
from depthpro_fast import DepthProConfig, inference

# The smallest model of the official structure: cheap enough for many calls (~0.5 s per infer).
MICRO = DepthProConfig(embed_dim=64, depth=2, num_heads=1, encoder_feature_layer_ids=(0, 1),
                       encoder_feature_dims=(8, 8, 16, 16), decoder_features=8)


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return depthpro_fast.load(None, config=MICRO, device="cpu")


def random_image(seed: int, h: int = 48, w: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (2000, 3)])
def test_tiny_and_thin_images_work(micro, shape):
    model, transform = micro
    out = model.infer(transform(random_image(0, *shape)))
    assert out["depth"].shape == shape
    assert bool(torch.isfinite(out["depth"]).all())


def test_non_contiguous_and_channels_last_inputs_work(micro):
    model, transform = micro
    x = transform(random_image(1, 40, 56))
    ref = model.infer(x)["depth"]
    strided = torch.zeros(3, 80, 56)
    strided[:, ::2] = x  # a strided view
    view = strided[:, ::2]
    assert not view.is_contiguous()
    torch.testing.assert_close(model.infer(view)["depth"], ref, rtol=0, atol=0)
    cl = x.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model.infer(cl)["depth"], ref, rtol=1e-6, atol=0)
    hwc = np.ascontiguousarray(random_image(1, 40, 56).permute(1, 2, 0).numpy()[:, ::-1])
    assert model.infer(transform(hwc))["depth"].shape == (40, 56)  # negative-stride source


def test_forward_on_wrong_device_says_so(micro):
    model, _ = micro
    x = torch.zeros(1, 3, 1536, 1536, device="meta")
    with pytest.raises(ValueError, match="is on meta but the model is on cpu"):
        model(x)


def test_huge_output_refused_with_memory_needed(micro, monkeypatch):
    model, _ = micro
    monkeypatch.setattr(inference, "available_memory", lambda device: 2**30)
    # a 20000 x 20000 image: 4.5 GiB of float32 output maps, checked before any work
    x = torch.zeros(3, 1, 1).expand(3, 20000, 20000)  # a view: no 4.8 GB input allocated
    with pytest.raises(MemoryError, match=r"20000x20000 input needs about 4\.5 GiB"):
        model.infer(x)


def test_degenerate_fov_is_clamped_with_warning(micro):
    model, transform = micro
    for bias, expected in ((-50.0, 1.0), (400.0, 179.0)):
        model.fov.head[4].bias.data.fill_(bias)
        try:
            with pytest.warns(RuntimeWarning, match="outside"):
                out = model.infer(transform(random_image(2)))
        finally:
            model.fov.head[4].bias.data.fill_(60.0)
        f = float(out["focallength_px"])
        assert np.isfinite(f) and f > 0
        assert f == pytest.approx(0.5 * 64 / np.tan(np.deg2rad(expected) / 2), rel=1e-5)
        assert bool(torch.isfinite(out["depth"]).all()) and bool((out["depth"] > 0).all())


def test_plausible_fov_gives_no_warning(micro):
    model, transform = micro
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.infer(transform(random_image(3)))


def test_two_threads_match_sequential(micro):
    model, transform = micro
    images = [transform(random_image(10 + i)) for i in range(4)]
    sequential = [model.infer(x)["depth"] for x in images]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(indices):
        try:
            for i in indices:
                results[i] = model.infer(images[i])["depth"]
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(idx,)) for idx in ([0, 1], [2, 3])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, ref in enumerate(sequential):
        assert torch.equal(results[i], ref)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _soak(model, transform, calls: int) -> tuple[int, int]:
    """RSS after a warm-up, and the largest RSS seen afterwards."""
    images = [transform(random_image(100 + i, 30 + i, 50)) for i in range(5)]
    for x in images:
        model.infer(x)
    gc.collect()
    baseline = peak = _rss_bytes()
    for i in range(calls):
        model.infer(images[i % len(images)], f_px=None if i % 2 else 400.0)
        if i % 5 == 4:
            gc.collect()
            peak = max(peak, _rss_bytes())
    return baseline, peak


def test_short_soak_no_memory_growth(micro):
    baseline, peak = _soak(*micro, calls=25)
    assert peak - baseline < 64 * 2**20, (baseline, peak)


@pytest.mark.slow
def test_long_soak_no_memory_growth(micro):
    baseline, peak = _soak(*micro, calls=300)
    assert peak - baseline < 64 * 2**20, (baseline, peak)
