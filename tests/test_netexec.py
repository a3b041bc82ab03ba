"""netexec against independent references: one tiny TensorRT network per layer type, built with the
real network API, evaluated by netexec and compared with torch (CPU, float64) or plain numpy.

Tolerances are relative L2 errors: fp32 networks agree to float32 rounding (~1e-6); fp16 networks
round every tensor to fp16 (2^-11 relative), so they stay below about 1e-3.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
from oracle import rel_l2
import pytest
import torch
import torch.nn.functional as F

from trt_sdxl import backend, netexec

trt = backend.trt()
TOL = {np.float32: 1e-6, np.float16: 1e-3}
DTYPES = [np.float32, np.float16]
TRT_TYPES = {np.float32: trt.float32, np.float16: trt.float16, np.int32: trt.int32, np.bool_: trt.bool}


def assert_close(out, ref, tol, what=""):
    err = rel_l2(out, ref)
    assert err <= tol, f"{what}: relative L2 error {err:.3e} > {tol:.1e}"


def t64(array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, np.float64))


def randn(rng, shape, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


class Net:
    """A strongly typed network plus the arrays its weights point into (TensorRT does not copy them)."""

    def __init__(self):
        self.builder, self.network = backend.get().create_network()
        self.arrays = []

    def input(self, name, dtype, shape):
        return self.network.add_input(name, TRT_TYPES[dtype], tuple(shape))

    def weights(self, array):
        array = np.ascontiguousarray(array)
        self.arrays.append(array)
        return trt.Weights(array)

    def const(self, array):
        array = np.ascontiguousarray(array)
        return self.network.add_constant(array.shape, self.weights(array)).get_output(0)

    def run(self, feeds, *outputs):
        for tensor in outputs:
            self.network.mark_output(tensor)
        result = netexec.run(self.network, feeds)
        return [result[t.name] for t in outputs]


# ---- convolution ---------------------------------------------------------------------------------

CONV_CASES = {
    "3x3 pad 1": dict(stride=(1, 1), dilation=(1, 1), groups=1, pre=(1, 1), post=(1, 1)),
    "stride 2 asymmetric pad": dict(stride=(2, 2), dilation=(1, 1), groups=1, pre=(0, 0), post=(1, 1)),
    "dilation, groups, uneven": dict(stride=(2, 1), dilation=(1, 2), groups=2, pre=(1, 0), post=(2, 1)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_convolution(case, dtype):
    p = CONV_CASES[case]
    rng = np.random.default_rng(0)
    x, w, b = randn(rng, (2, 4, 9, 8), dtype), randn(rng, (6, 4 // p["groups"], 3, 3), dtype), randn(rng, (6,), dtype)
    net = Net()
    layer = net.network.add_convolution_nd(net.input("x", dtype, x.shape), 6, (3, 3), net.weights(w), net.weights(b))
    layer.stride_nd, layer.dilation_nd, layer.num_groups = p["stride"], p["dilation"], p["groups"]
    layer.pre_padding, layer.post_padding = p["pre"], p["post"]
    (out,) = net.run({"x": x}, layer.get_output(0))
    xp = F.pad(t64(x), (p["pre"][1], p["post"][1], p["pre"][0], p["post"][0]))
    ref = F.conv2d(xp, t64(w), t64(b), stride=p["stride"], dilation=p["dilation"], groups=p["groups"])
    assert out.dtype == dtype
    assert_close(out, ref.numpy(), TOL[dtype], case)


def test_convolution_kernel_and_bias_from_tensors_int8_weights():
    """Quantized weights: kernel = constant(int8) -> dequantize (per output channel), bias as input 2."""
    rng = np.random.default_rng(1)
    x = randn(rng, (1, 3, 6, 6))
    w_q = rng.integers(-128, 128, (5, 3, 3, 3)).astype(np.int8)
    w_scale = np.array([0.01, 0.02, 0.005, 0.03, 0.015], np.float32)
    b = randn(rng, (5,))
    net = Net()
    dq = net.network.add_dequantize(net.const(w_q), net.const(w_scale), trt.float32)
    dq.axis = 0
    layer = net.network.add_convolution_nd(net.input("x", np.float32, x.shape), 5, (3, 3), trt.Weights(), trt.Weights())
    layer.set_input(1, dq.get_output(0))
    layer.set_input(2, net.const(b))
    (out,) = net.run({"x": x}, layer.get_output(0))
    ref = F.conv2d(t64(x), t64(w_q) * t64(w_scale).view(5, 1, 1, 1), t64(b))
    assert_close(out, ref.numpy(), TOL[np.float32], "conv with dequantized kernel")


# ---- matrix multiply -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op0,op1", [("NONE", "NONE"), ("TRANSPOSE", "NONE"), ("NONE", "TRANSPOSE")])
def test_matrix_multiply_broadcast(op0, op1, dtype):
    rng = np.random.default_rng(2)
    a = randn(rng, (2, 1, 5, 7) if op0 == "NONE" else (2, 1, 7, 5), dtype)
    b = randn(rng, (1, 3, 7, 4) if op1 == "NONE" else (1, 3, 4, 7), dtype)
    net = Net()
    layer = net.network.add_matrix_multiply(net.input("a", dtype, a.shape), getattr(trt.MatrixOperation, op0),
                                            net.input("b", dtype, b.shape), getattr(trt.MatrixOperation, op1))
    (out,) = net.run({"a": a, "b": b}, layer.get_output(0))
    a64 = np.swapaxes(a, -1, -2) if op0 == "TRANSPOSE" else a
    b64 = np.swapaxes(b, -1, -2) if op1 == "TRANSPOSE" else b
    assert out.shape == (2, 3, 5, 4) and out.dtype == dtype
    assert_close(out, np.matmul(a64.astype(np.float64), b64.astype(np.float64)), TOL[dtype], f"{op0}/{op1}")


def test_matrix_multiply_vector():
    rng = np.random.default_rng(3)
    m, v = randn(rng, (3, 5, 7)), randn(rng, (3, 7))
    net = Net()
    layer = net.network.add_matrix_multiply(net.input("m", np.float32, m.shape), trt.MatrixOperation.NONE,
                                            net.input("v", np.float32, v.shape), trt.MatrixOperation.VECTOR)
    (out,) = net.run({"m": m, "v": v}, layer.get_output(0))
    assert_close(out, np.einsum("bij,bj->bi", m.astype(np.float64), v), TOL[np.float32], "matrix x vector")


# ---- elementwise, unary, activation ----------------------------------------------------------------

ARITHMETIC = {
    "SUM": np.add, "PROD": np.multiply, "SUB": np.subtract, "DIV": np.divide,
    "MAX": np.maximum, "MIN": np.minimum, "POW": np.power,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ARITHMETIC)
def test_elementwise_arithmetic(op, dtype):
    rng = np.random.default_rng(4)
    a = (rng.uniform(0.5, 2.0, (2, 3, 4)) if op == "POW" else randn(rng, (2, 3, 4))).astype(dtype)
    b = (rng.uniform(0.5, 2.0, (1, 3, 1)) * rng.choice([-1, 1], (1, 3, 1))).astype(dtype)  # never near 0
    net = Net()
    layer = net.network.add_elementwise(net.input("a", dtype, a.shape), net.input("b", dtype, b.shape),
                                        getattr(trt.ElementWiseOperation, op))
    (out,) = net.run({"a": a, "b": b}, layer.get_output(0))
    assert out.dtype == dtype
    assert_close(out, ARITHMETIC[op](a.astype(np.float64), b.astype(np.float64)), TOL[dtype], op)


def test_elementwise_comparisons_and_integer_division():
    a = np.array([[-7, -6, 5, 7]], np.int32)
    b = np.array([[2, 3, 5, -2]], np.int32)
    net = Net()
    ta, tb = net.input("a", np.int32, a.shape), net.input("b", np.int32, b.shape)
    layers = {op: net.network.add_elementwise(ta, tb, getattr(trt.ElementWiseOperation, op)).get_output(0)
              for op in ("DIV", "FLOOR_DIV", "EQUAL", "GREATER", "LESS")}
    out = dict(zip(layers, net.run({"a": a, "b": b}, *layers.values())))
    np.testing.assert_array_equal(out["DIV"], [[-3, -2, 1, -3]])  # truncates toward zero
    np.testing.assert_array_equal(out["FLOOR_DIV"], [[-4, -2, 1, -4]])
    np.testing.assert_array_equal(out["EQUAL"], [[False, False, True, False]])
    np.testing.assert_array_equal(out["GREATER"], a > b)
    np.testing.assert_array_equal(out["LESS"], a < b)
    assert out["EQUAL"].dtype == np.bool_ and out["DIV"].dtype == np.int32


UNARY = {
    "EXP": (torch.exp, (-3, 3)), "LOG": (torch.log, (0.1, 5)), "SQRT": (torch.sqrt, (0.1, 5)),
    "RECIP": (torch.reciprocal, (0.5, 3)), "ABS": (torch.abs, (-3, 3)), "NEG": (torch.neg, (-3, 3)),
    "SIN": (torch.sin, (-3, 3)), "COS": (torch.cos, (-3, 3)), "ATAN": (torch.atan, (-3, 3)),
    "ERF": (torch.erf, (-3, 3)), "FLOOR": (torch.floor, (-3, 3)), "CEIL": (torch.ceil, (-3, 3)),
    "ROUND": (torch.round, (-3, 3)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", UNARY)
def test_unary(op, dtype):
    fn, (lo, hi) = UNARY[op]
    rng = np.random.default_rng(5)
    x = rng.uniform(lo, hi, (3, 50)).astype(dtype)
    if op == "ROUND":
        x[0, :4] = [0.5, 1.5, 2.5, -2.5]  # halves round to even
    net = Net()
    layer = net.network.add_unary(net.input("x", dtype, x.shape), getattr(trt.UnaryOperation, op))
    (out,) = net.run({"x": x}, layer.get_output(0))
    ref = fn(t64(x)).numpy()
    if op == "ROUND":
        np.testing.assert_array_equal(out[0, :4], [0, 2, 2, -2])
    assert_close(out, ref, TOL[dtype], op)


def scaled_tanh(x):
    return 1.5 * torch.tanh(0.5 * x)


SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805
ACTIVATIONS = {  # name: (torch reference, alpha, beta)
    "RELU": (F.relu, 0.0, 0.0),
    "SIGMOID": (torch.sigmoid, 0.0, 0.0),
    "TANH": (torch.tanh, 0.0, 0.0),
    "GELU_ERF": (F.gelu, 0.0, 0.0),
    "GELU_TANH": (lambda x: F.gelu(x, approximate="tanh"), 0.0, 0.0),
    "LEAKY_RELU": (lambda x: F.leaky_relu(x, 0.1), 0.1, 0.0),
    "ELU": (lambda x: F.elu(x, 0.7), 0.7, 0.0),
    "SELU": (F.selu, SELU_ALPHA, SELU_SCALE),
    "SOFTSIGN": (F.softsign, 0.0, 0.0),
    "SOFTPLUS": (lambda x: F.softplus(x, beta=2.0, threshold=100.0), 0.5, 2.0),
    "CLIP": (lambda x: torch.clamp(x, -1.0, 0.5), -1.0, 0.5),
    "HARD_SIGMOID": (F.hardsigmoid, 1 / 6, 0.5),
    "SCALED_TANH": (scaled_tanh, 1.5, 0.5),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_activation(kind, dtype):
    fn, alpha, beta = ACTIVATIONS[kind]
    rng = np.random.default_rng(6)
    x = randn(rng, (4, 64), dtype, scale=2.0)
    net = Net()
    layer = net.network.add_activation(net.input("x", dtype, x.shape), getattr(trt.ActivationType, kind))
    layer.alpha, layer.beta = alpha, beta
    (out,) = net.run({"x": x}, layer.get_output(0))
    assert out.dtype == dtype
    assert_close(out, fn(t64(x)).numpy(), TOL[dtype], kind)


# ---- data movement ---------------------------------------------------------------------------------

def test_shuffle_transpose_reshape_transpose():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    net = Net()
    layer = net.network.add_shuffle(net.input("x", np.float32, x.shape))
    layer.first_transpose = (0, 2, 3, 1)  # [2, 4, 5, 3]
    layer.reshape_dims = (0, -1, 3)  # 0 copies dim 0: [2, 20, 3]
    layer.second_transpose = (0, 2, 1)  # [2, 3, 20]
    (out,) = net.run({"x": x}, layer.get_output(0))
    np.testing.assert_array_equal(out, x.transpose(0, 2, 3, 1).reshape(2, 20, 3).transpose(0, 2, 1))


def test_shuffle_reshape_from_constant_tensor():
    x = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    net = Net()
    layer = net.network.add_shuffle(net.input("x", np.float16, x.shape))
    layer.set_input(1, net.const(np.array([4, 6], np.int64)))
    (out,) = net.run({"x": x}, layer.get_output(0))
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, x.reshape(4, 6))


def test_concatenation_slice_gather_select_squeeze_identity():
    rng = np.random.default_rng(7)
    a, b = randn(rng, (2, 3, 4)), randn(rng, (2, 5, 4))
    table = randn(rng, (10, 6))
    ids = np.array([[0, 9, 3], [3, 3, 1]], np.int32)
    net = Net()
    ta, tb = net.input("a", np.float32, a.shape), net.input("b", np.float32, b.shape)
    concat = net.network.add_concatenation([ta, tb])
    concat.axis = 1
    sliced = net.network.add_slice(concat.get_output(0), (1, 1, 0), (1, 3, 2), (1, 2, 3))
    gathered = net.network.add_gather(net.const(table), net.input("ids", np.int32, ids.shape), 0)
    zero = net.const(np.zeros((1, 1, 1), np.float32))
    greater = net.network.add_elementwise(ta, zero, trt.ElementWiseOperation.GREATER)
    select = net.network.add_select(greater.get_output(0), ta, net.const(np.full((1, 1, 1), -1.0, np.float32)))
    axes = net.const(np.array([0, 3], np.int64))
    unsqueezed = net.network.add_unsqueeze(ta, axes)
    squeezed = net.network.add_squeeze(unsqueezed.get_output(0), axes)
    identity = net.network.add_identity(ta)
    outs = net.run({"a": a, "b": b, "ids": ids}, concat.get_output(0), sliced.get_output(0), gathered.get_output(0),
                   select.get_output(0), unsqueezed.get_output(0), squeezed.get_output(0), identity.get_output(0))
    cat = np.concatenate([a, b], axis=1)
    np.testing.assert_array_equal(outs[0], cat)
    np.testing.assert_array_equal(outs[1], cat[1:2, 1:7:2, 0:4:3])
    np.testing.assert_array_equal(outs[2], table[ids])
    np.testing.assert_array_equal(outs[3], np.where(a > 0, a, -1.0))
    np.testing.assert_array_equal(outs[4], a[None, :, :, None])
    np.testing.assert_array_equal(outs[5], a)
    np.testing.assert_array_equal(outs[6], a)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32])
def test_topk_values_and_indices(dtype):
    rng = np.random.default_rng(17)
    x = rng.permutation(2 * 3 * 9).reshape(2, 3, 9).astype(dtype)  # distinct values: the order is defined
    net = Net()
    tx = net.input("x", dtype, x.shape)
    top = net.network.add_topk(tx, trt.TopKOperation.MAX, 4, 1 << 2)
    bottom = net.network.add_topk(tx, trt.TopKOperation.MIN, 2, 1 << 1)
    outs = net.run({"x": x}, top.get_output(0), top.get_output(1), bottom.get_output(0), bottom.get_output(1))
    for (values, indices), largest, k, axis in zip((outs[:2], outs[2:]), (True, False), (4, 2), (2, 1)):
        ref = torch.topk(torch.from_numpy(x.astype(np.float64)), k, dim=axis, largest=largest)
        assert values.dtype == dtype and indices.dtype == np.int32
        np.testing.assert_array_equal(values, ref.values.numpy().astype(dtype))
        np.testing.assert_array_equal(indices, ref.indices.numpy())


def test_topk_ties_take_the_lower_index():
    x = np.array([[1.0, 5.0, 2.0, 5.0, 5.0]], np.float32)
    net = Net()
    top = net.network.add_topk(net.input("x", np.float32, x.shape), trt.TopKOperation.MAX, 2, 1 << 1)
    (indices,) = net.run({"x": x}, top.get_output(1))
    np.testing.assert_array_equal(indices, [[1, 3]])


def test_gather_with_one_elementwise_dim():
    """out[b] = data[b] indexed along `axis` by indices[b]: one token per sequence, as CLIP pools."""
    rng = np.random.default_rng(18)
    data = randn(rng, (3, 7, 4), np.float16)
    indices = np.array([[6], [0], [3]], np.int32)
    net = Net()
    layer = net.network.add_gather(net.input("data", np.float16, data.shape), net.input("i", np.int32, (3, 1)), 1)
    layer.num_elementwise_dims = 1
    (out,) = net.run({"data": data, "i": indices}, layer.get_output(0))
    ref = torch.gather(torch.from_numpy(data), 1, torch.from_numpy(indices).long()[:, :, None].expand(3, 1, 4))
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, ref.numpy())


def test_cast():
    x = np.array([[-2.7, -0.5, 0.0, 0.4, 5.6, 1e-4, 65519.0, 3.3]], np.float32)
    net = Net()
    tx = net.input("x", np.float32, x.shape)
    to_int = net.network.add_cast(tx, trt.int32)
    to_half = net.network.add_cast(tx, trt.float16)
    to_bool = net.network.add_cast(tx, trt.bool)
    back = net.network.add_cast(to_int.get_output(0), trt.float32)
    i, h, b, f = net.run({"x": x}, *(layer.get_output(0) for layer in (to_int, to_half, to_bool, back)))
    np.testing.assert_array_equal(i, [[-2, 0, 0, 0, 5, 0, 65519, 3]])  # truncation toward zero
    assert i.dtype == np.int32 and h.dtype == np.float16 and b.dtype == np.bool_ and f.dtype == np.float32
    np.testing.assert_array_equal(h, x.astype(np.float16))
    np.testing.assert_array_equal(b, x != 0)
    np.testing.assert_array_equal(f, i.astype(np.float32))


# ---- softmax, reduce, normalization ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, 3])
def test_softmax(axis, dtype):
    rng = np.random.default_rng(8)
    x = randn(rng, (2, 5, 3, 7), dtype, scale=3.0)
    net = Net()
    layer = net.network.add_softmax(net.input("x", dtype, x.shape))
    layer.axes = 1 << axis
    (out,) = net.run({"x": x}, layer.get_output(0))
    assert out.dtype == dtype
    assert_close(out, torch.softmax(t64(x), axis).numpy(), TOL[dtype], f"softmax axis {axis}")


REDUCE = {"SUM": np.sum, "PROD": np.prod, "MAX": np.max, "MIN": np.min, "AVG": np.mean}


@pytest.mark.parametrize("keep_dims", [True, False])
@pytest.mark.parametrize("op", REDUCE)
def test_reduce(op, keep_dims):
    rng = np.random.default_rng(9)
    x = rng.uniform(0.5, 1.5, (2, 3, 4, 5)).astype(np.float32)
    net = Net()
    layer = net.network.add_reduce(net.input("x", np.float32, x.shape), getattr(trt.ReduceOperation, op),
                                   0b1010, keep_dims)  # axes 1 and 3
    (out,) = net.run({"x": x}, layer.get_output(0))
    ref = REDUCE[op](x.astype(np.float64), axis=(1, 3), keepdims=keep_dims)
    assert_close(out, ref, TOL[np.float32], op)


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_per_channel_affine(dtype):
    """add_normalization_v2 (through backend): scale/bias [1, C, 1, 1]."""
    rng = np.random.default_rng(10)
    x, gamma, beta = randn(rng, (2, 8, 5, 6), dtype, 2.0) + dtype(1), randn(rng, (8,), dtype), randn(rng, (8,), dtype)
    net = Net()
    scale, bias = net.const(gamma.reshape(1, 8, 1, 1)), net.const(beta.reshape(1, 8, 1, 1))
    layer = backend.get().add_normalization(net.network, net.input("x", dtype, x.shape), scale, bias, 0b1100)
    layer.num_groups, layer.epsilon = 4, 1e-5
    (out,) = net.run({"x": x}, layer.get_output(0))
    ref = F.group_norm(t64(x), 4, t64(gamma), t64(beta), eps=1e-5)
    assert out.dtype == dtype
    assert_close(out, ref.numpy(), TOL[dtype], "group norm")


def test_group_norm_legacy_per_group_affine():
    """Legacy add_normalization: GroupNorm scale/bias are [1, G, 1, 1], one value per group."""
    rng = np.random.default_rng(11)
    x, gamma, beta = randn(rng, (2, 6, 4, 4)), randn(rng, (3,)), randn(rng, (3,))
    net = Net()
    layer = net.network.add_normalization(net.input("x", np.float32, x.shape), net.const(gamma.reshape(1, 3, 1, 1)),
                                          net.const(beta.reshape(1, 3, 1, 1)), 0b1100)
    layer.num_groups = 3
    (out,) = net.run({"x": x}, layer.get_output(0))
    ref = F.group_norm(t64(x), 3, t64(np.repeat(gamma, 2)), t64(np.repeat(beta, 2)), eps=layer.epsilon)
    assert_close(out, ref.numpy(), TOL[np.float32], "legacy group norm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm(dtype):
    rng = np.random.default_rng(12)
    x, gamma, beta = randn(rng, (2, 7, 32), dtype), randn(rng, (32,), dtype), randn(rng, (32,), dtype)
    net = Net()
    scale, bias = net.const(gamma.reshape(1, 1, 32)), net.const(beta.reshape(1, 1, 32))
    layer = backend.get().add_normalization(net.network, net.input("x", dtype, x.shape), scale, bias, 1 << 2)
    layer.epsilon = 1e-6
    (out,) = net.run({"x": x}, layer.get_output(0))
    ref = F.layer_norm(t64(x), (32,), t64(gamma), t64(beta), eps=1e-6)
    assert_close(out, ref.numpy(), TOL[dtype], "layer norm")


# ---- resize ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("by", ["scales", "shape"])
def test_resize_nearest_2x(by, dtype):
    rng = np.random.default_rng(13)
    x = randn(rng, (2, 3, 4, 5), dtype)
    net = Net()
    layer = net.network.add_resize(net.input("x", dtype, x.shape))
    layer.resize_mode = trt.InterpolationMode.NEAREST
    if by == "scales":
        layer.scales = (1.0, 1.0, 2.0, 2.0)
    else:
        layer.shape = (2, 3, 8, 10)
    (out,) = net.run({"x": x}, layer.get_output(0))
    np.testing.assert_array_equal(out, F.interpolate(t64(x), scale_factor=2, mode="nearest").numpy().astype(dtype))


@pytest.mark.parametrize("mode", ["nearest-exact", "bilinear", "bilinear-align-corners"])
def test_resize_coordinate_transformations(mode):
    """HALF_PIXEL + HALF_UP is torch's nearest-exact; LINEAR with HALF_PIXEL / ALIGN_CORNERS is bilinear."""
    rng = np.random.default_rng(14)
    x = randn(rng, (1, 2, 8, 5))  # 8 -> 4 under HALF_PIXEL lands every row on a .5 tie
    net = Net()
    layer = net.network.add_resize(net.input("x", np.float32, x.shape))
    layer.shape = (1, 2, 4, 9)
    if mode == "nearest-exact":
        layer.coordinate_transformation = trt.ResizeCoordinateTransformation.HALF_PIXEL
        layer.nearest_rounding = trt.ResizeRoundMode.HALF_UP
        ref = F.interpolate(t64(x), size=(4, 9), mode="nearest-exact")
    else:
        layer.resize_mode = trt.InterpolationMode.LINEAR
        corners = mode == "bilinear-align-corners"
        layer.coordinate_transformation = (trt.ResizeCoordinateTransformation.ALIGN_CORNERS if corners
                                           else trt.ResizeCoordinateTransformation.HALF_PIXEL)
        ref = F.interpolate(t64(x), size=(4, 9), mode="bilinear", align_corners=corners)
    (out,) = net.run({"x": x}, layer.get_output(0))
    assert_close(out, ref.numpy(), TOL[np.float32], mode)


