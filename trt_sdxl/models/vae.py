"""The decoder half of diffusers' AutoencoderKL (SDXL's VAE) as a TensorRT network, named like the checkpoint.

latent -> post_quant_conv -> decoder (conv_in, mid block, up blocks, GroupNorm-SiLU-conv_out) -> image,
as `AutoencoderKL.decode` computes it. The encoder is not part of text-to-image, so its tensors
are marked skipped. The network takes `latent` and returns `image` in float32 whatever the
precision: the scheduler keeps latents in fp32 and the image goes on to be written as a PNG,
so the runtime never converts to or from fp16/bf16 at either end.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .. import layers as L
from . import blocks as B
from ..errors import UserError
from ..layers import Definition
from ..shapes import ImageProfile, box

PRECISIONS = ("fp32", "bf16", "fp16")
EPS = 1e-6  # diffusers' Decoder hard-codes eps 1e-6 for every resnet, attention and the output norm
ENCODER_PREFIXES = ("encoder.", "quant_conv.")


@dataclass(frozen=True)
class VAEConfig:
    """The parts of diffusers' AutoencoderKL config the decoder depends on."""

    latent_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    mid_block_add_attention: bool
    use_post_quant_conv: bool
    force_upcast: bool
    scaling_factor: float

    @property
    def upscale(self) -> int:
        """Image pixels per latent pixel along a side: 8 for SDXL (one 2x upsampler per block but the last)."""
        return 2 ** (len(self.block_out_channels) - 1)


def parse_config(cfg: dict) -> VAEConfig:
    """Check that the config describes a decoder we can write (AutoencoderKL, GroupNorm, SiLU), and extract it."""
    channels = tuple(int(c) for c in cfg.get("block_out_channels", (64,)))
    up = tuple(cfg.get("up_block_types", ("UpDecoderBlock2D",)))
    if cfg.get("act_fn", "silu") != "silu":
        raise UserError(f"vae config act_fn={cfg['act_fn']!r} is not supported (SDXL's VAE uses 'silu')")
    if cfg.get("norm_type", "group") != "group":
        raise UserError(f"vae config norm_type={cfg['norm_type']!r} is not supported (SDXL's VAE uses 'group')")
    if any(t != "UpDecoderBlock2D" for t in up):
        raise UserError(f"vae config up_block_types={list(up)} is not supported "
                        "(SDXL's VAE uses UpDecoderBlock2D for every block)")
    if len(up) != len(channels):
        raise UserError(f"vae config up_block_types has {len(up)} entries for {len(channels)} block_out_channels")
    groups = int(cfg.get("norm_num_groups", 32))
    if any(c % groups for c in channels):
        raise UserError(f"vae config norm_num_groups={groups} does not divide block_out_channels={list(channels)}")
    return VAEConfig(
        latent_channels=int(cfg.get("latent_channels", 4)),
        out_channels=int(cfg.get("out_channels", 3)),
        block_out_channels=channels,
        layers_per_block=int(cfg.get("layers_per_block", 1)),
        norm_num_groups=groups,
        mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
        use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
        force_upcast=bool(cfg.get("force_upcast", True)),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
    )


# ---------------------------------------------------------------- blocks


def attention_block(d: Definition, x, path: str, groups: int):
    """diffusers' Attention as the VAE mid block uses it: GN, one head over all channels, biased q/k/v, + input."""
    n = L.group_norm(d, x, f"{path}.group_norm", groups, EPS)
    n = L.image_to_tokens(d, n)  # [B, C, H, W] -> [B, HW, C]
    # heads = C // attention_head_dim, and the Decoder sets attention_head_dim to C
    o = L.multi_head_attention(d, n, n, path, heads=1, qkv_bias=True)  # [B, HW, C]
    o = L.tokens_to_image(d, o, x)  # [B, HW, C] -> [B, C, H, W]
    return L.add(d, o, x, name=f"{path}.residual")  # rescale_output_factor is 1 in the Decoder


