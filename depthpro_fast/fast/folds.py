"""Exact algebraic folds of the linear chains in DepthPro's convolutional parts.

Every fold here is exact in real arithmetic (only the rounding differs): the folded weights are
computed once, in float64, from the loaded weights, and rounded once to the run dtype.

Notation: a ConvTranspose2d with kernel = stride = k and no padding (the "deconv" of the spec)
is a per-pixel linear map ``C_in -> k*k*C_out`` followed by a depth-to-space, with weight
``W[c, o, a, b]``::

    y[o, k*i + a, k*j + b] = sum_c W[c, o, a, b] x[c, i, j] + bias[o]

A 1x1 conv ``z[p] = sum_o V[p, o] y[o] + beta[p]`` is per-pixel too.

Folds and their formulas (derivations in the docstrings):

1. deconv (k2s2, bias ``bd`` or none) -> 1x1 conv (bias ``bc``) = one deconv k2s2 with
   ``W'[c, p, a, b] = sum_o W[c, o, a, b] V[p, o]``, ``b' = bc + V bd``.
   Decoder ``fusions[1..4]``: ``deconv -> out_conv`` (halves their MACs: the 1x1 conv ran on 4x the
   pixels).
2. 1x1 conv (no bias, ``U[i, c]``) -> deconv k2s2 (no bias) = one deconv with
   ``W'[c, o, a, b] = sum_i U[i, c] W[i, o, a, b]``. Encoder ``upsample*`` blocks. Exact always,
   but it pays only when ``4 C_in C_out < C_in C_int + 4 C_int C_out`` per input pixel:
   official sizes: ``upsample1``/``upsample2`` (1024 -> 1024 -> 1024: 4M instead of 5M MACs per
   pixel) yes; ``upsample0`` (1024 -> 512 -> 512) and ``upsample_latent0/1``
   (1024 -> 256 -> 256) no (folding would double their MACs). See :func:`fold_1x1_deconv_pays`.
3. Chains of deconvs k2s2 (no bias) = one deconv with k = s = 2^n:
   ``W'[c, o, 2a + a2, 2b + b2] = sum_m W1[c, m, a, b] W2[m, o, a2, b2]`` (and recursively).
   ``upsample_latent0`` (3 deconvs), ``upsample_latent1`` (2): saves the smaller terms of
   4 + 16 + 64 MAC units (20% for latent0). Optional (``fold_deconv_chains``): whether cuDNN
   runs a k8s8 ConvTranspose2d as fast must be measured.
4. The low-resolution fusion ``fuse_lowres(cat(upsample2(x2), upsample_lowres(g)))`` (1x1 ->
   deconv, deconv with bias, then a 1x1 conv with bias over the concatenation) is linear in
   ``cat(x2, g)``: one deconv k2s2 over the 2E input channels with bias (2 + 1 + 1 convolutions
   become 1, and the 48x48x2048 concatenation disappears).
5. 1x1 conv (bias ``beta``) -> 3x3 conv (zero padding 1, bias ``b3``): the weights fold to
   ``W'[p, c, y, x] = sum_o W3[p, o, y, x] V[o, c]``, but the bias does not fold into a constant:
   the 3x3 conv sees zero padding, not ``beta``, outside the map, so its bias contribution is
   ``sum over the taps inside the map of W3[p, :, y, x] . beta``. Interior: the full sum; on the
   border rows and columns, the taps outside are subtracted (:class:`BorderBias`,
   inclusion-exclusion over the 4 edges and 4 corners). ``fusions[0].out_conv -> head[0]``.
6. deconv k2s2 (bias ``bd``) -> 3x3 conv (pad 1, bias ``b3``) = a 3x3 conv on the *low*
   resolution map with ``4 P`` output channels (one block of ``P`` per output phase
   ``(a, b)``, phase-major) followed by a depth-to-space: output pixel ``(2i + a, 2j + b)``
   with 3x3 tap ``(dy, dx)`` reads the deconv output at ``2(i + q) + a'`` where
   ``q = floor((a + dy) / 2)``, ``a' = (a + dy) mod 2``, so::

       W'[(2a + b) P + p, c, q + 1, r + 1] = sum over dy with floor((a + dy)/2) = q,
                                             dx with floor((b + dx)/2) = r,  and o of
                                             W3[p, o, dy + 1, dx + 1] Wd[c, o, a', b']

   A tap outside the high-resolution map is exactly a tap outside the low-resolution map, so
   zero padding carries over; the deconv bias is handled as in 5, per phase (the top row of the
   output is row 0 of the ``a = 0`` phases, etc.). ``head[1] -> head[2]``: 147k instead of 212k
   MACs per 768^2 pixel and no 128 x 1536^2 intermediate (604 MB in bf16). The ReLU and the
   32 -> 1 1x1 conv that follow are per pixel, so they run per phase (a grouped 1x1 conv)
   before the depth-to-space, which then moves one channel instead of 32.

Not folded (not exact, or not profitable): ``head[0]`` (3x3) -> ``head[1]`` (deconv) would be a
3x3 conv with 4x the output channels (1.18M instead of 0.36M MACs per pixel); anything across a
ReLU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def _check_deconv(m: nn.Module, what: str) -> None:
    if not isinstance(m, nn.ConvTranspose2d):
        raise TypeError(f"{what}: expected an nn.ConvTranspose2d, got {type(m).__name__}")
    k, s = m.kernel_size, m.stride
    if (k[0] != k[1] or k != s or m.padding != (0, 0) or m.output_padding != (0, 0)
            or m.groups != 1 or m.dilation != (1, 1)):
        raise ValueError(f"{what}: only kernel = stride, no padding, groups 1 deconvs fold; got "
                         f"kernel {k}, stride {s}, padding {m.padding}")


def _check_conv(m: nn.Module, kernel: int, what: str) -> None:
    if not isinstance(m, nn.Conv2d):
        raise TypeError(f"{what}: expected an nn.Conv2d, got {type(m).__name__}")
    pad = kernel // 2
    if (m.kernel_size != (kernel, kernel) or m.stride != (1, 1) or m.padding != (pad, pad)
            or m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros"):
        raise ValueError(f"{what}: expected a {kernel}x{kernel} stride-1 conv with zero padding "
                         f"{pad}, got kernel {m.kernel_size}, stride {m.stride}, padding "
                         f"{m.padding}")


# ----------------------------------------------------------------------------------------------
# weight formulas (float64 in, float64 out)
# ----------------------------------------------------------------------------------------------


def deconv_then_1x1(w_deconv: Tensor, b_deconv: Tensor | None, w_conv: Tensor,
                    b_conv: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Fold 1: ``W'[c,p,a,b] = sum_o W[c,o,a,b] V[p,o]``, ``b' = b_conv + V b_deconv``."""
    v = w_conv[:, :, 0, 0]
    w = torch.einsum("coab,po->cpab", w_deconv, v)
    bias = b_conv
    if b_deconv is not None:
        extra = v @ b_deconv
        bias = extra if bias is None else bias + extra
    return w, bias


