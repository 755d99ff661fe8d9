"""The categories of ``depthpro-fast bench --breakdown``: which op's time counts where.

An op called from Python (not from inside another op) is classified by its name, the model
stage it ran in (the labels of ``breakdown_scopes.py``) and, for ``to`` / ``copy_``, whether it
changed the dtype; everything inside a labelled ``depthpro_fast`` op (attention, split, merge,
the fused LayerNorm / GELU passes) counts as that op. The events and their FLOPs / bytes:
``breakdown_events.py``.
"""

from __future__ import annotations

from .breakdown_events import ATTENTION_PREFIXES, VIEWS, Event, moves_data, transposed

#: (key, label, floor kind): ``gemm`` / ``conv`` categories have a FLOP floor at the measured
#: GEMM / conv rate, ``memory`` ones a byte floor at the measured copy bandwidth, ``none`` none.
CATEGORIES: tuple[tuple[str, str, str], ...] = (
    ("vit_gemm", "ViT GEMMs", "gemm"),
    ("attention", "attention", "gemm"),
    ("vit_elementwise", "ViT LayerNorm / GELU / residual / LayerScale", "memory"),
    ("conv", "convolutions", "conv"),
    ("deconv", "deconvolutions (conv_transpose)", "conv"),
    ("split", "split (patch windows)", "memory"),
    ("merge", "merge (stitch)", "memory"),
    ("resize", "interpolation / resize", "memory"),
    ("cast", "dtype casts", "memory"),
    ("copy", "layout conversions / copies", "memory"),
    ("other_gemm", "other GEMMs (outside the ViTs)", "gemm"),
    ("elementwise", "other elementwise (decoder, head, FOV)", "memory"),
    ("view", "views / allocations (no data moved)", "none"),
    ("python", "Python between ops", "none"),
    ("other", "other ops", "none"),
)
LABELS = {key: label for key, label, _ in CATEGORIES}
FLOOR_KIND = {key: kind for key, _, kind in CATEGORIES}

#: Stages whose ops belong to a ViT (the names of ``depthpro_fast.flops.STAGES`` and the
#: labels ``breakdown_scopes.py`` adds for the ViTs as a whole).
VIT_STAGES = frozenset({"patch encoder", "image encoder", "FOV encoder", "ViTs",
                        "ViTs (lock-step)"})

_GEMMS = frozenset({"aten::linear", "aten::addmm", "aten::addmm_", "aten::mm", "aten::bmm",
                    "aten::baddbmm", "aten::matmul", "aten::_addmm_activation",
                    "aten::mkldnn_linear", "aten::_scaled_mm", "aten::einsum",
                    "mkldnn::_linear_pointwise", "mkldnn::_linear_pointwise.binary",
                    "mkldnn::_mkl_linear", "aten::_mkl_linear"})
_CONVS = frozenset({"aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::_convolution",
                    "aten::convolution", "aten::mkldnn_convolution", "aten::thnn_conv2d",
                    "aten::_slow_conv2d_forward", "aten::cudnn_convolution",
                    "mkldnn::_convolution_pointwise", "mkldnn::_convolution_pointwise.binary"})
_DECONVS = frozenset({"aten::conv_transpose1d", "aten::conv_transpose2d",
                      "aten::conv_transpose3d", "aten::slow_conv_transpose2d",
                      "aten::mkldnn_convolution_transpose", "aten::cudnn_convolution_transpose",
                      "mkldnn::_convolution_transpose_pointwise"})
_RESIZE_PREFIXES = ("aten::upsample_", "aten::_upsample_", "aten::grid_sampler",
                    "aten::interpolate", "aten::adaptive_avg_pool", "aten::avg_pool")
_COPIES = frozenset({"aten::contiguous", "aten::clone", "aten::copy_", "aten::cat",
                     "aten::stack", "aten::reshape", "aten::flatten", "aten::pixel_shuffle",
                     "aten::pixel_unshuffle", "aten::constant_pad_nd", "aten::pad",
                     "aten::repeat", "aten::roll", "aten::flip", "aten::index_select",
                     "aten::slice_scatter", "aten::select_scatter", "aten::index_put_",
                     "aten::narrow_copy", "aten::as_strided_copy", "aten::_to_copy",
                     "aten::to", "aten::type_as", "aten::_unsafe_view_copy", "aten::unfold",
                     "aten::im2col", "aten::col2im", "aten::chunk_cat", "aten::_cat",
                     "aten::contiguous_format", "aten::to_dense", "aten::to_mkldnn"})
