"""The decoder and the depth head without extra elementwise passes.

``FastOptions.decoder_epilogues``: every residual block ``x + conv_b(relu(conv_a(relu(x))))``
of the decoder runs its convs without bias, and one epilogue pass follows each conv::

    t        = bias_relu(conv_a(relu_x), bias_a)                  relu(. + bias), one pass
    x', relu = bias_residual(conv_b(t), bias_b, x, f, with_relu)  + bias + x (+ f), and its ReLU

In a feature-fusion block the second residual ``f`` (the incoming features) is added in the
same pass as the first block's residual, and the ReLU that the next residual block starts with
is written by that pass too (no ``F.relu`` copy). The bias of the tail of fusion ``i`` (its
deconv folded with ``out_conv``, fold 1) is carried into fusion ``i - 1``'s ``bias_b`` (it
adds a per-channel constant to ``f``, exactly what ``bias_b`` adds), so the deconv runs without
bias too. Per fusion at 768^2 x 256 channels, bf16: 25 -> 14 tensor passes.

``FastOptions.head_tail`` (with ``head_subpixel``): the sub-pixel head's 3x3 conv without its
bias, then ``subpixel_tail`` (bias with the border corrections, ReLU, the 32 -> 1 1x1 conv per
phase, ReLU, depth-to-space) in one pass.

The ops dispatch on the engine's epilogue backend (Triton kernels on a GPU, the pure-PyTorch
references on a CPU). Biases are summed in float64 at preparation and rounded once.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .. import ops
from ..dataflow import decode
from ..op_common import math_dtype
from . import folds
from .epilogue_backends import EpilogueBackends, op_backend


def _without_bias(layer: folds.FoldedLayer) -> tuple[folds.FoldedLayer, torch.Tensor | None]:
    """A shallow copy of a prepared conv / deconv with no bias (the same weight tensor), and
    the bias it had."""
    bias = layer.bias
    bare = copy.copy(layer)
    bare.bias = None
    return bare, bias


def _sum(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    return (a.double() + b.double()).to(a.dtype)


class EpilogueDecoder(folds.FoldedLayer):
    """The prepared decoder (``PreparedLayers.dec_convs`` / ``fusions``) rearranged for the epilogue
    ops: bias-less convs, their biases, the tails' biases carried one fusion down."""

    def __init__(self, dec_convs: list, fusions: list):
        self.dec_convs = dec_convs
        self.blocks: list[tuple] = []  # per fusion: (res1 or None, res2, tail layers)
        carry: list[torch.Tensor | None] = [None] * len(fusions)
        for i, (res1, res2, tail) in enumerate(fusions):
            tail = list(tail)
            if i > 0 and tail and tail[-1].bias is not None:
                # fusion i-1 adds f (this tail's output) in its res1 pass, with its own bias
                tail[-1], carry[i - 1] = _without_bias(tail[-1])
            self.blocks.append([None if res1 is None else self._split(res1),
                                self._split(res2), tail])
        for i, c in enumerate(carry):
            if c is not None:
                conv_a, bias_a, conv_b, bias_b = self.blocks[i][0]
                self.blocks[i][0] = (conv_a, bias_a, conv_b, _sum(bias_b, c))
        self.carried = sum(c is not None for c in carry)

    @staticmethod
    def _split(res: tuple) -> tuple:
        conv_a, bias_a = _without_bias(res[0])
        conv_b, bias_b = _without_bias(res[1])
        return conv_a, bias_a, conv_b, bias_b

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}

        def walk(prefix: str, obj) -> None:
            if isinstance(obj, torch.Tensor):
                out[prefix] = obj
            elif isinstance(obj, folds.FoldedLayer):
                out.update({f"{prefix}.{k}": v for k, v in obj.tensors().items()})
            elif isinstance(obj, (list, tuple)):
                for j, o in enumerate(obj):
                    walk(f"{prefix}.{j}", o)

        walk("dec_convs", self.dec_convs)
        walk("blocks", self.blocks)
        return out

    def __call__(self, encodings: list[torch.Tensor],
                 backend: str | None | EpilogueBackends) -> tuple[torch.Tensor, torch.Tensor]:
        relu_backend = op_backend(backend, "bias_relu")
        residual_backend = op_backend(backend, "bias_residual")

        def project(i: int, e: torch.Tensor) -> torch.Tensor:
            c = self.dec_convs[i]
            return e if c is None else c(e)

        def fuse(i: int, f: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
            res1, res2, tail = self.blocks[i]
            if skip is None:
                relu_f = F.relu(f)
            else:
                conv_a, bias_a, conv_b, bias_b = res1
                t = ops.bias_relu(conv_a(F.relu(skip)), bias_a, backend=relu_backend)
                f, relu_f = ops.bias_residual(conv_b(t), bias_b, skip, f, with_relu=True,
                                              backend=residual_backend)
            conv_a, bias_a, conv_b, bias_b = res2
            t = ops.bias_relu(conv_a(relu_f), bias_a, backend=relu_backend)
            f = ops.bias_residual(conv_b(t), bias_b, f, backend=residual_backend)
            for layer in tail:
                f = layer(f)
            return f

        return decode(encodings, project, fuse)


class FusedSubpixelTail(folds.FoldedLayer):
    """A prepared ``folds.SubpixelHead`` run as its conv without bias + ``subpixel_tail``."""

    def __init__(self, head: folds.SubpixelHead):
        if head.out_channels != 1:
            raise ValueError("the fused head tail writes one output channel; this head has "
                             f"{head.out_channels}")
        self.conv, self.bias = _without_bias(head.conv)
        self.conv.border = None
        w = head.conv.weight
        border = head.conv.border
        self.border = None if border is None else torch.stack(
            [getattr(border, f) for f in folds.BorderBias.FIELDS]).to(math_dtype(w.dtype))
        self.weight = head.out.weight.reshape(-1)  # (4P,): phase g's P weights at g*P
        # (4,): one bias per phase (zeros when head[4] has none)
        self.out_bias = head.out.bias if head.out.bias is not None else self.weight.new_zeros(4)

    def __call__(self, t: torch.Tensor, backend: str | None | EpilogueBackends) -> torch.Tensor:
        return ops.subpixel_tail(self.conv(t), self.weight, self.out_bias, bias=self.bias,
                                 border=self.border, backend=op_backend(backend, "subpixel_tail"))

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {f"conv.{k}": v for k, v in self.conv.tensors().items()}
        t.update({k: v for k, v in (("bias", self.bias), ("border", self.border),
                                    ("weight", self.weight), ("out_bias", self.out_bias))
                  if v is not None})
        return t