def conv1x1_then_deconv(w_conv: Tensor, w_deconv: Tensor) -> Tensor:
    """Fold 2: ``W'[c,o,a,b] = sum_i U[i,c] W[i,o,a,b]`` (neither has a bias)."""
    return torch.einsum("ic,ioab->coab", w_conv[:, :, 0, 0], w_deconv)


def deconv_chain(w_first: Tensor, w_next: Tensor) -> Tensor:
    """Fold 3: deconv k=s=K then deconv k=s=k2 (no biases) = deconv k=s=K*k2 with
    ``W'[c, o, k2 a + a2, k2 b + b2] = sum_m W1[c, m, a, b] W2[m, o, a2, b2]``."""
    c, _, k1, _ = w_first.shape
    o, k2 = w_next.shape[1], w_next.shape[2]
    w = torch.einsum("cmab,moxy->coaxby", w_first, w_next)
    return w.reshape(c, o, k1 * k2, k1 * k2)


def conv1x1_deconv_pays(c_in: int, c_int: int, c_out: int, k: int = 2) -> bool:
    """Whether fold 2 lowers the MACs per input pixel:
    ``k^2 Cin Cout < Cin Cint + k^2 Cint Cout``."""
    return k * k * c_in * c_out < c_in * c_int + k * k * c_int * c_out


