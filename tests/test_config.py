"""DepthProConfig: presets, dict / JSON loading, validation."""

from __future__ import annotations

import json

import pytest

from depthpro_fast.config import OFFICIAL, TINY, DepthProConfig, resolve_config
from tests.conftest import TINY_DIR


def test_official_preset_values():
    c = DepthProConfig()
    assert (c.embed_dim, c.depth, c.num_heads, c.head_dim, c.mlp_hidden) == (1024, 24, 16, 64, 4096)
    assert c.hook_block_ids == (5, 11)
    assert c.encoder_feature_dims == (256, 512, 1024, 1024)
    assert c.decoder_features == 256 and c.use_fov


def test_fixture_json_equals_tiny_preset():
    assert DepthProConfig.from_json(TINY_DIR / "config.json") == TINY
    assert resolve_config(str(TINY_DIR / "config.json")) == TINY
    assert resolve_config("tiny") == TINY and resolve_config(None) == OFFICIAL


def test_from_dict_ignores_official_extras_and_rejects_unknown():
    knobs = json.loads((TINY_DIR / "config.json").read_text())
    assert DepthProConfig.from_dict({**knobs, "init_values": 1e-5, "mlp_ratio": 4.0}) == TINY
    with pytest.raises(ValueError, match="unknown config keys"):
        DepthProConfig.from_dict({**knobs, "embed_dims": 3})


def test_round_trip_to_dict():
    c = DepthProConfig(embed_dim=192, depth=3, num_heads=3, mlp_ratio=2.0,
                       encoder_feature_layer_ids=[2, 0], encoder_feature_dims=[8, 16, 24, 40],
                       decoder_features=48, use_fov=False)
    assert DepthProConfig.from_dict(c.to_dict()) == c
    assert c.head_dim == 64 and c.hook_block_ids == (2, 0)


@pytest.mark.parametrize("knobs, match", [
    ({"embed_dim": 100, "num_heads": 3}, "divisible"),
    ({"depth": 0}, "positive"),
    ({"encoder_feature_dims": [1, 2, 3]}, "4 positive"),
    ({"encoder_feature_layer_ids": [5]}, "at least 2"),
    ({"depth": 4}, "must lie in"),
    ({"decoder_features": 30}, "divisible by 8"),
    ({"mlp_ratio": 0}, "mlp_ratio"),
])
def test_invalid_configs_say_what_is_wrong(knobs, match):
    with pytest.raises(ValueError, match=match):
        DepthProConfig(**knobs)


def test_resolve_config_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_config("no-such-preset")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_config(bad)
    with pytest.raises(TypeError):
        resolve_config(3)