# ---- quantize / dequantize -------------------------------------------------------------------------

def quantize_net(x, scale, to, axis=None):
    net = Net()
    tx = net.input("x", x.dtype.type, x.shape)
    ts = net.const(scale)
    q = net.network.add_quantize(tx, ts, to)
    dq = net.network.add_dequantize(q.get_output(0), ts, trt.float32 if x.dtype == np.float32 else trt.float16)
    if axis is not None:
        q.axis = dq.axis = axis
    return net.run({"x": x}, q.get_output(0), dq.get_output(0))


def test_quantize_int8_round_half_even_and_saturate():
    x = np.array([2.5, 3.5, -2.5, 0.5, 1.5, -0.5, 1.25, 200.0, -200.0, 127.4, -128.6], np.float32)
    q, dq = quantize_net(x * 0.5, np.array(0.5, np.float32), trt.int8)  # x * 0.5 / 0.5 is exact
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, [2, 4, -2, 0, 2, 0, 1, 127, -128, 127, -128])
    np.testing.assert_array_equal(dq, q.astype(np.float32) * 0.5)


def test_quantize_int8_per_channel_weight_fp16():
    rng = np.random.default_rng(15)
    w = randn(rng, (4, 6), np.float16)
    scale = (np.abs(w.astype(np.float32)).max(axis=1) / 127).astype(np.float16)
    scale[1] /= 4  # channel 1 saturates
    q, dq = quantize_net(w, scale, trt.int8, axis=0)
    expected = [[max(-128, min(127, round(float(w[c, j]) / float(scale[c])))) for j in range(6)] for c in range(4)]
    np.testing.assert_array_equal(q, expected)  # Python's round() rounds halves to even
    assert dq.dtype == np.float16
    assert_close(dq, np.array(expected) * scale.astype(np.float64)[:, None], TOL[np.float16], "per-channel dequantize")


