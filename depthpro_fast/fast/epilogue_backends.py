"""The backend each of the fast engine's epilogue ops runs on.

The engine runs its elementwise passes (LayerNorm, bias + GELU, residual updates, the decoder's
conv epilogues, the fp8 quantising passes) on ``FastOptions.epilogue_backend``, by default the
model's backend. A backend need not implement every op: the CUDA extension has attention and
the patch split / merge only. So each op is resolved on its own
(``backends.implementation_with_fallback``): the asked backend where it has the op and can run
it here, else the next of ``cuda -> triton -> torch -> reference``, the reason recorded in
``backends.fallback_log()`` (shown by ``depthpro_fast.info()``) and in the engine's status.
"""

from __future__ import annotations

import torch

from .. import backends

#: Every op the fast engine runs on its epilogue backend (``tests/test_epilogue_backends.py``
#: checks the engine's sources against this list).
EPILOGUE_OPS = (
    "layer_norm", "add_layer_norm", "residual_layerscale", "bias_gelu",
    "grouped_layer_norm", "grouped_add_layer_norm",
    "bias_relu", "bias_residual", "subpixel_tail",
    "quantize_rows", "bias_gelu_fp8", "layer_norm_fp8", "add_layer_norm_fp8",
)


class EpilogueBackends:
    """One asked backend resolved, per epilogue op, on one device (resolved when made)."""

    def __init__(self, asked: str | None, device: torch.device):
        self.asked = backends.check_backend(asked)
        self.device = device
        self.chosen = {op: backends.implementation_with_fallback(op, self.asked, device)[1]
                       for op in EPILOGUE_OPS}

    def of(self, op: str) -> str:
        """The backend to run ``op`` on."""
        try:
            return self.chosen[op]
        except KeyError:
            raise KeyError(f"{op!r} is not one of the fast engine's epilogue ops "
                           f"({', '.join(EPILOGUE_OPS)})") from None

    def describe(self) -> str:
        """E.g. ``"cuda asked; triton: add_layer_norm, bias_gelu, ..."`` (for status())."""
        by_backend: dict[str, list[str]] = {}
        for op, used in self.chosen.items():
            by_backend.setdefault(used, []).append(op)
        parts = [f"{used}: {', '.join(names)}" for used, names in by_backend.items()]
        return f"{self.asked} asked on {self.device.type}; " + "; ".join(parts)


def op_backend(epilogue_backend: str | None | EpilogueBackends, op: str) -> str | None:
    """The backend to pass to ``op``: the per-op resolution of the engine, or, for a plain name
    (direct callers of the fused ViT forward and its GEMM helpers), that name as given."""
    if isinstance(epilogue_backend, EpilogueBackends):
        return epilogue_backend.of(op)
    return epilogue_backend
