"""DepthPro's data flow, written once: split -> patch / image / FOV ViTs -> merge -> decoder ->
head -> FOV (spec §2-§5).

:func:`run_network` (and :func:`encode`, its encoder half) is the network's orchestration over a
few **stages**. :class:`Stages` implements each stage with the model's own modules (the reference
path, ``DepthPro.forward``); the fast engine (``fast/stages.py``) subclasses it and swaps in its
fused implementations: fused ViTs with the image / FOV encoders on a second CUDA stream, folded
channels_last convs, the decoder epilogue kernels. A change to the network's wiring is made here
and both paths follow.

Stages may run concurrently: :meth:`Stages.vits` returns the image and FOV encoders' tokens as
:class:`Pending` values, and the flow asks for them (``.get()``) only where it uses them, so an
implementation may compute them on another stream meanwhile (the reference returns them ready).

``mark(stage)`` is called after each stage of ``depthpro_fast.flops.STAGES`` (the bench's
per-stage timer); nothing is stored on the modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from . import ops
from .op_common import tokens_to_maps

if TYPE_CHECKING:
    from torch import nn

    from .model import DepthProEncoder, FOVNetwork, MultiresConvDecoder

Intermediates = dict[str, torch.Tensor]
Mark = Callable[[str], None]
#: The encoder's project-upsample blocks of the four merged maps, in ``encode``'s order.
UPSAMPLES = ("upsample_latent0", "upsample_latent1", "upsample0", "upsample1")


def _no_mark(stage: str) -> None:
    return None


class Pending(Protocol):
    """A tensor that may still be being computed elsewhere (another stream)."""

    def get(self) -> torch.Tensor: ...


@dataclass
class Ready:
    """A value that is already there."""

    value: torch.Tensor

    def get(self) -> torch.Tensor:
        return self.value


@dataclass
class ViTOutputs:
    """What the three ViTs give the rest of the network."""

    tokens: torch.Tensor  # patch encoder, final-normed (35B, 577, E)
    hooks: list[torch.Tensor]  # patch encoder's residual stream after the hooked blocks
    image: Pending  # image encoder, final-normed (B, 577, E)
    fov: Pending | None  # FOV encoder through its Linear (B, 577, D/2); None when not needed


def decode(encodings: Sequence[torch.Tensor],
           project: Callable[[int, torch.Tensor], torch.Tensor],
           fuse: Callable[[int, torch.Tensor, torch.Tensor | None], torch.Tensor],
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The multi-resolution decoder's flow (spec §3): ``project(i, encoding)`` is the level's
    projection conv, ``fuse(i, f, skip)`` its feature-fusion block. Returns (features at the
    highest resolution, the projected lowest-resolution encoding)."""
    last = len(encodings) - 1
    lowres = project(last, encodings[last])
    f = fuse(last, lowres, None)
    for i in range(last - 1, -1, -1):
        f = fuse(i, f, project(i, encodings[i]))
    return f, lowres