def test_quantize_fp8_e4m3_saturate_and_round():
    x = np.array([448.0, 500.0, -1000.0, 1.0, 0.5, -0.375, 240.0, 17.0, 19.0, 0.0], np.float32)
    q, dq = quantize_net(x, np.array(1.0, np.float32), trt.fp8)
    assert q.dtype == ml_dtypes.float8_e4m3fn
    # 17 and 19 are ties between e4m3 neighbours 16/18 and 18/20: to the even mantissa.
    np.testing.assert_array_equal(q.astype(np.float32), [448, 448, -448, 1, 0.5, -0.375, 240, 16, 20, 0])
    np.testing.assert_array_equal(dq, q.astype(np.float32))


def test_fp8_constant_weights_cannot_be_read_back():
    """TensorRT's Python API returns fp8/bf16 weights as opaque objects: netexec must say so, not guess."""
    w = np.array([1.0, 2.0], np.float32).astype(ml_dtypes.float8_e4m3fn)
    net = Net()
    net.arrays.append(w)
    constant = net.network.add_constant((2,), trt.Weights(trt.fp8, w.ctypes.data, w.size))
    with pytest.raises(NotImplementedError, match="FP8"):
        net.run({}, constant.get_output(0))


# ---- attention -------------------------------------------------------------------------------------

