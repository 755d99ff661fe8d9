"""FLOP and byte accounting (depthpro_fast.flops), on the meta device."""

from __future__ import annotations

import pytest
import torch

from depthpro_fast.config import OFFICIAL, TINY
from depthpro_fast.flops import STAGES, count_bytes, count_flops


@pytest.fixture(scope="module")
def official():
    return count_flops(OFFICIAL)


def test_official_is_19_25_tflop(official):
    # anchors.md §2: 19,247.4 GFLOP per 1536x1536 image
    assert official.total == pytest.approx(19_247.4e9, rel=5e-3)
    assert official.total / 1e9 == pytest.approx(19_247.35, abs=0.1)  # exact, in fact


def test_official_breakdown(official):
    by_op = {op.split(".")[-1]: v / 1e9 for op, v in official.by_op.items()}
    assert by_op["addmm"] == pytest.approx(12_894.5, abs=0.1)
    assert by_op["bmm"] == pytest.approx(1_210.9, abs=0.1)  # attention: QK^T and PV
    assert by_op["convolution"] == pytest.approx(5_141.9, abs=0.1)
    stages = {k: v / 1e9 for k, v in official.by_stage().items()}
    assert set(stages) == set(STAGES)
    assert stages["patch encoder"] == pytest.approx(13_374.6, abs=0.1)
    assert stages["image encoder"] == pytest.approx(382.1, abs=0.1)
    assert stages["decoder"] == pytest.approx(4_299.7, abs=0.1)
    assert stages["split"] == 0
    # the stages cover the whole model exactly once
    assert sum(official.by_stage().values()) == official.total
    assert official.by_module[""] == official.total
    # a module entered without __call__ (forward_with_hooks) still appears
    assert official.by_module["encoder.patch_encoder"] == official.by_stage()["patch encoder"]
    assert "patch_encoder" in official.table()


def test_tiny_is_159_gflop():
    report = count_flops(TINY)
    assert report.total == pytest.approx(159e9, rel=5e-3)  # spec §13


def test_batch_scales_linearly():
    one, two = count_flops("tiny"), count_flops("tiny", batch=2)
    assert two.total == 2 * one.total
    assert two.per_image == one.total


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"batch": 1.5}, {"image_size": 1024}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        count_flops("tiny", **kwargs)


def test_bytes_official_bf16():
    report = count_bytes(OFFICIAL, dtype=torch.bfloat16)
    assert report.weights == 951_991_330 * 2
    assert report.input == 3 * 1536 * 1536 * 2
    assert report.outputs == 1536 * 1536 * 2 + 2  # inverse depth + FOV
    assert 1.9e9 < report.floor < 2.0e9  # anchors.md: ~1.94 GB
    assert report.eager > 20 * report.floor  # unfused eager moves far more
    assert report.to_dict()["floor"] == report.floor


def test_bytes_bad_dtype():
    with pytest.raises(ValueError):
        count_bytes("tiny", dtype=torch.float64)
