"""The module that export traces: ``model(image)`` with named outputs, on a chosen path."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..config import IMG_SIZE

#: the batch size of the example input traced (1 would fix the batch: torch.export
#: specialises sizes 0 and 1); the exported graph takes any batch >= 1
EXAMPLE_BATCH = 2


class NetworkForward(torch.nn.Module):
    """``image -> (canonical_inverse_depth, fov_deg)``, or the depth alone without the FOV."""

    def __init__(self, model: Any, include_fov: bool):
        super().__init__()
        self.model = model
        self.include_fov = include_fov

    def forward(self, image: torch.Tensor):
        cid, fov = self.model(image, need_fov=self.include_fov)
        return (cid, fov) if self.include_fov else (cid,)


def example_input(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A normalised batch like ``transform``'s output (values in [-1, 1], not zeros)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(EXAMPLE_BATCH, 3, IMG_SIZE, IMG_SIZE, generator=g) * 2 - 1
    return x.to(device=device, dtype=dtype)


#: the largest batch the graph accepts: a CUDA grid's y / z extent (the Triton kernels launch
#: one program row per window); far above any batch of 1536x1536 images that fits in memory
MAX_BATCH = 65535


def dynamic_batch() -> dict[str, dict[int, Any]]:
    return {"image": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}


@contextlib.contextmanager
def traced_as(model: Any, *, reference: bool, include_fov: bool) -> Iterator[None]:
    """Set the model up for tracing, and put everything back afterwards.

    ``reference=True``: the reference modules with the ``reference`` backend (plain PyTorch
    math, what ONNX can express), the fast engine detached. Without the FOV output the FOV
    branch is skipped (``need_fov=False`` with ``skip_unused_fov``)."""
    engine, backend, skip = model._fast_engine, model.backend, model.skip_unused_fov
    try:
        if reference:
            model._fast_engine = None
            if backend != "reference":
                model.set_backend("reference")
        model.skip_unused_fov = skip or not include_fov
        yield
    finally:
        model._fast_engine = engine
        model.skip_unused_fov = skip
        if model.backend != backend:
            model.set_backend(backend)
