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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..model import Block, VisionTransformer
from .cpu_gemm import CpuGemm


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


def fused_forward_with_hooks(vit: VisionTransformer, x: torch.Tensor,
                             hook_ids: Sequence[int] = (), *, backend: str | None,
                             epilogue_backend: str | None, fuse_layer_norm: bool = True,
                             gemm: CpuGemm | None = None,
                             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Same contract as ``VisionTransformer.forward_with_hooks``.

    ``backend``: attention op backend; ``epilogue_backend``: the epilogue ops' backend.
    ``fuse_layer_norm=False`` runs ``residual_layerscale`` then ``layer_norm`` (two passes) to
    measure what the LayerNorm fusion buys. ``gemm``: the linears and the LayerNorm passes that
    feed them: a GEMM library (``fast/cpu_gemm.py``; default ``F.linear``, with fc1's bias +
    GELU as the ``bias_gelu`` op), or the fp8 mode's (``fast/fp8.py``: the normalised stream and
    fc2's input are then quantised rows, written by those passes).
    """
    gemm = gemm or CpuGemm("aten", epilogue_backend)
    blocks = vit.blocks
    wanted = set(hook_ids)
    hooked: dict[int, torch.Tensor] = {}
    h = vit.embed(x)
    n = gemm.layer_norm(h, blocks[0].norm1, feeds_gemm=True)

    def residual_norm(h, delta, bias, gamma, norm, feeds_gemm=True):
        if fuse_layer_norm:
            return gemm.add_layer_norm(h, delta, bias, gamma, norm, feeds_gemm=feeds_gemm)
        r = ops.residual_layerscale(h, delta, bias, gamma, backend=epilogue_backend)
        return r, gemm.layer_norm(r, norm, feeds_gemm=feeds_gemm)

    for i, blk in enumerate(blocks):
        a = gemm.linear(_attention(blk, n, backend, gemm), blk.attn.proj.weight)
        h, n = residual_norm(h, a, blk.attn.proj.bias, blk.ls1.gamma, blk.norm2)
        u = gemm.linear_bias_gelu(n, blk.mlp.fc1.weight, blk.mlp.fc1.bias)
        m = gemm.linear(u, blk.mlp.fc2.weight)
        last = i + 1 == len(blocks)
        nxt = vit.norm if last else blocks[i + 1].norm1
        # after the last block: the ViT's output (final norm), not a GEMM input
        h, n = residual_norm(h, m, blk.mlp.fc2.bias, blk.ls2.gamma, nxt, feeds_gemm=not last)
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
