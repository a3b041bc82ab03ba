"""SDXL's UNet2DConditionModel as a TensorRT network, block by block, named like the checkpoint.

The structure is read from the component's config (block channels, heads, transformer
depth per block, layers per block, groups, cross-attention width) and every weight is
bound by its diffusers name, so the code below is a walk over the checkpoint's module tree.
"""

from __future__ import annotations

import numpy as np

from .. import layers as L
from . import blocks as B
from ..errors import UserError
from ..layers import Definition, shape
from ..shapes import ImageProfile, box
from ..unet_config import UNetConfig

TOKENS = 77  # text context positions per prompt chunk


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
    c = shape(x)[1]
    h = L.group_norm(d, x, f"{path}.norm", cfg.norm_num_groups, 1e-6)
    h = L.image_to_tokens(d, h)  # [B, C, H, W] -> [B, HW, C]
    h = L.linear(d, h, f"{path}.proj_in", c)
    for i in range(depth):
        h = transformer_block(d, h, context, f"{path}.transformer_blocks.{i}", heads)
    h = L.linear(d, h, f"{path}.proj_out", c)
    h = L.tokens_to_image(d, h, x)  # [B, HW, C] -> [B, C, H, W]
    return L.add(d, h, x, name=f"{path}.residual")


# ---------------------------------------------------------------- the whole UNet


