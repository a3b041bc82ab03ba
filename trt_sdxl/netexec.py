"""netexec: a numpy interpreter of a TensorRT INetworkDefinition, the numerical truth where no GPU runs.

`run(network, feeds)` evaluates a network definition layer by layer (verification ladder,
item 2, in DESIGN.md). Every attribute is read back from TensorRT (kernel, padding, axes,
permutations, types, Q/DQ axis and scale), never assumed, and evaluated with the semantics
of TensorRT's operator documentation. Tensors keep their declared types between layers:
an fp16 tensor is an np.float16 array, fp8 is ml_dtypes.float8_e4m3fn, so rounding happens
where TensorRT rounds. Arithmetic runs in float32, statistics in float64. A layer type or
attribute value netexec does not implement raises NotImplementedError: nothing passes
through silently.
"""

from __future__ import annotations

import functools
import math

import ml_dtypes
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import backend, dtypes

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn, 1.75 * 2^8
_FLOAT_DTYPES = frozenset(
    np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn)
)


def run(network, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Evaluate `network` on `feeds` (network input name -> array).

    Returns the marked outputs, or the tensors named in `outputs` (any tensor of the
    network), each as a numpy array of the tensor's declared type. Only the layers the
    requested tensors depend on are evaluated. To evaluate one network many times, make its
    `Program` once and call `Program.run`.
    """
    return Program(network, outputs).run(feeds)


class Program:
    """A network prepared once for many evaluations: which layers the requested tensors depend on,
    in what order, what each reads, each output's declared shape and type, and when each value can
    be dropped. A run then only computes; every layer's attributes (weights included) are still
    read from TensorRT at each run, so the network stays the one truth."""

    def __init__(self, network, outputs: list[str] | None = None):
        trt = backend.trt()
        self.network = network
        self.inputs = []
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            self.inputs.append((tensor.name, tuple(tensor.shape), _np_dtype(tensor.dtype, tensor.name)))
        available = {name: None for name, _, _ in self.inputs}
        layers = [network.get_layer(i) for i in range(network.num_layers)]
        producer = {}
        for index, layer in enumerate(layers):
            for j in range(layer.num_outputs):
                name = layer.get_output(j).name
                if name in producer or name in available:
                    raise ValueError(f"netexec: two tensors are named {name!r}; tensors are identified by name")
                producer[name] = index
        self.targets = list(outputs) if outputs is not None else [
            network.get_output(i).name for i in range(network.num_outputs)]
        for name in self.targets:
            if name not in producer and name not in available:
                raise ValueError(f"netexec: the network has no tensor named {name!r}")
        reads: dict[int, list] = {}
        order = _schedule(layers, producer, self.targets, available, reads, trt)
        # Drop each tensor after its last reader, so large networks fit in host memory.
        last_reader: dict[str, int] = {}
        for position, index in enumerate(order):
            for name in reads[index]:
                if name is not None:
                    last_reader[name] = position
        drops: dict[int, list[str]] = {}
        for name, position in last_reader.items():
            if name not in self.targets:
                drops.setdefault(position, []).append(name)
        self.steps = []
        for position, index in enumerate(order):
            layer = layers[index]
            kind = layer.type  # read first: IActivationLayer.type is the activation type
            entry = _dispatch().get(kind)
            if entry is None:
                raise NotImplementedError(
                    f"netexec: layer {layer.name!r} has type {kind.name}, which is not implemented")
            layer_class, evaluate = entry
            layer.__class__ = layer_class  # get_layer() returns a plain ILayer; the subclass exposes the attributes
            producer_name = f"{layer.name!r} ({kind.name})"
            declared = [_declared(layer.get_output(j), producer_name) for j in range(layer.num_outputs)]
            self.steps.append((layer, evaluate, reads[index], declared, producer_name, drops.get(position, ())))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = _validated_feeds(self.inputs, feeds)
        for layer, evaluate, reads, declared, producer, drops in self.steps:
            results = evaluate(layer, [values[name] if name is not None else None for name in reads])
            for array, (name, shape, dtype) in zip(results, declared):
                values[name] = _to_declared(array, name, shape, dtype, producer)
            for name in drops:
                del values[name]
        missing = [name for name in self.targets if name not in values]
        if missing:
            raise ValueError(f"netexec: {missing} have no value of their own (internal to a fused attention)")
        return {name: values[name] for name in self.targets}


def _validated_feeds(inputs, feeds):
    """Feeds checked against the network inputs (rank, every fixed dim) and cast to the declared type."""
    values = {}
    for name, expected, dtype in inputs:
        what = f"network input {name!r} (shape {expected}, -1 = any; dtype {dtype.name})"
        if name not in feeds:
            raise ValueError(f"netexec: no feed for {what}")
        array = np.asarray(feeds[name])
        if array.ndim != len(expected) or any(e not in (-1, a) for e, a in zip(expected, array.shape)):
            raise ValueError(f"netexec: feed for {what} has shape {array.shape}")
        values[name] = array.astype(dtype, copy=False)
    unknown = sorted(set(feeds) - set(values))
    if unknown:
        raise ValueError(f"netexec: feeds {unknown} are not inputs of the network (inputs: {sorted(values)})")
    return values


def _schedule(layers, producer, targets, available, reads, trt):
    """Indices of the layers the targets depend on, each after the layers it reads from.

    Creation order is not enough: `set_input` and the attention's late-set mask/scale can
    point a layer at a tensor created after it.
    """
    order, state = [], {}
    stack = [(producer[name], False) for name in reversed(targets) if name not in available]
    while stack:
        index, expanded = stack.pop()
        if expanded:
            state[index] = "done"
            order.append(index)
            continue
        if state.get(index) == "done":
            continue
        if state.get(index) == "open":
            raise ValueError(f"netexec: layer {layers[index].name!r} depends on its own output")
        state[index] = "open"
        stack.append((index, True))
        reads[index] = _input_names(layers[index], trt)
        for name in reversed(reads[index]):
            if name is None or name in available:
                continue
            if name not in producer:
                raise ValueError(f"netexec: layer {layers[index].name!r} reads {name!r}, which nothing produces")
            if state.get(producer[name]) != "done":
                stack.append((producer[name], False))
    return order


def _input_names(layer, trt):
    """Names of the tensors a layer's evaluation reads (None for an unset optional input)."""
    kind = layer.type.name
    if kind == "ATTENTION_INPUT":
        return []
    if kind == "ATTENTION_OUTPUT":
        # The whole IAttention is evaluated here; its inputs are read from the IAttention itself.
        layer.__class__ = trt.IAttentionBoundaryLayer
        att = layer.attention
        tensors = [att.get_input(0), att.get_input(1), att.get_input(2), att.mask, att.normalization_quantize_scale]
    else:
        tensors = [layer.get_input(i) for i in range(layer.num_inputs)]
    return [t.name if t is not None else None for t in tensors]


def _declared(tensor, producer: str) -> tuple[str, tuple[int, ...], np.dtype]:
    """(name, shape, numpy dtype) TensorRT infers for a layer's output."""
    try:
        shape, trt_dtype = tuple(tensor.shape), tensor.dtype
    except RuntimeError as error:
        raise ValueError(
            f"netexec: TensorRT cannot infer {tensor.name!r}, the output of layer {producer}: the network "
            f"is invalid there (TensorRT's log above says why)"
        ) from error
    return tensor.name, shape, _np_dtype(trt_dtype, tensor.name)


def _to_declared(array, name: str, declared: tuple[int, ...], dtype: np.dtype, producer: str):
    """`array` in the tensor's declared type, after checking its shape against TensorRT's inference."""
    array = np.asarray(array)
    if array.dtype != dtype:
        array = array.astype(dtype)
    if array.ndim != len(declared) or any(d not in (-1, a) for d, a in zip(declared, array.shape)):
        raise RuntimeError(f"netexec: layer {producer} computed shape {array.shape} for {name!r}, TensorRT "
                           f"declares {declared}")
    return array


def _np_dtype(trt_dtype, what) -> np.dtype:
    dtype = dtypes.to_numpy(trt_dtype)
    if dtype is None:
        raise NotImplementedError(f"netexec: {what!r} has type {trt_dtype.name}, which is not implemented")
    return dtype


def _is_float(array) -> bool:
    return array.dtype in _FLOAT_DTYPES


def _f32(array):
    return array.astype(np.float32, copy=False)


def _optional(inputs, index):
    return inputs[index] if index < len(inputs) else None


def _unsupported(layer, what):
    return NotImplementedError(f"netexec: layer {layer.name!r}: {what} is not implemented")


def _axes_from_mask(mask: int, ndim: int) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if mask >> a & 1)