def conv1x1_then_conv3x3(w_conv: Tensor, b_conv: Tensor | None, w3: Tensor,
                         b3: Tensor | None) -> tuple[Tensor, Tensor, BorderBias]:
    """Fold 5: ``W'[p,c,y,x] = sum_o W3[p,o,y,x] V[o,c]``; the 1x1 bias goes to the border-aware
    bias (returns the weight, the interior bias and the border corrections)."""
    w = torch.einsum("poyx,oc->pcyx", w3, w_conv[:, :, 0, 0])
    p = w3.shape[0]
    beta = b_conv if b_conv is not None else w3.new_zeros(w3.shape[1])
    # taps[p, y, x] = W3[p, :, y, x] . beta: what each tap adds when it lands inside the map
    taps = torch.einsum("poyx,o->pyx", w3, beta)
    interior = taps.sum(dim=(1, 2)) + (b3 if b3 is not None else w3.new_zeros(p))
    return w, interior, BorderBias.from_taps(taps)


def deconv_then_conv3x3(w_deconv: Tensor, b_deconv: Tensor | None, w3: Tensor,
                        b3: Tensor | None) -> tuple[Tensor, Tensor, BorderBias]:
    """Fold 6 (sub-pixel): the weight (4P, C, 3, 3) of the phase-major 3x3 conv on the
    low-resolution map, its interior bias (4P,) and the per-phase border corrections."""
    c, o, k, _ = w_deconv.shape
    if k != 2:
        raise ValueError(f"the sub-pixel fold is written for k2s2 deconvs, got kernel {k}")
    p = w3.shape[0]
    w = w3.new_zeros(4, p, c, 3, 3)
    for a in range(2):
        for b in range(2):
            for dy in (-1, 0, 1):
                q, a2 = divmod(a + dy, 2)
                for dx in (-1, 0, 1):
                    r, b2 = divmod(b + dx, 2)
                    # (P, O) x (C, O) -> (P, C)
                    w[2 * a + b, :, :, q + 1, r + 1] += (w3[:, :, dy + 1, dx + 1]
                                                         @ w_deconv[:, :, a2, b2].T)
    w = w.reshape(4 * p, c, 3, 3)
    beta = b_deconv if b_deconv is not None else w3.new_zeros(o)
    taps = torch.einsum("poyx,o->pyx", w3, beta)  # (P, 3, 3)
    interior = (taps.sum(dim=(1, 2)) + (b3 if b3 is not None else w3.new_zeros(p))).repeat(4)
    # High-resolution border rows/columns live in one phase each: the top row (Y = 0) is row 0
    # of the a = 0 phases, the bottom row (Y = 2H - 1) row H - 1 of the a = 1 phases, etc.
    zero = torch.zeros_like(taps[:, 0, 0])
    phase_a = [0, 0, 1, 1]  # phase index 2a + b -> a
    phase_b = [0, 1, 0, 1]

    def per_phase(vec: Tensor, want_a: int | None, want_b: int | None) -> Tensor:
        return torch.cat([vec if (want_a is None or phase_a[i] == want_a)
                          and (want_b is None or phase_b[i] == want_b) else zero
                          for i in range(4)])

    full = BorderBias.from_taps(taps)
    border = BorderBias(
        top=per_phase(full.top[:p], 0, None), bottom=per_phase(full.bottom[:p], 1, None),
        left=per_phase(full.left[:p], None, 0), right=per_phase(full.right[:p], None, 1),
        top_left=per_phase(full.top_left[:p], 0, 0), top_right=per_phase(full.top_right[:p], 0, 1),
        bottom_left=per_phase(full.bottom_left[:p], 1, 0),
        bottom_right=per_phase(full.bottom_right[:p], 1, 1))
    return w, interior, border


# ----------------------------------------------------------------------------------------------
# border-aware bias of a 3x3 conv (zero padding 1) that absorbed a constant
# ----------------------------------------------------------------------------------------------


