"""The three ViTs in lock-step (``FastOptions.vit_lockstep``): one GEMM launch per linear layer,
one attention launch and one launch per elementwise pass for the patch, image and FOV encoders
together, instead of one per ViT (beside, not instead of, the side-stream path of
``fast/stages.py``).

The three encoders are ViTs of one shape (same width, depth, heads, MLP width, 577 tokens) with
different weights. Their rows are concatenated, patch encoder first (35B windows), then the
image encoder (B) and the FOV encoder (B; left out when the FOV is not needed, ``G = 2``), and
every block runs over all of them:

- **linears**: one grouped GEMM (``torch.nn.functional.grouped_mm``, ``torch._grouped_mm`` on
  older PyTorch) over the ``G`` row groups, each with its own weights, stacked once at
  preparation as ``(G, N, K)``. That GEMM has no per-group bias in this PyTorch: the qkv and fc1
  weights carry their bias as one more input column (``K' = C + 8``: column ``C`` the bias,
  zeros after, so rows stay a multiple of 16 bytes) and the LayerNorm pass that writes their
  input writes a 1 there (``ops.grouped_add_layer_norm(..., out_width=K')``). proj's and fc2's
  biases stay in the residual pass, as in ``fast/vit.py``.
- **attention**: all sequences have 577 tokens and the same heads, so the (S, 577, 3, H, D) view
  of the packed qkv rows is one batch of ``S = 35B + 2B`` sequences: one launch (the
  implementation measured fastest for that batch, ``fast/attention_choice.py``).
- **elementwise**: the LayerNorm / residual passes take the ViTs' parameters stacked ``(G, C)``
  and the row boundaries (``ops.grouped_layer_norm`` / ``grouped_add_layer_norm``); the GELU
  pass has no parameters left (the bias is in the GEMM): ``ops.bias_gelu`` without a bias.

Where the grouped GEMM cannot run (see :func:`choose_grouped_gemm`: fp64, a GPU other than
sm90 / sm100, fp16 / fp32 on CUDA, where it would be a host loop that synchronises) the linears
are one GEMM per ViT into slices of one output (``loop``); the rest stays grouped. The reason
is in ``engine.status()["vit_lockstep"]``.

Each ViT keeps its own hooked blocks (the patch encoder's ``hook_block_ids``); the embedding
(patch conv, class token, positions) runs per ViT and is concatenated once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import ops
from .epilogue_backends import EpilogueBackends, op_backend

if TYPE_CHECKING:
    from ..model import DepthPro, VisionTransformer

GEMMS = ("grouped_mm", "loop")
#: Row length granularity of the grouped GEMM's operands (its TMA needs 16-byte strides).
_ALIGN_BYTES = 16


def grouped_mm_function() -> Callable[..., torch.Tensor] | None:
    """The grouped GEMM of this PyTorch (public ``F.grouped_mm`` from 2.10, else the private
    ``torch._grouped_mm``), or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def model_vits(model: DepthPro) -> list[VisionTransformer]:
    """The ViTs run in lock-step, in row order: patch, image, FOV encoder (if any)."""
    vits = [model.encoder.patch_encoder, model.encoder.image_encoder]
    if model.fov is not None:
        vits.append(model.fov.encoder[0])
    return vits


def vit_shape(vit: VisionTransformer) -> dict[str, object]:
    """What must agree between ViTs run in lock-step."""
    blk = vit.blocks[0]
    return {"width": vit.pos_embed.shape[-1], "tokens": vit.pos_embed.shape[1],
            "depth": len(vit.blocks), "heads": blk.attn.num_heads,
            "mlp_hidden": blk.mlp.fc1.out_features,
            "eps": sorted({m.eps for m in vit.modules() if isinstance(m, torch.nn.LayerNorm)})}


def shape_problem(vits: Sequence[VisionTransformer]) -> str | None:
    """Why these ViTs cannot run in lock-step (None: they can)."""
    shapes = [vit_shape(v) for v in vits]
    for i, s in enumerate(shapes[1:], start=1):
        if s != shapes[0]:
            diff = {k: (shapes[0][k], s[k]) for k in s if s[k] != shapes[0][k]}
            return f"ViT {i} differs from the patch encoder in {diff}"
    if len(shapes[0]["eps"]) != 1:
        return f"the LayerNorms of a ViT use several eps values {shapes[0]['eps']}"
    return None