def _same_rank(layer, arrays):
    """TensorRT broadcasts only between tensors of equal rank (dims of length 1 stretch)."""
    ranks = {a.ndim for a in arrays}
    if len(ranks) > 1:
        raise ValueError(
            f"netexec: layer {layer.name!r} has inputs of ranks {sorted(ranks)}; TensorRT needs equal ranks"
        )


def _weights_array(layer, weights, what):
    """A numpy view of weights read back from TensorRT."""
    if isinstance(weights, np.ndarray):
        return weights
    # The Python API hands bf16/fp8/int4 weights back as a Weights object whose numpy() returns itself.
    array = weights.numpy()
    if not isinstance(array, np.ndarray):
        raise _unsupported(layer, f"reading {what} of type {weights.dtype.name} back from TensorRT")
    return array


def _erf(x):
    # numpy has no erf; math.erf is exact to double precision.
    return np.vectorize(math.erf, otypes=[np.float64])(x)


# ---- layers -------------------------------------------------------------------------------------


def _constant(layer, inputs):
    return [_weights_array(layer, layer.weights, "constant weights").reshape(tuple(layer.shape))]


def _shape(layer, inputs):
    """The input's dimensions as an int64 [rank] tensor (TensorRT Shape)."""
    return [np.asarray(inputs[0].shape, np.int64)]


