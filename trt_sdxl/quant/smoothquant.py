"""SmoothQuant (Xiao et al. 2023, arXiv:2211.10438): move activation outliers into the weights.

Per input channel j of a linear layer y = x W^T:
    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha),   W' = W diag(s),   X' = X diag(1/s)
so X' W'^T = X W^T exactly, while X' has flatter channels and quantizes with less error.
Layers that read the same tensor share one s (their W maxima are combined), which keeps the
result exact for any alpha. alpha is chosen per layer group by a search that minimizes the
quantized group's output error on activation rows sampled during calibration.
"""

from __future__ import annotations

import numpy as np

from ..reference import fake_quant
from .recipe import QMAX

ALPHA_GRID = tuple(np.round(np.arange(0.0, 1.0001, 0.1), 2))
_TINY = 1e-5


def smoothing_scales(x_channel_amax: np.ndarray, w_channel_amax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = x_j^alpha / w_j^(1-alpha), with both maxima floored so silent channels keep s finite."""
    x = np.maximum(np.asarray(x_channel_amax, np.float64), _TINY)
    w = np.maximum(np.asarray(w_channel_amax, np.float64), _TINY)
    s = x**alpha / w ** (1.0 - alpha)
    return np.clip(s, 1e-4, 1e4)


def weight_channel_amax(weights: list[np.ndarray]) -> np.ndarray:
    """max over output rows (and over the layers of a group) of |W[:, j]| for each input channel j."""
    return np.max([np.abs(w.reshape(w.shape[0], w.shape[1], -1)).max(axis=(0, 2)) for w in weights], axis=0)


def quantized_output_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray | None, x_amax: float,
                           fmt: str) -> float:
    """Relative L2 error of the group's outputs when X (per tensor) and W (per output channel) are
    fake-quantized, with smoothing s (None = no smoothing); x_amax is the activation amax before smoothing
    expressed per channel through s (the caller passes max_j(amax_j / s_j))."""
    x = np.asarray(x, np.float64)
    xs = x if s is None else x / s
    xq = fake_quant(xs, x_amax, fmt)
    num = den = 0.0
    for w in weights:
        w = np.asarray(w, np.float64)
        ws = w if s is None else w * s
        w_amax = np.maximum(np.abs(ws).max(axis=1), _TINY)
        wq = fake_quant(ws, w_amax, fmt, axis=0)
        ref = x @ w.T
        num += float(np.sum((xq @ wq.T - ref) ** 2))
        den += float(np.sum(ref**2))
    return float(np.sqrt(num / max(den, 1e-30)))


def search_alpha(samples: np.ndarray, weights: list[np.ndarray], x_channel_amax: np.ndarray, fmt: str,
                 grid=ALPHA_GRID) -> tuple[float | None, dict]:
    """Best alpha for a group (None = no smoothing) and the error of every candidate.

    The activation amax a candidate sees is the calibrated per-channel amax divided by s,
    maximized over channels — the same per-tensor amax the quantized network will use.
    """
    assert fmt in QMAX
    w_amax = weight_channel_amax(weights)
    errors: dict = {"none": quantized_output_error(samples, weights, None, float(np.max(x_channel_amax)), fmt)}
    for alpha in grid:
        s = smoothing_scales(x_channel_amax, w_amax, alpha)
        errors[float(alpha)] = quantized_output_error(samples, weights, s, float(np.max(x_channel_amax / s)), fmt)
    best = min(errors, key=errors.get)
    return (None if best == "none" else best), errors