_ELEMENTWISE_PREFIXES = (
    "aten::add", "aten::sub", "aten::mul", "aten::div", "aten::gelu", "aten::relu",
    "aten::layer_norm", "aten::native_layer_norm", "aten::softmax", "aten::_softmax",
    "aten::_safe_softmax", "aten::sigmoid", "aten::tanh", "aten::clamp", "aten::pow",
    "aten::sqrt", "aten::rsqrt", "aten::exp", "aten::log", "aten::neg", "aten::abs",
    "aten::mean", "aten::sum", "aten::var", "aten::std", "aten::max", "aten::min",
    "aten::where", "aten::fill_", "aten::zero_", "aten::zeros", "aten::ones", "aten::full",
    "aten::addcmul", "aten::addcdiv", "aten::lerp", "aten::threshold", "aten::hardtanh",
    "aten::silu", "aten::erf", "aten::reciprocal", "aten::square", "aten::group_norm",
    "aten::native_group_norm", "aten::batch_norm", "aten::_native_batch_norm",
    "aten::leaky_relu", "aten::maximum", "aten::minimum", "aten::atan", "aten::rad2deg",
    "aten::floor", "aten::ceil", "aten::round", "aten::eq", "aten::ne", "aten::lt",
    "aten::gt", "aten::le", "aten::ge", "aten::isfinite", "aten::isnan", "aten::any",
    "aten::all", "aten::logical_", "aten::bitwise_", "aten::masked_fill", "aten::amax",
    "aten::amin", "aten::norm", "aten::linalg_vector_norm", "aten::prod", "aten::cumsum",
    "aten::arange", "aten::linspace", "aten::rand", "aten::randn", "aten::normal_",
    "aten::uniform_")

#: the depthpro_fast ops (``depthpro_fast.ops``, also as custom ops ``depthpro_fast::<op>``)
#: that ``breakdown_scopes.py`` labels, and the category of everything inside them
#: (``None``: the elementwise category of the stage they run in)
OP_SCOPES: dict[str, str | None] = {
    "attention": "attention",
    "split_patches": "split",
    "merge_patches": "merge",
    "layer_norm": None, "add_layer_norm": None, "bias_gelu": None, "bias_residual": None,
    "residual_layerscale": None, "grouped_layer_norm": None, "grouped_add_layer_norm": None,
    "layer_norm_fp8": None, "add_layer_norm_fp8": None, "bias_gelu_fp8": None,
    "quantize_rows": None, "bias_relu": None,
}


def elementwise_category(stage: str | None) -> str:
    """The elementwise category of ``stage``: the ViTs' passes, or the others'."""
    return "vit_elementwise" if stage in VIT_STAGES else "elementwise"


def scope_category(op: str, stage: str | None) -> str:
    """The category of everything inside the labelled ``depthpro_fast`` op ``op``."""
    found = OP_SCOPES[op]
    return found if found is not None else elementwise_category(stage)


def _copy_dtypes(e: Event) -> list[tuple[str, str]]:
    """(destination, source) dtypes of every ``copy_`` in ``e`` and below."""
    out = []
    if e.name == "aten::copy_" and len(e.dtypes) >= 2:
        out.append((e.dtypes[0], e.dtypes[1]))
    for c in e.children:
        out += _copy_dtypes(c)
    return out


def changes_dtype(e: Event) -> bool:
    """Whether ``e`` (a ``to`` / ``_to_copy`` / ``copy_`` / ``type_as``) converts dtypes."""
    return any(dst != src for dst, src in _copy_dtypes(e))


def classify(e: Event, stage: str | None) -> str:
    """The category of a top-level op ``e`` (one called from Python, not from another op)
    that ran in ``stage`` and in no labelled ``depthpro_fast`` op."""
    name = e.name
    if name.startswith("depthpro_fast::"):  # a registered custom op of ours
        op = name.split("::", 1)[1].split(".", 1)[0]
        if op in OP_SCOPES:
            return scope_category(op, stage)
    if name in _GEMMS:
        if name == "aten::matmul" and _is_attention_matmul(e, stage):
            return "attention"
        return "vit_gemm" if stage in VIT_STAGES else "other_gemm"
    if name.startswith(ATTENTION_PREFIXES):
        return "attention"
    if name in _DECONVS or (name in ("aten::convolution", "aten::_convolution")
                            and transposed(e)):
        return "deconv"
    if name in _CONVS:
        return "conv"
    if name.startswith(_RESIZE_PREFIXES):
        return "resize"
    if name in ("aten::to", "aten::_to_copy", "aten::copy_", "aten::type_as"):
        return "cast" if changes_dtype(e) else ("copy" if moves_data(e) else "view")
    if name in _COPIES:
        return "copy" if moves_data(e) else "view"
    if name in VIEWS:
        return "view"
    if name.startswith(_ELEMENTWISE_PREFIXES):
        return elementwise_category(stage)
    return "other"


def _is_attention_matmul(e: Event, stage: str | None) -> bool:
    """The reference attention's batched (B, H, N, D) matmuls, seen outside the attention op's
    label (4-D by 4-D in a ViT)."""
    shapes = [s for s in e.shapes[:2] if isinstance(s, list)]
    return stage in VIT_STAGES and len(shapes) == 2 and all(len(s) == 4 for s in shapes)

