"""trt_sdxl.reference against PyTorch / diffusers / transformers on the CPU as independent implementations.

Fixed-seed random inputs, float64 wherever the reference implementation allows it;
the figure compared is the relative L2 error ‖out − ref‖ / ‖ref‖, except for the
quantizers, whose integer / FP8 codes must match bit for bit.
"""

import ml_dtypes
import numpy as np
from oracle import rel_l2
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import get_timestep_embedding
from transformers.activations import QuickGELUActivation

from trt_sdxl import reference as ref

FLOAT64_TOL = 1e-12


def assert_close(name, out, expected, tol):
    assert out.shape == expected.shape, f"{name}: shape {out.shape}, expected {expected.shape}"
    err = rel_l2(out, expected)
    assert err <= tol, f"{name}: relative L2 error {err:.3e} > tolerance {tol:.0e}"


def assert_same_codes(name, out, expected):
    assert out.shape == expected.shape, f"{name}: shape {out.shape}, expected {expected.shape}"
    bad = np.flatnonzero(out.ravel() != expected.ravel())
    assert bad.size == 0, (
        f"{name}: {bad.size} of {out.size} codes differ, first at flat index {bad[0]}: "
        f"{out.ravel()[bad[0]]} vs {expected.ravel()[bad[0]]}"
    )


def rng(seed):
    return np.random.default_rng(seed)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# --- convolution and linear -------------------------------------------------------------

