"""Per-layer tests: each function of trt_sdxl.layers emitted alone into a fresh network, run by
netexec, compared with the numpy reference (trt_sdxl.reference) on random inputs, fp32, fp16 and bf16.

Tolerances are relative L2 errors: fp32 networks must agree to float32 rounding; fp16 networks
round every tensor to fp16 (about 5e-4 relative each), so a few layers stay below 3e-3; bf16
keeps 3 fewer mantissa bits, so 8x that.
"""

from __future__ import annotations

import numpy as np
from oracle import rel_l2
import pytest

from trt_sdxl import layers as L
from trt_sdxl import netexec
from trt_sdxl import reference as R

TOL = {"fp32": 2e-5, "fp16": 3e-3, "bf16": 2.5e-2}  # bf16 keeps 8 mantissa bits to fp16's 11: 8x fp16


class ArrayWeights:
    """Weights held in a dict, with the checkpoint's get() contract (shape check, consumption)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.consumed: set[str] = set()

    def get(self, name, dtype=np.float16, shape=None):
        array = self.arrays[name]
        assert shape is None or tuple(array.shape) == tuple(shape), (name, array.shape, shape)
        self.consumed.add(name)
        return array.astype(dtype)


def run_layer(precision, arrays, inputs, emit):
    """Emit `emit(d, *input_tensors)` into a new network; run it with netexec on `inputs`."""
    weights = ArrayWeights(arrays)
    d = L.new_definition(weights, precision)
    tensors = [L.add_input(d, f"in{i}", x.shape, d.dtype if x.dtype.kind == "f" else x.dtype)
               for i, x in enumerate(inputs)]
    L.mark_output(d, emit(d, *tensors), "out", np.float32)
    feeds = {f"in{i}": x.astype(d.dtype) if x.dtype.kind == "f" else x for i, x in enumerate(inputs)}
    assert weights.consumed == set(arrays), f"unused weights: {set(arrays) - weights.consumed}"
    return netexec.run(d.network, feeds)["out"], d


def as_compute(x, precision):
    """The input as the network sees it (fp16 networks take fp16 inputs), in float64 for the reference."""
    return x.astype(L.COMPUTE_DTYPES[precision]).astype(np.float64)


PRECISIONS = ["fp32", "fp16", "bf16"]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("stride,padding,kernel", [(1, 1, 3), (2, 1, 3), (1, 0, 1)])
def test_conv2d(precision, stride, padding, kernel, rng):
    x = rng.standard_normal((2, 6, 9, 12)).astype(np.float32)
    w = (rng.standard_normal((5, 6, kernel, kernel)) * 0.2).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    out, d = run_layer(precision, {"c.weight": w, "c.bias": b}, [x],
                       lambda d, t: L.conv2d(d, t, "c", 5, kernel, stride=stride, padding=padding))
    ref = R.conv2d(as_compute(x, precision), as_compute(w, precision), as_compute(b, precision), stride, padding)
    err = rel_l2(out, ref)
    assert out.shape == ref.shape
    assert err < TOL[precision], f"conv2d {precision} k{kernel} s{stride}: rel L2 {err:.2e}"
    assert d.macs[0].macs == 2 * 5 * ref.shape[2] * ref.shape[3] * 6 * kernel * kernel


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("scale", [1.0, 0.125])
def test_linear(precision, scale, rng):
    x = rng.standard_normal((2, 7, 16)).astype(np.float32)
    w = (rng.standard_normal((24, 16)) * 0.3).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    out, _ = run_layer(precision, {"fc.weight": w, "fc.bias": b}, [x],
                       lambda d, t: L.linear(d, t, "fc", 24, weight_scale=scale))
    ref = R.linear(as_compute(x, precision), as_compute(w, precision), as_compute(b, precision)) * scale
    err = rel_l2(out, ref)
    assert err < TOL[precision], f"linear {precision} scale {scale}: rel L2 {err:.2e}"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("groups,eps", [(4, 1e-5), (8, 1e-6)])
def test_group_norm(precision, groups, eps, rng):
    x = (rng.standard_normal((2, 16, 5, 7)) * 3 + 1).astype(np.float32)
    g = rng.standard_normal(16).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    out, _ = run_layer(precision, {"n.weight": g, "n.bias": b}, [x],
                       lambda d, t: L.group_norm(d, t, "n", groups, eps))
    ref = R.group_norm(as_compute(x, precision), groups, as_compute(g, precision), as_compute(b, precision), eps)
    err = rel_l2(out, ref)
    assert err < TOL[precision], f"group_norm {precision} G={groups}: rel L2 {err:.2e}"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_layer_norm(precision, rng):
    x = (rng.standard_normal((2, 9, 24)) * 2 - 0.5).astype(np.float32)
    g = rng.standard_normal(24).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    out, _ = run_layer(precision, {"ln.weight": g, "ln.bias": b}, [x], lambda d, t: L.layer_norm(d, t, "ln"))
    ref = R.layer_norm(as_compute(x, precision), as_compute(g, precision), as_compute(b, precision), 1e-5)
    err = rel_l2(out, ref)
    assert err < TOL[precision], f"layer_norm {precision}: rel L2 {err:.2e}"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("fn", ["silu", "gelu"])
def test_activations(precision, fn, rng):
    x = (rng.standard_normal((3, 40)) * 3).astype(np.float32)
    out, _ = run_layer(precision, {}, [x], lambda d, t: getattr(L, fn)(d, t))
    ref = getattr(R, fn)(as_compute(x, precision))
    err = rel_l2(out, ref)
    assert err < TOL[precision], f"{fn} {precision}: rel L2 {err:.2e}"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_geglu(precision, rng):
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    w = (rng.standard_normal((2 * 32, 16)) * 0.3).astype(np.float32)
    b = rng.standard_normal(2 * 32).astype(np.float32)
    out, _ = run_layer(precision, {"ff.proj.weight": w, "ff.proj.bias": b}, [x],
                       lambda d, t: L.geglu(d, t, "ff", 32))
    ref = R.geglu(as_compute(x, precision), as_compute(w, precision), as_compute(b, precision))
    err = rel_l2(out, ref)
    assert err < TOL[precision], f"geglu {precision}: rel L2 {err:.2e}"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_attention(precision, rng):
    q = rng.standard_normal((2, 3, 10, 8)).astype(np.float32)
    k = rng.standard_normal((2, 3, 7, 8)).astype(np.float32)
    v = rng.standard_normal((2, 3, 7, 8)).astype(np.float32)
    scale = 1 / np.sqrt(8)
    out, _ = run_layer(precision, {}, [q * scale, k, v], lambda d, a, b, c: L.attention(d, a, b, c, "att"))
    ref = R.attention(as_compute(q * scale, precision), as_compute(k, precision), as_compute(v, precision), scale=1.0)
    err = rel_l2(out, ref)
    assert err < TOL[precision], f"attention {precision}: rel L2 {err:.2e}"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("cross", [False, True])
def test_multi_head_attention(precision, cross, rng):
    c, heads, cc = 24, 3, 12  # head size 8 != number of heads
    x = rng.standard_normal((2, 10, c)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, cc)).astype(np.float32) if cross else x
    in_ctx = cc if cross else c
    arrays = {
        "a.to_q.weight": (rng.standard_normal((c, c)) * 0.3).astype(np.float32),
        "a.to_k.weight": (rng.standard_normal((c, in_ctx)) * 0.3).astype(np.float32),
        "a.to_v.weight": (rng.standard_normal((c, in_ctx)) * 0.3).astype(np.float32),
        "a.to_out.0.weight": (rng.standard_normal((c, c)) * 0.3).astype(np.float32),
        "a.to_out.0.bias": rng.standard_normal(c).astype(np.float32),
    }
    inputs = [x, ctx] if cross else [x]
    out, _ = run_layer(precision, arrays, inputs,
                       lambda d, t, *rest: L.multi_head_attention(d, t, rest[0] if rest else t, "a", heads))
    cw = {k: as_compute(v, precision) for k, v in arrays.items()}
    ref = R.multi_head_attention(as_compute(x, precision), as_compute(ctx, precision), cw["a.to_q.weight"],
                                 cw["a.to_k.weight"], cw["a.to_v.weight"], cw["a.to_out.0.weight"],
                                 cw["a.to_out.0.bias"], heads)
    err = rel_l2(out, ref)
    assert err < TOL[precision] * 2, f"multi-head attention {precision} cross={cross}: rel L2 {err:.2e}"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_upsample_nearest2x(precision, rng):
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    out, _ = run_layer(precision, {}, [x], lambda d, t: L.upsample_nearest2x(d, t))
    ref = R.upsample_nearest2x(as_compute(x, precision))
    assert out.shape == (2, 3, 10, 14)
    assert rel_l2(out, ref) == 0.0, "nearest upsampling copies values exactly"


@pytest.mark.parametrize("dim,flip,shift", [(32, True, 0), (16, False, 1)])
def test_timestep_embedding(dim, flip, shift):
    t = np.array([0.0, 1.0, 17.0, 499.5, 999.0], np.float32)
    out, _ = run_layer("fp16", {}, [t], lambda d, x: L.timestep_embedding(d, x, dim, flip, shift))
    ref = R.timestep_embedding(t.astype(np.float64), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    err = rel_l2(out, ref)
    # computed in fp32 even in fp16 networks: sin/cos of arguments up to ~1000 rad
    assert err < 1e-5, f"timestep embedding dim {dim}: rel L2 {err:.2e}"
