"""Free functions that add TensorRT layers to a network and return the output tensor.

Every model (UNet, text encoders, VAE) is written with these functions only, so that
weight binding, dtype handling, MAC accounting and all graph emission of quantization —
calibration taps, SmoothQuant's folds and explicit multiplies, Q/DQ — live in one place (as
`Definition.taps` / `.quant`, trt_sdxl.quant's plans, ask). A
function that reads weights takes the checkpoint path of its module
(`down_blocks.1.attentions.0.proj_in`) and binds `<path>.weight` / `<path>.bias` by name: a
missing or mis-shaped tensor is an error, never a silent skip.

Shapes: a network is defined at one concrete shape (its opt shape), so `shape(x)` is known at
definition time — for the channel counts the weights fix, and for MAC accounting (MACs are counted at
that shape) — and every attribute that depends on a batch, image or token dimension is written so it
holds for any shape: reshapes copy (0) or infer (-1) those dimensions, and where a dimension must be
rebuilt (the [B, HW, C] -> [B, C, H, W] reshape, a slice's size) it comes from a shape tensor of the
running tensor. `DefinedNetwork.set_profiles` then widens the inputs' dynamic axes to -1 and records
the optimization profiles; a network left as defined is a static one (a profile of one shape), and
gives the same numbers. Only the calibration taps, which sample positions of the defined shape, need
a static network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from . import backend, dtypes
from .errors import UserError
from .quant.plan import weight_scales
from .quant.recipe import QMAX

# numpy dtype of the tensors a network computes in, by precision name
COMPUTE_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}
# numpy dtype weights are bound in, where it differs from the compute dtype: TensorRT's Python API
# cannot hand bf16 weights back (`Weights.numpy()` fails), so netexec could not evaluate them; bf16
# networks bind float32 constants and cast them to bf16, a cast the builder folds into the weights.
WEIGHT_DTYPES = {"bf16": np.float32}


@dataclass
class MacRecord:
    """One multiply-accumulate heavy op (conv, linear, attention BMM) and its cost."""

    name: str
    kind: str  # "conv" | "linear" | "bmm"
    macs: int
    quantized: bool = False


# What a weight of the refit map is: a linear or convolution weight (what a LoRA changes), the quantization
# scale of an 8-bit one (recomputed from it), a bias, a norm's affine, an embedding table.
REFIT_ROLES = ("weight", "weight scale", "bias", "norm", "embedding")


@dataclass(frozen=True)
class RefitEntry:
    """How one weight of the network comes from the checkpoint (the refit map): tensor `key` read as
    `dtype` in its stored `shape`, times `scale` (in float32, then `dtype` again) where that is not 1,
    then through the quant plan where `transform` says so ("smoothed": a weight's SmoothQuant factor and
    row divisor, or a bias's row divisor; "norm fold": a norm affine's 1/s), reshaped to `bound_shape`.
    A "weight scale" entry is the quantization scale of the weight named `of`, computed from it.
    trt_sdxl.refit_map recomputes every entry this way (tests/test_refit_map.py)."""

    key: str
    dtype: str
    shape: tuple
    bound_shape: tuple
    scale: float = 1.0
    transform: str | None = None
    role: str = "weight"
    of: str | None = None


@dataclass
class Definition:
    """A network being defined: builder, network, the weights it binds, and its bookkeeping.

    The builder and every numpy array handed to TensorRT are kept here, because TensorRT
    does not copy weights until the engine is built.
    """

    network: object
    builder: object
    weights: object  # trt_sdxl.weights.Component
    precision: str = "fp16"
    macs: list[MacRecord] = field(default_factory=list)
    # Set for 8-bit networks (trt_sdxl.quant.plan.QuantPlan) or for the calibration network
    # (trt_sdxl.quant.plan.CalibrationTaps); the helpers below consult them, models never do.
    quant: object = None
    taps: object = None
    # explicit SmoothQuant multiplies, one per (group, input tensor): the layers of a group share it
    smoothing: dict[tuple[str, str], object] = field(default_factory=dict)
    # one Q/DQ per quantized tensor: input tensor name -> (scale, the dequantized tensor its consumers read)
    quantized_inputs: dict[str, tuple[float, object]] = field(default_factory=dict)
    # attention_check(fmt, q_shape, k_shape) -> whether the backend has a fused 8-bit attention kernel
    # for those shapes (trt_sdxl.engines.fused_attention_check); where not, that attention keeps FP16
    # BMMs and its name goes into attention_fallbacks
    attention_check: object = None
    attention_fallbacks: list[str] = field(default_factory=list)
    # the refit map: weight name -> RefitEntry. The name is the constant layer's, or `<conv>.weight`/`.bias` for
    # a convolution's own weights, and TensorRT's refitter knows the weight by it too (set_weights_name)
    refit: dict[str, RefitEntry] = field(default_factory=dict)
    _keep: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def smoothing_muls(self) -> int:
        return len(self.smoothing)

    @property
    def dtype(self):
        return COMPUTE_DTYPES[self.precision]

    @property
    def trt_dtype(self):
        return trt_dtype(self.dtype)

    @property
    def weight_dtype(self):
        """numpy dtype of the arrays handed to TensorRT as weights (see WEIGHT_DTYPES)."""
        return WEIGHT_DTYPES.get(self.precision, self.dtype)

    def bound(self, name: str, key: str, shape: tuple, bound_shape: tuple, scale: float = 1.0,
              transform: str | None = None, role: str = "weight", of: str | None = None, dtype=None) -> None:
        """Record in the refit map that weight `name` is checkpoint tensor `key`, transformed so (before the
        weight is added to the network: `constant` names it for TensorRT's refitter)."""
        if role not in REFIT_ROLES:
            raise ValueError(f"refit role {role!r}: expected one of {REFIT_ROLES}")
        self.refit[name] = RefitEntry(key, np.dtype(dtype or self.weight_dtype).name, tuple(shape),
                                      tuple(bound_shape), float(scale), transform, role, of)

    def name_weights(self, weights, name: str) -> None:
        """Give TensorRT's refitter the weights `name` (INetworkDefinition.set_weights_name)."""
        if not self.network.set_weights_name(weights, name):
            raise ValueError(f"{name}: TensorRT refused it as a weights name (two weights named alike?)")

    def keep(self, array: np.ndarray) -> np.ndarray:
        self._keep.append(array)
        return array

    def param(self, name: str, shape: tuple[int, ...], dtype=None) -> np.ndarray:
        """The checkpoint tensor `name`, checked to have `shape`, in `dtype` (default: weight dtype)."""
        array = self.weights.get(name, dtype=dtype or self.weight_dtype, shape=tuple(shape))
        return self.keep(np.ascontiguousarray(array))


class DefinedNetwork:
    """A model's defined network: `.network` (INetworkDefinition) kept alive with its builder and
    weights through `.definition`; `.inputs` maps each input name to (shape, numpy dtype)."""

    def __init__(self, definition: Definition, config, inputs: dict[str, tuple]):
        self.definition = definition
        self.network = definition.network
        self.builder = definition.builder
        self.config = config
        self.inputs = inputs
        self.precision = definition.precision

        self.opt_inputs = dict(inputs)  # the shapes it was defined at
        self.profiles: list[dict[str, tuple]] = []  # [{input: (min, opt, max)}]; [] for a static network

    @property
    def macs(self) -> list[MacRecord]:
        """MACs at the shape the network was defined at (`opt_inputs`)."""
        return self.definition.macs

    @property
    def dynamic(self) -> bool:
        return any(-1 in shape for shape, _ in self.inputs.values())

    def set_profiles(self, profiles: list[dict[str, tuple]]) -> None:
        """Optimization profiles, each {input name: (min, opt, max) shapes}: every axis that is not one
        value across all of them becomes dynamic (-1) in the network's inputs. The first profile's opt
        must be the defined shape. One profile of one shape leaves the network static."""
        if not profiles:
            raise ValueError("set_profiles: expected at least one profile")
        if self.definition.taps is not None:
            raise ValueError("the calibration network samples positions of its defined shape: it stays static")
        for k, profile in enumerate(profiles):
            if set(profile) != set(self.inputs):
                raise ValueError(f"profile {k} gives {sorted(profile)}, the network takes {sorted(self.inputs)}")
            for name, (lo, opt, hi) in profile.items():
                rank = len(self.opt_inputs[name][0])
                if not len(lo) == len(opt) == len(hi) == rank or not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                    raise ValueError(f"profile {k}, input {name}: {lo}/{opt}/{hi} is not min <= opt <= max of rank {rank}")
        first = {name: tuple(opt) for name, (_, opt, _) in profiles[0].items()}
        defined = {name: tuple(shape) for name, (shape, _) in self.opt_inputs.items()}
        if first != defined:
            raise ValueError(f"the first profile's opt shapes {first} are not the defined shapes {defined}")
        by_name = {self.network.get_input(i).name: self.network.get_input(i) for i in range(self.network.num_inputs)}
        for name, (shape, dtype) in self.opt_inputs.items():
            dims = tuple(-1 if any(len({p[name][j][axis] for j in range(3)} | {shape[axis]}) > 1 for p in profiles)
                         else shape[axis] for axis in range(len(shape)))
            by_name[name].shape = dims
            self.inputs[name] = (dims, dtype)
        self.profiles = [{name: tuple(tuple(int(v) for v in s) for s in shapes) for name, shapes in p.items()}
                         for p in profiles]


def new_definition(weights, precision: str = "fp16") -> Definition:
    if precision not in COMPUTE_DTYPES:
        raise UserError(f"precision {precision!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    builder, network = backend.get().create_network()
    return Definition(network=network, builder=builder, weights=weights, precision=precision)


def trt_dtype(np_dtype):
    return dtypes.to_trt(np_dtype)


def shape(x) -> tuple[int, ...]:
    return tuple(x.shape)


def _named(layer, name: str | None):
    if name:
        layer.name = name
    return layer.get_output(0)


# ---------------------------------------------------------------- plumbing


def constant(d: Definition, array: np.ndarray, name: str | None = None):
    """A constant tensor of `array`; one the refit map lists under `name` carries that weights name."""
    array = d.keep(np.ascontiguousarray(array))
    layer = d.network.add_constant(array.shape, array)
    if name is not None and name in d.refit:
        d.name_weights(layer.weights, name)
    return _named(layer, name)


def weight_tensor(d: Definition, array: np.ndarray, name: str | None = None):
    """Weights `array` (in `d.weight_dtype`) as a tensor of the compute dtype: a constant, cast for bf16."""
    return cast(d, constant(d, array, name), d.dtype)


def scalar_like(d: Definition, value: float, x):
    """A constant of x's rank (all ones dims) and x's dtype, for broadcasting elementwise ops."""
    trt = backend.trt()
    np_dtype = np.float16 if x.dtype == trt.float16 else np.float32
    c = constant(d, np.full((1,) * len(shape(x)), value, dtype=np_dtype))
    return cast(d, c, ml_dtypes.bfloat16) if x.dtype == trt.bfloat16 else c  # bf16: see WEIGHT_DTYPES


def cast(d: Definition, x, np_dtype, name: str | None = None):
    if x.dtype == trt_dtype(np_dtype):
        return x
    return _named(d.network.add_cast(x, trt_dtype(np_dtype)), name)


def elementwise(d: Definition, a, b, op: str, name: str | None = None):
    trt = backend.trt()
    return _named(d.network.add_elementwise(a, b, getattr(trt.ElementWiseOperation, op)), name)


def add(d: Definition, a, b, name=None):
    return elementwise(d, a, b, "SUM", name)


def mul(d: Definition, a, b, name=None):
    return elementwise(d, a, b, "PROD", name)


def unary(d: Definition, x, op: str, name=None):
    return _named(d.network.add_unary(x, getattr(backend.trt().UnaryOperation, op)), name)


def activation(d: Definition, x, kind: str, name=None):
    return _named(d.network.add_activation(x, getattr(backend.trt().ActivationType, kind)), name)


def silu(d: Definition, x, name=None):
    """silu(x) = x * sigmoid(x)."""
    return mul(d, x, activation(d, x, "SIGMOID"), name)


def gelu(d: Definition, x, name=None):
    """gelu(x) = 0.5 x (1 + erf(x / sqrt 2))."""
    return activation(d, x, "GELU_ERF", name)


def quick_gelu(d: Definition, x, name=None):
    """quick_gelu(x) = x * sigmoid(1.702 x) (OpenAI CLIP)."""
    return mul(d, x, activation(d, mul(d, x, scalar_like(d, 1.702, x)), "SIGMOID"), name)


def shape_of(d: Definition, x, axes=None):
    """x's dimensions at run time, int64 [rank] (or those of `axes`): a shape tensor."""
    dims = d.network.add_shape(x).get_output(0)
    if axes is None:
        return dims
    return d.network.add_gather(dims, constant(d, np.asarray(tuple(axes), np.int32)), 0).get_output(0)


def dims_tensor(d: Definition, parts):
    """A shape tensor int64 [n] joining `parts`: shape tensors and integers (constants)."""
    tensors = [constant(d, np.asarray([p], np.int64)) if isinstance(p, (int, np.integer)) else p for p in parts]
    return tensors[0] if len(tensors) == 1 else concat(d, tensors, axis=0)


def reshape(d: Definition, x, dims, first_transpose=None, second_transpose=None, name=None):
    """Shuffle: first_transpose, reshape to `dims`, second_transpose. `dims` is a tuple, where 0 copies
    the input's dimension and -1 is inferred (so a batch, image or token dimension stays free), or a
    shape tensor (`dims_tensor`) for a dimension that must be rebuilt."""
    layer = d.network.add_shuffle(x)
    if first_transpose is not None:
        layer.first_transpose = tuple(first_transpose)
    if dims is not None and not isinstance(dims, (tuple, list)):
        layer.set_input(1, dims)
    elif dims is not None:
        layer.reshape_dims = tuple(dims)
    if second_transpose is not None:
        layer.second_transpose = tuple(second_transpose)
    return _named(layer, name)


def image_to_tokens(d: Definition, x, name=None):
    """[B, C, H, W] -> [B, HW, C]."""
    return reshape(d, x, (0, -1, shape(x)[1]), first_transpose=(0, 2, 3, 1), name=name)


def tokens_to_image(d: Definition, x, like, name=None):
    """[B, HW, C] -> [B, C, H, W], with the H and W `like` [B, *, H, W] has at run time."""
    dims = dims_tensor(d, [shape_of(d, like, (0, 2, 3)), shape(x)[2]])  # [B, H, W, C]
    return reshape(d, x, dims, second_transpose=(0, 3, 1, 2), name=name)


def transpose(d: Definition, x, perm, name=None):
    return reshape(d, x, None, first_transpose=perm, name=name)


def concat(d: Definition, tensors, axis: int, name=None):
    layer = d.network.add_concatenation(list(tensors))
    layer.axis = axis
    return _named(layer, name)


def slice_axis(d: Definition, x, axis: int, start: int, size: int, name=None):
    """x[..., start:start + size, ...] on `axis`; the other dimensions whole, whatever their run-time size."""
    dims = shape(x)
    rank = len(dims)
    axis %= rank
    starts = [0] * rank
    sizes = list(dims)
    starts[axis], sizes[axis] = start, size
    layer = d.network.add_slice(x, tuple(starts), tuple(sizes), (1,) * rank)
    parts = ([shape_of(d, x, range(axis))] if axis else []) + [size] \
        + ([shape_of(d, x, range(axis + 1, rank))] if axis < rank - 1 else [])
    layer.set_input(2, dims_tensor(d, parts))
    return _named(layer, name)


# ---------------------------------------------------------------- weighted layers


def quantize_dequantize(d: Definition, x, scale, fmt: str, axis: int | None = None, name: str | None = None,
                        to=None, scale_name: str | None = None):
    """Q/DQ pair: x -> int8/fp8 with `scale` (scalar: per tensor; vector: per channel on `axis`) -> x's
    type, or the numpy dtype `to`. `scale_name`: the scale constant's name (a weight's, in the refit map).

    Quantize is round-half-to-even with saturation (INT8 to [-128, 127], FP8 e4m3 to ±448).
    """
    trt = backend.trt()
    scale = np.asarray(scale, np.float32)
    s = constant(d, scale.reshape(()) if axis is None else scale.reshape(-1), scale_name)
    q = d.network.add_quantize(x, s, trt.int8 if fmt == "int8" else trt.fp8)
    dq = d.network.add_dequantize(q.get_output(0), s, x.dtype if to is None else trt_dtype(to))
    if axis is not None:
        q.axis = axis
        dq.axis = axis
    if name:
        q.name, dq.name = f"{name}.quantize", f"{name}.dequantize"
    return dq.get_output(0)


def _quantized_weight(d: Definition, path: str, weight: np.ndarray):
    """A weight [O, ...] quantized per output channel (axis 0) or per tensor, as the recipe says,
    dequantized to the compute dtype. Its scale is in the refit map as `<path>.weight_scale`."""
    fmt, axis = d.quant.format, d.quant.weight_axis
    scale = weight_scales(weight, fmt, axis)
    d.bound(f"{path}.weight_scale", f"{path}.weight", weight.shape, scale.shape, role="weight scale",
            of=f"{path}.weight", dtype=np.float32)
    return quantize_dequantize(d, constant(d, weight, f"{path}.weight"), scale, fmt, axis=axis, name=f"{path}.weight",
                               scale_name=f"{path}.weight_scale")


def smooth_input(d: Definition, x, path: str):
    """x / s by an explicit multiply where the plan has no fold for `path`'s input; the layers of
    one smoothing group reading one tensor share the multiply."""
    found = d.quant.explicit_smoothing(path)
    if found is None:
        return x
    group, inverse = found
    key = (group, x.name)
    if key not in d.smoothing:
        rank = len(x.shape)
        channel_axis = 1 if rank == 4 else rank - 1  # NCHW convolution inputs, [..., C] linear inputs
        inv = inverse.reshape([-1 if i == channel_axis else 1 for i in range(rank)])
        d.smoothing[key] = mul(d, x, constant(d, inv.astype(d.dtype)), name=f"{group}.smooth")
    return d.smoothing[key]


def tap(d: Definition, x, path: str, channel_axis: int, sample_rows: bool) -> None:
    """Calibration: the per-sample, per-channel abs-max of x as output `amax:<path>` ([B, C], fp32),
    and sampled rows of x as `rows:<path>` (fp32): for a [B, S, C] linear input (`sample_rows`) a few
    token rows ([B, R, C]); for a convolution's [B, C, H, W] input a few k x k patches as rows of its
    im2col matrix ([B, R, C*k*k], channel-major like the [O, C, k, k] weight), zero where a patch
    overhangs the border as under the conv's own padding, so `rows @ weight.reshape(O, -1).T` is the
    conv's output at the patch centres, bias aside."""
    if d.taps is None or not d.taps.wants(path):
        return
    trt = backend.trt()
    rank = len(x.shape)
    axis = channel_axis % rank
    mask = sum(1 << i for i in range(1, rank) if i != axis)  # every axis but the batch and the channel
    red = d.network.add_reduce(unary(d, x, "ABS"), trt.ReduceOperation.MAX, mask, False)
    mark_output(d, red.get_output(0), f"amax:{path}", np.float32)  # [B, C]
    if sample_rows and rank == 3:
        idx = d.taps.sample_positions(x.shape[1])
        rows = d.network.add_gather(x, constant(d, idx), 1).get_output(0)  # [B, R, C]
        mark_output(d, rows, f"rows:{path}", np.float32)
    elif rank == 4 and axis == 1:
        b, c, h, w = shape(x)
        k = d.weights.shape(f"{path}.weight")[-1]
        (hi, hm), (wi, wm) = d.taps.patch_windows(h, k), d.taps.patch_windows(w, k)
        g = d.network.add_gather(x, constant(d, hi), 2).get_output(0)  # [B, C, r*k, W]
        g = d.network.add_gather(g, constant(d, wi), 3).get_output(0)  # [B, C, r*k, r*k]
        g = mul(d, g, constant(d, np.outer(hm, wm).reshape(1, 1, len(hm), len(wm)).astype(d.dtype)))
        r = len(hi) // k
        g = reshape(d, g, (b, c, r, k, r, k), second_transpose=(0, 2, 4, 1, 3, 5))  # [B, r, r, C, k, k]
        mark_output(d, reshape(d, g, (b, r * r, c * k * k)), f"rows:{path}", np.float32)  # [B, R, C*k*k]
    d.taps.add(path)


def _quantized_input(d: Definition, x, path: str):
    """x (smoothed where the plan says) through one Q/DQ pair, shared by every quantized layer that
    reads the same tensor (attn1's q/k/v, attn2's k/v): one quantizing pass, and one 8-bit tensor
    the builder can feed to a fused QKV GEMM. The plan gives a group's members one scale."""
    x = smooth_input(d, x, path)
    if not d.quant.qdq:
        return x
    scale = d.quant.input_scale(path)
    found = d.quantized_inputs.get(x.name)
    if found is not None:
        if found[0] != scale:
            raise ValueError(f"{path}: its input {x.name} is already quantized with scale {found[0]!r}, not {scale!r}")
        return found[1]
    dq = quantize_dequantize(d, x, scale, d.quant.format, name=f"{path}.input")
    d.quantized_inputs[x.name] = (scale, dq)
    return dq


def conv2d(d: Definition, x, path: str, out_channels: int, kernel: int, stride: int = 1,
           padding: int = 0, bias: bool = True):
    """Conv2d from `<path>.weight` [O, C, k, k] and `<path>.bias` [O]; x: [B, C, H, W]."""
    b, c, h, w = shape(x)
    tap(d, x, path, channel_axis=1, sample_rows=False)
    weight = d.param(f"{path}.weight", (out_channels, c, kernel, kernel))
    bias_array = d.param(f"{path}.bias", (out_channels,)) if bias else None
    quantized = d.quant is not None and d.quant.is_quantized(path) and d.quant.qdq
    d.bound(f"{path}.weight", f"{path}.weight", weight.shape, weight.shape, transform="smoothed" if quantized else None)
    if bias:
        d.bound(f"{path}.bias", f"{path}.bias", bias_array.shape, bias_array.shape, role="bias")
    if quantized:
        trt = backend.trt()
        layer = d.network.add_convolution_nd(_quantized_input(d, x, path), out_channels, (kernel, kernel),
                                             trt.Weights(), trt.Weights())
        smoothed = d.keep(d.quant.transform_weight(path, weight))
        layer.set_input(1, _quantized_weight(d, path, smoothed))
        if bias:
            layer.set_input(2, weight_tensor(d, bias_array, f"{path}.bias"))  # [O]
    elif d.weight_dtype == d.dtype:
        layer = d.network.add_convolution_nd(x, out_channels, (kernel, kernel), weight, bias_array)
        d.name_weights(layer.kernel, f"{path}.weight")
        if bias:
            d.name_weights(layer.bias, f"{path}.bias")
    else:  # kernel and bias as cast constants, through the layer's inputs 1 and 2 (see WEIGHT_DTYPES)
        trt = backend.trt()
        layer = d.network.add_convolution_nd(x, out_channels, (kernel, kernel), trt.Weights(), trt.Weights())
        layer.set_input(1, weight_tensor(d, weight, f"{path}.weight"))  # [O, C, k, k]
        if bias:
            layer.set_input(2, weight_tensor(d, bias_array, f"{path}.bias"))  # [O]
    layer.stride_nd = (stride, stride)
    layer.padding_nd = (padding, padding)
    layer.name = path
    y = layer.get_output(0)  # [B, O, H', W']
    _, _, ho, wo = shape(y)
    d.macs.append(MacRecord(path, "conv", b * out_channels * ho * wo * c * kernel * kernel, quantized))
    return y


def linear(d: Definition, x, path: str, out_features: int, bias: bool = True, weight_scale: float = 1.0):
    """y = x W^T + b from `<path>.weight` [out, in]; x: [..., in] -> [..., out].

    `weight_scale` folds a constant factor into W and b (the attention 1/sqrt(d) goes here,
    as TensorRT wants Q pre-scaled), costing one copy of that weight.
    """
    dims = shape(x)
    in_features = dims[-1]
    tap(d, x, path, channel_axis=-1, sample_rows=True)
    weight = d.param(f"{path}.weight", (out_features, in_features))
    if weight_scale != 1.0:
        weight = d.keep((weight.astype(np.float32) * weight_scale).astype(d.weight_dtype))
    if d.quant is not None:
        weight = d.keep(d.quant.transform_weight(path, weight))
    quantized = d.quant is not None and d.quant.is_quantized(path)
    rank = len(dims)
    w_shape = (1,) * (rank - 2) + weight.shape
    eight_bit = quantized and d.quant.qdq
    d.bound(f"{path}.weight", f"{path}.weight", weight.shape, weight.shape if eight_bit else w_shape, weight_scale,
            "smoothed" if d.quant is not None else None)
    if quantized:
        x = _quantized_input(d, x, path)  # smoothing's explicit 1/s where needed, then Q/DQ
    if eight_bit:
        w = reshape(d, _quantized_weight(d, path, weight), w_shape)
    else:
        w = weight_tensor(d, weight.reshape(w_shape), name=f"{path}.weight")
    trt = backend.trt()
    y = _named(d.network.add_matrix_multiply(x, trt.MatrixOperation.NONE, w, trt.MatrixOperation.TRANSPOSE),
               path)  # [..., out]
    d.macs.append(MacRecord(path, "linear", int(np.prod(dims[:-1])) * in_features * out_features, eight_bit))
    if bias:
        b = d.param(f"{path}.bias", (out_features,))
        if weight_scale != 1.0:
            b = d.keep((b.astype(np.float32) * weight_scale).astype(d.weight_dtype))
        if d.quant is not None:
            b = d.keep(d.quant.transform_bias(path, b))
        d.bound(f"{path}.bias", f"{path}.bias", (out_features,), (1,) * (rank - 1) + (out_features,), weight_scale,
                "smoothed" if d.quant is not None else None, role="bias")
        y = add(d, y, weight_tensor(d, b.reshape((1,) * (rank - 1) + (out_features,)), name=f"{path}.bias"),
                name=f"{path}.bias.add")
    return y


def group_norm(d: Definition, x, path: str, groups: int, eps: float):
    """GroupNorm over [B, C, H, W] with `<path>.weight`/`.bias` [C] (TensorRT normalization layer)."""
    be = backend.get()
    _, c, _, _ = shape(x)
    gamma = d.param(f"{path}.weight", (c,)).reshape(1, c, 1, 1)
    beta = d.param(f"{path}.bias", (c,)).reshape(1, c, 1, 1)
    if d.quant is not None:
        gamma, beta = (d.keep(a) for a in d.quant.fold_norm(path, gamma, beta))
    for part in ("weight", "bias"):
        d.bound(f"{path}.{part}", f"{path}.{part}", (c,), (1, c, 1, 1),
                transform="norm fold" if d.quant is not None else None, role="norm")
    if be.has_normalization_v2:
        layer = be.add_normalization(d.network, x, weight_tensor(d, gamma, f"{path}.weight"),
                                     weight_tensor(d, beta, f"{path}.bias"), 0b1100)
        layer.num_groups = groups
        layer.epsilon = eps
        return _named(layer, path)
    # Legacy API: scale/bias are per group, so normalize with unit affine and apply ours after.
    ones = np.ones((1, groups, 1, 1), d.weight_dtype)
    zeros = np.zeros((1, groups, 1, 1), d.weight_dtype)
    layer = be.add_normalization(d.network, x, weight_tensor(d, ones), weight_tensor(d, zeros), 0b1100)
    layer.num_groups = groups
    layer.epsilon = eps
    y = _named(layer, path)
    return add(d, mul(d, y, weight_tensor(d, gamma, f"{path}.weight")), weight_tensor(d, beta, f"{path}.bias"),
               name=f"{path}.affine")


def layer_norm(d: Definition, x, path: str, eps: float = 1e-5):
    """LayerNorm over the last axis of x [..., C] with `<path>.weight`/`.bias` [C]."""
    dims = shape(x)
    c = dims[-1]
    rank = len(dims)
    gamma = d.param(f"{path}.weight", (c,)).reshape((1,) * (rank - 1) + (c,))
    beta = d.param(f"{path}.bias", (c,)).reshape((1,) * (rank - 1) + (c,))
    if d.quant is not None:
        gamma, beta = (d.keep(a) for a in d.quant.fold_norm(path, gamma, beta))
    for part in ("weight", "bias"):
        d.bound(f"{path}.{part}", f"{path}.{part}", (c,), (1,) * (rank - 1) + (c,),
                transform="norm fold" if d.quant is not None else None, role="norm")
    layer = backend.get().add_normalization(d.network, x, weight_tensor(d, gamma, f"{path}.weight"),
                                            weight_tensor(d, beta, f"{path}.bias"), 1 << (rank - 1))
    layer.epsilon = eps
    return _named(layer, path)


def geglu(d: Definition, x, path: str, inner: int):
    """diffusers GEGLU: [h, gate] = x W^T + b (2*inner features); h * gelu(gate)."""
    proj = linear(d, x, f"{path}.proj", 2 * inner)  # [B, S, 2*inner]
    rank = len(shape(proj))
    hidden = slice_axis(d, proj, rank - 1, 0, inner)
    gate = slice_axis(d, proj, rank - 1, inner, inner)
    return mul(d, hidden, gelu(d, gate), name=f"{path}.mul")


def upsample_nearest2x(d: Definition, x, name=None):
    """Nearest-neighbour 2x upsampling of [B, C, H, W]: out[i, j] = in[i // 2, j // 2]."""
    trt = backend.trt()
    layer = d.network.add_resize(x)
    layer.resize_mode = trt.InterpolationMode.NEAREST
    layer.coordinate_transformation = trt.ResizeCoordinateTransformation.ASYMMETRIC
    layer.nearest_rounding = trt.ResizeRoundMode.FLOOR
    layer.scales = (1.0, 1.0, 2.0, 2.0)
    return _named(layer, name)


def timestep_embedding(d: Definition, t, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0, name=None):
    """Sinusoidal embedding of t [N] (fp32) -> [N, dim] (fp32).

    freqs_i = exp(-ln(max_period) * i / (dim/2 - freq_shift)); emb = [sin(t f), cos(t f)]
    (cos first when flip_sin_to_cos), as in DDPM / diffusers' get_timestep_embedding.
    Computed in fp32: t * f reaches ~1000 rad, where fp16 sin/cos would be meaningless.
    """
    half = dim // 2
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float64) / (half - freq_shift)
    freqs = np.exp(exponent).astype(np.float32).reshape(1, half)
    t2 = reshape(d, cast(d, t, np.float32), (0, 1))  # [N, 1]
    arg = mul(d, t2, constant(d, freqs))  # [N, half]
    sin, cos = unary(d, arg, "SIN"), unary(d, arg, "COS")
    return concat(d, [cos, sin] if flip_sin_to_cos else [sin, cos], axis=1, name=name)  # [N, dim]


def causal_mask(d: Definition, sq: int, sk: int, np_dtype):
    """Additive [1, 1, Sq, Sk] mask: 0 where key j <= query i, a large negative number above the diagonal."""
    upper = np.triu(np.ones((sq, sk), dtype=bool), k=1)
    stored = np.float32 if np_dtype == ml_dtypes.bfloat16 else np_dtype  # bf16: see WEIGHT_DTYPES
    mask = np.where(upper, ml_dtypes.finfo(np_dtype).min, 0).astype(stored).reshape(1, 1, sq, sk)
    return cast(d, constant(d, mask), np_dtype)


def attention(d: Definition, q, k, v, name: str, causal: bool = False, probs_format: str | None = None):
    """softmax(q k^T [+ causal mask]) v over [B, N, S, D]; q must be pre-scaled by 1/sqrt(D).

    Uses TensorRT's fused attention layer where the backend has one, else matmul-softmax-matmul.
    In high precision the layer is decomposable (a head size without a fused kernel still
    builds); quantized (`probs_format` "fp8"/"int8": q, k, v arrive as Q/DQ outputs) it is not:
    decomposed, an 8-bit attention would run as separate BMMs with the score matrix in memory,
    slower than FP16 — the build then fails and falls back to FP16 attention, logged
    (trt_sdxl.build). The causal mask (CLIP's text encoders) is an explicit additive mask in both
    forms, which every TensorRT version reads the same way. The softmax output is quantized before
    the second BMM — through the attention layer's normalization-quantize scale, or a Q/DQ pair in
    the unfused form; probabilities lie in [0, 1], so amax is 1. The unfused FP8 form computes in
    FP32 between its Q/DQ pairs (q/k/v dequantized to FP32, output cast back), the pattern
    TensorRT's FP8 MHA fusion matches: it has FP32-accumulation FP8 MHA kernels only.
    """
    be = backend.get()
    trt = be.module
    b, n, sq, dh = shape(q)
    sk = shape(k)[2]
    d.macs.append(MacRecord(f"{name}.bmm1", "bmm", b * n * sq * sk * dh, probs_format is not None))
    d.macs.append(MacRecord(f"{name}.bmm2", "bmm", b * n * sq * sk * dh, probs_format is not None))
    np_dtype = {trt.float16: np.float16, trt.bfloat16: ml_dtypes.bfloat16}.get(q.dtype, np.float32)
    mask = causal_mask(d, sq, sk, np_dtype) if causal else None
    probs_scale = None
    if probs_format is not None:
        probs_scale = 1.0 / QMAX[probs_format]
    if be.has_attention_layer:
        att = d.network.add_attention(q, k, v, trt.AttentionNormalizationOp.SOFTMAX, False)
        att.decomposable = probs_format is None
        if mask is not None:
            att.mask = mask
        if probs_scale is not None:
            att.normalization_quantize_scale = cast(d, constant(d, np.array(probs_scale, np.float32)), np_dtype)
            att.normalization_quantize_to_type = trt.int8 if probs_format == "int8" else trt.fp8
        att.name = name
        return att.get_output(0)  # [B, N, Sq, D]
    fp32_core = q.dtype == trt.float32 and d.dtype != np.float32  # FP8 q, k, v dequantized to FP32
    scores = _named(d.network.add_matrix_multiply(q, trt.MatrixOperation.NONE, k, trt.MatrixOperation.TRANSPOSE),
                    f"{name}.bmm1")  # [B, N, Sq, Sk]
    if mask is not None:
        scores = add(d, scores, mask, name=f"{name}.mask")
    softmax = d.network.add_softmax(scores)
    softmax.axes = 1 << 3
    probs = _named(softmax, f"{name}.softmax")
    if probs_scale is not None:
        probs = quantize_dequantize(d, probs, probs_scale, probs_format, name=f"{name}.probs")
    out = _named(d.network.add_matrix_multiply(probs, trt.MatrixOperation.NONE, v, trt.MatrixOperation.NONE),
                 f"{name}.bmm2")  # [B, N, Sq, D]
    return cast(d, out, d.dtype, name=f"{name}.output") if fp32_core else out


def multi_head_attention(d: Definition, x, context, path: str, heads: int, qkv_bias: bool = False,
                         causal: bool = False, names=("to_q", "to_k", "to_v", "to_out.0")):
    """Multi-head attention with linear q/k/v/out projections; x [B, S, C], context [B, T, Cc] -> [B, S, C].

    `names` are the projections' module names under `path`: diffusers' Attention uses
    to_q/to_k/to_v/to_out.0 (q/k/v without bias in the UNet, with bias in the VAE), CLIP
    uses q_proj/k_proj/v_proj/out_proj (all with bias).
    """
    c = shape(x)[2]
    head_dim = c // heads
    nq, nk, nv, no = (f"{path}.{n}" for n in names)
    q = linear(d, x, nq, c, bias=qkv_bias, weight_scale=1.0 / math.sqrt(head_dim))  # [B, S, C]
    k = linear(d, context, nk, c, bias=qkv_bias)  # [B, T, C]
    v = linear(d, context, nv, c, bias=qkv_bias)  # [B, T, C]
    att = f"{path}.attention"
    for part, tensor in (("q", q), ("k", k), ("v", v)):
        tap(d, tensor, f"{att}.{part}", channel_axis=-1, sample_rows=False)
    q = reshape(d, q, (0, 0, heads, head_dim), second_transpose=(0, 2, 1, 3))  # [B, N, S, D]
    k = reshape(d, k, (0, 0, heads, head_dim), second_transpose=(0, 2, 1, 3))  # [B, N, T, D]
    v = reshape(d, v, (0, 0, heads, head_dim), second_transpose=(0, 2, 1, 3))  # [B, N, T, D]
    probs_format = None
    quantize = d.quant is not None and d.quant.quantize_bmm and d.quant.has_stats(f"{att}.q")
    if quantize and d.attention_check is not None and not d.attention_check(d.quant.format, shape(q), shape(k)):
        d.attention_fallbacks.append(att)
        quantize = False
    if quantize:
        # Q/DQ on the BMM inputs themselves, after the head shuffles (per-tensor scales commute
        # with them), as TensorRT's 8-bit MHA fusion wants them; FP32 out of the DQ in the unfused
        # FP8 form (see `attention`).
        probs_format = d.quant.format
        to = np.float32 if probs_format == "fp8" and not backend.get().has_attention_layer else None
        q, k, v = (quantize_dequantize(d, tensor, d.quant.act_scale(f"{att}.{part}"), probs_format,
                                       name=f"{att}.{part}", to=to) for part, tensor in (("q", q), ("k", k), ("v", v)))
    o = attention(d, q, k, v, name=att, causal=causal, probs_format=probs_format)  # [B, N, S, D]
    o = reshape(d, o, (0, 0, c), first_transpose=(0, 2, 1, 3))  # [B, S, C]
    return linear(d, o, no, c)


def embedding(d: Definition, ids, path: str, num: int, dim: int, name: str | None = None):
    """Row lookup: `<path>.weight` [num, dim] gathered by integer ids [...] -> [..., dim]."""
    d.bound(f"{path}.weight", f"{path}.weight", (num, dim), (num, dim), role="embedding")
    table = weight_tensor(d, d.param(f"{path}.weight", (num, dim)), name=f"{path}.weight")
    return _named(d.network.add_gather(table, ids, 0), name or path)


def argmax_last(d: Definition, x, name: str | None = None):
    """Index of the largest value along the last axis of a float32 [B, S] tensor -> int32 [B, 1]."""
    trt = backend.trt()
    layer = d.network.add_topk(x, trt.TopKOperation.MAX, 1, 1 << (len(shape(x)) - 1))
    if name:
        layer.name = name
    return layer.get_output(1)


def mark_output(d: Definition, x, name: str, np_dtype=None):
    if np_dtype is not None:
        x = cast(d, x, np_dtype)
    x.name = name
    d.network.mark_output(x)
    return x


def add_input(d: Definition, name: str, dims, np_dtype):
    return d.network.add_input(name, trt_dtype(np_dtype), tuple(dims))


# ---------------------------------------------------------------- token selection (CLIP pooling)


def argmax_first(d: Definition, x, bound: int, name: str | None = None):
    """Index of the first largest value along the last axis of an int32 [B, S] tensor with values in
    [0, bound) -> int32 [B, 1] (torch.argmax's rule).

    TopK leaves the order of ties open, so value v at position j becomes the float32 score
    v * S + (S - 1 - j): one per position, ordered by value, then by earlier position, and exact
    while bound * S <= 2^24.
    """
    b, s = shape(x)
    if bound * s > 2**24:
        raise ValueError(f"argmax_first: values below {bound} over {s} positions do not fit float32 exactly")
    later = constant(d, np.arange(s - 1, -1, -1, dtype=np.float32).reshape(1, s))  # [1, S]: S-1-j
    width = constant(d, np.full((1, 1), s, np.float32))
    score = add(d, mul(d, cast(d, x, np.float32), width), later)  # [B, S]
    return argmax_last(d, score, name)


def gather_tokens(d: Definition, x, index, name: str | None = None):
    """One position per sequence: x [B, S, C] at int32 index [B, 1] -> [B, C] (row b is x[b, index[b]])."""
    c = shape(x)[2]
    layer = d.network.add_gather(x, index, 1)
    layer.num_elementwise_dims = 1  # index[b] selects within x[b]
    picked = _named(layer, name)  # [B, 1, C]
    return reshape(d, picked, (0, c))
