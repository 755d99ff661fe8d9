"""The quantising store shared by the fp8 kernels (LayerNorm, bias + GELU, stand-alone rows).

``store_fp8_rows`` takes a tile of whole rows in fp32 registers and writes them quantised per row
(the rule of ``depthpro_fast.fp8_format``): the row amax, the fp32 scale ``amax / 448`` and the
values ``clamp(y * (448 / amax), -448, 448)`` converted to the element type of ``q_ptr``. That is
e4m3 in the model (the GPU's round-to-nearest-even convert); the tests pass an fp32 buffer to
read the values before that last conversion, because Triton's interpreter does not round to
e4m3 as the GPU does (it rounds ties away from zero and loses the smallest subnormals).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..fp8_format import AMAX_FLOOR as _AMAX_FLOOR
from ..fp8_format import E4M3_MAX as _E4M3_MAX

# Module globals read in a @triton.jit body must be tl.constexpr (the GPU compiler refuses
# plain floats).
E4M3_MAX: tl.constexpr = tl.constexpr(_E4M3_MAX)
AMAX_FLOOR: tl.constexpr = tl.constexpr(_AMAX_FLOOR)


@triton.jit
def store_fp8_rows(y, mask, rmask, rows64, cols, q_ptr, s_ptr, stride_q):
    """Quantise the fp32 tile ``y`` (BLOCK_M whole rows; masked lanes ignored) and store it."""
    amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1)
    a = tl.maximum(amax, AMAX_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    # IEEE divisions (the reference's), once per row
    scale = tl.math.div_rn(a, tl.full(a.shape, E4M3_MAX, tl.float32))
    inv = tl.math.div_rn(tl.full(a.shape, E4M3_MAX, tl.float32), a)
    v = y * inv[:, None]
    # the clamp keeps NaN (a broken activation must not become a finite value)
    v = tl.maximum(v, -E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
    v = tl.minimum(v, E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
    tl.store(q_ptr + rows64[:, None] * stride_q + cols[None, :],
             v.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows64, scale, mask=rmask)