needs_attention = pytest.mark.skipif(not backend.get().has_attention_layer,
                                     reason="this TensorRT has no fused attention API")


def attention_net(q, k, v, causal=False, mask=None, quantize=None):
    net = Net()
    dtype = q.dtype.type
    att = net.network.add_attention(net.input("q", dtype, q.shape), net.input("k", dtype, k.shape),
                                    net.input("v", dtype, v.shape), trt.AttentionNormalizationOp.SOFTMAX, causal)
    feeds = {"q": q, "k": k, "v": v}
    if mask is not None:
        att.mask = net.input("mask", mask.dtype.type, mask.shape)
        feeds["mask"] = mask
    if quantize is not None:
        # The scale constant is created after the attention: netexec must not rely on creation order.
        scale, to = quantize
        att.normalization_quantize_scale = net.const(np.array(scale, np.float32))
        att.normalization_quantize_to_type = to
    (out,) = net.run(feeds, att.get_output(0))
    return out


def qkv(rng, dtype, heads=2, kv_heads=2, sq=6, skv=9, d=8):
    q = randn(rng, (2, heads, sq, d), dtype, scale=1 / math.sqrt(d))  # pre-scaled, as the caller must
    return q, randn(rng, (2, kv_heads, skv, d), dtype), randn(rng, (2, kv_heads, skv, d), dtype)


