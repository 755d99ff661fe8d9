"""bf16 GEMM inputs, fp32 activations: the fused ViT's linears of an fp32 model in bf16.

``FastOptions(gemm_dtype="bf16")`` on a CPU: the model stays fp32 (weights, residual stream,
LayerNorm, softmax statistics, GELU's input), and only the GEMMs see bf16 ("low precision in
the arithmetic, not in the storage"):

- **Weights** (``prepare_bf16_weights``): each ViT linear's weight rounded once to bf16, at the
  engine's preparation (a prepared copy keyed by ``id`` of the fp32 weight the forward passes;
  the engine re-prepares when a source changes in place, e.g. ``load_state_dict``). The qkv and
  fc1 biases get bf16 copies too (see below).
- **Activations**: rounded to bf16 at each GEMM's input (one cast of the fp32 LayerNorm output).
- **GEMMs**: bf16 x bf16 with fp32 accumulation (oneDNN, AVX512_BF16 / AMX). PyTorch 2.13 on a
  CPU has no bf16 GEMM with an fp32 *output* (``mm`` / ``addmm`` ``out_dtype`` overloads have no
  CPU kernel; the oneDNN fp32 ``fpmath`` bf16 mode did not engage on an AVX512_BF16 EPYC without
  AMX: measured, its results were the fp32 ones), so each GEMM's output is rounded once to bf16:
  proj / fc2 (the residual branches) are widened to fp32 by the fp32 residual + LayerNorm pass
  that adds them (``ops.add_layer_norm`` takes a bf16 ``delta`` on an fp32 stream; without the
  fused pass, ``widen_branches``, here); qkv's output (bias in oneDNN's fp32 epilogue) stays
  bf16 and the attention (SDPA) runs in bf16 on it (fp32 softmax statistics inside); fc1's
  bias + exact GELU run in oneDNN's fp32 epilogue and its bf16 output is fc2's input, which
  would be rounded to bf16 there anyway. The only roundings beyond OpenVINO's design are thus
  the GEMM outputs' (and the qkv / fc1 biases', rounded to bf16 for oneDNN).
- **Convolutions** (``gemm_dtype_convs``, ``folds.FoldedLayer.gemm_dtype``): the same rule,
  bf16 weights and inputs, the bf16 output widened before the fp32 bias.

CPU only for now: on CUDA the 16-bit model with ``residual_fp32`` is the corresponding route.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .cpu_gemm import CpuGemm, onednn_linear_available
from .epilogue_backends import EpilogueBackends

GEMM_DTYPES = ("bf16",)
#: the linears of a ViT block whose GEMMs take bf16 inputs (attribute paths in ``model.Block``)
VIT_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@dataclasses.dataclass
class Bf16Weights:
    """bf16 copies of ViT linears' weights (and qkv / fc1 biases), keyed by ``id`` of the fp32
    tensor the forward passes; ``bf16_out``: the ids of weights whose GEMM output stays bf16
    (qkv: read only by the attention)."""

    weights: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    biases: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    bf16_out: set[int] = dataclasses.field(default_factory=set)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.weights.values()) + list(self.biases.values())


def conv_gemm_dtype(gemm_dtype: str | None, convs: bool) -> torch.dtype | None:
    """The dtype of the convolutions' inputs (``folds.FoldedLayer.gemm_dtype``): bf16 with
    ``gemm_dtype="bf16"`` and ``gemm_dtype_convs``, else None (the activations' dtype)."""
    return torch.bfloat16 if gemm_dtype == "bf16" and convs else None


def check_mixed_model(p: torch.Tensor, gemm_dtype: str) -> None:
    """``gemm_dtype`` needs an fp32 model on a CPU whose PyTorch runs oneDNN's bf16 linear."""
    if gemm_dtype not in GEMM_DTYPES:
        raise ValueError(f"gemm_dtype must be one of {GEMM_DTYPES} or None, got {gemm_dtype!r}")
    if p.dtype != torch.float32:
        raise ValueError(f"gemm_dtype={gemm_dtype!r} rounds an fp32 model's GEMM inputs to bf16; "
                         f"this model is {p.dtype} (load it in float32, or use the bf16 model "
                         "without gemm_dtype)")
    if p.device.type != "cpu":
        raise ValueError(f"gemm_dtype={gemm_dtype!r} runs on a CPU only for now (this model is on "
                         f"{p.device}); on a GPU use a bf16 model with residual_fp32")
    ok, why = onednn_linear_available(torch.bfloat16)
    if not ok:
        raise RuntimeError(f"gemm_dtype={gemm_dtype!r} needs oneDNN's bf16 linear: {why}")


@torch.no_grad()
def prepare_bf16_weights(vits: list[torch.nn.Module]) -> Bf16Weights:
    """bf16 copies of every ViT linear of ``vits`` (rounded once, round-to-nearest-even)."""
    out = Bf16Weights()
    for vit in vits:
        for blk in vit.blocks:
            for path in VIT_LINEARS:
                lin = blk.get_submodule(path)
                out.weights[id(lin.weight)] = lin.weight.detach().to(torch.bfloat16).contiguous()
                if path in ("attn.qkv", "mlp.fc1") and lin.bias is not None:
                    out.biases[id(lin.bias)] = lin.bias.detach().to(torch.bfloat16)
            out.bf16_out.add(id(blk.attn.qkv.weight))
    return out


def source_slots(vits: list[torch.nn.Module]) -> list[tuple[torch.nn.Module, str]]:
    """(module, parameter name) of every tensor the bf16 copies derive from."""
    slots: list[tuple[torch.nn.Module, str]] = []
    for vit in vits:
        for blk in vit.blocks:
            for path in VIT_LINEARS:
                lin = blk.get_submodule(path)
                slots.append((lin, "weight"))
                if path in ("attn.qkv", "mlp.fc1") and lin.bias is not None:
                    slots.append((lin, "bias"))
    return slots


def _lookup(table: dict[int, torch.Tensor], t: torch.Tensor, what: str) -> torch.Tensor:
    found = table.get(id(t))
    if found is None:
        raise RuntimeError(f"gemm_dtype='bf16': no prepared bf16 copy of this {what} "
                           f"{tuple(t.shape)} (its module or parameter was replaced): call "
                           "model.prepare_fast() again")
    return found


def _onednn_bf16(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                 attr: str) -> torch.Tensor:
    lead = x.shape[:-1]
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, b, attr, [],
                                             "none" if attr == "gelu" else "")
    return out.view(*lead, w.shape[0])


