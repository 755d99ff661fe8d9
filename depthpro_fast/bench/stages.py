"""Per-stage timing of one forward: the model's stages run explicitly in sequence.

:func:`staged_forward` computes what ``DepthPro.forward`` computes, stage by stage, with a timer
mark between stages; nothing is hooked into or stored on the modules.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..flops import STAGES
from ..ops.merge_patches import tokens_to_maps
from .timing import Stats, synchronize

STAGE_NAMES = tuple(STAGES)


@torch.no_grad()
def staged_forward(model: torch.nn.Module, x: torch.Tensor,
                   mark: Callable[[str], None] = lambda stage: None,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``model(x)`` computed stage by stage, calling ``mark(stage)`` after each stage.

    The same computation as ``DepthPro.forward`` (the bench tests check that the outputs are
    identical), in the order of ``STAGE_NAMES``; the FOV encoder runs before the merge since it
    depends only on the input. Nothing is stored on the modules.
    """
    from ..inference import check_network_input

    check_network_input(x, model)
    enc = model.encoder
    b = x.shape[0]
    n0 = enc.LEVEL0[0] ** 2 * b
    n1 = enc.LEVEL1[0] ** 2 * b

    patches = ops.split_patches(x, prenormalized=True, backend=enc.backend)
    mark("split")
    tokens, (hook0, hook1) = enc.patch_encoder.forward_with_hooks(patches, enc.hook_block_ids)
    mark("patch encoder")
    global_tokens = enc.image_encoder(patches[n0 + n1:])
    mark("image encoder")
    fov_tokens = None
    if model.fov is not None:
        y = F.interpolate(x, scale_factor=0.25, mode="bilinear", align_corners=False)
        fov_tokens = model.fov.encoder(y)
    mark("FOV encoder")
    latent0 = enc._merge(hook0[:n0], b, enc.LEVEL0)
    latent1 = enc._merge(hook1[:n0], b, enc.LEVEL0)
    x0 = enc._merge(tokens[:n0], b, enc.LEVEL0)
    x1 = enc._merge(tokens[n0:n0 + n1], b, enc.LEVEL1)
    x2 = tokens_to_maps(tokens[n0 + n1:])
    fused = enc.fuse_lowres(torch.cat([enc.upsample2(x2),
                                       enc.upsample_lowres(tokens_to_maps(global_tokens))], dim=1))
    encodings = [enc.upsample_latent0(latent0), enc.upsample_latent1(latent1),
                 enc.upsample0(x0), enc.upsample1(x1), fused]
    mark("merge + upsample")
    features, lowres = model.decoder(encodings)
    mark("decoder")
    depth = model.head(features)
    fov = None
    if model.fov is not None:
        fov = model.fov.head(tokens_to_maps(fov_tokens) + model.fov.downsample(lowres.detach()))
    mark("head")
    return depth, fov


def time_stages(model: torch.nn.Module, inputs: Sequence[torch.Tensor], *, warmup: int,
                runs: int, device: torch.device) -> dict[str, Stats]:
    """Per-stage times of :func:`staged_forward` (CUDA events between stages on a GPU)."""
    for i in range(warmup):
        staged_forward(model, inputs[i % len(inputs)])
    synchronize(device)
    per_stage: dict[str, list[float]] = {s: [] for s in STAGE_NAMES}
    per_stage["total"] = []
    for i in range(runs):
        x = inputs[(warmup + i) % len(inputs)]
        if device.type == "cuda":
            events: list[tuple[str, torch.cuda.Event]] = []

            def mark(stage: str, events=events) -> None:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                events.append((stage, ev))

            torch.cuda.synchronize(device)
            mark("start")
            staged_forward(model, x, mark)
            events[-1][1].synchronize()
            for (_, prev), (stage, ev) in zip(events, events[1:], strict=False):
                per_stage[stage].append(prev.elapsed_time(ev))
            per_stage["total"].append(events[0][1].elapsed_time(events[-1][1]))
        else:
            stamps: list[tuple[str, float]] = [("start", time.perf_counter())]
            staged_forward(model, x, lambda stage, s=stamps: s.append((stage,
                                                                        time.perf_counter())))
            for (_, prev), (stage, now) in zip(stamps, stamps[1:], strict=False):
                per_stage[stage].append((now - prev) * 1e3)
            per_stage["total"].append((stamps[-1][1] - stamps[0][1]) * 1e3)
    return {stage: Stats(times) for stage, times in per_stage.items()}