@dataclass
class BorderBias:
    """Per-channel bias corrections on the border of a 3x3, padding-1 conv output.

    The interior bias assumes all 9 taps inside the map; on row 0 the 3 taps of kernel row 0 are
    outside (``top``), on the last row kernel row 2 (``bottom``), on column 0 kernel column 0
    (``left``), on the last column kernel column 2 (``right``). Subtracting the edges counts a
    corner tap twice, so the corners add it back once (inclusion-exclusion; also right for maps
    one pixel high or wide).
    """

    top: Tensor
    bottom: Tensor
    left: Tensor
    right: Tensor
    top_left: Tensor
    top_right: Tensor
    bottom_left: Tensor
    bottom_right: Tensor

    FIELDS = ("top", "bottom", "left", "right", "top_left", "top_right", "bottom_left",
              "bottom_right")

    @classmethod
    def from_taps(cls, taps: Tensor) -> BorderBias:
        """``taps[p, y, x]``: the bias contribution of kernel tap (y, x) to output channel p."""
        return cls(top=taps[:, 0, :].sum(1), bottom=taps[:, 2, :].sum(1),
                   left=taps[:, :, 0].sum(1), right=taps[:, :, 2].sum(1),
                   top_left=taps[:, 0, 0], top_right=taps[:, 0, 2],
                   bottom_left=taps[:, 2, 0], bottom_right=taps[:, 2, 2])

    def to(self, **kwargs) -> BorderBias:
        return BorderBias(*(getattr(self, f).to(**kwargs) for f in self.FIELDS))

    def apply_(self, out: Tensor) -> Tensor:
        """Correct the conv output ``out`` (N, C, H, W) in place (8 thin strided updates)."""
        def v(t: Tensor) -> Tensor:
            return t.view(1, -1, 1)

        out[:, :, 0, :] -= v(self.top)
        out[:, :, -1, :] -= v(self.bottom)
        out[:, :, :, 0] -= v(self.left)
        out[:, :, :, -1] -= v(self.right)
        out[:, :, 0, 0] += self.top_left
        out[:, :, 0, -1] += self.top_right
        out[:, :, -1, 0] += self.bottom_left
        out[:, :, -1, -1] += self.bottom_right
        return out


# ----------------------------------------------------------------------------------------------
# folded layers (what the fast path runs)
# ----------------------------------------------------------------------------------------------


class FoldedLayer:
    """Base of the folded layers: plain objects (not nn.Modules, so they never show up in the
    model's state dict) holding tensors already in the run dtype / device / memory format.

    ``gemm_dtype`` (convs and deconvs): the dtype of the arithmetic's inputs when it differs
    from the activations' (an fp32 model with ``FastOptions(gemm_dtype="bf16")``): the weight is
    stored in it, the input is rounded to it, oneDNN accumulates in fp32 and the output is
    widened back to the activations' dtype before the bias (kept in that dtype) is added.
    """

    gemm_dtype: torch.dtype | None = None
    io_dtype: torch.dtype | None = None

    def tensors(self) -> dict[str, Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, Tensor)}

    def _set_dtypes(self, dtype: torch.dtype, gemm_dtype: torch.dtype | None) -> None:
        self.io_dtype = dtype
        self.gemm_dtype = None if gemm_dtype == dtype else gemm_dtype

    def _conv_op(self, op: Callable[..., Tensor], x: Tensor, **kwargs) -> Tensor:
        """``op(x, weight, bias, **kwargs)``, with bf16 inputs when ``gemm_dtype`` is set."""
        weight, bias = self.weight, self.bias  # type: ignore[attr-defined]
        if self.gemm_dtype is None:
            return op(x, weight, bias, **kwargs)
        out = op(x.to(self.gemm_dtype), weight, None, **kwargs).to(self.io_dtype)
        return out if bias is None else out.add_(bias.view(1, -1, 1, 1))

    def _cast(self, t: Tensor | None, dtype: torch.dtype, device: torch.device,
              channels_last: bool) -> Tensor | None:
        if t is None:
            return None
        t = t.to(device=device, dtype=dtype)
        if channels_last and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t.contiguous()


class Deconv(FoldedLayer):
    """ConvTranspose2d with kernel = stride (folds 1-4 produce these)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, *, dtype: torch.dtype,
                 device: torch.device, channels_last: bool = False,
                 gemm_dtype: torch.dtype | None = None):
        self._set_dtypes(dtype, gemm_dtype)
        self.stride = weight.shape[-1]
        self.weight = self._cast(weight, self.gemm_dtype or dtype, device, channels_last)
        self.bias = self._cast(bias, dtype, device, channels_last)

    def __call__(self, x: Tensor) -> Tensor:
        return self._conv_op(F.conv_transpose2d, x, stride=self.stride)


class Conv(FoldedLayer):
    """A Conv2d (optionally with a border-aware bias from fold 5 or 6)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, *, stride: int = 1,
                 padding: int = 0, groups: int = 1, border: BorderBias | None = None,
                 dtype: torch.dtype, device: torch.device, channels_last: bool = False,
                 gemm_dtype: torch.dtype | None = None):
        self._set_dtypes(dtype, gemm_dtype)
        self.stride, self.padding, self.groups = stride, padding, groups
        self.weight = self._cast(weight, self.gemm_dtype or dtype, device, channels_last)
        self.bias = self._cast(bias, dtype, device, channels_last)
        self.border = None if border is None else border.to(device=device, dtype=dtype)

    def __call__(self, x: Tensor) -> Tensor:
        out = self._conv_op(F.conv2d, x, stride=self.stride, padding=self.padding,
                            groups=self.groups)
        if self.border is not None:
            self.border.apply_(out)
        return out

    def tensors(self) -> dict[str, Tensor]:
        t = super().tensors()
        if self.border is not None:
            t.update({f"border.{f}": getattr(self.border, f) for f in BorderBias.FIELDS})
        return t