class Stages:
    """The reference implementation of each stage: the model's own modules."""

    def __init__(self, encoder: DepthProEncoder, decoder: MultiresConvDecoder | None = None,
                 head: nn.Module | None = None, fov: FOVNetwork | None = None):
        self.encoder, self.decoder_module, self.head_module = encoder, decoder, head
        self.fov_network = fov

    # -- encoder ----------------------------------------------------------------------------

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 1536, 1536) normalised -> (35B, 3, 384, 384) windows."""
        return ops.split_patches(x, prenormalized=True, backend=self.encoder.backend)

    def vits(self, x: torch.Tensor, patches: torch.Tensor, level2: torch.Tensor,
             compute_fov: bool, mark: Mark = _no_mark) -> ViTOutputs:
        """The patch encoder on every window, the image encoder on the level-2 windows, the
        FOV encoder on the 0.25 resize of ``x`` (the official input; the same values as
        ``level2``, spec §15)."""
        enc = self.encoder
        tokens, hooks = enc.patch_encoder.forward_with_hooks(patches, enc.hook_block_ids)
        mark("patch encoder")
        image = Ready(enc.image_encoder(level2))
        mark("image encoder")
        fov = Ready(self.fov_network.encode(x)) if compute_fov else None
        mark("FOV encoder")
        return ViTOutputs(tokens, hooks, image, fov)

    def merge(self, tokens: torch.Tensor, batch: int, level: tuple[int, int]) -> torch.Tensor:
        grid, padding = level
        return ops.merge_patches(tokens, batch_size=batch, grid=grid, padding=padding,
                                 backend=self.encoder.backend)

    def upsample(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """One of the project-upsample blocks of :data:`UPSAMPLES`."""
        return getattr(self.encoder, name)(t)

    def lowres(self, x2: torch.Tensor, global_map: torch.Tensor) -> torch.Tensor:
        """The fused lowest-resolution encoding of the level-2 and global maps."""
        enc = self.encoder
        return enc.fuse_lowres(torch.cat([enc.upsample2(x2), enc.upsample_lowres(global_map)],
                                         dim=1))

    # -- decoder, head, FOV -----------------------------------------------------------------

    def decoder(self, encodings: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder_module(encodings)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head_module(features)

    def fov(self, fov_tokens: torch.Tensor, lowres: torch.Tensor,
            intermediates: Intermediates | None = None) -> torch.Tensor:
        return self.fov_network.finish(fov_tokens, lowres.detach(), intermediates)


def encode(stages: Stages, x: torch.Tensor, *, compute_fov: bool = False,
           intermediates: Intermediates | None = None, mark: Mark = _no_mark,
           ) -> tuple[list[torch.Tensor], Pending | None]:
    """(B, 3, 1536, 1536) normalised -> (five feature maps, highest resolution first; the FOV
    encoder's tokens when ``compute_fov``)."""
    enc = stages.encoder
    level0, level1 = enc.LEVEL0, enc.LEVEL1
    b = x.shape[0]
    n0 = level0[0] ** 2 * b
    n1 = level1[0] ** 2 * b
    patches = stages.split(x)
    mark("split")
    # The level-2 image (last B windows) is also the global image encoder's input.
    v = stages.vits(x, patches, patches[n0 + n1:], compute_fov, mark)
    hook0, hook1 = v.hooks
    maps = [stages.merge(hook0[:n0], b, level0), stages.merge(hook1[:n0], b, level0),
            stages.merge(v.tokens[:n0], b, level0),
            stages.merge(v.tokens[n0:n0 + n1], b, level1)]
    x2 = tokens_to_maps(v.tokens[n0 + n1:])  # level 2 is a single window: nothing to merge
    encodings = [stages.upsample(name, m) for name, m in zip(UPSAMPLES, maps, strict=True)]
    global_tokens = v.image.get()
    encodings.append(stages.lowres(x2, tokens_to_maps(global_tokens)))
    mark("merge + upsample")
    if intermediates is not None:
        intermediates["encoder.patch_encoder.tokens"] = v.tokens
        intermediates["encoder.patch_encoder.hook0"] = hook0
        intermediates["encoder.patch_encoder.hook1"] = hook1
        intermediates["encoder.image_encoder.tokens"] = global_tokens
    return encodings, v.fov


def run_network(stages: Stages, x: torch.Tensor, *, compute_fov: bool,
                intermediates: Intermediates | None = None, mark: Mark = _no_mark,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The whole forward: (canonical inverse depth (B, 1, 1536, 1536), FOV in degrees
    (B, 1, 1, 1) or None when not ``compute_fov``)."""
    encodings, fov_tokens = encode(stages, x, compute_fov=compute_fov,
                                   intermediates=intermediates, mark=mark)
    features, lowres = stages.decoder(encodings)
    mark("decoder")
    canonical_inverse_depth = stages.head(features)
    fov = stages.fov(fov_tokens.get(), lowres, intermediates) if fov_tokens is not None else None
    mark("head")
    if intermediates is not None:
        for i, e in enumerate(encodings):
            intermediates[f"encoder.outputs.{i}"] = e
        intermediates["decoder.outputs.0"] = features
        intermediates["decoder.outputs.1"] = lowres
    return canonical_inverse_depth, fov


def fov_input(x: torch.Tensor) -> torch.Tensor:
    """The FOV encoder's official input: the 0.25 bilinear resize of the network input."""
    return F.interpolate(x, scale_factor=0.25, mode="bilinear", align_corners=False)