@needs_attention
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention(dtype):
    q, k, v = qkv(np.random.default_rng(16), dtype)
    out = attention_net(q, k, v)
    ref = F.scaled_dot_product_attention(t64(q), t64(k), t64(v), scale=1.0)
    assert out.dtype == dtype and out.shape == (2, 2, 6, 8)
    assert_close(out, ref.numpy(), TOL[dtype], "attention")


@needs_attention
def test_attention_causal_and_masks():
    rng = np.random.default_rng(17)
    q, k, v = qkv(rng, np.float32, sq=7, skv=7)
    causal = attention_net(q, k, v, causal=True)
    ref = F.scaled_dot_product_attention(t64(q), t64(k), t64(v), is_causal=True, scale=1.0)
    assert_close(causal, ref.numpy(), TOL[np.float32], "causal")
    bool_mask = rng.random((2, 1, 7, 7)) < 0.7
    bool_mask[..., 0] = True  # every query sees at least one key
    out = attention_net(q, k, v, mask=bool_mask)
    ref = F.scaled_dot_product_attention(t64(q), t64(k), t64(v), attn_mask=torch.from_numpy(bool_mask), scale=1.0)
    assert_close(out, ref.numpy(), TOL[np.float32], "bool mask")
    float_mask = randn(rng, (1, 2, 7, 7))
    out = attention_net(q, k, v, mask=float_mask)
    ref = F.scaled_dot_product_attention(t64(q), t64(k), t64(v), attn_mask=t64(float_mask), scale=1.0)
    assert_close(out, ref.numpy(), TOL[np.float32], "float mask")