def bias_lane_width(c: int) -> int:
    """``C + 1`` (the bias lane) rounded up to a multiple of 8 elements (16 bytes in bf16)."""
    return -(-(c + 1) // 8) * 8


# ----------------------------------------------------------------------------------------------
# the GEMM: one grouped launch, or one per ViT
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowGroups:
    """The rows of each ViT in the concatenated stream: ``bounds[g]`` = (start, end) as Python
    ints; ``ends``: the same ends on the device (int32; the grouped GEMM's ``offs`` and the
    elementwise ops' ``group_ends``)."""

    bounds: tuple[tuple[int, int], ...]
    ends: torch.Tensor

    @property
    def groups(self) -> int:
        return len(self.bounds)

    @property
    def rows(self) -> int:
        return self.bounds[-1][1]


def grouped_linear(gemm: str, x: torch.Tensor, weight: torch.Tensor,
                   rows: RowGroups) -> torch.Tensor:
    """``x[rows of g] @ weight[g]^T`` for each ViT ``g``: (M, K) x (G, N, K) -> (M, N)."""
    if gemm == "grouped_mm":
        fn = grouped_mm_function()
        assert fn is not None
        # (G, K, N) column-major view of the stacked (G, N, K) weights: the layout the grouped
        # kernels take for ``x @ W^T`` (no copy)
        return fn(x, weight.transpose(1, 2), offs=rows.ends)
    out = x.new_empty((x.shape[0], weight.shape[1]))
    for g, (s, e) in enumerate(rows.bounds):
        torch.mm(x[s:e], weight[g].t(), out=out[s:e])
    return out


def _probe(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run a tiny grouped GEMM here and compare it with the per-group loop (None: fine)."""
    fn = grouped_mm_function()
    assert fn is not None
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(24, 16, generator=g).to(device, dtype)
        w = torch.randn(3, 32, 16, generator=g).to(device, dtype)
        rows = RowGroups(((0, 5), (5, 13), (13, 24)),
                         torch.tensor([5, 13, 24], dtype=torch.int32, device=device))
        got = grouped_linear("grouped_mm", x, w, rows).float()
        want = grouped_linear("loop", x.float(), w.float(), rows)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        if not torch.allclose(got, want, rtol=tol, atol=tol):
            return "it disagrees with one GEMM per group"
    except Exception as e:  # noqa: BLE001  (missing kernel for this device / dtype)
        return f"it failed: {str(e).splitlines()[0]}"
    return None


def choose_grouped_gemm(device: torch.device, dtype: torch.dtype,
                        widths: Sequence[int]) -> tuple[str, str]:
    """``(gemm, why)``: ``grouped_mm`` where this PyTorch's grouped GEMM runs here as one launch
    without a host sync, else ``loop`` (one GEMM per ViT). ``widths``: the K / N of the
    linears (multiples of 16 bytes for the grouped kernel)."""
    if grouped_mm_function() is None:
        return "loop", f"loop: this PyTorch ({torch.__version__}) has no grouped_mm"
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return "loop", f"loop: grouped_mm takes bf16 / fp16 / fp32, the model is {dtype}"
    align = _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
    odd = sorted({w for w in widths if w % align})
    if odd:
        return "loop", (f"loop: grouped_mm needs rows of a multiple of 16 bytes; widths {odd} "
                        f"are not multiples of {align} in {dtype}")
    if device.type == "meta":
        return "loop", "loop: meta tensors (grouped_mm's meta kernel takes bf16 only)"
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return "loop", ("loop: on CUDA grouped_mm's CUTLASS kernel is bf16 only; in "
                            f"{dtype} it is a host loop that copies offs to the host (a sync, "
                            "which a CUDA-graph capture refuses)")
        major, minor = torch.cuda.get_device_capability(device)
        if major not in (9, 10):
            return "loop", (f"loop: grouped_mm's CUTLASS kernel needs sm90 / sm100, this GPU is "
                            f"sm{major}{minor} (elsewhere a host loop with a sync)")
    problem = _probe(device, dtype)
    if problem:
        return "loop", f"loop: grouped_mm probed in {dtype} on {device.type}: {problem}"
    return "grouped_mm", f"grouped_mm: one launch per linear ({dtype} on {device.type})"


# ----------------------------------------------------------------------------------------------
# the stacked weights
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Block:
    """One block's parameters of the G ViTs, stacked on a leading axis."""

    qkv: torch.Tensor  # (G, 3C, K'): weight, bias in column C, zeros after
    proj: torch.Tensor  # (G, C, C)
    proj_bias: torch.Tensor  # (G, C)
    ls1: torch.Tensor  # (G, C)
    norm2_weight: torch.Tensor
    norm2_bias: torch.Tensor
    fc1: torch.Tensor  # (G, 4C, K'): weight, bias in column C, zeros after
    fc2: torch.Tensor  # (G, C, 4C)
    fc2_bias: torch.Tensor
    ls2: torch.Tensor
    next_weight: torch.Tensor  # the next block's norm1, or the ViT's final norm after the last
    next_bias: torch.Tensor


def _with_bias_lane(linear: torch.nn.Linear, width: int) -> torch.Tensor:
    w, b = linear.weight.detach(), linear.bias.detach()
    out = w.new_zeros((w.shape[0], width))
    out[:, :w.shape[1]] = w
    out[:, w.shape[1]] = b
    return out


class LockstepViTs:
    """The ViTs' weights stacked for the lock-step forward (copies, made once at preparation:
    one more copy of the ViT weights in memory; the engine re-prepares when the ViTs' weights
    change in place). ``gemm`` / ``why``: the GEMM implementation chosen and the reason."""

    def __init__(self, vits: Sequence[VisionTransformer]):
        problem = shape_problem(vits)
        if problem:
            raise ValueError(f"the ViTs cannot run in lock-step: {problem}")
        self.vits = list(vits)
        first = vits[0]
        p = first.pos_embed
        c = p.shape[-1]
        self.width, self.tokens = c, p.shape[1]
        self.kb = bias_lane_width(c)
        attn = first.blocks[0].attn
        self.heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.eps = first.blocks[0].norm1.eps

        def stack(get) -> torch.Tensor:
            return torch.stack([get(v).detach() for v in vits])

        with torch.no_grad():
            self.norm1_weight = stack(lambda v: v.blocks[0].norm1.weight)
            self.norm1_bias = stack(lambda v: v.blocks[0].norm1.bias)
            self.blocks: list[_Block] = []
            depth = len(first.blocks)
            for i in range(depth):
                def at(v, i=i):
                    return v.blocks[i]

                def nxt(v, i=i):
                    return v.norm if i + 1 == depth else v.blocks[i + 1].norm1

                self.blocks.append(_Block(
                    qkv=torch.stack([_with_bias_lane(at(v).attn.qkv, self.kb) for v in vits]),
                    proj=stack(lambda v: at(v).attn.proj.weight),
                    proj_bias=stack(lambda v: at(v).attn.proj.bias),
                    ls1=stack(lambda v: at(v).ls1.gamma),
                    norm2_weight=stack(lambda v: at(v).norm2.weight),
                    norm2_bias=stack(lambda v: at(v).norm2.bias),
                    fc1=torch.stack([_with_bias_lane(at(v).mlp.fc1, self.kb) for v in vits]),
                    fc2=stack(lambda v: at(v).mlp.fc2.weight),
                    fc2_bias=stack(lambda v: at(v).mlp.fc2.bias),
                    ls2=stack(lambda v: at(v).ls2.gamma),
                    next_weight=stack(lambda v: nxt(v).weight),
                    next_bias=stack(lambda v: nxt(v).bias)))
        hidden = first.blocks[0].mlp.fc1.out_features
        self.gemm, self.gemm_why = choose_grouped_gemm(p.device, p.dtype,
                                                       (self.kb, c, 3 * c, hidden))
        self._rows: dict[tuple, RowGroups] = {}

    @property
    def groups(self) -> int:
        return len(self.vits)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor owned (CUDA graphs keep them alive), row-group ends included."""
        out = [self.norm1_weight, self.norm1_bias]
        for b in self.blocks:
            out += [getattr(b, f.name) for f in dataclasses.fields(b)]
        out += [r.ends for r in self._rows.values()]
        return out

    def row_groups(self, batches: Sequence[int], device: torch.device) -> RowGroups:
        """The row groups for ViT batches ``batches`` (made once per batches and device: the
        ends tensor is created outside any CUDA-graph capture, at the warm-up run)."""
        key = (tuple(batches), str(device))
        rows = self._rows.get(key)
        if rows is None:
            bounds, start = [], 0
            for b in batches:
                bounds.append((start, start + b * self.tokens))
                start += b * self.tokens
            ends = torch.tensor([e for _, e in bounds], dtype=torch.int32, device=device)
            rows = self._rows[key] = RowGroups(tuple(bounds), ends)
        return rows


def prepare(model: DepthPro) -> tuple[LockstepViTs | None, str]:
    """The stacked ViTs of ``model`` and a sentence for ``status()``; None (and why) when its
    ViTs cannot run in lock-step (the engine then runs them one by one)."""
    vits = model_vits(model)
    problem = shape_problem(vits)
    if problem:
        return None, f"off (per-ViT path): {problem}"
    st = LockstepViTs(vits)
    groups = ("patch, image, FOV encoders (G=3; G=2 when the FOV is skipped)" if len(vits) == 3
              else "patch, image (no FOV network) encoders (G=2)")
    return st, f"on: {groups} in lock-step, no side stream; linears: {st.gemm_why}"


# ----------------------------------------------------------------------------------------------
# the forward
# ----------------------------------------------------------------------------------------------


def _gelu(u: torch.Tensor, epilogue_backend: str | None | EpilogueBackends) -> torch.Tensor:
    """Exact GELU of fc1's output (its bias came through the bias lane): on a CPU in place (as
    ``CpuGemm.linear_bias_gelu``: the op's contract keeps its input, one more pass), else the
    ``bias_gelu`` op without a bias (one launch over all rows)."""
    backend = op_backend(epilogue_backend, "bias_gelu")
    if u.device.type == "cpu" and backend not in ("triton", "cuda"):
        return torch.ops.aten.gelu_(u)
    return ops.bias_gelu(u, None, backend=backend)


def forward(st: LockstepViTs, inputs: Sequence[torch.Tensor],
            hook_ids: Sequence[Sequence[int]], *, backend: str | None,
            epilogue_backend: str | None | EpilogueBackends,
            ) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """The first ``len(inputs)`` ViTs of ``st`` on their inputs ((b_g, 3, 384, 384) each), in
    lock-step. Returns, per ViT, what ``VisionTransformer.forward_with_hooks(inputs[g],
    hook_ids[g])`` returns (final-normed tokens, hooked residual streams), as views of the
    concatenated rows. ``backend``: attention; ``epilogue_backend``: the elementwise ops (a
    name, or the engine's per-op resolution, ``fast/epilogue_backends.py``)."""
    g_count = len(inputs)
    if not 1 <= g_count <= st.groups or len(hook_ids) != g_count:
        raise ValueError(f"lock-step: 1 to {st.groups} inputs with one hook list each, got "
                         f"{g_count} inputs and {len(hook_ids)} hook lists")
    c, t, kb, eps, epi = st.width, st.tokens, st.kb, st.eps, epilogue_backend
    embeds = [vit.embed(x) for vit, x in zip(st.vits, inputs, strict=False)]
    rows = st.row_groups([e.shape[0] for e in embeds], embeds[0].device)
    seqs = sum(e.shape[0] for e in embeds)
    h = torch.cat([e.reshape(-1, c) for e in embeds])
    ends, g = rows.ends, g_count
    n = ops.grouped_layer_norm(h, st.norm1_weight[:g], st.norm1_bias[:g], eps, ends,
                               out_width=kb, backend=op_backend(epi, "grouped_layer_norm"))
    add_ln = op_backend(epi, "grouped_add_layer_norm")
    wanted = [set(ids) for ids in hook_ids]
    hooked: list[dict[int, torch.Tensor]] = [{} for _ in range(g)]
    depth = len(st.blocks)
    for i, blk in enumerate(st.blocks):
        qkv = grouped_linear(st.gemm, n, blk.qkv[:g], rows).view(seqs, t, 3, st.heads,
                                                                  st.head_dim)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        o = ops.attention(q, k, v, scale=st.scale, backend=backend)
        o = o.transpose(1, 2).reshape(-1, c)
        a = grouped_linear(st.gemm, o, blk.proj[:g], rows)
        h, n = ops.grouped_add_layer_norm(h, a, blk.norm2_weight[:g], blk.norm2_bias[:g], eps,
                                          ends, delta_bias=blk.proj_bias[:g], gamma=blk.ls1[:g],
                                          out_width=kb, backend=add_ln)
        u = _gelu(grouped_linear(st.gemm, n, blk.fc1[:g], rows), epi)
        m = grouped_linear(st.gemm, u, blk.fc2[:g], rows)
        last = i + 1 == depth
        # after the last block: the ViTs' outputs (final norms), no GEMM input (no bias lane)
        h, n = ops.grouped_add_layer_norm(h, m, blk.next_weight[:g], blk.next_bias[:g], eps,
                                          ends, delta_bias=blk.fc2_bias[:g], gamma=blk.ls2[:g],
                                          out_width=None if last else kb, backend=add_ln)
        for j, (s, e) in enumerate(rows.bounds):
            if i in wanted[j]:
                hooked[j][i] = h[s:e].view(-1, t, c)
    return [(n[s:e].view(-1, t, c), [hooked[j][i] for i in hook_ids[j]])
            for j, (s, e) in enumerate(rows.bounds)]