def conv_of(m: nn.Conv2d, *, dtype: torch.dtype, device: torch.device,
            channels_last: bool, gemm_dtype: torch.dtype | None = None) -> Conv:
    """An unfolded Conv2d as a :class:`Conv` (a converted copy of its weights)."""
    if m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros":
        raise ValueError("conv_of: plain convs only")
    if m.stride[0] != m.stride[1] or m.padding[0] != m.padding[1]:
        raise ValueError("conv_of: square stride and padding only")
    return Conv(m.weight.detach(), _detach(m.bias), stride=m.stride[0], padding=m.padding[0],
                dtype=dtype, device=device, channels_last=channels_last, gemm_dtype=gemm_dtype)


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


# ----------------------------------------------------------------------------------------------
# module-level folds (what the engine calls)
# ----------------------------------------------------------------------------------------------


def fold_deconv_1x1(deconv: nn.ConvTranspose2d, conv: nn.Conv2d, **cast) -> Deconv:
    """Fold 1 of two modules (e.g. a FeatureFusionBlock2d's ``deconv`` and ``out_conv``)."""
    _check_deconv(deconv, "fold_deconv_1x1")
    _check_conv(conv, 1, "fold_deconv_1x1")
    w, b = deconv_then_1x1(_f64(deconv.weight), _f64(deconv.bias), _f64(conv.weight),
                           _f64(conv.bias))
    return Deconv(w, b, **cast)


def fold_project_upsample(block: nn.Sequential, *, fold_1x1: bool | None = None,
                          fold_chain: bool = False, **cast) -> list[Deconv | Conv]:
    """An encoder project-upsample block (1x1 conv, no bias; then deconvs k2s2, no bias) as a
    list of layers: the 1x1 folded into the first deconv when ``fold_1x1`` (None: when it lowers
    the MACs, :func:`conv1x1_deconv_pays`) and the deconvs composed into one when ``fold_chain``."""
    conv, deconvs = block[0], list(block)[1:]
    _check_conv(conv, 1, "fold_project_upsample")
    if conv.bias is not None:
        raise ValueError("fold_project_upsample: the 1x1 conv must have no bias")
    for d in deconvs:
        _check_deconv(d, "fold_project_upsample")
        if d.bias is not None:
            raise ValueError("fold_project_upsample: the deconvs must have no bias")
    weights = [_f64(d.weight) for d in deconvs]
    if fold_chain and len(weights) > 1:
        w = weights[0]
        for nxt in weights[1:]:
            w = deconv_chain(w, nxt)
        weights = [w]
    if fold_1x1 is None:
        c_int, c_in = conv.weight.shape[:2]
        fold_1x1 = conv1x1_deconv_pays(c_in, c_int, weights[0].shape[1], weights[0].shape[-1])
    layers: list[Deconv | Conv] = []
    if fold_1x1:
        weights[0] = conv1x1_then_deconv(_f64(conv.weight), weights[0])
    else:
        layers.append(Conv(conv.weight.detach(), None, **cast))
    layers += [Deconv(w, None, **cast) for w in weights]
    return layers