def decoder(d: Definition, cfg: VAEConfig, z):
    """AutoencoderKL._decode: post_quant_conv, then the Decoder; z [B, latent, h, w] -> [B, out, 8h, 8w]."""
    groups = cfg.norm_num_groups
    if cfg.use_post_quant_conv:
        z = L.conv2d(d, z, "post_quant_conv", cfg.latent_channels, 1)  # [B, latent, h, w]
    top = cfg.block_out_channels[-1]
    h = L.conv2d(d, z, "decoder.conv_in", top, 3, padding=1)  # [B, top, h, w]

    h = B.resnet(d, h, None, "decoder.mid_block.resnets.0", top, groups, EPS)
    if cfg.mid_block_add_attention:
        h = attention_block(d, h, "decoder.mid_block.attentions.0", groups)
    h = B.resnet(d, h, None, "decoder.mid_block.resnets.1", top, groups, EPS)

    n_blocks = len(cfg.block_out_channels)
    for i, out in enumerate(reversed(cfg.block_out_channels)):
        path = f"decoder.up_blocks.{i}"
        for j in range(cfg.layers_per_block + 1):
            h = B.resnet(d, h, None, f"{path}.resnets.{j}", out, groups, EPS)  # [B, out, H, W]
        if i < n_blocks - 1:
            h = B.upsample(d, h, f"{path}.upsamplers.0")  # [B, out, 2H, 2W]

    h = L.silu(d, L.group_norm(d, h, "decoder.conv_norm_out", groups, EPS))
    return L.conv2d(d, h, "decoder.conv_out", cfg.out_channels, 3, padding=1)  # [B, out, 8h, 8w]


# ---------------------------------------------------------------- the network


class VAENetwork(L.DefinedNetwork):
    """A defined VAE decoder: `.network` (INetworkDefinition) kept alive with its builder and weights."""


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"--vae-precision {precision}: expected one of {', '.join(PRECISIONS)} "
                        "(the VAE is not quantized)")


def _check_precision(precision: str, cfg: VAEConfig) -> None:
    check_precision(precision)
    if precision == "fp16" and cfg.force_upcast:
        warnings.warn(
            "--vae-precision fp16: these VAE weights are known to overflow in fp16 (their config sets "
            "force_upcast), which gives black or NaN images; use --vae-precision fp32 or bf16, or fp16-fix "
            "weights (e.g. madebyollin/sdxl-vae-fp16-fix)",
            stacklevel=3,
        )


def input_profile(cfg: VAEConfig, profile: ImageProfile) -> dict[str, tuple]:
    """{input: (min, opt, max)} of one profile: `latent` is 1/8 of the image."""
    return {"latent": box(profile.batch, cfg.latent_channels, profile.height.divided(8), profile.width.divided(8))}


def define(model, precision: str = "fp32", batch: int = 1, latent_height: int = 128,
           latent_width: int = 128, profiles: list[ImageProfile] | None = None) -> VAENetwork:
    """Define the VAE decoder of `model` (pipeline folder, `vae/` folder, single file or opened component).

    Input `latent` [B, latent_channels, h, w] float32, as `AutoencoderKL.decode` receives it (already
    divided by the scaling factor); output `image` [B, 3, 8h, 8w] float32 in [-1, 1], not clamped.
    `precision`: fp32 (default), bf16, or fp16 for weights fine-tuned not to overflow in it.
    `profiles`: define at the first one's opt shape and widen the axes they vary (trt_sdxl.shapes).
    """
    from .. import weights as W

    component = W.open_component(model, "vae")
    cfg = parse_config(component.config)
    _check_precision(precision, cfg)
    if profiles:
        batch, _, latent_height, latent_width = input_profile(cfg, profiles[0])["latent"][1]
    if batch < 1 or latent_height < 1 or latent_width < 1:
        raise UserError(f"batch {batch}, latent {latent_height}x{latent_width}: expected positive sizes")
    for key in component.keys():
        if key.startswith(ENCODER_PREFIXES):
            component.skip(key, "the encoder (image -> latent) is not used for text-to-image")
    d = L.new_definition(component, precision)
    specs = {"latent": ((batch, cfg.latent_channels, latent_height, latent_width), np.float32)}
    latent = L.add_input(d, "latent", *specs["latent"])
    image = decoder(d, cfg, L.cast(d, latent, d.dtype))
    L.mark_output(d, image, "image", np.float32)
    component.check_all_consumed()
    net = VAENetwork(d, cfg, specs)
    if profiles:
        net.set_profiles([input_profile(cfg, p) for p in profiles])
    return net
