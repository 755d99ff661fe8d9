"""The one definition of the DepthPro network, in plain PyTorch modules.

State-dict keys are exactly those of Apple's checkpoint (spec §11). Wherever a fast path differs
from plain PyTorch the modules call an op from ``depthpro_fast.ops`` with the model's backend.
No forward hooks and no state stored during forward: the forward is re-entrant; intermediate
tensors are returned to a caller-owned dict on request. The wiring of the modules (split ->
ViTs -> merge -> decoder -> head -> FOV) is written once, in ``dataflow.py``, over stages that
the fast engine reimplements.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import dataflow, ops
from .config import IMG_SIZE, LN_EPS, NUM_TOKENS, PATCH_SIZE, DepthProConfig
from .op_common import tokens_to_maps

Intermediates = dict[str, torch.Tensor]


class _UsesBackend(nn.Module):
    """A module that calls ops; ``backend`` is set for the whole model by ``DepthPro``."""

    backend: str = "reference"


# ----------------------------------------------------------------------------------------------
# ViT-L/16 (DINOv2 layout, timm key names)
# ----------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, E, 24, 24) -> (B, 576, E), row-major token order
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(_UsesBackend):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (B, N, 3, H, D) -> three (B, H, N, D) strided views; the op reads them in place.
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        o = ops.attention(q, k, v, scale=self.scale, backend=self.backend)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT on 384x384 inputs: (B, 3, 384, 384) -> final-normed tokens (B, 577, E)."""

    def __init__(self, config: DepthProConfig):
        super().__init__()
        e = config.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e))
        self.pos_embed = nn.Parameter(torch.zeros(1, NUM_TOKENS, e))
        self.patch_embed = PatchEmbed(e)
        self.blocks = nn.ModuleList(Block(e, config.num_heads, config.mlp_hidden)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(e, eps=LN_EPS)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed

    def forward_with_hooks(self, x: torch.Tensor, hook_ids: Sequence[int] = (),
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final-normed tokens and the raw residual stream after each block in ``hook_ids``."""
        h = self.embed(x)
        hooked = {}
        wanted = set(hook_ids)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in wanted:
                hooked[i] = h
        return self.norm(h), [hooked[i] for i in hook_ids]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_hooks(x)[0]


# ----------------------------------------------------------------------------------------------
# Encoder (spec §2)
# ----------------------------------------------------------------------------------------------


def project_upsample(dim_in: int, dim_int: int, dim_out: int, num_deconvs: int) -> nn.Sequential:
    """1x1 conv (no bias) then ``num_deconvs`` ConvTranspose2d k2 s2 (no bias)."""
    layers: list[nn.Module] = [nn.Conv2d(dim_in, dim_int, 1, bias=False)]
    for i in range(num_deconvs):
        layers.append(nn.ConvTranspose2d(dim_int if i == 0 else dim_out, dim_out, 2, stride=2,
                                         bias=False))
    return nn.Sequential(*layers)


class DepthProEncoder(_UsesBackend):
    # (grid, crop padding in tokens) of the merged pyramid levels
    LEVEL0 = (5, 3)
    LEVEL1 = (3, 6)

    def __init__(self, config: DepthProConfig):
        super().__init__()
        e = config.embed_dim
        dims = config.encoder_feature_dims
        d = config.decoder_features
        self.hook_block_ids = config.hook_block_ids
        self.patch_encoder = VisionTransformer(config)
        self.image_encoder = VisionTransformer(config)
        self.upsample_latent0 = project_upsample(e, dims[0], d, 3)
        self.upsample_latent1 = project_upsample(e, dims[0], dims[0], 2)
        self.upsample0 = project_upsample(e, dims[1], dims[1], 1)
        self.upsample1 = project_upsample(e, dims[2], dims[2], 1)
        self.upsample2 = project_upsample(e, dims[3], dims[3], 1)
        self.upsample_lowres = nn.ConvTranspose2d(e, dims[3], 2, stride=2, bias=True)
        self.fuse_lowres = nn.Conv2d(2 * dims[3], dims[3], 1, bias=True)

    def forward(self, x: torch.Tensor, intermediates: Intermediates | None = None,
                ) -> list[torch.Tensor]:
        """(B, 3, 1536, 1536) normalised -> five feature maps, highest resolution first."""
        return dataflow.encode(dataflow.Stages(self), x, intermediates=intermediates)[0]


# ----------------------------------------------------------------------------------------------
# Decoder (spec §3)
# ----------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """``x + conv(ReLU(conv(ReLU(x))))``; Sequential slots 0 and 2 are the ReLUs."""

    def __init__(self, dim: int):
        super().__init__()
        self.residual = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1),
                                      nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)


class FeatureFusionBlock2d(nn.Module):
    def __init__(self, dim: int, deconv: bool):
        super().__init__()
        self.resnet1 = ResidualBlock(dim)
        self.resnet2 = ResidualBlock(dim)
        self.deconv = nn.ConvTranspose2d(dim, dim, 2, stride=2, bias=False) if deconv else None
        self.out_conv = nn.Conv2d(dim, dim, 1, bias=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resnet1(skip)
        x = self.resnet2(x)
        if self.deconv is not None:
            x = self.deconv(x)
        return self.out_conv(x)


class MultiresConvDecoder(nn.Module):
    def __init__(self, dims_encoder: Sequence[int], dim_decoder: int):
        super().__init__()
        convs: list[nn.Module] = [
            nn.Identity() if dims_encoder[0] == dim_decoder
            else nn.Conv2d(dims_encoder[0], dim_decoder, 1, bias=False)]
        convs += [nn.Conv2d(c, dim_decoder, 3, padding=1, bias=False) for c in dims_encoder[1:]]
        self.convs = nn.ModuleList(convs)
        self.fusions = nn.ModuleList(FeatureFusionBlock2d(dim_decoder, deconv=i != 0)
                                     for i in range(len(dims_encoder)))

    def forward(self, encodings: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (features at the highest resolution, lowest-resolution projected features)."""
        return dataflow.decode(encodings, lambda i, e: self.convs[i](e),
                               lambda i, f, skip: self.fusions[i](f, skip))


# ----------------------------------------------------------------------------------------------
# FOV network (spec §5)
# ----------------------------------------------------------------------------------------------


class FOVNetwork(nn.Module):
    def __init__(self, config: DepthProConfig):
        super().__init__()
        d = config.decoder_features
        self.encoder = nn.Sequential(VisionTransformer(config), nn.Linear(config.embed_dim, d // 2))
        self.downsample = nn.Sequential(nn.Conv2d(d, d // 2, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(
            nn.Conv2d(d // 2, d // 4, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(d // 4, d // 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(d // 8, 1, 6, stride=1, padding=0))

    def forward(self, x: torch.Tensor, lowres: torch.Tensor,
                intermediates: Intermediates | None = None) -> torch.Tensor:
        """x: (B, 3, 1536, 1536) network input, lowres: (B, D, 48, 48) -> FOV deg (B, 1, 1, 1)."""
        return self.finish(self.encode(x), lowres, intermediates)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The FOV encoder (ViT + Linear) on the 0.25 resize of the network input."""
        return self.encoder(dataflow.fov_input(x))

    def finish(self, tokens: torch.Tensor, lowres: torch.Tensor,
               intermediates: Intermediates | None = None) -> torch.Tensor:
        """The encoder's tokens and the decoder's lowres features -> FOV deg (B, 1, 1, 1)."""
        l = self.downsample(lowres)
        if intermediates is not None:
            intermediates["fov.encoder.tokens"] = tokens
            intermediates["fov.downsample"] = l
        return self.head(tokens_to_maps(tokens) + l)


# ----------------------------------------------------------------------------------------------
# DepthPro
# ----------------------------------------------------------------------------------------------


class DepthPro(nn.Module):
    """The network: ``forward(x)`` -> (canonical inverse depth, FOV in degrees or None)."""

    def __init__(self, config: DepthProConfig, use_fov: bool | None = None):
        super().__init__()
        self.config = config
        use_fov = config.use_fov if use_fov is None else use_fov
        dims = config.encoder_feature_dims
        d = config.decoder_features
        self.encoder = DepthProEncoder(config)
        self.decoder = MultiresConvDecoder([d, *dims], d)
        self.head = nn.Sequential(
            nn.Conv2d(d, d // 2, 3, padding=1),
            nn.ConvTranspose2d(d // 2, d // 2, 2, stride=2, bias=True),
            nn.Conv2d(d // 2, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 1, 1), nn.ReLU())
        self.fov = FOVNetwork(config) if use_fov else None
        self._backend = "reference"
        # Skip the FOV branch when the caller says its result is unused (``need_fov=False``;
        # ``infer`` passes that when given ``f_px``). Off by default: the official ``infer``
        # always computes (and we report) the estimated FOV. The fast path turns it on.
        self.skip_unused_fov = False
        self._fast_engine = None  # a plain object (not a submodule): see prepare_fast()

    @property
    def img_size(self) -> int:
        return IMG_SIZE

    @property
    def backend(self) -> str:
        return self._backend

    def set_backend(self, backend: str) -> DepthPro:
        """Route every op of this model through ``backend`` (reference, triton, cuda, auto)."""
        from .backends import check_backend, preload, require_backend

        backend = check_backend(backend)
        device = next(self.parameters()).device
        require_backend(backend, device)  # refused here, with the reason, not at every call
        self._backend = backend
        if device.type != "meta":
            preload(backend, device)
        for m in self.modules():
            if isinstance(m, _UsesBackend):
                m.backend = backend
        return self

    # -- fast path --------------------------------------------------------------------------

    def prepare_fast(self, options=True) -> DepthPro:
        """Attach the fast engine (``depthpro_fast.fast``): folded conv weights, fused ViT
        epilogues, channels_last, and on CUDA a second stream and CUDA graphs.

        ``options``: ``True`` (defaults), a dict of ``FastOptions`` fields or a ``FastOptions``;
        ``False`` detaches it. Calls without gradients and without ``intermediates`` then run
        on the engine; call again after replacing parameters by new tensor objects.
        """
        from .fast.engine import FastEngine, FastOptions

        opts = FastOptions.resolve(options)
        if opts is None:
            self._fast_engine = None
            self.skip_unused_fov = False
            return self
        self._fast_engine = FastEngine(self, opts)
        self.skip_unused_fov = opts.skip_unused_fov
        return self

    @property
    def fast_engine(self):
        """The attached ``FastEngine``, or None (reference modules only)."""
        return self._fast_engine

    def forward(self, x: torch.Tensor, intermediates: Intermediates | None = None, *,
                need_fov: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, 1536, 1536) normalised -> (canonical inverse depth (B, 1, 1536, 1536),
        FOV in degrees (B, 1, 1, 1), or None without the FOV network).

        ``need_fov=False`` tells the model the FOV is not used; it then returns None for it
        when ``skip_unused_fov`` is set (the fast path), saving the FOV branch.
        """
        from .inference import check_network_input

        check_network_input(x, self)
        engine = self._fast_engine
        if engine is not None and intermediates is None and not torch.is_grad_enabled():
            return engine(x, need_fov=need_fov)
        compute_fov = self.fov is not None and (need_fov or not self.skip_unused_fov)
        return dataflow.run_network(self.stages(), x, compute_fov=compute_fov,
                                    intermediates=intermediates)

    def stages(self) -> dataflow.Stages:
        """The reference implementation of the stages of ``dataflow.run_network``."""
        return dataflow.Stages(self.encoder, self.decoder, self.head, self.fov)

    @torch.no_grad()
    def infer(self, x: torch.Tensor, f_px: float | torch.Tensor | None = None,
              interpolation_mode: str = "bilinear", *, return_inverse_depth: bool = False,
              intrinsics: Any = None) -> dict[str, torch.Tensor]:
        """Metric depth of a normalised (3, H, W) image or (B, 3, H, W) batch (spec §7).

        Returns ``{"depth", "focallength_px", "fov_deg", "intrinsics"}``, plus
        ``"fov_deg_estimated"`` when the FOV network ran and ``"inverse_depth"`` on request;
        for one image ``depth`` is (H, W), ``intrinsics`` (3, 3) and the scalars are 0-dim
        tensors. ``fov_deg`` is the FOV of the focal length used; ``fov_deg_estimated`` the
        network's estimate (see ``inference.postprocess``).

        ``intrinsics`` (instead of ``f_px``): the camera, (fx, fy, cx, cy) or a 3x3 K in pixels
        of the image (or one per image); the depth uses fx, and the returned K is this one
        (``depthpro_fast.intrinsics``, docs/intrinsics.md). Without it the returned K is the
        focal length used on both axes, principal point at the image centre.
        """
        from .inference import infer

        return infer(self, x, f_px, interpolation_mode, return_inverse_depth=return_inverse_depth,
                     intrinsics=intrinsics)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

