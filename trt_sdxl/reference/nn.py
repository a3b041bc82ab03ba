"""Plain numpy references for the neural-network ops of SDXL's UNet, text encoders and VAE.

Each function is written from the op's formula (given in its docstring with the shapes)
over explicit arrays, in the floating type numpy promotes its inputs to. Images are
NCHW. These are the ground truth that netexec and the layer helpers are tested against,
so clarity wins over speed.
"""

import math

import numpy as np


def _pair(v):
    """An int or a 2-sequence as a (height, width) pair."""
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    h, w = v
    return int(h), int(w)


def conv2d(x, w, b=None, stride=1, padding=0, groups=1):
    """2-D cross-correlation with zero padding, as torch.nn.functional.conv2d.

    x: [B, Cin, H, W]; w: [Cout, Cin/groups, kh, kw]; b: [Cout] or None.
    stride, padding: int or (h, w). Channels split into `groups` independent groups,
    g = o // (Cout/groups):

        y[n, o, i, j] = b[o] + Σ_c Σ_p Σ_q w[o, c, p, q] · xpad[n, g·Cin/groups + c, i·sh + p, j·sw + q]

    Returns y: [B, Cout, Ho, Wo] with Ho = (H + 2·ph − kh) // sh + 1 (likewise Wo).
    """
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    batch, cin, _, _ = x.shape
    cout, cin_per_group, kh, kw = w.shape
    if cin != cin_per_group * groups or cout % groups:
        raise ValueError(f"conv2d: x has {cin} channels, w is {w.shape}, groups={groups}")
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    # windows[n, c, i, j, p, q] = xpad[n, c, i·sh + p, j·sw + q]
    windows = np.lib.stride_tricks.sliding_window_view(xpad, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    ho, wo = windows.shape[2:4]
    windows = windows.reshape(batch, groups, cin_per_group, ho, wo, kh, kw)  # [B, G, Cin/G, Ho, Wo, kh, kw]
    wg = w.reshape(groups, cout // groups, cin_per_group, kh, kw)            # [G, Cout/G, Cin/G, kh, kw]
    y = np.einsum("ngchwpq,gocpq->ngohw", windows, wg, optimize=True).reshape(batch, cout, ho, wo)
    if b is not None:
        y = y + b.reshape(1, cout, 1, 1)
    return y


def linear(x, w, b=None):
    """Affine map on the last axis, as torch.nn.functional.linear.

    x: [..., in]; w: [out, in]; b: [out] or None.   y = x · wᵀ + b  -> [..., out]
    """
    y = x @ w.T
    return y if b is None else y + b


def group_norm(x, num_groups, gamma, beta, eps):
    """Group normalization (Wu & He, 2018), as torch.nn.functional.group_norm.

    x: [B, C, *spatial]; gamma, beta: [C]. The C channels split into `num_groups` groups;
    over each (sample, group), with μ and σ² the mean and biased variance of its
    C/num_groups · Π(spatial) values:

        y = (x − μ) / sqrt(σ² + eps) · gamma[c] + beta[c]
    """
    batch, channels = x.shape[:2]
    if channels % num_groups:
        raise ValueError(f"group_norm: {channels} channels do not split into {num_groups} groups")
    xg = x.reshape(batch, num_groups, -1)                        # [B, G, C/G · Π(spatial)]
    mean = xg.mean(axis=-1, keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=-1, keepdims=True)
    xhat = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
    affine_shape = (1, channels) + (1,) * (x.ndim - 2)
    return xhat * gamma.reshape(affine_shape) + beta.reshape(affine_shape)


def layer_norm(x, gamma, beta, eps):
    """Layer normalization (Ba et al., 2016) over the last axis, as torch.nn.functional.layer_norm.

    x: [..., C]; gamma, beta: [C]. With μ and σ² the mean and biased variance over C:

        y = (x − μ) / sqrt(σ² + eps) · gamma + beta
    """
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def sigmoid(x):
    """σ(x) = 1 / (1 + e^(−x)), evaluated as (1 + tanh(x/2)) / 2, which never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def silu(x):
    """SiLU / swish: silu(x) = x · σ(x)."""
    return x * sigmoid(x)


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    """Exact GELU (Hendrycks & Gimpel, 2016): gelu(x) = x · Φ(x) = x/2 · (1 + erf(x / √2))."""
    x = np.asarray(x)
    erf = _erf(x / math.sqrt(2.0)).astype(x.dtype)
    return 0.5 * x * (1.0 + erf)


def gelu_tanh(x):
    """GELU, tanh approximation: x/2 · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def quick_gelu(x):
    """CLIP's GELU approximation: quick_gelu(x) = x · σ(1.702 · x)."""
    return x * sigmoid(1.702 * x)


def geglu(x, w, b):
    """GEGLU feed-forward input (Shazeer, 2020), as diffusers.models.activations.GEGLU.

    x: [..., C]; w: [2·D, C]; b: [2·D]. The projection's first half is the value h,
    the second half the gate g:

        [h, g] = x · wᵀ + b,   y = h · gelu(g)   -> [..., D]
    """
    hidden, gate = np.split(linear(x, w, b), 2, axis=-1)
    return hidden * gelu(gate)


def softmax(x, axis=-1):
    """softmax(x)_i = e^(x_i − m) / Σ_j e^(x_j − m) along `axis`, with m = max_j x_j for stability."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def attention(q, k, v, scale=None, mask=None, causal=False):
    """Scaled dot-product attention (Vaswani et al., 2017), as torch's scaled_dot_product_attention.

    q: [B, N, Sq, H]; k: [B, N, Sk, H]; v: [B, N, Sk, Hv] (N heads).

        out = softmax(scale · q · kᵀ + M) · v   -> [B, N, Sq, Hv],   scale defaults to 1/√H

    mask broadcasts to [B, N, Sq, Sk]: boolean (True = key takes part, M = 0 there and
    −∞ elsewhere) or float (added to the logits as M). causal lets query i see keys
    j ≤ i (aligned at the top-left, as torch does when Sq ≠ Sk).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    logits = scale * (q @ np.swapaxes(k, -1, -2))                    # [B, N, Sq, Sk]
    if causal:
        sq, sk = logits.shape[-2:]
        logits = np.where(np.tril(np.ones((sq, sk), dtype=bool)), logits, -np.inf)
    if mask is not None:
        mask = np.asarray(mask)
        logits = np.where(mask, logits, -np.inf) if mask.dtype == bool else logits + mask
    return softmax(logits, axis=-1) @ v


def multi_head_attention(x, context, wq, wk, wv, wo, bo, heads, bq=None, bk=None, bv=None, causal=False):
    """Multi-head attention with linear projections, as diffusers' Attention (AttnProcessor2_0).

    x: [B, Sq, Cq]; context: [B, Sk, Ckv], or None for self-attention (context = x).
    wq: [N·H, Cq]; wk, wv: [N·H, Ckv]; wo: [Cout, N·H]; bo: [Cout] or None; N = heads.
    bq, bk, bv: optional projection biases (the UNet has none; CLIP and the VAE do).

        q = x·wqᵀ,  k = context·wkᵀ,  v = context·wvᵀ,   each split into N heads of size H
        out = concat_heads(attention(q, k, v)) · woᵀ + bo   -> [B, Sq, Cout]
    """
    if context is None:
        context = x

    def split_heads(t):  # [B, S, N·H] -> [B, N, S, H]
        batch, seq, inner = t.shape
        return t.reshape(batch, seq, heads, inner // heads).transpose(0, 2, 1, 3)

    q = split_heads(linear(x, wq, bq))
    k = split_heads(linear(context, wk, bk))
    v = split_heads(linear(context, wv, bv))
    o = attention(q, k, v, causal=causal)                             # [B, N, Sq, H]
    batch, _, seq, _ = o.shape
    o = o.transpose(0, 2, 1, 3).reshape(batch, seq, -1)               # [B, Sq, N·H]
    return linear(o, wo, bo)


def upsample_nearest2x(x):
    """Nearest-neighbour 2× upsampling of an image: y[n, c, i, j] = x[n, c, ⌊i/2⌋, ⌊j/2⌋].

    x: [B, C, H, W] -> [B, C, 2H, 2W].
    """
    return np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)


def timestep_embedding(timesteps, dim, flip_sin_to_cos=True, downscale_freq_shift=0, max_period=10000):
    """Sinusoidal timestep embedding (DDPM; diffusers' get_timestep_embedding).

    timesteps: [N] (may be fractional); returns [N, dim]. With half = dim // 2 and
    i = 0 … half − 1:

        f_i = max_period^(−i / (half − downscale_freq_shift)),   a_i = t · f_i
        emb = [sin(a), cos(a)], or [cos(a), sin(a)] when flip_sin_to_cos

    An odd dim gets one zero column at the end. The defaults are SDXL's (its UNet and
    its added-time embedding of time_ids). Computed in float64, returned as float32
    unless the timesteps are float64.
    """
    timesteps = np.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timestep_embedding: timesteps must be 1-D, got shape {timesteps.shape}")
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / (half - downscale_freq_shift))
    angles = timesteps.astype(np.float64)[:, None] * freqs[None, :]   # [N, half]
    sin, cos = np.sin(angles), np.cos(angles)
    emb = np.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float64 if timesteps.dtype == np.float64 else np.float32)
