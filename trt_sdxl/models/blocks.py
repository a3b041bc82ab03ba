"""Blocks shared by the UNet and the VAE decoder: ResnetBlock2D, Downsample2D, Upsample2D."""

from __future__ import annotations

from .. import layers as L
from ..layers import Definition, shape


def resnet(d: Definition, x, temb_silu, path: str, out_channels: int, groups: int, eps: float):
    """ResnetBlock2D: GN-SiLU-conv, (+ time projection), GN-SiLU-conv, + (1x1-projected) input.

    `temb_silu` is SiLU(time embedding) [B, T] in the UNet, None in the VAE (no time input).
    """
    c = shape(x)[1]
    h = L.silu(d, L.group_norm(d, x, f"{path}.norm1", groups, eps))
    h = L.conv2d(d, h, f"{path}.conv1", out_channels, 3, padding=1)  # [B, O, H, W]
    if temb_silu is not None:
        t = L.linear(d, temb_silu, f"{path}.time_emb_proj", out_channels)  # [B, O]
        h = L.add(d, h, L.reshape(d, t, (0, 0, 1, 1)))
    h = L.silu(d, L.group_norm(d, h, f"{path}.norm2", groups, eps))
    h = L.conv2d(d, h, f"{path}.conv2", out_channels, 3, padding=1)
    shortcut = x if c == out_channels else L.conv2d(d, x, f"{path}.conv_shortcut", out_channels, 1)
    return L.add(d, shortcut, h, name=f"{path}.residual")


def downsample(d: Definition, x, path: str):
    """Downsample2D: 3x3 conv, stride 2, padding 1."""
    return L.conv2d(d, x, f"{path}.conv", shape(x)[1], 3, stride=2, padding=1)


def upsample(d: Definition, x, path: str):
    """Upsample2D: nearest 2x, then 3x3 conv."""
    h = L.upsample_nearest2x(d, x, name=f"{path}.interpolate")
    return L.conv2d(d, h, f"{path}.conv", shape(x)[1], 3, padding=1)
