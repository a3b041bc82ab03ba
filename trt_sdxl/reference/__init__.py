"""Per-layer numpy references, written from the math: the ground truth for netexec and the layer tests.

nn: convolution, linear, norms, activations, attention, upsampling, timestep embedding.
quant: INT8 and FP8 e4m3 quantize / dequantize.
"""

from .nn import (
    attention,
    conv2d,
    gelu,
    gelu_tanh,
    geglu,
    group_norm,
    layer_norm,
    linear,
    multi_head_attention,
    quick_gelu,
    sigmoid,
    silu,
    softmax,
    timestep_embedding,
    upsample_nearest2x,
)
from .quant import FP8_E4M3_MAX, dequantize, fake_quant, quantize_fp8_e4m3, quantize_int8

__all__ = [
    "FP8_E4M3_MAX",
    "attention",
    "conv2d",
    "dequantize",
    "fake_quant",
    "gelu",
    "gelu_tanh",
    "geglu",
    "group_norm",
    "layer_norm",
    "linear",
    "multi_head_attention",
    "quantize_fp8_e4m3",
    "quantize_int8",
    "quick_gelu",
    "sigmoid",
    "silu",
    "softmax",
    "timestep_embedding",
    "upsample_nearest2x",
]
