"""SDXL's UNet2DConditionModel as a TensorRT network, block by block, named like the checkpoint.

The structure is read from the component's config (block channels, heads, transformer
depth per block, layers per block, groups, cross-attention width) and every weight is
bound by its diffusers name, so the code below is a walk over the checkpoint's module tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import layers as L
from . import blocks as B
from ..errors import UserError
from ..layers import Definition, shape


@dataclass(frozen=True)
class UNetConfig:
    """The parts of diffusers' UNet2DConditionModel config this network depends on."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int
    heads: tuple[int, ...]  # per down block
    transformer_depth: tuple[int, ...]  # per down block
    transformer_depth_up: tuple[int, ...]  # per up block
    cross_attention_dim: int
    norm_num_groups: int
    norm_eps: float
    addition_time_embed_dim: int
    projection_class_embeddings_input_dim: int
    flip_sin_to_cos: bool
    freq_shift: float

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def num_time_ids(self) -> int:
        """6 for SDXL base (size, crop, target size); 5 for the refiner (size, crop, aesthetic score).

        The refiner attends to text_encoder_2's hidden states alone, so its cross-attention
        width equals the pooled text width: that is how its config gives it away.
        """
        five = self.projection_class_embeddings_input_dim - 5 * self.addition_time_embed_dim
        return 5 if five == self.cross_attention_dim else 6

    @property
    def text_embeds_dim(self) -> int:
        return self.projection_class_embeddings_input_dim - self.num_time_ids * self.addition_time_embed_dim


