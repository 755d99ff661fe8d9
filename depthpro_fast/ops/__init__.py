"""The op boundary: every place where the fast path differs from plain PyTorch.

Each op lives in its own file with its pure-PyTorch reference, its input checks and its
dispatch to the implementations of the selected backend (see ``depthpro_fast.backends``).
"""

from .attention import attention, attention_reference
from .bias_gelu import bias_gelu, bias_gelu_reference
from .bias_gelu_fp8 import bias_gelu_fp8, bias_gelu_fp8_reference
from .bias_relu import bias_relu, bias_relu_reference
from .bias_residual import bias_residual, bias_residual_reference
from .grouped_layer_norm import (
    grouped_add_layer_norm,
    grouped_add_layer_norm_reference,
    grouped_layer_norm,
    grouped_layer_norm_reference,
)
from .layer_norm import (
    add_layer_norm,
    add_layer_norm_reference,
    add_layer_norm_torch,
    layer_norm,
    layer_norm_reference,
)
from .layer_norm_fp8 import (
    add_layer_norm_fp8,
    add_layer_norm_fp8_reference,
    layer_norm_fp8,
    layer_norm_fp8_reference,
)
from .merge_patches import merge_patches, merge_patches_reference
from .quantize_fp8 import quantize_rows, quantize_rows_reference
from .residual_layerscale import residual_layerscale, residual_layerscale_reference
from .split_patches import split_patches, split_patches_reference
from .subpixel_tail import subpixel_tail, subpixel_tail_reference

__all__ = [
    "add_layer_norm",
    "add_layer_norm_fp8",
    "add_layer_norm_fp8_reference",
    "add_layer_norm_reference",
    "add_layer_norm_torch",
    "attention",
    "attention_reference",
    "bias_gelu",
    "bias_gelu_fp8",
    "bias_gelu_fp8_reference",
    "bias_gelu_reference",
    "bias_relu",
    "bias_relu_reference",
    "bias_residual",
    "bias_residual_reference",
    "grouped_add_layer_norm",
    "grouped_add_layer_norm_reference",
    "grouped_layer_norm",
    "grouped_layer_norm_reference",
    "layer_norm",
    "layer_norm_fp8",
    "layer_norm_fp8_reference",
    "layer_norm_reference",
    "merge_patches",
    "merge_patches_reference",
    "quantize_rows",
    "quantize_rows_reference",
    "residual_layerscale",
    "residual_layerscale_reference",
    "split_patches",
    "split_patches_reference",
    "subpixel_tail",
    "subpixel_tail_reference",
]
