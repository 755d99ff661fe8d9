"""Model configuration: the official DepthPro preset and any knob values of the same kind.

The knobs are the ones that change between the official model and the tiny test model
(spec §13). Everything else (window size 384, overlaps 0.25 / 0.5, merge paddings 3 / 6, head
``last_dims`` (32, 1), LayerNorm eps 1e-6, patch size 16, 24x24 token grid) is fixed by the
architecture and is not a knob.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from ._spelling import option

# Fixed architecture constants (spec §1.1, §2).
PATCH_SIZE = 16
WINDOW_SIZE = 384
TOKEN_GRID = WINDOW_SIZE // PATCH_SIZE  # 24
NUM_TOKENS = TOKEN_GRID * TOKEN_GRID + 1  # 577, class token first
IMG_SIZE = 4 * WINDOW_SIZE  # 1536, the network's fixed input resolution
LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class DepthProConfig:
    """Knobs of a DepthPro network. ``DepthProConfig()`` is the official model."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    encoder_feature_layer_ids: tuple[int, ...] = (5, 11, 17, 23)
    encoder_feature_dims: tuple[int, ...] = (256, 512, 1024, 1024)
    decoder_features: int = 256
    use_fov: bool = True

    # Keys that appear in config files of the official tooling but change nothing at inference.
    _IGNORED_KEYS = frozenset({"init_values", "checkpoint_uri", "patch_encoder_preset",
                               "image_encoder_preset", "fov_encoder_preset"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_feature_layer_ids",
                           tuple(int(i) for i in self.encoder_feature_layer_ids))
        object.__setattr__(self, "encoder_feature_dims",
                           tuple(int(d) for d in self.encoder_feature_dims))
        problems = []
        for name in ("embed_dim", "depth", "num_heads", "decoder_features"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.embed_dim % self.num_heads:
            problems.append(f"embed_dim ({self.embed_dim}) must be divisible by num_heads "
                            f"({self.num_heads})")
        if not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            problems.append(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        elif not float(self.embed_dim * self.mlp_ratio).is_integer():
            problems.append(f"embed_dim * mlp_ratio must be an integer, got "
                            f"{self.embed_dim} * {self.mlp_ratio}")
        if len(self.encoder_feature_dims) != 4 or any(d <= 0 for d in self.encoder_feature_dims):
            problems.append("encoder_feature_dims must be 4 positive integers, got "
                            f"{list(self.encoder_feature_dims)}")
        ids = self.encoder_feature_layer_ids
        if len(ids) < 2:
            problems.append("encoder_feature_layer_ids needs at least 2 block indices (the first "
                            f"two are the hooked blocks), got {list(ids)}")
        elif isinstance(self.depth, int) and any(not 0 <= i < self.depth for i in ids[:2]):
            problems.append(f"hooked blocks {list(ids[:2])} must lie in 0..{self.depth - 1} "
                            f"(depth {self.depth})")
        if isinstance(self.decoder_features, int) and self.decoder_features % 8:
            problems.append("decoder_features must be divisible by 8 (the FOV head uses D/2, "
                            f"D/4 and D/8 channels), got {self.decoder_features}")
        if problems:
            raise ValueError("invalid DepthProConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def hook_block_ids(self) -> tuple[int, int]:
        """The two patch-encoder blocks whose outputs feed the high-resolution latents."""
        return (self.encoder_feature_layer_ids[0], self.encoder_feature_layer_ids[1])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["encoder_feature_layer_ids"] = list(self.encoder_feature_layer_ids)
        d["encoder_feature_dims"] = list(self.encoder_feature_dims)
        return d

    @classmethod
    def from_dict(cls, knobs: Mapping[str, Any]) -> DepthProConfig:
        if not isinstance(knobs, Mapping):
            raise TypeError(f"config knobs must be a mapping, got {type(knobs).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in knobs if k not in fields and k not in cls._IGNORED_KEYS)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; accepted: {sorted(fields)}")
        return cls(**{k: v for k, v in knobs.items() if k in fields})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> DepthProConfig:
        try:
            with open(path, encoding="utf-8") as f:
                knobs = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {os.fspath(path)!r}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {os.fspath(path)!r} is not valid JSON: {e}") from None
        return cls.from_dict(knobs)


OFFICIAL = DepthProConfig()

#: The golden fixtures' tiny model (spec §13).
TINY = DepthProConfig(embed_dim=128, depth=4, num_heads=2, mlp_ratio=4.0,
                      encoder_feature_layer_ids=(0, 1, 2, 3),
                      encoder_feature_dims=(16, 32, 64, 128), decoder_features=32)

PRESETS = {"official": OFFICIAL, "tiny": TINY}


def resolve_config(config: DepthProConfig | Mapping[str, Any] | str | os.PathLike | None,
                   ) -> DepthProConfig:
    """Turn any accepted config spelling into a ``DepthProConfig``.

    Accepted: ``None`` (official), a ``DepthProConfig``, a dict of knobs, a preset name
    (``"official"``, ``"tiny"``) or a path to a JSON file of knobs.
    """
    if config is None:
        return OFFICIAL
    if isinstance(config, DepthProConfig):
        return config
    if isinstance(config, Mapping):
        return DepthProConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        if isinstance(config, str) and config in PRESETS:
            return PRESETS[config]
        if os.path.exists(config):
            return DepthProConfig.from_json(config)
        raise ValueError(f"{option('config', '--config')} {os.fspath(config)!r} is neither a "
                         f"preset ({', '.join(PRESETS)}) nor an existing JSON file")
    raise TypeError("config must be None, a DepthProConfig, a dict of knobs, a preset name or a "
                    f"path to a JSON file, got {type(config).__name__}")