def _identity(layer, inputs):
    return [inputs[0]]


def _convolution(layer, inputs):
    """Cross-correlation over the trailing spatial dims, groups splitting C and K (TensorRT Convolution)."""
    trt = backend.trt()
    if layer.padding_mode != trt.PaddingMode.EXPLICIT_ROUND_DOWN:
        raise _unsupported(layer, f"padding mode {layer.padding_mode.name}")
    x = _f32(inputs[0])
    size, groups, maps = tuple(layer.kernel_size_nd), layer.num_groups, layer.num_output_maps
    stride, dilation = tuple(layer.stride_nd), tuple(layer.dilation_nd)
    pre, post = tuple(layer.pre_padding), tuple(layer.post_padding)
    if min(pre + post) < 0:
        raise _unsupported(layer, f"negative padding {pre}/{post}")
    n, c = x.shape[:2]
    kernel = _optional(inputs, 1)
    if kernel is None:
        kernel = _weights_array(layer, layer.kernel, "kernel")
    kernel = _f32(kernel).reshape((maps, c // groups) + size)  # [K, C/G, *k]
    bias = _optional(inputs, 2)
    if bias is None:
        bias = _weights_array(layer, layer.bias, "bias")
    nsp = len(size)
    x = np.pad(x, [(0, 0), (0, 0)] + list(zip(pre, post)))
    span = tuple(d * (k - 1) + 1 for k, d in zip(size, dilation))
    windows = sliding_window_view(x, span, axis=tuple(range(2, 2 + nsp)))  # [N, C, *O', *span]
    picks = tuple(slice(None, None, s) for s in stride) + tuple(slice(None, None, d) for d in dilation)
    windows = windows[(slice(None), slice(None)) + picks]  # [N, C, *O, *k]
    out_spatial = windows.shape[2 : 2 + nsp]
    cg, kg = c // groups, maps // groups
    out = np.empty((n, maps) + out_spatial, np.float32)
    window_axes = [1] + list(range(2 + nsp, 2 + 2 * nsp))
    kernel_axes = [1] + list(range(2, 2 + nsp))
    for g in range(groups):
        # tensordot copies the windows into an im2col matrix and runs one float32 GEMM.
        group_windows, group_kernel = windows[:, g * cg : (g + 1) * cg], kernel[g * kg : (g + 1) * kg]
        part = np.tensordot(group_windows, group_kernel, (window_axes, kernel_axes))
        out[:, g * kg : (g + 1) * kg] = np.moveaxis(part, -1, 1)  # [N, *O, K/G] -> [N, K/G, *O]
    if bias.size:
        out += _f32(bias).reshape((1, maps) + (1,) * nsp)
    return [out]


def _matrix_multiply(layer, inputs):
    """Batched matmul over the last two dims; batch dims broadcast (TensorRT MatrixMultiply)."""
    ops = (layer.op0.name, layer.op1.name)
    a, b = _f32(inputs[0]), _f32(inputs[1])
    if "VECTOR" not in ops:
        _same_rank(layer, (a, b))
    if ops[0] == "TRANSPOSE":
        a = np.swapaxes(a, -1, -2)
    if ops[1] == "TRANSPOSE":
        b = np.swapaxes(b, -1, -2)
    if ops[0] == "VECTOR":
        a = a[..., None, :]
    if ops[1] == "VECTOR":
        b = b[..., :, None]
    c = np.matmul(a, b)
    if ops[1] == "VECTOR":
        c = c[..., 0]
    if ops[0] == "VECTOR":
        c = c[..., 0] if ops[1] == "VECTOR" else c[..., 0, :]
    return [c]


def _int_divide(a, b):
    # Integer DIV truncates toward zero, as integer division does in CUDA C.
    q = np.floor_divide(a, b)
    return q + ((q < 0) & (q * b != a))


_ELEMENTWISE = {
    "SUM": np.add,
    "PROD": np.multiply,
    "MAX": np.maximum,
    "MIN": np.minimum,
    "SUB": np.subtract,
    "DIV": np.divide,
    "POW": np.power,
    "FLOOR_DIV": np.floor_divide,
    "AND": np.logical_and,
    "OR": np.logical_or,
    "XOR": np.logical_xor,
    "EQUAL": np.equal,
    "GREATER": np.greater,
    "LESS": np.less,
}


def _elementwise(layer, inputs):
    a, b = inputs
    _same_rank(layer, (a, b))
    op = layer.op.name
    fn = _ELEMENTWISE.get(op)
    if fn is None:
        raise _unsupported(layer, f"elementwise operation {op}")
    if _is_float(a):
        return [fn(_f32(a), _f32(b))]
    if op == "DIV":
        fn = _int_divide
    return [fn(a, b)]


_UNARY = {
    "EXP": np.exp,
    "LOG": np.log,
    "SQRT": np.sqrt,
    "RECIP": np.reciprocal,
    "ABS": np.abs,
    "NEG": np.negative,
    "SIN": np.sin,
    "COS": np.cos,
    "TAN": np.tan,
    "SINH": np.sinh,
    "COSH": np.cosh,
    "ASIN": np.arcsin,
    "ACOS": np.arccos,
    "ATAN": np.arctan,
    "ASINH": np.arcsinh,
    "ACOSH": np.arccosh,
    "ATANH": np.arctanh,
    "CEIL": np.ceil,
    "FLOOR": np.floor,
    "ERF": _erf,
    "NOT": np.logical_not,
    "SIGN": np.sign,
    "ROUND": np.rint,  # TensorRT kROUND rounds halves to even
    "ISINF": np.isinf,
    "ISNAN": np.isnan,
}


def _unary(layer, inputs):
    x = inputs[0]
    op = layer.op.name
    fn = _UNARY.get(op)
    if fn is None:
        raise _unsupported(layer, f"unary operation {op}")
    return [fn(_f32(x) if _is_float(x) else x)]


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + e^-x), without overflow for large |x|


# Formulas of TensorRT's Activation operator documentation; a = alpha, b = beta.
# THRESHOLDED_RELU is left out: the documentation's max(0, x - alpha) is not the usual definition.
_ACTIVATION = {
    "RELU": lambda x, a, b: np.maximum(x, 0),
    "SIGMOID": lambda x, a, b: _sigmoid(x),
    "TANH": lambda x, a, b: np.tanh(x),
    "LEAKY_RELU": lambda x, a, b: np.where(x >= 0, x, a * x),
    "ELU": lambda x, a, b: np.where(x >= 0, x, a * np.expm1(x)),
    "SELU": lambda x, a, b: np.where(x >= 0, b * x, b * a * np.expm1(x)),
    "SOFTSIGN": lambda x, a, b: x / (1 + np.abs(x)),
    "SOFTPLUS": lambda x, a, b: a * np.logaddexp(b * x, 0),
    "CLIP": lambda x, a, b: np.clip(x, a, b),
    "HARD_SIGMOID": lambda x, a, b: np.clip(a * x + b, 0, 1),
    "SCALED_TANH": lambda x, a, b: a * np.tanh(b * x),
    "GELU_ERF": lambda x, a, b: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
    "GELU_TANH": lambda x, a, b: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
}


@functools.lru_cache(maxsize=None)
def _fp16_activation_table(kind: str, alpha: float, beta: float) -> np.ndarray:
    """`kind` evaluated, as _activation does, on every one of the 65536 fp16 values (by bit pattern)."""
    every = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):
        return _ACTIVATION[kind](every, np.float32(alpha), np.float32(beta))