def _per_block(value, n: int, key: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise UserError(f"unet config {key}={value}: expected one value per block ({n})")
    return tuple(int(v) for v in value)


def parse_config(cfg: dict) -> UNetConfig:
    """Check that the config describes an SDXL-style UNet we can write, and extract it."""
    expected = {
        "addition_embed_type": "text_time",
        "use_linear_projection": True,
        "class_embed_type": None,
        "time_embedding_type": "positional",
        "resnet_time_scale_shift": "default",
        "only_cross_attention": False,
        "upcast_attention": False,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "encoder_hid_dim_type": None,
    }
    for key, value in expected.items():
        got = cfg.get(key, value)
        if isinstance(got, list):
            got = got[0] if len(set(got)) == 1 else got
        if value is False and got is None:  # published configs write null for "off"
            got = False
        if got != value:
            raise UserError(f"unet config {key}={got!r} is not supported (SDXL UNets use {value!r})")
    down = tuple(cfg["down_block_types"])
    up = tuple(cfg["up_block_types"])
    for t in down:
        if t not in ("DownBlock2D", "CrossAttnDownBlock2D"):
            raise UserError(f"unet config down_block_types: {t} is not supported")
    for t in up:
        if t not in ("UpBlock2D", "CrossAttnUpBlock2D"):
            raise UserError(f"unet config up_block_types: {t} is not supported")
    n = len(down)
    heads_cfg = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    depth = _per_block(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    reverse = cfg.get("reverse_transformer_layers_per_block")
    depth_up = tuple(max(x) if isinstance(x, list) else x for x in reverse) if reverse else tuple(reversed(depth))
    if reverse and any(isinstance(x, list) and len(set(x)) > 1 for x in reverse):
        raise UserError("unet config reverse_transformer_layers_per_block with per-layer depths is not supported")
    cross = cfg.get("cross_attention_dim", 1280)
    if not isinstance(cross, int):
        raise UserError(f"unet config cross_attention_dim={cross}: expected one integer")
    return UNetConfig(
        in_channels=int(cfg.get("in_channels", 4)),
        out_channels=int(cfg.get("out_channels", 4)),
        block_out_channels=tuple(cfg["block_out_channels"]),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=int(cfg.get("layers_per_block", 2)),
        heads=_per_block(heads_cfg, n, "attention_head_dim"),
        transformer_depth=depth,
        transformer_depth_up=depth_up,
        cross_attention_dim=cross,
        norm_num_groups=int(cfg.get("norm_num_groups", 32)),
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
        addition_time_embed_dim=int(cfg["addition_time_embed_dim"]),
        projection_class_embeddings_input_dim=int(cfg["projection_class_embeddings_input_dim"]),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
        freq_shift=float(cfg.get("freq_shift", 0)),
    )


# ---------------------------------------------------------------- blocks


def time_embedding(d: Definition, x, path: str, in_dim: int, out_dim: int):
    """TimestepEmbedding: linear_1 -> SiLU -> linear_2; x [B, in_dim] -> [B, out_dim]."""
    h = L.linear(d, x, f"{path}.linear_1", out_dim)
    return L.linear(d, L.silu(d, h), f"{path}.linear_2", out_dim)


def transformer_block(d: Definition, x, context, path: str, heads: int):
    """BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward, each pre-LN + residual."""
    c = shape(x)[2]
    h = L.layer_norm(d, x, f"{path}.norm1")
    x = L.add(d, x, L.multi_head_attention(d, h, h, f"{path}.attn1", heads), name=f"{path}.attn1.residual")
    h = L.layer_norm(d, x, f"{path}.norm2")
    x = L.add(d, x, L.multi_head_attention(d, h, context, f"{path}.attn2", heads), name=f"{path}.attn2.residual")
    h = L.layer_norm(d, x, f"{path}.norm3")
    h = L.geglu(d, h, f"{path}.ff.net.0", 4 * c)  # [B, S, 4C]
    h = L.linear(d, h, f"{path}.ff.net.2", c)  # [B, S, C]
    return L.add(d, x, h, name=f"{path}.ff.residual")


def spatial_transformer(d: Definition, x, context, path: str, heads: int, depth: int, cfg: UNetConfig):
    """Transformer2DModel with linear projections: GN, proj_in, `depth` blocks, proj_out, + input."""
    b, c, hh, ww = shape(x)
    h = L.group_norm(d, x, f"{path}.norm", cfg.norm_num_groups, 1e-6)
    h = L.reshape(d, h, (b, hh * ww, c), first_transpose=(0, 2, 3, 1))  # [B, C, H, W] -> [B, HW, C]
    h = L.linear(d, h, f"{path}.proj_in", c)
    for i in range(depth):
        h = transformer_block(d, h, context, f"{path}.transformer_blocks.{i}", heads)
    h = L.linear(d, h, f"{path}.proj_out", c)
    h = L.reshape(d, h, (b, hh, ww, c), second_transpose=(0, 3, 1, 2))  # [B, HW, C] -> [B, C, H, W]
    return L.add(d, h, x, name=f"{path}.residual")


# ---------------------------------------------------------------- the whole UNet


def unet(d: Definition, cfg: UNetConfig, sample, timestep, context, text_embeds, time_ids, progress=None):
    """The SDXL UNet forward; returns noise_pred [B, out_channels, h, w] in the compute dtype.

    `progress(message)` is called after each block (the full SDXL UNet has ~5000 layers).
    """
    report = progress or (lambda message: None)
    b = shape(sample)[0]
    ch0 = cfg.block_out_channels[0]

    # time and added (text_time) conditioning, computed in fp32, then the compute dtype
    t_emb = L.timestep_embedding(d, timestep, ch0, cfg.flip_sin_to_cos, cfg.freq_shift)  # [B, ch0]
    emb = time_embedding(d, L.cast(d, t_emb, d.dtype), "time_embedding", ch0, cfg.time_embed_dim)
    n_ids = cfg.num_time_ids
    ids = L.reshape(d, time_ids, (b * n_ids,))  # [B, 6] -> [B*6]
    ids_emb = L.timestep_embedding(d, ids, cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
    ids_emb = L.reshape(d, L.cast(d, ids_emb, d.dtype), (b, n_ids * cfg.addition_time_embed_dim))  # [B, 6*256]
    add_in = L.concat(d, [text_embeds, ids_emb], axis=1)  # [B, projection_class_embeddings_input_dim]
    aug = time_embedding(d, add_in, "add_embedding", cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
    emb = L.add(d, emb, aug, name="emb")  # [B, 4*ch0]
    temb_silu = L.silu(d, emb)  # every resnet's time_emb_proj starts with SiLU

    h = L.conv2d(d, sample, "conv_in", ch0, 3, padding=1)  # [B, ch0, h, w]
    skips = [h]
    n_blocks = len(cfg.block_out_channels)
    for i, block_type in enumerate(cfg.down_block_types):
        out = cfg.block_out_channels[i]
        path = f"down_blocks.{i}"
        for j in range(cfg.layers_per_block):
            h = B.resnet(d, h, temb_silu, f"{path}.resnets.{j}", out, cfg.norm_num_groups, cfg.norm_eps)
            if block_type == "CrossAttnDownBlock2D":
                h = spatial_transformer(d, h, context, f"{path}.attentions.{j}", cfg.heads[i],
                                        cfg.transformer_depth[i], cfg)
            skips.append(h)
        if i < n_blocks - 1:
            h = B.downsample(d, h, f"{path}.downsamplers.0")  # [B, C, h/2, w/2]
            skips.append(h)
        report(f"{path} defined ({d.network.num_layers} layers)")

    top = cfg.block_out_channels[-1]
    h = B.resnet(d, h, temb_silu, "mid_block.resnets.0", top, cfg.norm_num_groups, cfg.norm_eps)
    h = spatial_transformer(d, h, context, "mid_block.attentions.0", cfg.heads[-1], cfg.transformer_depth[-1], cfg)
    h = B.resnet(d, h, temb_silu, "mid_block.resnets.1", top, cfg.norm_num_groups, cfg.norm_eps)
    report(f"mid_block defined ({d.network.num_layers} layers)")

    rev_channels = list(reversed(cfg.block_out_channels))
    rev_heads = list(reversed(cfg.heads))
    for i, block_type in enumerate(cfg.up_block_types):
        out = rev_channels[i]
        path = f"up_blocks.{i}"
        for j in range(cfg.layers_per_block + 1):
            skip = skips.pop()
            h = L.concat(d, [h, skip], axis=1, name=f"{path}.resnets.{j}.skip_concat")  # [B, C+Cs, H, W]
            h = B.resnet(d, h, temb_silu, f"{path}.resnets.{j}", out, cfg.norm_num_groups, cfg.norm_eps)
            if block_type == "CrossAttnUpBlock2D":
                h = spatial_transformer(d, h, context, f"{path}.attentions.{j}", rev_heads[i],
                                        cfg.transformer_depth_up[i], cfg)
        if i < n_blocks - 1:
            h = B.upsample(d, h, f"{path}.upsamplers.0")  # [B, C, 2H, 2W]
        report(f"{path} defined ({d.network.num_layers} layers)")

    h = L.silu(d, L.group_norm(d, h, "conv_norm_out", cfg.norm_num_groups, cfg.norm_eps))
    return L.conv2d(d, h, "conv_out", cfg.out_channels, 3, padding=1)  # [B, out, h, w]


class UNetNetwork(L.DefinedNetwork):
    """A defined UNet: `.network` (INetworkDefinition) kept alive with its builder and weights."""


def default_image_side(config: dict) -> int:
    """The image side a UNet config was made for: its latent sample_size x 8 (SDXL: 128 -> 1024)."""
    return 8 * int(config.get("sample_size", 128))


def input_specs(cfg: UNetConfig, batch: int, latent_height: int, latent_width: int, dtype) -> dict[str, tuple]:
    return {
        "sample": ((batch, cfg.in_channels, latent_height, latent_width), dtype),
        "timestep": ((batch,), np.float32),
        "encoder_hidden_states": ((batch, 77, cfg.cross_attention_dim), dtype),
        "text_embeds": ((batch, cfg.text_embeds_dim), dtype),
        "time_ids": ((batch, cfg.num_time_ids), np.float32),
    }


def define(model, precision: str = "fp16", batch: int = 1, latent_height: int = 128, latent_width: int = 128,
           progress=None, calibration=None, quant_options: dict | None = None, calibration_taps: bool = False
           ) -> UNetNetwork:
    """Define the UNet of `model` (pipeline folder, `unet/` folder, single file or opened component).

    Inputs as diffusers' UNet arguments: `sample` [B, 4, h, w], `timestep` [B] (fp32),
    `encoder_hidden_states` [B, 77, 2048], `text_embeds` [B, 1280], `time_ids` [B, 6] (fp32; [B, 5] for the refiner);
    output `noise_pred` [B, 4, h, w]. `progress(message)`, if given, hears about each block.

    `precision` "int8"/"fp8" needs `calibration` (a CalibrationTable, or a path to one);
    `quant_options` may override the table's tuned choices (`rule`, `alphas`) — the tuning
    pipeline does that to compare candidates. `calibration_taps` defines the calibration
    network instead: FP16 plus per-channel abs-max outputs (`amax:<path>`) and sampled rows.
    """
    from .. import weights as W
    from ..quant.plan import CalibrationTaps, QuantPlan
    from ..quant.table import CalibrationTable

    from ..quant.recipe import RECIPES

    if precision not in ("fp32", "fp16") and precision not in RECIPES:
        raise UserError(f"--precision {precision}: expected one of fp16, int8, fp8 (or fp32)")
    component = W.open_component(model, "unet")
    W.check_unet_config(component)
    cfg = parse_config(component.config)
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if batch < 1 or latent_height % factor or latent_width % factor or min(latent_height, latent_width) < factor:
        raise UserError(
            f"batch {batch}, latent {latent_height}x{latent_width}: expected batch >= 1 and latent sides that are "
            f"positive multiples of {factor} (image sides multiples of {8 * factor})"
        )
    eight_bit = precision in RECIPES  # a recipe name: int8, fp8 (or a named level like int8_nvidia_2.5)
    d = L.new_definition(component, "fp16" if eight_bit else precision)
    if eight_bit:
        if calibration is None:
            raise UserError(f"--precision {precision}: needs a calibration table (calibrate first)")
        table = calibration if isinstance(calibration, CalibrationTable) else \
            CalibrationTable.load(calibration, component.fingerprint())
        d.quant = QuantPlan(precision, table, component, **(quant_options or table.choices(precision)))
    if calibration_taps:
        d.taps = CalibrationTaps()
    specs = input_specs(cfg, batch, latent_height, latent_width, d.dtype)
    tensors = {name: L.add_input(d, name, dims, dt) for name, (dims, dt) in specs.items()}
    y = unet(d, cfg, tensors["sample"], tensors["timestep"], tensors["encoder_hidden_states"],
             tensors["text_embeds"], tensors["time_ids"], progress)
    L.mark_output(d, y, "noise_pred")
    component.check_all_consumed()
    net = UNetNetwork(d, cfg, specs)
    net.precision = precision
    return net