@pytest.mark.parametrize(
    "batch, cin, cout, hw, kernel, stride, padding, groups, bias",
    [
        (2, 4, 6, (7, 10), (3, 3), 1, 1, 1, True),     # SDXL resnet conv: 3x3, padding 1
        (2, 4, 6, (9, 8), (3, 3), 2, 1, 1, True),      # SDXL downsampler: stride 2, padding 1
        (1, 6, 4, (5, 11), (3, 3), 1, 1, 2, True),     # grouped
        (2, 4, 4, (6, 5), (3, 3), 1, 1, 4, False),     # depthwise, no bias
        (2, 5, 3, (4, 7), (1, 1), 1, 0, 1, True),      # 1x1 (conv_shortcut, proj_in)
        (1, 3, 2, (8, 6), (3, 2), (2, 1), (0, 2), 1, True),  # non-square kernel, stride, padding
    ],
)
def test_conv2d(batch, cin, cout, hw, kernel, stride, padding, groups, bias):
    r = rng(1)
    x = r.standard_normal((batch, cin, *hw))
    w = r.standard_normal((cout, cin // groups, *kernel))
    b = r.standard_normal(cout) if bias else None
    out = ref.conv2d(x, w, b, stride=stride, padding=padding, groups=groups)
    expected = F.conv2d(t(x), t(w), None if b is None else t(b), stride=stride, padding=padding, groups=groups)
    assert_close("conv2d", out, expected.numpy(), FLOAT64_TOL)


@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias):
    r = rng(2)
    x = r.standard_normal((2, 5, 12))
    w = r.standard_normal((7, 12))
    b = r.standard_normal(7) if bias else None
    expected = F.linear(t(x), t(w), None if b is None else t(b)).numpy()
    assert_close("linear", ref.linear(x, w, b), expected, FLOAT64_TOL)


# --- normalization ------------------------------------------------------------------------

@pytest.mark.parametrize("shape, groups", [((2, 8, 5, 7), 4), ((2, 6, 9), 3), ((1, 32, 4, 4), 32)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_group_norm(shape, groups, eps):
    r = rng(3)
    x = 3.0 * r.standard_normal(shape) + 2.0  # non-zero mean so centring matters
    gamma, beta = r.standard_normal(shape[1]), r.standard_normal(shape[1])
    expected = F.group_norm(t(x), groups, t(gamma), t(beta), eps).numpy()
    assert_close("group_norm", ref.group_norm(x, groups, gamma, beta, eps), expected, FLOAT64_TOL)


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_layer_norm(eps):
    r = rng(4)
    x = 2.0 * r.standard_normal((2, 9, 24)) - 1.0
    gamma, beta = r.standard_normal(24), r.standard_normal(24)
    expected = F.layer_norm(t(x), (24,), t(gamma), t(beta), eps).numpy()
    assert_close("layer_norm", ref.layer_norm(x, gamma, beta, eps), expected, FLOAT64_TOL)


# --- activations --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, ours, theirs",
    [
        ("silu", ref.silu, F.silu),
        ("gelu", ref.gelu, F.gelu),
        ("gelu_tanh", ref.gelu_tanh, lambda v: F.gelu(v, approximate="tanh")),
        ("quick_gelu", ref.quick_gelu, QuickGELUActivation()),
    ],
)
def test_activation(name, ours, theirs):
    x = 4.0 * rng(5).standard_normal((2, 3, 50))
    x[0, 0, :4] = [-40.0, 40.0, 0.0, -1e-3]  # saturated tails and the origin
    assert_close(name, ours(x), theirs(t(x)).numpy(), FLOAT64_TOL)


def test_gelu_float32_keeps_dtype():
    x = rng(6).standard_normal((4, 8)).astype(np.float32)
    out = ref.gelu(x)
    assert out.dtype == np.float32, f"gelu turned float32 into {out.dtype}"
    assert_close("gelu float32", out, F.gelu(t(x)).numpy(), 1e-6)


def test_geglu_matches_diffusers():
    r = rng(7)
    dim_in, dim_out = 12, 20
    w, b = r.standard_normal((2 * dim_out, dim_in)), r.standard_normal(2 * dim_out)
    module = GEGLU(dim_in, dim_out).double()
    module.load_state_dict({"proj.weight": t(w), "proj.bias": t(b)})
    x = r.standard_normal((2, 6, dim_in))
    with torch.no_grad():
        expected = module(t(x)).numpy()
    assert_close("geglu", ref.geglu(x, w, b), expected, FLOAT64_TOL)


# --- softmax and attention ----------------------------------------------------------------

@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax(axis):
    x = 50.0 * rng(8).standard_normal((2, 7, 9)) + 1000.0  # exp(x) alone would overflow
    expected = torch.softmax(t(x), dim=axis).numpy()
    assert_close(f"softmax axis={axis}", ref.softmax(x, axis=axis), expected, FLOAT64_TOL)


@pytest.mark.parametrize(
    "sq, sk, scale, mask_kind, causal",
    [
        (5, 5, None, None, False),
        (5, 7, None, None, False),      # cross-attention lengths
        (5, 7, 0.3, None, False),
        (5, 7, None, "bool", False),
        (5, 7, None, "float", False),
        (6, 6, None, None, True),
        (4, 7, None, None, True),       # causal, top-left aligned
    ],
)
def test_attention(sq, sk, scale, mask_kind, causal):
    r = rng(9)
    batch, heads, head_dim = 2, 3, 8
    q = r.standard_normal((batch, heads, sq, head_dim))
    k = r.standard_normal((batch, heads, sk, head_dim))
    v = r.standard_normal((batch, heads, sk, head_dim))
    mask = None
    if mask_kind == "bool":
        mask = r.random((batch, 1, sq, sk)) < 0.7
        mask[..., 0] = True  # every query keeps at least one key
    elif mask_kind == "float":
        mask = r.standard_normal((batch, 1, sq, sk))
    expected = F.scaled_dot_product_attention(
        t(q), t(k), t(v), attn_mask=None if mask is None else t(mask), is_causal=causal, scale=scale
    ).numpy()
    out = ref.attention(q, k, v, scale=scale, mask=mask, causal=causal)
    assert_close(f"attention {mask_kind=} {causal=}", out, expected, FLOAT64_TOL)


@pytest.mark.parametrize("cross, bias", [(False, False), (True, False), (True, True)])
def test_multi_head_attention_matches_diffusers(cross, bias):
    r = rng(10)
    # heads (3) differs from the head size (8), and the inner width (24) from query_dim (20),
    # so a swapped reshape or a transposed weight cannot pass.
    query_dim, heads, dim_head, context_dim = 20, 3, 8, 28
    inner = heads * dim_head
    kv_dim = context_dim if cross else query_dim
    module = Attention(query_dim, cross_attention_dim=context_dim if cross else None,
                       heads=heads, dim_head=dim_head, bias=bias).double()
    weights = {
        "to_q.weight": r.standard_normal((inner, query_dim)) / np.sqrt(query_dim),
        "to_k.weight": r.standard_normal((inner, kv_dim)) / np.sqrt(kv_dim),
        "to_v.weight": r.standard_normal((inner, kv_dim)),
        "to_out.0.weight": r.standard_normal((query_dim, inner)),
        "to_out.0.bias": r.standard_normal(query_dim),
    }
    if bias:
        weights.update({f"to_{n}.bias": r.standard_normal(inner) for n in "qkv"})
    module.load_state_dict({name: t(value) for name, value in weights.items()})
    x = r.standard_normal((2, 10, query_dim))
    context = r.standard_normal((2, 7, context_dim)) if cross else None
    with torch.no_grad():
        expected = module(t(x), encoder_hidden_states=None if context is None else t(context)).numpy()
    out = ref.multi_head_attention(
        x, context, weights["to_q.weight"], weights["to_k.weight"], weights["to_v.weight"],
        weights["to_out.0.weight"], weights["to_out.0.bias"], heads,
        bq=weights.get("to_q.bias"), bk=weights.get("to_k.bias"), bv=weights.get("to_v.bias"),
    )
    assert_close(f"multi_head_attention {cross=} {bias=}", out, expected, FLOAT64_TOL)


def test_multi_head_attention_causal():
    r = rng(11)
    heads, dim_head, dim = 2, 6, 10
    x = r.standard_normal((2, 5, dim))
    wq, wk, wv = (r.standard_normal((heads * dim_head, dim)) for _ in range(3))
    wo, bo = r.standard_normal((dim, heads * dim_head)), r.standard_normal(dim)

    def split(a):  # [B, S, N·H] -> [B, N, S, H]
        return t(a).view(2, 5, heads, dim_head).transpose(1, 2)

    o = F.scaled_dot_product_attention(split(x @ wq.T), split(x @ wk.T), split(x @ wv.T), is_causal=True)
    expected = F.linear(o.transpose(1, 2).reshape(2, 5, -1), t(wo), t(bo)).numpy()
    out = ref.multi_head_attention(x, None, wq, wk, wv, wo, bo, heads, causal=True)
    assert_close("multi_head_attention causal", out, expected, FLOAT64_TOL)


# --- upsampling and embeddings ------------------------------------------------------------

def test_upsample_nearest2x():
    x = rng(12).standard_normal((2, 3, 4, 5))
    expected = F.interpolate(t(x), scale_factor=2.0, mode="nearest").numpy()
    assert_close("upsample_nearest2x", ref.upsample_nearest2x(x), expected, 0.0)


@pytest.mark.parametrize(
    "dim, flip, shift, max_period",
    [(320, True, 0, 10000), (256, True, 0, 10000), (7, True, 0, 10000), (64, False, 1, 10000), (33, False, 1, 500)],
)
def test_timestep_embedding(dim, flip, shift, max_period):
    timesteps = np.array([999.0, 0.5, 500.0, 1.0, 1024.0, 0.0], dtype=np.float32)  # 1024: time_ids size
    expected = get_timestep_embedding(
        t(timesteps), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, max_period=max_period
    ).numpy()
    out = ref.timestep_embedding(timesteps, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift,
                                 max_period=max_period)
    assert out.dtype == np.float32, f"timestep_embedding returned {out.dtype} for float32 timesteps"
    # diffusers forms t · f in float32: phases up to ~1000 carry ~6e-5 absolute rounding error.
    assert_close(f"timestep_embedding dim={dim}", out, expected, 2e-5)


# --- INT8 quantization --------------------------------------------------------------------

def test_int8_rounding_and_saturation_by_hand():
    scale = 0.5
    units = np.array([2.5, 3.5, -2.5, -3.5, 1.25, 0.75, 127.5, 1000.0, -128.5, -1000.0])  # x / scale
    expected = np.array([2, 4, -2, -4, 1, 1, 127, 127, -128, -128], dtype=np.int8)
    x = (units * scale).astype(np.float32)
    assert_same_codes("quantize_int8 by hand", ref.quantize_int8(x, scale), expected)


def int8_test_input(seed, shape, scale):
    """Random values plus exact ties k + 0.5 and values far beyond the int8 range, in units of scale."""
    r = rng(seed)
    x = 40.0 * r.standard_normal(shape)
    flat = x.reshape(-1)
    ties = np.arange(-131, 131) + 0.5
    flat[: ties.size] = ties
    flat[ties.size : ties.size + 4] = [500.0, -500.0, 127.5, -128.5]
    return (x * scale).astype(np.float32)


def test_quantize_int8_per_tensor():
    # A power of two: x / scale and torch's x · (1/scale) are both exact, and so is
    # torch's fake-quantized output divided back into codes.
    scale = 2.0**-5
    x = int8_test_input(13, (4, 200), scale)
    expected = torch.fake_quantize_per_tensor_affine(t(x), scale, 0, -128, 127).numpy()
    assert_same_codes("quantize_int8 per tensor", ref.quantize_int8(x, scale), (expected / scale).astype(np.int8))
    assert_same_codes("int8 quantize->dequantize", ref.dequantize(ref.quantize_int8(x, scale), scale), expected)


def test_quantize_int8_per_channel():
    r = rng(14)
    scales = (2.0 ** r.integers(-7, -2, size=6)).astype(np.float32)
    x = int8_test_input(15, (6, 300), 1.0).T * scales  # [300, 6], channel axis 1
    x = np.ascontiguousarray(x)
    zero = torch.zeros(6, dtype=torch.int32)
    expected = torch.fake_quantize_per_channel_affine(t(x), t(scales), zero, 1, -128, 127).numpy()
    codes = ref.quantize_int8(x, scales, axis=1)
    assert_same_codes("quantize_int8 per channel", codes, (expected / scales).astype(np.int8))
    assert_same_codes("int8 per-channel quantize->dequantize", ref.dequantize(codes, scales, axis=1), expected)


def test_fake_quant_int8_amax():
    r = rng(16)
    x = r.standard_normal((3, 8, 5, 5)).astype(np.float32)
    amax = np.float32(np.abs(x).max() * 0.8)  # clips the top 20 % of the range
    scale = float(amax / np.float32(127))
    expected = torch.fake_quantize_per_tensor_affine(t(x), scale, 0, -128, 127).numpy()
    assert_close("fake_quant int8 per tensor", ref.fake_quant(x, amax, "int8"), expected, 1e-6)

    amax_c = (np.abs(x).max(axis=(0, 2, 3)) * 0.9).astype(np.float32)  # per output channel, axis 1
    scales = t(amax_c / np.float32(127))
    expected = torch.fake_quantize_per_channel_affine(t(x), scales, torch.zeros(8, dtype=torch.int32), 1, -128, 127)
    assert_close("fake_quant int8 per channel", ref.fake_quant(x, amax_c, "int8", axis=1), expected.numpy(), 1e-6)


# --- FP8 e4m3 quantization ----------------------------------------------------------------

def torch_fp8_bits(x, scale):
    """Torch's own FP8 path: divide, saturate to ±448 (its cast alone gives NaN beyond), cast."""
    return (t(x) / t(np.asarray(scale, dtype=np.float32))).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def fp8_bits(q):
    assert q.dtype == ml_dtypes.float8_e4m3fn, f"quantize_fp8_e4m3 returned {q.dtype}"
    return q.view(np.uint8)


def test_fp8_rounding_and_saturation_by_hand():
    x = np.array([1.0625, 1.1875, -1.0625, 2**-10, 3 * 2**-10, 440.0, 460.0, 1e6, -1e6], dtype=np.float32)
    # ties to even: 1.0625 -> 1.0 (mantissa 000), 1.1875 -> 1.25 (010); 2^-10 is half the
    # smallest subnormal 2^-9 -> 0; 3·2^-10 -> 2^-8 (even); 440 -> 448; beyond ±448 saturates.
    expected = np.array([1.0, 1.25, -1.0, 0.0, 2**-8, 448.0, 448.0, 448.0, -448.0], dtype=np.float32)
    out = ref.quantize_fp8_e4m3(x, 1.0).astype(np.float32)
    np.testing.assert_array_equal(out, expected, err_msg="quantize_fp8_e4m3 by hand")


def test_quantize_fp8_every_value_and_tie():
    codes = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    grid = np.unique(codes[np.isfinite(codes)])                       # all finite e4m3 values, sorted
    midpoints = (grid[:-1] + grid[1:]) / 2                            # exact ties in float32
    x = np.concatenate([grid, midpoints, [500.0, -500.0, 449.0, -1e9]]).astype(np.float32)
    for scale in (1.0, 0.125):
        xs = x * np.float32(scale)
        assert_same_codes(f"quantize_fp8_e4m3 scale={scale}", fp8_bits(ref.quantize_fp8_e4m3(xs, scale)),
                          torch_fp8_bits(xs, scale))


def test_quantize_fp8_random_per_tensor_and_channel():
    r = rng(17)
    x = (r.standard_normal((5, 64, 9)) * np.exp(r.uniform(-8, 4, (5, 64, 9)))).astype(np.float32)
    scale = np.float32(0.37)
    assert_same_codes("quantize_fp8_e4m3 per tensor", fp8_bits(ref.quantize_fp8_e4m3(x, scale)),
                      torch_fp8_bits(x, scale))
    scales = r.uniform(0.01, 2.0, 64).astype(np.float32)
    assert_same_codes("quantize_fp8_e4m3 per channel", fp8_bits(ref.quantize_fp8_e4m3(x, scales, axis=1)),
                      torch_fp8_bits(x, scales.reshape(1, 64, 1)))


def test_fake_quant_fp8_amax():
    r = rng(18)
    x = r.standard_normal((2, 16, 6)).astype(np.float32)
    amax = np.float32(2.5)  # about 1 % of a standard normal lies beyond: saturation is exercised
    scale = amax / np.float32(448)
    expected = (t(x) / float(scale)).clamp(-448, 448).to(torch.float8_e4m3fn).float() * float(scale)
    out = ref.fake_quant(x, amax, "fp8")
    assert out.dtype == np.float32, f"fake_quant fp8 returned {out.dtype}"
    assert_close("fake_quant fp8 per tensor", out, expected.numpy(), 1e-6)
    assert rel_l2(out, x) < 0.1, f"fp8 fake quant error vs the input {rel_l2(out, x):.3e}, expected < 0.1"


def test_quant_rejects_mismatched_scale():
    with pytest.raises(ValueError, match="per-tensor"):
        ref.quantize_int8(np.ones((2, 3), np.float32), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="kind"):
        ref.fake_quant(np.ones(3, np.float32), 1.0, "int4")