@needs_attention
@pytest.mark.skipif(not hasattr(trt, "CausalMaskKind"), reason="causal_kind is TensorRT 11 / TensorRT-RTX 1.7")
def test_attention_causal_lower_right():
    """LOWER_RIGHT aligns the last query with the last key: query i sees keys j <= i + (Skv - Sq)."""
    q, k, v = qkv(np.random.default_rng(21), np.float32, sq=3, skv=7)
    net = Net()
    att = net.network.add_attention_v2(net.input("q", np.float32, q.shape), net.input("k", np.float32, k.shape),
                                       net.input("v", np.float32, v.shape), trt.AttentionNormalizationOp.SOFTMAX,
                                       trt.CausalMaskKind.LOWER_RIGHT)
    (out,) = net.run({"q": q, "k": k, "v": v}, att.get_output(0))
    allowed = torch.tensor([[j <= i + 4 for j in range(7)] for i in range(3)])
    ref = F.scaled_dot_product_attention(t64(q), t64(k), t64(v), attn_mask=allowed, scale=1.0)
    assert_close(out, ref.numpy(), TOL[np.float32], "lower-right causal")


@needs_attention
@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_attention_normalization_quantize(kind):
    """The softmax output goes through Q/DQ with the given scale before BMM2."""
    q, k, v = qkv(np.random.default_rng(18), np.float16)
    scale = 1 / 448 if kind == "fp8" else 1 / 127
    out = attention_net(q, k, v, quantize=(scale, trt.fp8 if kind == "fp8" else trt.int8))
    probs = torch.softmax(t64(q) @ t64(k).transpose(-1, -2), -1).float() / scale
    if kind == "fp8":
        probs = probs.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    else:
        probs = torch.round(probs).clamp(-128, 127)
    ref = (probs.double() * scale) @ t64(v)
    assert_close(out, ref.numpy(), TOL[np.float16], f"{kind} probabilities")