def _activation(layer, inputs):
    kind = layer.type.name  # IActivationLayer.type is the ActivationType
    fn = _ACTIVATION.get(kind)
    if fn is None:
        raise _unsupported(layer, f"activation {kind}")
    x = inputs[0]
    if kind == "GELU_ERF" and x.dtype == np.float16:
        # elementwise and deterministic: a lookup gives the very same values, without an erf per element
        return [_fp16_activation_table(kind, float(layer.alpha), float(layer.beta))[x.view(np.uint16)]]
    x = _f32(x) if _is_float(x) else x
    return [fn(x, np.float32(layer.alpha), np.float32(layer.beta))]


def _permutation(layer, perm, ndim):
    perm = tuple(perm)[:ndim]
    if sorted(perm) != list(range(ndim)):
        raise ValueError(f"netexec: layer {layer.name!r} has transpose {perm}, not a permutation of {ndim} dims")
    return perm


def _shuffle(layer, inputs):
    """first_transpose, reshape, second_transpose (TensorRT Shuffle).

    In the reshape 0 copies the input dim when zero_is_placeholder, and -1 is inferred.
    """
    x = inputs[0].transpose(_permutation(layer, layer.first_transpose, inputs[0].ndim))
    dims_tensor = _optional(inputs, 1)
    dims = tuple(int(d) for d in dims_tensor) if dims_tensor is not None else layer.reshape_dims
    if dims is not None:
        if layer.zero_is_placeholder:
            dims = tuple(x.shape[i] if d == 0 else d for i, d in enumerate(dims))
        x = x.reshape(dims)
    return [x.transpose(_permutation(layer, layer.second_transpose, x.ndim))]


