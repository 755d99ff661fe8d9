"""The ViT forward of the fast path: GEMMs without their biases, fused epilogues around them.

Per block, in the order the data flows (``h``: residual stream, ``n``: its normalised copy)::

    qkv = n @ Wqkv^T + bqkv                       (one GEMM, bias in its epilogue)
    o   = attention(q, k, v)                      (the attention op, read in place from qkv)
    h, n = add_layer_norm(h, o @ Wproj^T, bproj, ls1, norm2)     # bias+LayerScale+residual+LN
    u   = bias_gelu(n @ Wfc1^T, bfc1)                            # bias + exact GELU
    h, n = add_layer_norm(h, u @ Wfc2^T, bfc2, ls2, next norm)   # next block's norm1, or the
                                                                 # ViT's final norm after the last

so each block makes 4 GEMMs, 1 attention and 3 memory-bound passes (instead of ~10), and the
LayerNorm that starts a branch is computed in the pass that writes the residual. The hooked
outputs are the residual stream after the block (before the final norm), as in the reference.

It reads the parameters of the model's own modules (``model.VisionTransformer``); nothing is
copied, so weight updates in place are seen at once.

Options (``ViTEpilogues``, from ``FastOptions``):

- ``fold_layerscale`` (``LayerScaleFold``, made at the engine's preparation): proj's and fc2's
  weights and biases scaled by their LayerScale, ``diag(ls) W`` and ``ls * b``, in float64 and
  rounded once: prepared copies (the model's parameters stay as they are; the engine notices
  in-place changes of the sources and prepares again).
- ``residual_in_gemm`` (needs the fold): the branch is added to the residual stream by the
  GEMM itself, ``h.addmm_(o, (ls W)^T)`` (beta = 1) on a 2-D view, so no pass exists for the
  residual update. The GEMM has no room for the bias (addmm's ``self`` is ``h``), so the biases
  are carried: the stored stream lacks the running sum ``c`` of the ``ls * b`` vectors (a
  per-channel constant, precomputed per block), which is added where the stream is read: in the
  next LayerNorm pass (``layer_norm(h, shift=c)``), at the hooked outputs (one add, which also
  gives the hook its own tensor: ``h`` changes in place) and in the final norm. Per block::

      qkv = n @ Wqkv^T + bqkv
      o   = attention(q, k, v)
      h  += o @ (ls1 Wproj)^T                 (addmm_, beta = 1)
      n   = LN2(h + c_attn)                    (one pass: reads h, writes n)
      u   = gelu(n @ Wfc1^T + bfc1)
      h  += u @ (ls2 Wfc2)^T                   (addmm_, beta = 1)
      n   = next LN(h + c_mlp)

- ``fc1_gelu="tanh"``: fc1's bias and a tanh GELU in the GEMM's epilogue on CUDA
  (``CpuGemm.linear_bias_gelu``); the model's GELU is the exact erf one, so this changes the
  function (measured against the accuracy budget, docs/fast_path.md).
- ``residual_fp32`` (needs ``residual_in_gemm``; 16-bit models): the residual stream kept in
  fp32, updated by ``addmm(out_dtype=float32)`` where the device has it
  (``CpuGemm.residual_addmm``); the LayerNorm passes write the GEMM inputs in the model dtype,
  the hooked outputs are rounded to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..model import Block, VisionTransformer
from .cpu_gemm import CpuGemm
from .epilogue_backends import EpilogueBackends, op_backend


def _attention(blk: Block, n, backend: str | None,
               gemm: CpuGemm | None = None) -> torch.Tensor:
    """qkv GEMM and attention; returns the (B, N, C) input of the proj GEMM. ``n``: the
    normalised stream (a tensor, or the fp8 mode's quantised rows)."""
    attn = blk.attn
    linear = gemm.linear if gemm is not None else F.linear
    qkv = linear(n, attn.qkv.weight, attn.qkv.bias)
    b, t, c = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    qkv = qkv.view(b, t, 3, attn.num_heads, attn.head_dim)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    o = ops.attention(q, k, v, scale=attn.scale, backend=backend)
    return o.transpose(1, 2).reshape(b, t, c)


FC1_GELUS = ("erf", "tanh")


@dataclasses.dataclass(frozen=True)
class ViTEpilogues:
    """The fused ViT's epilogue choices (``FastOptions``' fields of the same names)."""

    residual_in_gemm: bool = False
    fc1_gelu: str = "erf"
    residual_fp32: bool = False

    def __post_init__(self) -> None:
        if self.fc1_gelu not in FC1_GELUS:
            raise ValueError(f"fc1_gelu must be one of {', '.join(FC1_GELUS)}, got "
                             f"{self.fc1_gelu!r}")
        if self.residual_fp32 and not self.residual_in_gemm:
            raise ValueError("residual_fp32 keeps the stream that the GEMMs update in place: "
                             "it needs residual_in_gemm=True")


@dataclasses.dataclass(frozen=True)
class FoldedBlock:
    """One block's LayerScale-folded linears: ``diag(ls) W`` (model dtype), ``ls * b`` (fp32),
    and the carried bias sums after its attention and MLP branches (fp32; ``residual_in_gemm``)."""

    proj_weight: torch.Tensor
    proj_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor
    shift_attn: torch.Tensor
    shift_mlp: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


@dataclasses.dataclass(frozen=True)
class LayerScaleFold:
    """A ViT's folded blocks, and the parameters they were made from (for freshness checks)."""

    blocks: tuple[FoldedBlock, ...]

    @staticmethod
    def source_slots(vit: VisionTransformer) -> list[tuple[torch.nn.Module, str]]:
        """(module, parameter name) of every tensor the fold derives from."""
        return [slot for blk in vit.blocks
                for slot in ((blk.attn.proj, "weight"), (blk.attn.proj, "bias"),
                             (blk.ls1, "gamma"), (blk.mlp.fc2, "weight"),
                             (blk.mlp.fc2, "bias"), (blk.ls2, "gamma"))]

    def tensors(self) -> list[torch.Tensor]:
        return [t for b in self.blocks for t in b.tensors()]


def _scaled(linear: torch.nn.Linear, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``diag(gamma) W`` rounded once to W's dtype, and ``gamma * b`` in float64."""
    g = gamma.detach().double()
    w = (g[:, None] * linear.weight.detach().double()).to(linear.weight.dtype)
    return w.contiguous(), g * linear.bias.detach().double()


@torch.no_grad()
def fold_layerscale(vit: VisionTransformer) -> LayerScaleFold:
    """LayerScale folded into proj and fc2: ``ls * (o W^T + b) = o (diag(ls) W)^T + ls * b``,
    computed in float64 and rounded once (weights to the model dtype, biases and their running
    sums to fp32: the epilogue passes read them in fp32)."""
    out = []
    carried = None
    for blk in vit.blocks:
        pw, pb = _scaled(blk.attn.proj, blk.ls1.gamma)
        fw, fb = _scaled(blk.mlp.fc2, blk.ls2.gamma)
        c_attn = pb if carried is None else carried + pb
        carried = c_attn + fb
        out.append(FoldedBlock(pw, pb.float(), fw, fb.float(), c_attn.float(), carried.float()))
    return LayerScaleFold(tuple(out))


def _stream_plus(h: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``h + shift`` rounded once to ``dtype``, in a new tensor (one pass)."""
    out = torch.empty(h.shape, dtype=dtype, device=h.device)
    return torch.add(h, shift, out=out)


def _forward_residual_in_gemm(vit: VisionTransformer, x: torch.Tensor, hook_ids: Sequence[int],
                              *, backend: str | None, gemm: CpuGemm, fold: LayerScaleFold,
                              epilogues: ViTEpilogues,
                              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The blocks with the residual add in the GEMMs and the biases carried (module docstring)."""
    blocks = vit.blocks
    wanted = set(hook_ids)
    hooked: dict[int, torch.Tensor] = {}
    h = vit.embed(x)
    dtype = h.dtype
    if epilogues.residual_fp32 and dtype in (torch.float16, torch.bfloat16):
        h = h.float()
    h = h.contiguous()
    n = gemm.layer_norm(h, blocks[0].norm1, feeds_gemm=True, out_dtype=dtype)
    tanh = "tanh" if epilogues.fc1_gelu == "tanh" else "none"
    for i, (blk, f) in enumerate(zip(blocks, fold.blocks, strict=True)):
        gemm.residual_addmm(h, _attention(blk, n, backend, gemm), f.proj_weight)
        n = gemm.layer_norm(h, blk.norm2, feeds_gemm=True, shift=f.shift_attn, out_dtype=dtype)
        u = gemm.linear_bias_gelu(n, blk.mlp.fc1.weight, blk.mlp.fc1.bias, approximate=tanh)
        gemm.residual_addmm(h, u, f.fc2_weight)
        if i in wanted:
            hooked[i] = _stream_plus(h, f.shift_mlp, dtype)
        last = i + 1 == len(blocks)
        nxt = vit.norm if last else blocks[i + 1].norm1
        n = gemm.layer_norm(h, nxt, feeds_gemm=not last, shift=f.shift_mlp, out_dtype=dtype)
    return n, [hooked[i] for i in hook_ids]


def fused_forward_with_hooks(vit: VisionTransformer, x: torch.Tensor,
                             hook_ids: Sequence[int] = (), *, backend: str | None,
                             epilogue_backend: str | None | EpilogueBackends,
                             fuse_layer_norm: bool = True,
                             gemm: CpuGemm | None = None, fold: LayerScaleFold | None = None,
                             epilogues: ViTEpilogues | None = None,
                             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Same contract as ``VisionTransformer.forward_with_hooks``.

    ``backend``: attention op backend; ``epilogue_backend``: the epilogue ops' backend (a
    name, or the engine's per-op resolution, ``fast/epilogue_backends.py``).
    ``fuse_layer_norm=False`` runs ``residual_layerscale`` then ``layer_norm`` (two passes) to
    measure what the LayerNorm fusion buys. ``gemm``: the linears and the LayerNorm passes that
    feed them: a GEMM library (``fast/cpu_gemm.py``; default ``F.linear``, with fc1's bias +
    GELU as the ``bias_gelu`` op), or the fp8 mode's (``fast/fp8.py``: the normalised stream and
    fc2's input are then quantised rows, written by those passes). ``fold``: the LayerScale
    fold of this ViT (``fold_layerscale``); ``epilogues``: the options of the module docstring.
    """
    gemm = gemm or CpuGemm("aten", epilogue_backend)
    epilogues = epilogues or ViTEpilogues()
    if epilogues != ViTEpilogues() and not gemm.supports_vit_epilogues:
        raise ValueError(f"{type(gemm).__name__} (the fp8 mode, or gemm_dtype='bf16') does not "
                         "take residual_in_gemm / fc1_gelu='tanh' / residual_fp32")
    if fold is not None and len(fold.blocks) != len(vit.blocks):
        raise ValueError(f"the LayerScale fold has {len(fold.blocks)} blocks, the ViT "
                         f"{len(vit.blocks)}: prepare the engine again")
    if epilogues.residual_in_gemm:
        if fold is None:
            raise ValueError("residual_in_gemm needs the LayerScale fold (fold_layerscale): "
                             "addmm's beta = 1 has no per-channel scale")
        return _forward_residual_in_gemm(vit, x, hook_ids, backend=backend, gemm=gemm,
                                         fold=fold, epilogues=epilogues)
    tanh = "tanh" if epilogues.fc1_gelu == "tanh" else "none"
    blocks = vit.blocks
    wanted = set(hook_ids)
    hooked: dict[int, torch.Tensor] = {}
    h = vit.embed(x)
    n = gemm.layer_norm(h, blocks[0].norm1, feeds_gemm=True)

    def residual_norm(h, delta, bias, gamma, norm, feeds_gemm=True):
        if fuse_layer_norm:
            return gemm.add_layer_norm(h, delta, bias, gamma, norm, feeds_gemm=feeds_gemm)
        r = ops.residual_layerscale(h, delta, bias, gamma,
                                    backend=op_backend(epilogue_backend, "residual_layerscale"))
        return r, gemm.layer_norm(r, norm, feeds_gemm=feeds_gemm)

    for i, blk in enumerate(blocks):
        if fold is not None:  # LayerScale in the weights: the passes add ls * b, no gamma
            f = fold.blocks[i]
            proj = (f.proj_weight, f.proj_bias, None)
            fc2 = (f.fc2_weight, f.fc2_bias, None)
        else:
            proj = (blk.attn.proj.weight, blk.attn.proj.bias, blk.ls1.gamma)
            fc2 = (blk.mlp.fc2.weight, blk.mlp.fc2.bias, blk.ls2.gamma)
        a = gemm.linear(_attention(blk, n, backend, gemm), proj[0])
        h, n = residual_norm(h, a, proj[1], proj[2], blk.norm2)
        if tanh == "tanh":
            u = gemm.linear_bias_gelu(n, blk.mlp.fc1.weight, blk.mlp.fc1.bias, approximate=tanh)
        else:  # (the fp8 mode's linear_bias_gelu has no approximate argument)
            u = gemm.linear_bias_gelu(n, blk.mlp.fc1.weight, blk.mlp.fc1.bias)
        m = gemm.linear(u, fc2[0])
        last = i + 1 == len(blocks)
        nxt = vit.norm if last else blocks[i + 1].norm1
        # after the last block: the ViT's output (final norm), not a GEMM input
        h, n = residual_norm(h, m, fc2[1], fc2[2], nxt, feeds_gemm=not last)
        if i in wanted:
            hooked[i] = h
    return n, [hooked[i] for i in hook_ids]


# ----------------------------------------------------------------------------------------------
# torch.compile alternative: the reference block's math, compiled once per shape
# ----------------------------------------------------------------------------------------------


def _block_math(h: torch.Tensor, n1w: torch.Tensor, n1b: torch.Tensor, qkvw: torch.Tensor,
                qkvb: torch.Tensor, projw: torch.Tensor, projb: torch.Tensor,
                ls1: torch.Tensor, n2w: torch.Tensor, n2b: torch.Tensor, fc1w: torch.Tensor,
                fc1b: torch.Tensor, fc2w: torch.Tensor, fc2b: torch.Tensor, ls2: torch.Tensor,
                heads: int, scale: float, eps: float, backend: str | None) -> torch.Tensor:
    """``Block.forward`` written over plain tensors, so that one compiled graph serves every
    block of every ViT of a given shape (no guards on module identity)."""
    b, t, c = h.shape
    n = F.layer_norm(h, (c,), n1w, n1b, eps)
    qkv = F.linear(n, qkvw, qkvb).view(b, t, 3, heads, c // heads)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    o = ops.attention(q, k, v, scale=scale, backend=backend).transpose(1, 2).reshape(b, t, c)
    h = h + ls1 * F.linear(o, projw, projb)
    n = F.layer_norm(h, (c,), n2w, n2b, eps)
    return h + ls2 * F.linear(F.gelu(F.linear(n, fc1w, fc1b)), fc2w, fc2b)


_COMPILED: dict[str, object] = {}


def compiled_block_fn(mode: str | None = None):
    """``torch.compile`` of :func:`_block_math` (one per mode, created lazily)."""
    key = mode or "default"
    fn = _COMPILED.get(key)
    if fn is None:
        fn = torch.compile(_block_math, dynamic=False, mode=mode)
        _COMPILED[key] = fn
    return fn


def compiled_forward_with_hooks(vit: VisionTransformer, x: torch.Tensor,
                                hook_ids: Sequence[int] = (), *, backend: str | None,
                                mode: str | None = None,
                                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Same contract as ``VisionTransformer.forward_with_hooks``, each block compiled."""
    fn = compiled_block_fn(mode)
    wanted = set(hook_ids)
    hooked: dict[int, torch.Tensor] = {}
    h = vit.embed(x)
    for i, blk in enumerate(vit.blocks):
        a, m = blk.attn, blk.mlp
        h = fn(h, blk.norm1.weight, blk.norm1.bias, a.qkv.weight, a.qkv.bias, a.proj.weight,
               a.proj.bias, blk.ls1.gamma, blk.norm2.weight, blk.norm2.bias, m.fc1.weight,
               m.fc1.bias, m.fc2.weight, m.fc2.bias, blk.ls2.gamma, a.num_heads, a.scale,
               blk.norm1.eps, backend)
        if i in wanted:
            hooked[i] = h
    return vit.norm(h), [hooked[i] for i in hook_ids]
