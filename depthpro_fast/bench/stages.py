"""Per-stage timing of one forward: the model's stages run explicitly in sequence.

:func:`staged_forward` computes what ``DepthPro.forward`` computes, stage by stage, with a timer
mark between stages; nothing is hooked into or stored on the modules.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from ..flops import STAGES
from .timing import Stats, synchronize

STAGE_NAMES = tuple(STAGES)


@torch.no_grad()
def staged_forward(model: torch.nn.Module, x: torch.Tensor,
                   mark: Callable[[str], None] = lambda stage: None,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``model(x)`` computed stage by stage, calling ``mark(stage)`` after each stage.

    The same computation as ``DepthPro.forward`` (the bench tests check that the outputs are
    identical): the reference stages of ``depthpro_fast.dataflow.run_network``, which marks the
    stages in the order of ``STAGE_NAMES`` (the FOV encoder runs before the merge since it
    depends only on the input). Nothing is stored on the modules.
    """
    from ..dataflow import run_network
    from ..inference import check_network_input

    check_network_input(x, model)
    return run_network(model.stages(), x, compute_fov=model.fov is not None, mark=mark)


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
