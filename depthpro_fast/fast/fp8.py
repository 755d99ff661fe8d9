"""The fp8 precision mode's ViT linears: e4m3 weights prepared once, FP8 GEMMs with row scales.

- **Weights** (``prepare_vit_weights``): each of the 4 linears of every block of a ViT (qkv,
  proj, fc1, fc2) quantised once, at preparation, per output channel: the fp32 amax of each row of
  ``W`` (N, K), ``scale = amax / 448`` as a (1, N) fp32 vector, ``W / scale`` in e4m3 stored
  (N, K) row-major, so that ``q.t()`` is the column-major (K, N) operand ``torch._scaled_mm``
  wants. A weight with inf / NaN is refused, naming the layer. The bf16 weights stay (the model
  is unchanged; the e4m3 copies add 1 byte per ViT weight: ~0.9 GB for the official model).
- **Activations**: quantised per token (row) by the pass that makes them (``Fp8Gemm``: the
  LayerNorm pass for qkv / fc1, the bias + GELU pass for fc2, a stand-alone pass for proj's input,
  the attention output).
- **GEMM** (``fp8_matmul``): ``torch._scaled_mm(q, Wq.t(), scale_a=(M, 1), scale_b=(1, N),
  bias, out_dtype=bf16)``: fp32 accumulation (``use_fast_accum=False``), the two scales and the
  bias applied in its epilogue, one bf16 rounding. On a CPU whose PyTorch has no row-wise
  ``_scaled_mm`` (torch 2.11: per-tensor only there) the same product is computed as the fp32
  matmul of the dequantised operands: the same function (the e4m3 values times their scales,
  summed in fp32), an emulation for tests.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import ops
from ..fp8_format import E4M3
from ..ops.quantize_fp8 import check_finite_rows, quantize_scaled_reference
from .cpu_gemm import CpuGemm
from .epilogue_backends import EpilogueBackends, op_backend

#: The linears of a ViT block that run in fp8 (attribute paths in ``model.Block``).
VIT_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """One linear's e4m3 weight: ``q`` (N, K) row-major, ``scale`` (1, N) fp32."""

    q: torch.Tensor
    scale: torch.Tensor
    name: str

    @property
    def out_features(self) -> int:
        return self.q.shape[0]


class Fp8Act(NamedTuple):
    """A quantised activation: ``q`` (M, K) e4m3, ``scale`` (M, 1) fp32, and the leading
    shape of the tensor it stands for (M = their product)."""

    q: torch.Tensor
    scale: torch.Tensor
    lead: tuple[int, ...]


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, name: str = "weight") -> Fp8Weight:
    """Per-output-channel e4m3 quantisation of a linear's (N, K) weight (fp32 amax)."""
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (out, in) weight, got shape "
                         f"{tuple(weight.shape)}")
    w = weight.detach().float()
    if w.device.type != "meta":
        check_finite_rows(f"fp8 weight {name}", w)
    q, scale = quantize_scaled_reference(w)
    return Fp8Weight(q.contiguous(), scale.reshape(1, -1).contiguous(), name)


def prepare_vit_weights(vit: torch.nn.Module, prefix: str) -> dict[int, Fp8Weight]:
    """The e4m3 weights of every fp8 linear of ``vit``, keyed by ``id`` of the bf16 weight
    tensor the forward passes (the engine keeps the model, so the ids stay valid)."""
    out: dict[int, Fp8Weight] = {}
    for i, blk in enumerate(vit.blocks):
        for path in VIT_LINEARS:
            lin = blk.get_submodule(path)
            name = f"{prefix}.blocks.{i}.{path}"
            if lin.weight.device.type == "cuda":
                n, k = lin.weight.shape
                if n % 16 or k % 16:
                    raise ValueError(f"fp8: {name} is {n}x{k}; torch._scaled_mm on a GPU needs "
                                     "both sizes divisible by 16")
            out[id(lin.weight)] = quantize_weight(lin.weight, name)
    return out


@functools.cache
def cpu_rowwise_scaled_mm() -> tuple[bool, str]:
    """Whether this PyTorch's ``_scaled_mm`` takes row-wise scales on a CPU (a tiny call
    decides; torch 2.13 does, 2.11 only per-tensor), and the words for the engine's status."""
    try:
        a = torch.ones(4, 16).to(E4M3)
        b = torch.ones(16, 16).to(E4M3)
        out = torch._scaled_mm(a, b.t(), scale_a=torch.full((4, 1), 2.0),
                               scale_b=torch.full((1, 16), 3.0), out_dtype=torch.bfloat16)
        if not torch.equal(out.float(), torch.full((4, 16), 96.0)):
            return False, "CPU emulation: dequantised fp32 matmuls (this PyTorch's CPU " \
                          "_scaled_mm gives wrong row-wise results)"
    except Exception as e:  # noqa: BLE001  (not supported by this build)
        why = str(e).strip().splitlines()[-1][:120] if str(e).strip() else type(e).__name__
        return False, ("CPU emulation: dequantised fp32 matmuls (this PyTorch's CPU "
                       f"_scaled_mm refuses row-wise scales: {why})")
    return True, "CPU emulation: torch._scaled_mm's CPU kernel (row-wise scales)"


