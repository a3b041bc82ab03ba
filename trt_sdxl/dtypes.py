"""The one table between TensorRT data types and numpy dtypes (by TensorRT's DataType name).

Used wherever a network's tensor types meet numpy: the layer helpers (numpy -> TensorRT),
netexec and the engine runtime (TensorRT -> numpy). bfloat16 and FP8 e4m3 are ml_dtypes' types.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from . import backend

# TensorRT DataType name -> numpy dtype of the values it stores
NUMPY = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "FP8": np.dtype(ml_dtypes.float8_e4m3fn),
    "INT8": np.dtype(np.int8),
    "UINT8": np.dtype(np.uint8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in NUMPY.items()}


def to_numpy(trt_dtype) -> np.dtype | None:
    """numpy dtype of a TensorRT DataType (None where numpy has none, e.g. INT4)."""
    return NUMPY.get(trt_dtype.name)


def to_trt(np_dtype):
    """The TensorRT DataType of the installed backend for a numpy dtype."""
    name = _NAMES.get(np.dtype(np_dtype))
    if name is None:
        raise TypeError(f"numpy dtype {np.dtype(np_dtype)} has no TensorRT data type")
    return getattr(backend.trt().DataType, name)


def name(np_dtype) -> str:
    """Lower-case TensorRT name of a numpy dtype, as manifests record it ('half', 'float', 'int32')."""
    return _NAMES[np.dtype(np_dtype)].lower()
