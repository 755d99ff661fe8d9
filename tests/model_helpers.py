"""Small random-weight models and inputs shared by the fast-path tests.

``MICRO`` is a config smaller than the tiny fixture's, for the runs that go through the Triton
interpreter (slow, erf in particular). Every helper takes its seed, so each test draws its own
weights and inputs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

import depthpro_fast
from depthpro_fast.config import DepthProConfig

MICRO = DepthProConfig(embed_dim=64, depth=2, num_heads=1, mlp_ratio=2.0,
                       encoder_feature_layer_ids=(0, 1), encoder_feature_dims=(8, 16, 32, 64),
                       decoder_features=16)


def max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest absolute difference relative to the largest magnitude of ``ref``."""
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def random_model(config: Any, seed: int, device: str = "cpu") -> tuple[Any, Any]:
    """(model, transform) of ``config`` with random weights from ``seed``, reference backend."""
    torch.manual_seed(seed)
    model, transform = depthpro_fast.load(None, config=config, device=device,
                                          backend="reference")
    return model, transform


def model_input(batch: int = 1, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """A normalised (batch, 3, 1536, 1536) input in [-1, 1]: a smooth image plus noise, closer
    to a photo than white noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, 24, 24, generator=g)
    x = torch.nn.functional.interpolate(base, size=(1536, 1536), mode="bilinear",
                                        align_corners=False)
    x = x + 0.05 * torch.randn(batch, 3, 1536, 1536, generator=g)
    return (x.clamp(0, 1) * 2 - 1).to(device)


def fast_copy(model: Any, dtype: torch.dtype = torch.float32, **options: Any) -> Any:
    """A copy of ``model`` in ``dtype`` with the fast engine prepared (``options``, else the
    defaults); ``model`` itself is left alone."""
    fast = copy.deepcopy(model).to(dtype)
    return fast.prepare_fast(options or True)


def model_with_large_layerscale(config: Any = "tiny", *, seed: int) -> Any:
    """A reference model whose ViT LayerScale (0.05-0.5) and proj / fc2 biases (O(1)) are large
    enough that a misplaced scale or bias shows (the model's init has LayerScale 1e-5)."""
    torch.manual_seed(seed)
    model, _ = depthpro_fast.load(None, config=config, device="cpu", backend="reference")
    with torch.no_grad():
        for vit in (model.encoder.patch_encoder, model.encoder.image_encoder):
            for blk in vit.blocks:
                blk.ls1.gamma.uniform_(0.05, 0.5)
                blk.ls2.gamma.uniform_(0.05, 0.5)
                blk.attn.proj.bias.normal_(0.0, 0.5)
                blk.mlp.fc2.bias.normal_(0.0, 0.5)
    return model