def gemm_description(device: torch.device) -> str:
    """What runs the fp8 GEMMs on ``device`` (for ``FastEngine.status()``)."""
    if device.type == "cpu":
        return cpu_rowwise_scaled_mm()[1]
    return f"torch._scaled_mm, row-wise scales, bf16 output ({device.type})"


def fp8_matmul(q: torch.Tensor, scale: torch.Tensor, w: Fp8Weight,
               bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``(q * scale) @ (w.q * w.scale)^T + bias`` (fp32 accumulation), rounded to ``out_dtype``."""
    if q.device.type == "cpu" and not cpu_rowwise_scaled_mm()[0]:
        a = q.float() * scale
        b = w.q.float() * w.scale.t()
        return F.linear(a, b, None if bias is None else bias.float()).to(out_dtype)
    return torch._scaled_mm(q, w.q.t(), scale_a=scale, scale_b=w.scale, bias=bias,
                            out_dtype=out_dtype)


class Fp8Gemm(CpuGemm):
    """The fused ViT forward's linears in fp8 (same interface as ``CpuGemm``).

    ``layer_norm`` / ``add_layer_norm`` return an ``Fp8Act`` when their output feeds a GEMM
    (``feeds_gemm``), ``linear`` takes an ``Fp8Act`` or quantises a plain tensor itself (the
    attention output), ``linear_bias_gelu`` returns fc2's ``Fp8Act``. ``per_tensor``: one scale
    per activation tensor instead of per token (reference ops; the measurement of what
    per-token scaling buys).
    """

    #: refused with ``residual_in_gemm`` / ``fc1_gelu="tanh"`` (``FastOptions``): its passes
    #: quantise the GEMM inputs, its GEMMs are ``_scaled_mm``
    supports_vit_epilogues = False

    def __init__(self, weights: dict[int, Fp8Weight],
                 epilogue_backend: str | None | EpilogueBackends = None, *,
                 per_tensor: bool = False):
        super().__init__("aten", epilogue_backend)
        self.weights = weights
        self.per_tensor = per_tensor

    def _weight(self, weight: torch.Tensor) -> Fp8Weight:
        w = self.weights.get(id(weight))
        if w is None:
            raise RuntimeError("fp8: a ViT weight has no prepared e4m3 copy (its tensor was "
                               "replaced); call model.prepare_fast() again")
        return w

    def _quantize(self, x: torch.Tensor | Fp8Act) -> Fp8Act:
        if isinstance(x, Fp8Act):
            return x
        q, s = ops.quantize_rows(x, per_tensor=self.per_tensor,
                                 backend=op_backend(self.epilogue_backend, "quantize_rows"))
        return Fp8Act(q, s, tuple(x.shape[:-1]))

    def linear(self, x, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        a = self._quantize(x)
        w = self._weight(weight)
        out = fp8_matmul(a.q, a.scale, w, bias, weight.dtype)
        return out.view(*a.lead, w.out_features)

    def linear_bias_gelu(self, x, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> Fp8Act:
        u = self.linear(x, weight)  # bias + GELU in the quantising pass
        q, s = ops.bias_gelu_fp8(u, bias, per_tensor=self.per_tensor,
                                 backend=op_backend(self.epilogue_backend, "bias_gelu_fp8"))
        return Fp8Act(q, s, tuple(u.shape[:-1]))

    def layer_norm(self, h: torch.Tensor, norm: torch.nn.LayerNorm, *, feeds_gemm: bool):
        if not feeds_gemm:
            return super().layer_norm(h, norm, feeds_gemm=False)
        q, s = ops.layer_norm_fp8(h, norm.weight, norm.bias, norm.eps,
                                  per_tensor=self.per_tensor,
                                  backend=op_backend(self.epilogue_backend, "layer_norm_fp8"))
        return Fp8Act(q, s, tuple(h.shape[:-1]))

    def add_layer_norm(self, h: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor | None,
                       gamma: torch.Tensor | None, norm: torch.nn.LayerNorm, *,
                       feeds_gemm: bool):
        if not feeds_gemm:
            return super().add_layer_norm(h, delta, bias, gamma, norm, feeds_gemm=False)
        r, q, s = ops.add_layer_norm_fp8(h, delta, norm.weight, norm.bias, norm.eps,
                                         delta_bias=bias, gamma=gamma,
                                         per_tensor=self.per_tensor,
                                         backend=op_backend(self.epilogue_backend,
                                                            "add_layer_norm_fp8"))
        return r, Fp8Act(q, s, tuple(h.shape[:-1]))