def unet(d: Definition, cfg: UNetConfig, sample, timestep, context, text_embeds, time_ids, progress=None):
    """The SDXL UNet forward; returns noise_pred [B, out_channels, h, w] in the compute dtype.

    `progress(message)` is called after each block (the full SDXL UNet has ~5000 layers).
    """
    report = progress or (lambda message: None)
    ch0 = cfg.block_out_channels[0]

    # time and added (text_time) conditioning, computed in fp32, then the compute dtype
    t_emb = L.timestep_embedding(d, timestep, ch0, cfg.flip_sin_to_cos, cfg.freq_shift)  # [B, ch0]
    emb = time_embedding(d, L.cast(d, t_emb, d.dtype), "time_embedding", ch0, cfg.time_embed_dim)
    n_ids = cfg.num_time_ids
    ids = L.reshape(d, time_ids, (-1,))  # [B, 6] -> [B*6]
    ids_emb = L.timestep_embedding(d, ids, cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
    ids_emb = L.reshape(d, L.cast(d, ids_emb, d.dtype), (-1, n_ids * cfg.addition_time_embed_dim))  # [B, 6*256]
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
        for j in range(cfg.layers[i]):
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
        for j in range(cfg.layers[n_blocks - 1 - i] + 1):
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


def input_specs(cfg: UNetConfig, batch: int, latent_height: int, latent_width: int, dtype,
                tokens: int = TOKENS) -> dict[str, tuple]:
    return {
        "sample": ((batch, cfg.in_channels, latent_height, latent_width), dtype),
        "timestep": ((batch,), np.float32),
        "encoder_hidden_states": ((batch, tokens, cfg.cross_attention_dim), dtype),
        "text_embeds": ((batch, cfg.text_embeds_dim), dtype),
        "time_ids": ((batch, cfg.num_time_ids), np.float32),
    }


def input_profile(cfg: UNetConfig, profile: ImageProfile) -> dict[str, tuple]:
    """{input: (min, opt, max)} of one profile: the CFG batch is 2 x images, latents 1/8 of the image,
    the text context 77 tokens per prompt chunk."""
    rows, lh, lw = profile.batch.scaled(2), profile.height.divided(8), profile.width.divided(8)
    return {"sample": box(rows, cfg.in_channels, lh, lw), "timestep": box(rows),
            "encoder_hidden_states": box(rows, profile.chunks.scaled(TOKENS), cfg.cross_attention_dim),
            "text_embeds": box(rows, cfg.text_embeds_dim), "time_ids": box(rows, cfg.num_time_ids)}


def define(model, precision: str = "fp16", batch: int = 1, latent_height: int = 128, latent_width: int = 128,
           progress=None, calibration=None, quant_options: dict | None = None, calibration_taps: bool = False,
           attention_check=None, profiles: list[ImageProfile] | None = None, quant_plan=None) -> UNetNetwork:
    """Define the UNet of `model` (pipeline folder, `unet/` folder, single file or opened component).

    Inputs as diffusers' UNet arguments: `sample` [B, 4, h, w], `timestep` [B] (fp32),
    `encoder_hidden_states` [B, 77, 2048], `text_embeds` [B, 1280], `time_ids` [B, 6] (fp32; [B, 5] for the refiner);
    output `noise_pred` [B, 4, h, w]. `progress(message)`, if given, hears about each block.

    `precision` "int8"/"fp8" needs `calibration` (a CalibrationTable, or a path to one);
    `quant_options` may override the table's tuned choices (`rule`, `alphas`) — the tuning
    pipeline does that to compare candidates. `calibration_taps` defines the calibration
    network instead: FP16 plus per-channel abs-max outputs (`amax:<path>`) and sampled rows.
    `attention_check(fmt, q_shape, k_shape)`: whether a quantized attention of those shapes has a
    fused kernel (the build asks the builder); one without keeps FP16 BMMs (`attention_fallbacks`).
    `profiles` (trt_sdxl.shapes.ImageProfile): define at the first one's opt shape (CFG batch, latent
    size and token count replace `batch`/`latent_*`) and widen the axes they vary to dynamic.
    `quant_plan`: an 8-bit network's plan made elsewhere (`quant_plan()` of the base checkpoint) instead of
    one from `calibration` and these weights: what a refit keeps when a LoRA changes the weights.
    """
    from .. import weights as W
    from ..quant.plan import CalibrationTaps
    from ..quant.recipe import RECIPES

    if precision not in ("fp32", "fp16") and precision not in RECIPES:
        raise UserError(f"--precision {precision}: expected one of fp16, int8, fp8 (or fp32)")
    component = W.open_component(model, "unet")
    cfg = UNetConfig.parse(component.config)
    cfg.check_weights(component)
    tokens = TOKENS
    if profiles:
        opt = {name: shapes[1] for name, shapes in input_profile(cfg, profiles[0]).items()}
        batch, _, latent_height, latent_width = opt["sample"]
        tokens = opt["encoder_hidden_states"][1]
    factor = cfg.latent_multiple
    if batch < 1 or latent_height % factor or latent_width % factor or min(latent_height, latent_width) < factor:
        raise UserError(
            f"batch {batch}, latent {latent_height}x{latent_width}: expected batch >= 1 and latent sides that are "
            f"positive multiples of {factor} (image sides multiples of {8 * factor})"
        )
    eight_bit = precision in RECIPES  # a recipe name: int8, fp8 (or a named level like int8_level3)
    d = L.new_definition(component, "fp16" if eight_bit else precision)
    if eight_bit:
        d.quant = quant_plan if quant_plan is not None else \
            make_quant_plan(component, precision, calibration, quant_options)
    d.attention_check = attention_check
    if calibration_taps:
        d.taps = CalibrationTaps()
    specs = input_specs(cfg, batch, latent_height, latent_width, d.dtype, tokens)
    tensors = {name: L.add_input(d, name, dims, dt) for name, (dims, dt) in specs.items()}
    y = unet(d, cfg, tensors["sample"], tensors["timestep"], tensors["encoder_hidden_states"],
             tensors["text_embeds"], tensors["time_ids"], progress)
    L.mark_output(d, y, "noise_pred")
    component.check_all_consumed()
    net = UNetNetwork(d, cfg, specs)
    net.precision = precision
    if profiles:
        net.set_profiles([input_profile(cfg, p) for p in profiles])
    return net


def make_quant_plan(model, precision: str, calibration, quant_options: dict | None = None):
    """The quant plan of an 8-bit UNet: `calibration` (a CalibrationTable, or a path to one checked against the
    weights' fingerprint) with its tuned choices for `precision` (or `quant_options`), over `model`'s weights
    (SmoothQuant's factors depend on them)."""
    from .. import weights as W
    from ..quant.plan import QuantPlan
    from ..quant.table import CalibrationTable

    if calibration is None:
        raise UserError(f"--precision {precision}: needs a calibration table (calibrate first)")
    component = W.open_component(model, "unet")
    table = calibration if isinstance(calibration, CalibrationTable) else \
        CalibrationTable.load(calibration, component.fingerprint())
    return QuantPlan(precision, table, component, **(quant_options or table.choices(precision)))


def placement_table(model, batch: int = 2, latent_height: int = 8, latent_width: int = 8):
    """A calibration table with abs-max 1 for every tapped input (one call, one step), no tuned
    choices: for defining 8-bit networks (with quant_options {"rule": AmaxRule(), "alphas": {}})
    where what matters is which layers carry Q/DQ — MAC shares, the fusion lint, an engine's
    layout — not the scales. The input paths do not depend on the latent size."""
    from .. import weights as W
    from ..quant.table import FORMAT_VERSION, CalibrationTable

    component = W.open_component(model, "unet")
    paths = define(component, batch=batch, latent_height=latent_height, latent_width=latent_width,
                   calibration_taps=True).definition.taps.paths
    return CalibrationTable(meta={"format_version": FORMAT_VERSION, "unet_fingerprint": component.fingerprint()},
                            tensor_amax={p: np.ones((1, 1), np.float32) for p in paths},
                            channel_amax={p: np.ones((3, 1, 1), np.float32) for p in paths})