def _concatenation(layer, inputs):
    _same_rank(layer, inputs)
    return [np.concatenate(inputs, axis=layer.axis % inputs[0].ndim)]


def _slice(layer, inputs):
    """out[i] = x[start + i * stride] per dim, strictly in bounds (TensorRT Slice, mode STRICT_BOUNDS)."""
    if layer.mode.name != "STRICT_BOUNDS":
        raise _unsupported(layer, f"slice mode {layer.mode.name}")
    if _optional(inputs, 4) is not None or _optional(inputs, 5) is not None or layer.axes is not None:
        raise _unsupported(layer, "a fill value or slice axes")
    x = inputs[0]
    start, shape, stride = (
        tuple(int(v) for v in inputs[i]) if _optional(inputs, i) is not None else tuple(attr)
        for i, attr in ((1, layer.start), (2, layer.shape), (3, layer.stride))
    )
    indices = []
    for axis, (s, n, st) in enumerate(zip(start, shape, stride)):
        idx = s + st * np.arange(n)
        if n and (idx.min() < 0 or idx.max() >= x.shape[axis]):
            raise ValueError(f"netexec: layer {layer.name!r} slices out of bounds on axis {axis} (dim {x.shape[axis]})")
        indices.append(idx)
    return [x[np.ix_(*indices)]]


def _softmax(layer, inputs):
    x = _f32(inputs[0])
    axes = _axes_from_mask(layer.axes, x.ndim)
    e = np.exp(x - x.max(axis=axes, keepdims=True))
    return [e / e.sum(axis=axes, keepdims=True)]


_REDUCE = {"SUM": np.sum, "PROD": np.prod, "MAX": np.max, "MIN": np.min, "AVG": np.mean}


def _reduce(layer, inputs):
    x = inputs[0]
    op = layer.op.name
    fn = _REDUCE.get(op)
    if fn is None:
        raise _unsupported(layer, f"reduce operation {op}")
    axes = _axes_from_mask(layer.axes, x.ndim)
    if _is_float(x):
        x = x.astype(np.float64)  # accumulate in float64; rounded to the declared type afterwards
    return [fn(x, axis=axes, keepdims=layer.keep_dims)]


