"""Plain numpy references for quantize / dequantize (Q/DQ) in INT8 and FP8 e4m3.

Symmetric quantization with a zero point of 0, per tensor (axis=None, one scale) or per
channel (one scale per index along `axis`), as TensorRT's IQuantizeLayer and
IDequantizeLayer define it: q = saturate(round_half_even(x / scale)), x' = q · scale.
x / scale is evaluated in the floating type of x and scale (at least float32); pass
float32 to mirror a float32 TensorRT network.
"""

import ml_dtypes
import numpy as np

INT8_MIN, INT8_MAX = -128, 127
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn: 1.75 · 2^8


def _scale_for(scale, ndim, axis):
    """The scale shaped to broadcast against an ndim-array: a scalar, or [C] placed on `axis`."""
    scale = np.asarray(scale, dtype=np.result_type(scale, np.float32))
    if axis is None:
        if scale.size != 1:
            raise ValueError(f"per-tensor Q/DQ needs one scale, got shape {scale.shape}; pass axis for per-channel")
        return scale.reshape(())
    if scale.ndim != 1:
        raise ValueError(f"per-channel Q/DQ needs a 1-D scale, got shape {scale.shape}")
    shape = [1] * ndim
    shape[axis] = scale.size
    return scale.reshape(shape)


def quantize_int8(x, scale, axis=None):
    """INT8 quantization: q = clip(round_half_even(x / scale), −128, 127) as int8.

    x: any shape; scale: scalar (axis=None) or [x.shape[axis]].
    """
    x = np.asarray(x)
    s = _scale_for(scale, x.ndim, axis)
    # np.rint rounds halves to the even neighbour (IEEE roundTiesToEven), as TensorRT does.
    return np.clip(np.rint(x / s), INT8_MIN, INT8_MAX).astype(np.int8)


def quantize_fp8_e4m3(x, scale, axis=None):
    """FP8 e4m3 quantization: q = e4m3(clip(x / scale, −448, 448)), an ml_dtypes.float8_e4m3fn array.

    The cast rounds to the nearest e4m3 value, ties to even; clipping first saturates
    what would otherwise become NaN (e4m3fn has no infinity).
    x: any shape; scale: scalar (axis=None) or [x.shape[axis]].
    """
    x = np.asarray(x)
    s = _scale_for(scale, x.ndim, axis)
    return np.clip(x / s, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)


def dequantize(q, scale, axis=None):
    """Dequantization: x' = q · scale, in the scale's floating type (float32 for a Python float).

    q: int8 or float8_e4m3fn array; scale: scalar (axis=None) or [q.shape[axis]].
    """
    q = np.asarray(q)
    s = _scale_for(scale, q.ndim, axis)
    return q.astype(s.dtype) * s


def fake_quant(x, amax, kind="int8", axis=None):
    """Quantize then dequantize with scale = amax / 127 (kind="int8") or amax / 448 (kind="fp8").

    x: any shape; amax: scalar (axis=None) or [x.shape[axis]]. Returns x's floating type
    (at least float32): the value the next layer sees after a Q/DQ pair.
    """
    x = np.asarray(x)
    amax = np.asarray(amax, dtype=np.result_type(x, amax, np.float32))
    if kind == "int8":
        scale = amax / INT8_MAX
        q = quantize_int8(x, scale, axis)
    elif kind == "fp8":
        scale = amax / FP8_E4M3_MAX
        q = quantize_fp8_e4m3(x, scale, axis)
    else:
        raise ValueError(f"fake_quant: kind must be 'int8' or 'fp8', got {kind!r}")
    return dequantize(q, scale, axis)