def fold_lowres(upsample2: nn.Sequential, upsample_lowres: nn.ConvTranspose2d,
                fuse_lowres: nn.Conv2d, **cast) -> Deconv:
    """Fold 4: ``fuse_lowres(cat(upsample2(x2), upsample_lowres(g)))`` = one deconv over
    ``cat(x2, g)`` (input channels: x2's, then g's)."""
    if len(upsample2) != 2:
        raise ValueError("fold_lowres: upsample2 must be a 1x1 conv and one deconv")
    conv, deconv = upsample2[0], upsample2[1]
    _check_conv(conv, 1, "fold_lowres")
    _check_deconv(deconv, "fold_lowres")
    _check_deconv(upsample_lowres, "fold_lowres")
    _check_conv(fuse_lowres, 1, "fold_lowres")
    if conv.bias is not None or deconv.bias is not None:
        raise ValueError("fold_lowres: upsample2 must have no biases")
    o2 = deconv.weight.shape[1]
    fuse_w, fuse_b = _f64(fuse_lowres.weight), _f64(fuse_lowres.bias)
    wa = conv1x1_then_deconv(_f64(conv.weight), _f64(deconv.weight))
    wa, _ = deconv_then_1x1(wa, None, fuse_w[:, :o2], None)
    wb, bias = deconv_then_1x1(_f64(upsample_lowres.weight), _f64(upsample_lowres.bias),
                               fuse_w[:, o2:], fuse_b)
    return Deconv(torch.cat([wa, wb], dim=0), bias, **cast)


def fold_1x1_conv3x3(conv1: nn.Conv2d, conv3: nn.Conv2d, **cast) -> Conv:
    """Fold 5 of two modules (``fusions[0].out_conv`` then ``head[0]``)."""
    _check_conv(conv1, 1, "fold_1x1_conv3x3")
    _check_conv(conv3, 3, "fold_1x1_conv3x3")
    w, b, border = conv1x1_then_conv3x3(_f64(conv1.weight), _f64(conv1.bias), _f64(conv3.weight),
                                        _f64(conv3.bias))
    return Conv(w, b, padding=1, border=border, **cast)


class SubpixelHead(FoldedLayer):
    """Fold 6 applied to the depth head's tail: ``head[1]`` (deconv k2s2) -> ``head[2]`` (3x3)
    -> ReLU -> ``head[4]`` (1x1 to one channel) -> ReLU, computed at the low resolution per
    output phase, then one depth-to-space of a single channel."""

    def __init__(self, deconv: nn.ConvTranspose2d, conv3: nn.Conv2d, conv_out: nn.Conv2d, *,
                 dtype: torch.dtype, device: torch.device, channels_last: bool = False,
                 gemm_dtype: torch.dtype | None = None):
        _check_deconv(deconv, "SubpixelHead")
        _check_conv(conv3, 3, "SubpixelHead")
        _check_conv(conv_out, 1, "SubpixelHead")
        if deconv.kernel_size != (2, 2):
            raise ValueError("SubpixelHead: the deconv must be k2s2")
        cast = dict(dtype=dtype, device=device, channels_last=channels_last)
        w, b, border = deconv_then_conv3x3(_f64(deconv.weight), _f64(deconv.bias),
                                           _f64(conv3.weight), _f64(conv3.bias))
        # the 3x3 (the head's FLOPs) takes gemm_dtype; the 32 -> 1 1x1 that writes the depth
        # map stays in the activations' dtype (a few MFLOP per pixel row, full precision)
        self.conv = Conv(w, b, padding=1, border=border, gemm_dtype=gemm_dtype, **cast)
        q = conv_out.weight.shape[0]
        # grouped 1x1: phase g's P channels -> phase g's Q outputs; depth-to-space wants the
        # channel order q * 4 + phase, the grouped conv gives phase * Q + q (the same for Q = 1).
        self.out_channels = q
        w_out = _f64(conv_out.weight).repeat(4, 1, 1, 1)
        b_out = None if conv_out.bias is None else _f64(conv_out.bias).repeat(4)
        self.out = Conv(w_out, b_out, groups=4, **cast)

    def tensors(self) -> dict[str, Tensor]:
        return {**{f"conv.{k}": v for k, v in self.conv.tensors().items()},
                **{f"out.{k}": v for k, v in self.out.tensors().items()}}

    def __call__(self, t: Tensor) -> Tensor:
        z = self.conv(t).relu_()
        z = self.out(z).relu_()  # (N, 4 Q, H, W), phase-major
        if self.out_channels != 1:
            n, _, h, w = z.shape
            z = z.view(n, 4, self.out_channels, h, w).transpose(1, 2).reshape(n, -1, h, w)
        return F.pixel_shuffle(z, 2)