def _normalization(layer, inputs):
    """Y = (X - mean) / sqrt(var + eps) * S + B over `axes`; with G groups the channel axis 1 splits in G.

    GroupNorm scale/bias are per channel [1, C, 1, ..] (add_normalization_v2) or per group
    [1, G, 1, ..] (legacy add_normalization); the scale's shape tells which.
    """
    x, scale, bias = (a.astype(np.float64) for a in inputs[:3])
    axes, groups, eps = _axes_from_mask(layer.axes, x.ndim), layer.num_groups, layer.epsilon
    if groups == 1:
        mean = x.mean(axis=axes, keepdims=True)
        var = np.square(x - mean).mean(axis=axes, keepdims=True)
        y = (x - mean) / np.sqrt(var + eps)
    else:
        n, c = x.shape[:2]
        if 0 in axes or 1 in axes or c % groups:
            raise _unsupported(layer, f"{groups} groups of {c} channels over axes {axes}")
        xg = x.reshape((n, groups, c // groups) + x.shape[2:])
        reduced = (2,) + tuple(a + 1 for a in axes)
        mean = xg.mean(axis=reduced, keepdims=True)
        var = np.square(xg - mean).mean(axis=reduced, keepdims=True)
        y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
        if scale.ndim == x.ndim and scale.shape[1] == groups != c:
            scale, bias = (np.repeat(t, c // groups, axis=1) for t in (scale, bias))
    return [y * scale + bias]


def _cast(layer, inputs):
    """Float to integer truncates toward zero (TensorRT Cast example: 5.6 -> 5); to bool is x != 0."""
    x = inputs[0]
    to = _np_dtype(layer.to_type, layer.get_output(0).name)
    if to == np.bool_:
        return [_f32(x) != 0 if _is_float(x) else x != 0]
    if _is_float(x) and to not in _FLOAT_DTYPES:
        return [np.trunc(_f32(x)).astype(to)]
    return [x.astype(to)]


def _resize_coordinates(layer, out_len, in_len):
    """Source coordinate of each output index (TensorRT Resize coordinate_transformation)."""
    trt = backend.trt()
    dst = np.arange(out_len, dtype=np.float64)
    transform = layer.coordinate_transformation
    if out_len == 1 and layer.selector_for_single_pixel == trt.ResizeSelector.UPPER:
        return np.zeros(1)
    if transform == trt.ResizeCoordinateTransformation.ALIGN_CORNERS:
        return dst * ((in_len - 1) / (out_len - 1)) if out_len > 1 else np.zeros(1)
    if transform == trt.ResizeCoordinateTransformation.ASYMMETRIC:
        return dst * (in_len / out_len)
    if transform == trt.ResizeCoordinateTransformation.HALF_PIXEL:
        return (dst + 0.5) * (in_len / out_len) - 0.5
    raise _unsupported(layer, f"coordinate transformation {transform.name}")


_NEAREST_ROUNDING = {
    "HALF_UP": lambda c: np.floor(c + 0.5),
    "HALF_DOWN": lambda c: np.ceil(c - 0.5),
    "FLOOR": np.floor,
    "CEIL": np.ceil,
}


def _resize(layer, inputs):
    """Nearest or (multi)linear resize, separable over the dims whose length changes (TensorRT Resize)."""
    x = inputs[0]
    mode = layer.resize_mode.name
    if mode not in ("NEAREST", "LINEAR"):
        raise _unsupported(layer, f"resize mode {mode}")
    target = _optional(inputs, 1)
    if target is not None:
        out_shape = tuple(int(d) for d in target) if not _is_float(target) else None
        scales = tuple(float(s) for s in target) if _is_float(target) else None
    else:
        out_shape, scales = layer.shape, tuple(layer.scales) or None
    if out_shape is None:
        # Output dims are floor(input dim * scale).
        out_shape = tuple(int(math.floor(d * s)) for d, s in zip(x.shape, scales))
    out_shape = tuple(out_shape)
    if len(out_shape) != x.ndim:
        raise ValueError(f"netexec: layer {layer.name!r} resizes rank {x.ndim} to {out_shape}")
    y = x if mode == "NEAREST" else _f32(x)
    for axis, (in_len, out_len) in enumerate(zip(x.shape, out_shape)):
        if in_len == out_len:
            continue
        coords = _resize_coordinates(layer, out_len, in_len)
        if mode == "NEAREST":
            rounding = _NEAREST_ROUNDING.get(layer.nearest_rounding.name)
            if rounding is None:
                raise _unsupported(layer, f"nearest rounding {layer.nearest_rounding.name}")
            idx = np.clip(rounding(coords), 0, in_len - 1).astype(np.int64)
            y = np.take(y, idx, axis=axis)
        else:
            coords = np.clip(coords, 0, in_len - 1)
            lo = np.floor(coords).astype(np.int64)
            hi = np.minimum(lo + 1, in_len - 1)
            w = (coords - lo).astype(np.float32).reshape((-1,) + (1,) * (x.ndim - axis - 1))
            y = np.take(y, lo, axis=axis) * (1 - w) + np.take(y, hi, axis=axis) * w
    return [y]


def _qdq_scale(layer, x, scale, zero_point):
    """The scale as float32, shaped to broadcast: per tensor (one value) or per channel along `layer.axis`."""
    if zero_point is not None and np.any(_f32(zero_point) != 0):
        raise _unsupported(layer, "a non-zero zero point")
    scale = _f32(scale)
    if scale.size == 1:
        return scale.reshape(())
    if scale.ndim != 1:
        raise _unsupported(layer, f"block quantization (scale shape {scale.shape})")
    axis = layer.axis % x.ndim
    if scale.shape[0] != x.shape[axis]:
        raise ValueError(f"netexec: layer {layer.name!r}: {scale.shape[0]} scales for axis {axis} of shape {x.shape}")
    shape = [1] * x.ndim
    shape[axis] = -1
    return scale.reshape(shape)


def _quantize_values(layer, x, scale, to):
    """TensorRT Quantize: INT8 q = clamp(round_half_even(x / s), -128, 127); FP8 q = e4m3(clamp(x / s, ±448))."""
    scaled = _f32(x) / scale
    if to == np.int8:
        return np.clip(np.rint(scaled), -128, 127).astype(np.int8)
    if to == ml_dtypes.float8_e4m3fn:
        # The ml_dtypes cast rounds to nearest even; clipping first saturates instead of giving NaN.
        return np.clip(scaled, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    raise _unsupported(layer, f"quantizing to {np.dtype(to).name}")


def _quantize(layer, inputs):
    x = inputs[0]
    scale = _qdq_scale(layer, x, inputs[1], _optional(inputs, 2))
    return [_quantize_values(layer, x, scale, _np_dtype(layer.to_type, layer.get_output(0).name))]


def _dequantize(layer, inputs):
    """TensorRT Dequantize: x = q * scale, rounded to the output type."""
    q = inputs[0]
    return [_f32(q) * _qdq_scale(layer, q, inputs[1], _optional(inputs, 2))]


def _gather(layer, inputs):
    """Default mode: out = data indexed by `indices` along `axis` (an embedding lookup for axis 0).

    With one elementwise dim the leading axis is a batch: out[b] = data[b] indexed by indices[b]
    along `axis` (e.g. one token per sequence: data [B, S, C], indices [B, 1], axis 1 -> [B, 1, C]).
    """
    elementwise = layer.num_elementwise_dims
    if layer.mode.name != "DEFAULT" or elementwise not in (0, 1):
        raise _unsupported(layer, f"gather mode {layer.mode.name} with {elementwise} elementwise dims")
    data, indices = inputs
    axis = layer.axis % data.ndim
    if indices.size and (indices.min() < 0 or indices.max() >= data.shape[axis]):
        raise ValueError(f"netexec: layer {layer.name!r} gathers indices outside [0, {data.shape[axis]})")
    indices = indices.astype(np.int64)
    if elementwise == 0:
        return [np.take(data, indices, axis=axis)]
    if axis == 0 or indices.ndim == 0 or data.shape[0] != indices.shape[0]:
        raise _unsupported(layer, f"an elementwise gather on axis {axis} of {data.shape} by indices {indices.shape}")
    return [np.stack([np.take(data[b], indices[b], axis=axis - 1) for b in range(data.shape[0])])]


def _topk(layer, inputs):
    """The k largest (MAX) or smallest (MIN) values along one axis, in order, and their indices.

    Ties go to the lower index. TensorRT leaves the order of ties open, so a network must not
    depend on it (CLIP's pooling breaks ties itself before its TopK).
    """
    if _optional(inputs, 1) is not None:
        raise _unsupported(layer, "k from a tensor")
    x = inputs[0]
    axes = _axes_from_mask(layer.axes, x.ndim)
    if len(axes) != 1:
        raise _unsupported(layer, f"top-k over axes {axes}")
    axis, k = axes[0], layer.k
    key = x.astype(np.float64) if _is_float(x) else x.astype(np.int64)
    order = np.argsort(-key if layer.op.name == "MAX" else key, axis=axis, kind="stable")
    indices = np.take(order, np.arange(k), axis=axis)
    return [np.take_along_axis(x, indices, axis=axis), indices]


def _select(layer, inputs):
    condition, then, otherwise = inputs
    _same_rank(layer, inputs)
    return [np.where(condition, then, otherwise)]


def _squeeze(layer, inputs):
    x, axes = inputs
    return [np.squeeze(x, axis=tuple(int(a) % x.ndim for a in axes))]


def _unsqueeze(layer, inputs):
    x, axes = inputs
    rank = x.ndim + axes.size
    return [np.expand_dims(x, tuple(int(a) % rank for a in axes))]


def _attention_input(layer, inputs):
    return []  # a boundary marker; the attention is evaluated at its ATTENTION_OUTPUT layer


def _attention(layer, inputs):
    """out = norm(Q K^T [+ mask]) V with no 1/sqrt(d) (the caller pre-scales Q); Q, K, V are [B, N, S, H].

    Scores and softmax in float32; the probabilities are rounded to the input type (or
    Q/DQ'd with the normalization-quantize scale) before BMM2, as the fused kernel feeds them.
    """
    trt = backend.trt()
    att = layer.attention
    q, k, v, mask, quantize_scale = inputs
    if hasattr(att, "query_form"):  # TensorRT 11 / TensorRT-RTX 1.7: packed layouts, per-batch lengths
        if "PACKED_NHD" in (att.query_form.name, att.key_value_form.name) or att.key_value_lengths is not None:
            raise _unsupported(layer, "packed attention layouts or key/value lengths")
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:
        if heads % kv_heads:
            raise ValueError(f"netexec: layer {layer.name!r}: {heads} query heads for {kv_heads} key/value heads")
        # Group-query attention: query head h uses key/value head h // (heads / kv_heads).
        k, v = (np.repeat(t, heads // kv_heads, axis=1) for t in (k, v))
    scores = np.matmul(_f32(q), np.swapaxes(_f32(k), -1, -2))  # [B, N, Sq, Skv]
    sq, skv = scores.shape[-2:]
    # causal_kind (TensorRT 11 / TensorRT-RTX 1.7) supersedes the boolean causal, which meant UPPER_LEFT.
    causal = att.causal_kind.name if hasattr(att, "causal_kind") else ("UPPER_LEFT" if att.causal else "NONE")
    if causal != "NONE":
        # UPPER_LEFT: query i sees keys j <= i; LOWER_RIGHT aligns the last query with the last key.
        offset = 0 if causal == "UPPER_LEFT" else skv - sq
        scores = np.where(np.tri(sq, skv, offset, dtype=bool), scores, -np.inf)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + _f32(mask)
    if att.norm_op == trt.AttentionNormalizationOp.SOFTMAX:
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = e / e.sum(axis=-1, keepdims=True)
    elif causal == "NONE" and mask is None:
        probs = scores
    else:
        raise _unsupported(layer, "masking without softmax normalization")
    if quantize_scale is not None:
        to = _np_dtype(att.normalization_quantize_to_type, "normalization quantize")
        s = _f32(quantize_scale).reshape(())
        probs = _f32(_quantize_values(layer, probs, s, to)) * s
    else:
        probs = _f32(probs.astype(q.dtype))
    return [np.matmul(probs, _f32(v))]


@functools.lru_cache(maxsize=None)
def _dispatch():
    """trt.LayerType -> (the ILayer subclass exposing its attributes, its evaluation)."""
    trt = backend.trt()
    kinds = trt.LayerType
    table = {
        kinds.CONSTANT: (trt.IConstantLayer, _constant),
        kinds.IDENTITY: (trt.IIdentityLayer, _identity),
        kinds.SHAPE: (trt.IShapeLayer, _shape),
        kinds.CONVOLUTION: (trt.IConvolutionLayer, _convolution),
        kinds.MATRIX_MULTIPLY: (trt.IMatrixMultiplyLayer, _matrix_multiply),
        kinds.ELEMENTWISE: (trt.IElementWiseLayer, _elementwise),
        kinds.UNARY: (trt.IUnaryLayer, _unary),
        kinds.ACTIVATION: (trt.IActivationLayer, _activation),
        kinds.SHUFFLE: (trt.IShuffleLayer, _shuffle),
        kinds.CONCATENATION: (trt.IConcatenationLayer, _concatenation),
        kinds.SLICE: (trt.ISliceLayer, _slice),
        kinds.SOFTMAX: (trt.ISoftMaxLayer, _softmax),
        kinds.REDUCE: (trt.IReduceLayer, _reduce),
        kinds.NORMALIZATION: (trt.INormalizationLayer, _normalization),
        kinds.CAST: (trt.ICastLayer, _cast),
        kinds.RESIZE: (trt.IResizeLayer, _resize),
        kinds.QUANTIZE: (trt.IQuantizeLayer, _quantize),
        kinds.DEQUANTIZE: (trt.IDequantizeLayer, _dequantize),
        kinds.GATHER: (trt.IGatherLayer, _gather),
        kinds.TOPK: (trt.ITopKLayer, _topk),
        kinds.SELECT: (trt.ISelectLayer, _select),
        kinds.SQUEEZE: (trt.ISqueezeLayer, _squeeze),
        kinds.UNSQUEEZE: (trt.IUnsqueezeLayer, _unsqueeze),
    }
    if backend.get().has_attention_layer:
        table[kinds.ATTENTION_INPUT] = (trt.IAttentionBoundaryLayer, _attention_input)
        table[kinds.ATTENTION_OUTPUT] = (trt.IAttentionBoundaryLayer, _attention)
    return table
