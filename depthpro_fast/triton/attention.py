"""Triton kernel of ``attention``: a flash-attention forward pass, ``softmax(q k^T * scale) v``.

Algorithm (one program per BLOCK_M query rows of one (batch, head)):

- **Online softmax.** The program walks over the keys in tiles of BLOCK_N and never holds the
  full N x N score matrix. It keeps, per query row, the running maximum ``m`` of the scores seen
  so far, the running sum ``l`` of ``exp(score - m)`` and the un-normalised output
  ``acc = sum_j exp(score_j - m) v_j``. When a tile raises the maximum from ``m`` to ``m'``, the
  old ``l`` and ``acc`` are rescaled by ``exp(m - m')`` before the tile's terms are added; at the
  end ``acc / l`` is exactly the softmax-weighted sum of ``v``.
- **exp2 with the scale folded in.** ``exp(s * scale - m) = 2 ** (s * scale * log2(e) - m2)``,
  with ``m2`` the running maximum in the base-2 domain. Multiplying the raw ``q . k`` by one
  constant ``qk_scale = scale * log2(e)`` and using ``exp2`` (a single hardware instruction)
  saves a multiplication per score and the ``exp`` -> ``exp2`` conversion.
- **fp32 accumulators and statistics.** ``q . k`` and ``p . v`` run through ``tl.dot`` (tensor
  cores on Ampere/Hopper, fed fp16/bf16 operands) with fp32 accumulation; ``m``, ``l`` and
  ``acc`` stay fp32 throughout, because the sums over 577 keys and the repeated rescaling would
  lose several bits in a 16-bit format. Only the final ``acc / l`` is rounded to the input
  dtype. fp32 inputs use ``input_precision="ieee"`` so that they are not silently rounded to
  TF32 on the tensor cores.
- **The ragged last tile.** N is arbitrary (577 = 24 * 24 + 1 in DepthPro). The key loop runs
  unmasked over the full BLOCK_N tiles, then once more, masked, over the partial tile: keys
  beyond N are loaded as zeros and get a score of ``-inf`` (so ``exp2`` makes them 0). Every
  tile holds at least one real key, so the running maximum is always finite and no ``inf - inf``
  NaN can occur. Query rows beyond N (in the last query tile) compute harmless values from zero
  rows and are not stored.

q, k and v may have any strides: the kernel takes the four strides of every tensor, so views
straight into the packed qkv GEMM output (B, N, 3, H, D) are read in place, without a copy. The
output is allocated (B, N, H, D)-contiguous (see ``op_common.empty_attention_output``) so that
``out.transpose(1, 2).reshape(B, N, H * D)`` feeds the ``proj`` GEMM without a copy.

Launch grid: ``(cdiv(N, BLOCK_M), B * H)``: the query tiles of one (batch, head) are neighbours,
so they share its K/V tiles in L2. Block sizes, warps and pipeline stages are autotuned on a GPU
(keyed on B * H, N, the head dim and, implicitly, the dtype); under the interpreter one small
config runs.

The op is registered as the ``torch.library`` custom op ``depthpro_fast::attention_triton``
with a fake implementation, so ``torch.compile(fullgraph=True)`` and CUDA graphs see one op.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting
from ..device_guard import on_device
from ..op_common import check_attention_inputs as _check
from ..op_common import empty_attention_output as empty_output_like

#: Head dims the kernel is instantiated for (tl.dot needs a power of two >= 16).
HEAD_DIMS = (32, 64, 128)

_LOG2E = math.log2(math.e)
# CUDA limits grid dimension 1 to 65535: larger B * H are launched in batch chunks.
_MAX_GRID_Y = 65535
# Whether @triton.jit made interpreted functions (decided when the module is imported).
_INTERPRETED = triton_interpreting()


# Under the interpreter (TRITON_INTERPRET=1, CPU tests) one small config runs, with no
# autotuning: (BLOCK_M, BLOCK_N). 32 x 16 already gives several query and key tiles at the
# tests' N of 64, and a ragged last key tile at N = 17 and 577. The interpreter pays per tile
# (a few ms), so tests that run many 577-token sequences may raise it, e.g. to (128, 128).
INTERPRETER_BLOCKS: tuple[int, int] = (32, 16)


def _configs(tiles: tuple[tuple[int, int, int, int], ...]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in tiles]


# Autotuning candidates on a GPU, (BLOCK_M, BLOCK_N, warps, stages). Each list holds only
# configs that compile for sm_90 without register spills at D = 64 (python -m
# depthpro_fast.triton.aot prints registers / spills / shared memory of every one).
# fp16 / bf16: tensor-core (wgmma) tiles.
CONFIGS_16BIT = _configs((
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 32, 4, 4),
    (64, 64, 4, 3),
    (64, 64, 4, 4),
    (64, 128, 4, 2),
    (64, 32, 4, 4),
))
# fp32 (exact "ieee" dot, FMA units): its operands and accumulators take twice the registers,
# and every 16-bit tile above spills (2-8 KB per thread at 128x64 or 64x64 with 4 warps), so
# fp32 gets smaller tiles or more warps per tile.
CONFIGS_FP32 = _configs((
    (32, 32, 4, 2),
    (32, 32, 4, 3),
    (64, 32, 8, 2),
    (64, 32, 8, 3),
    (32, 64, 8, 2),
    (128, 32, 16, 2),
))


@triton.jit
def _attend_keys(acc, m_i, l_i, q, k_base, v_base, lo, hi, offs_n, offs_d, N,
                 stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                 MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold the key tiles starting at lo, lo + BLOCK_N, ... < hi into the online-softmax state.

    ``MASKED`` tiles may run past N: their missing keys load as 0 and score -inf.
    """
    # K is read transposed, (D, BLOCK_N), so that q @ k is a plain tl.dot.
    k_ptrs = k_base + (lo + offs_n)[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_base + (lo + offs_n)[:, None] * stride_vn + offs_d[None, :] * stride_vd
    for start in range(lo, hi, BLOCK_N):
        if MASKED:
            valid = (start + offs_n) < N
            k = tl.load(k_ptrs, mask=valid[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        # Scores in the base-2 domain: (q . k) * scale * log2(e).
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)  # rescales the old state; 0 on the first tile (m_i = -inf)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # p is rounded to v's dtype so the tensor cores take fp16/bf16 operands; acc stays fp32.
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, m_i, l_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, BH, qk_scale,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch offsets of 35 x 577 x 3 x 1024 elements add up
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N

    q_ptrs = (Q + b * stride_qb + h * stride_qh
              + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Full key tiles without masks, then the ragged last one (if any) with masks.
    n_full = (N // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, k_base, v_base, 0, n_full, offs_n, offs_d, N,
                                 stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                                 MASKED=False, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N)
    acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, k_base, v_base, n_full, N, offs_n, offs_d, N,
                                 stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                                 MASKED=True, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N)

    out = acc / l_i[:, None]
    o_ptrs = (O + b * stride_ob + h * stride_oh
              + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


def _prune_configs(configs: list[triton.Config], named_args: dict,
                   **kwargs: object) -> list[triton.Config]:
    """Short sequences (N <= 64) only try tiles that fit them: less autotuning time."""
    n = named_args["N"]
    fit = [c for c in configs
           if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(n))
           and c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(n))]
    return fit or configs


def _autotuned(configs: list[triton.Config]) -> triton.runtime.Autotuner:
    # Keyed on batch x heads (BH: the grid's second axis; unused in the body), N, the head dim
    # and (implicitly) the tensors' dtypes: the patch encoder's 35B x 16 sequences and the
    # image / FOV encoders' B x 16 fill the GPU very differently and tune separately.
    return triton.autotune(configs=configs, key=["BH", "N", "HEAD_DIM"],
                           prune_configs_by={"early_config_prune": _prune_configs},
                           )(_attention_fwd_kernel)


_attention_fwd_tuned = _autotuned(CONFIGS_16BIT)
_attention_fwd_tuned_fp32 = _autotuned(CONFIGS_FP32)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Write ``softmax(q k^T * scale) v`` into ``out``; all four (B, H, N, D), any strides."""
    b, h, n, d = q.shape
    # fp32 stays fp32-accurate (no TF32 rounding). For fp16/bf16 operands the option has no
    # effect; "tf32" (NVIDIA's default) is passed as a plain string that every Triton 3.x takes.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    chunk = max(1, _MAX_GRID_Y // h)
    for b0 in range(0, b, chunk):
        sl = slice(b0, min(b, b0 + chunk))
        qs, ks, vs, os_ = q[sl], k[sl], v[sl], out[sl]
        rows = qs.shape[0] * h

        def grid(meta: dict, rows: int = rows) -> tuple[int, int]:
            return (triton.cdiv(n, meta["BLOCK_M"]), rows)

        args = (qs, ks, vs, os_, *qs.stride(), *ks.stride(), *vs.stride(), *os_.stride(),
                h, n, rows, scale * _LOG2E)
        with on_device(q):
            if _INTERPRETED:
                block_m, block_n = INTERPRETER_BLOCKS
                _attention_fwd_kernel[grid](*args, HEAD_DIM=d, DOT_PRECISION=precision,
                                            BLOCK_M=block_m, BLOCK_N=block_n)
            else:
                tuned = (_attention_fwd_tuned_fp32 if q.dtype == torch.float32
                         else _attention_fwd_tuned)
                tuned[grid](*args, HEAD_DIM=d, DOT_PRECISION=precision)
    return out


@torch.library.custom_op("depthpro_fast::attention_triton", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: float) -> torch.Tensor:
    # In eager mode custom ops hand their inputs over unchanged: strided views stay views.
    out = empty_output_like(q)
    if out.numel() == 0:
        return out
    return launch(q, k, v, out, scale)


@_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    b, h, n, d = q.shape
    # (B, N, H, D)-contiguous memory seen as (B, H, N, D), like empty_output_like.
    return torch.empty_strided((b, h, n, d), (n * h * d, d, h * d, 1), dtype=q.dtype,
                               device=q.device)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Triton implementation of :func:`depthpro_fast.ops.attention` (same arguments).

    q, k, v: (B, H, N, D) with any strides, one float dtype, D in ``HEAD_DIMS``. Returns a
    (B, H, N, D) tensor of q's dtype whose memory is (B, N, H, D)-contiguous.
    """
    _check(q, k, v)
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        raise ValueError(f"attention (triton): head dim D={d} is not supported; accepted: "
                         f"{', '.join(map(str, HEAD_DIMS))} (use backend='reference' for others)")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"attention (triton): scale must be a float, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"attention (triton): scale must be finite, got {scale}")
    return _attention_op(q, k, v, scale)