@needs_attention
def test_attention_group_query():
    q, k, v = qkv(np.random.default_rng(19), np.float32, heads=4, kv_heads=2)
    out = attention_net(q, k, v)
    ref = F.scaled_dot_product_attention(t64(q), t64(k), t64(v), scale=1.0, enable_gqa=True)
    assert_close(out, ref.numpy(), TOL[np.float32], "group-query attention")


# ---- a small block end to end ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_resnet_like_block_end_to_end(dtype):
    """conv -> group norm -> SiLU (x * sigmoid(x)) -> conv, plus the residual, against torch."""
    rng = np.random.default_rng(20)
    c = 8
    x = randn(rng, (2, c, 6, 6), dtype)
    w1, b1, w2, b2 = (randn(rng, s, dtype, 0.2) for s in ((c, c, 3, 3), (c,), (c, c, 3, 3), (c,)))
    gamma, beta = randn(rng, (c,), dtype) + dtype(1), randn(rng, (c,), dtype)
    net = Net()
    tx = net.input("x", dtype, x.shape)
    conv1 = net.network.add_convolution_nd(tx, c, (3, 3), net.weights(w1), net.weights(b1))
    conv1.padding_nd = (1, 1)
    norm = backend.get().add_normalization(net.network, conv1.get_output(0), net.const(gamma.reshape(1, c, 1, 1)),
                                           net.const(beta.reshape(1, c, 1, 1)), 0b1100)
    norm.num_groups = 4
    sig = net.network.add_activation(norm.get_output(0), trt.ActivationType.SIGMOID)
    silu = net.network.add_elementwise(norm.get_output(0), sig.get_output(0), trt.ElementWiseOperation.PROD)
    conv2 = net.network.add_convolution_nd(silu.get_output(0), c, (3, 3), net.weights(w2), net.weights(b2))
    conv2.padding_nd = (1, 1)
    residual = net.network.add_elementwise(tx, conv2.get_output(0), trt.ElementWiseOperation.SUM)
    (out,) = net.run({"x": x}, residual.get_output(0))
    h = F.conv2d(t64(x), t64(w1), t64(b1), padding=1)
    h = F.silu(F.group_norm(h, 4, t64(gamma), t64(beta), eps=norm.epsilon))
    ref = t64(x) + F.conv2d(h, t64(w2), t64(b2), padding=1)
    assert out.dtype == dtype
    assert_close(out, ref.numpy(), 2 * TOL[dtype], "resnet-like block")