class MixedGemm(CpuGemm):
    """The fused ViT's linears with bf16 inputs and prepared bf16 weights (module docstring);
    LayerNorm passes as ``CpuGemm``'s, in fp32."""

    supports_vit_epilogues = False  # the folded / in-GEMM-residual copies have no bf16 twins

    def __init__(self, prepared: Bf16Weights,
                 epilogue_backend: str | None | EpilogueBackends = None, *,
                 widen_branches: bool = True):
        super().__init__("onednn", epilogue_backend)
        self.prepared = prepared
        self.widen_branches = widen_branches

    def linear(self, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        wb = _lookup(self.prepared.weights, weight, "weight")
        xb = x.to(torch.bfloat16)
        if id(weight) in self.prepared.bf16_out:  # qkv: bias in oneDNN's epilogue, bf16 out
            bb = None if bias is None else _lookup(self.prepared.biases, bias, "bias")
            return _onednn_bf16(xb, wb, bb, "none")
        out = F.linear(xb, wb)  # a residual branch
        if bias is not None:
            return torch.add(out, bias)  # widened to fp32 in the bias pass
        return out.float() if self.widen_branches else out

    def linear_bias_gelu(self, x: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
        """fc1: bias + exact GELU in oneDNN's fp32 epilogue, bf16 output (fc2's input)."""
        if approximate != "none":
            raise ValueError("gemm_dtype='bf16' runs the model's exact GELU only")
        wb = _lookup(self.prepared.weights, weight, "weight")
        bb = None if bias is None else _lookup(self.prepared.biases, bias, "bias")
        return _onednn_bf16(x.to(torch.bfloat16), wb, bb, "gelu")

    def residual_addmm(self, h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
        raise ValueError("gemm_dtype='bf16' does not take residual_in_gemm")