# ---- contract: feeds, outputs, errors ----------------------------------------------------------------

def two_layer_net():
    net = Net()
    x = net.input("x", np.float32, (-1, 4))
    relu = net.network.add_activation(x, trt.ActivationType.RELU)
    relu.name = "relu"
    neg = net.network.add_unary(relu.get_output(0), trt.UnaryOperation.NEG)
    net.network.mark_output(neg.get_output(0))
    return net, relu, neg


def test_dynamic_batch_and_intermediate_outputs():
    net, relu, neg = two_layer_net()
    x = np.array([[1.0, -2.0, 3.0, -4.0]] * 3)  # float64 feed, cast to the declared float32
    out = netexec.run(net.network, {"x": x})
    np.testing.assert_array_equal(out[neg.get_output(0).name], -np.maximum(x, 0))
    inner = netexec.run(net.network, {"x": x}, outputs=[relu.get_output(0).name])
    assert list(inner) == [relu.get_output(0).name] and inner[relu.get_output(0).name].dtype == np.float32


@pytest.mark.parametrize("feeds,match", [
    ({}, "no feed for network input 'x'"),
    ({"x": np.zeros((2, 5), np.float32)}, r"'x' \(shape \(-1, 4\)"),
    ({"x": np.zeros((4,), np.float32)}, "has shape"),
    ({"x": np.zeros((2, 4), np.float32), "y": np.zeros(1)}, "not inputs of the network"),
])
def test_bad_feeds_raise_value_error(feeds, match):
    net, _, _ = two_layer_net()
    with pytest.raises(ValueError, match=match):
        netexec.run(net.network, feeds)


def test_unknown_output_name_raises_value_error():
    net, _, _ = two_layer_net()
    with pytest.raises(ValueError, match="no tensor named 'nope'"):
        netexec.run(net.network, {"x": np.zeros((1, 4), np.float32)}, outputs=["nope"])


def test_unimplemented_layer_type_raises():
    net = Net()
    einsum = net.network.add_einsum([net.input("x", np.float32, (2, 8))], "ij->ji")
    einsum.name = "my_einsum"
    with pytest.raises(NotImplementedError, match="'my_einsum' has type EINSUM"):
        net.run({"x": np.zeros((2, 8), np.float32)}, einsum.get_output(0))


def test_unimplemented_attribute_raises():
    net = Net()
    layer = net.network.add_resize(net.input("x", np.float32, (1, 1, 4, 4)))
    layer.scales = (1.0, 1.0, 2.0, 2.0)
    layer.resize_mode = trt.InterpolationMode.CUBIC
    with pytest.raises(NotImplementedError, match="resize mode CUBIC"):
        net.run({"x": np.ones((1, 1, 4, 4), np.float32)}, layer.get_output(0))


def test_invalid_network_is_reported():
    """A strongly typed network mixing fp16 and fp32 in one elementwise has no valid output: say so."""
    net = Net()
    layer = net.network.add_elementwise(net.input("a", np.float16, (2,)), net.input("b", np.float32, (2,)),
                                        trt.ElementWiseOperation.SUM)
    with pytest.raises(ValueError, match="network is invalid"):
        net.run({"a": np.ones(2, np.float16), "b": np.ones(2, np.float32)}, layer.get_output(0))
