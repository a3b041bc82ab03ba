"""The one key map between single-file (SGM/LDM) checkpoint names and diffusers names.

A single-file SDXL checkpoint stores every component under the module names of Stability's
`sgm` code (`model.diffusion_model.input_blocks.4.1.proj_in.weight`); the rest of trt_sdxl
reads weights by their diffusers names (`down_blocks.1.attentions.0.proj_in.weight`).

The map is data: block-index arithmetic turns a component's config into a table of module
pairs (sgm module -> diffusers module), built from fixed tables of module names below. A key
maps when its module (the key less its final `.weight`/`.bias`) is in the table. Index
arithmetic is the one diffusers' `convert_ldm_unet_checkpoint` uses; the tests check that
converter against this map on real SDXL configs.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import UserError

# Where each component lives in an SGM single-file checkpoint (SDXL base layout; in the
# refiner, whose only text encoder is OpenCLIP bigG, that encoder is `conditioner.embedders.0`).
SINGLE_FILE_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}

PARAMETERS = ("weight", "bias")

# ---------------------------------------------------------------- UNet tables

UNET_FIXED = (
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
)

# addition_embed_type "text_time": SDXL's pooled-text + size/crop embedding.
UNET_TEXT_TIME = (
    ("label_emb.0.0", "add_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
)

# sgm ResBlock -> diffusers ResnetBlock2D. in_layers = [GroupNorm, SiLU, Conv],
# emb_layers = [SiLU, Linear], out_layers = [GroupNorm, SiLU, Dropout, Conv].
RESNET_MODULES = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)

# sgm SpatialTransformer and diffusers Transformer2DModel use the same sub-module names,
# so these map to themselves under the block's new prefix.
TRANSFORMER_MODULES = ("norm", "proj_in", "proj_out")
TRANSFORMER_BLOCK_MODULES = (
    "norm1", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "norm2", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "norm3", "ff.net.0.proj", "ff.net.2",
)

DOWN_BLOCKS = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # type -> has attentions
UP_BLOCKS = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)


def per_block(value, n: int, key: str) -> tuple[int, ...]:
    """A config value given as one integer or one integer per block, as a tuple of `n` integers."""
    if isinstance(value, int):
        return (value,) * n
    values = tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(values) != n or not all(isinstance(v, int) for v in values):
        raise UserError(f"unet config {key}={value!r}: expected one integer or {n} integers (one per block)")
    return values


def unet_layout(config: dict) -> dict:
    """The UNet's block structure from its diffusers config.

    Returns `layers` (resnets per down block), `down_attention` / `up_attention` (per block:
    has transformers), and transformer depth per block: `down_depth`, `up_depth`, `mid_depth`.
    """
    down_types = tuple(config["down_block_types"])
    up_types = tuple(config["up_block_types"])
    n = len(config["block_out_channels"])
    if len(down_types) != n or len(up_types) != n:
        raise UserError(
            f"unet config: {len(down_types)} down_block_types and {len(up_types)} up_block_types, "
            f"expected one per block_out_channels entry ({n})"
        )
    for key, types, known in (("down_block_types", down_types, DOWN_BLOCKS), ("up_block_types", up_types, UP_BLOCKS)):
        for b, kind in enumerate(types):
            if kind not in known:
                raise UserError(f"unet config {key}[{b}]={kind!r}: expected one of {', '.join(known)}")
    mid_type = config.get("mid_block_type") or MID_BLOCKS[0]
    if mid_type not in MID_BLOCKS:
        raise UserError(f"unet config mid_block_type={mid_type!r}: expected {MID_BLOCKS[0]}")
    down_depth = per_block(config.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    reverse = config.get("reverse_transformer_layers_per_block")
    up_depth = (per_block(reverse, n, "reverse_transformer_layers_per_block") if reverse is not None
                else down_depth[::-1])
    return {
        "layers": per_block(config.get("layers_per_block", 2), n, "layers_per_block"),
        "down_attention": tuple(DOWN_BLOCKS[t] for t in down_types),
        "up_attention": tuple(UP_BLOCKS[t] for t in up_types),
        "down_depth": down_depth,
        "up_depth": up_depth,
        # diffusers builds the mid block with the last down block's depth.
        "mid_depth": down_depth[-1],
    }


def _add_resnet(table: dict, sgm: str, diffusers: str) -> None:
    for s, d in RESNET_MODULES:
        table[f"{sgm}.{s}"] = f"{diffusers}.{d}"


def _add_transformer(table: dict, sgm: str, diffusers: str, depth: int) -> None:
    for m in TRANSFORMER_MODULES:
        table[f"{sgm}.{m}"] = f"{diffusers}.{m}"
    for k in range(depth):
        for m in TRANSFORMER_BLOCK_MODULES:
            table[f"{sgm}.transformer_blocks.{k}.{m}"] = f"{diffusers}.transformer_blocks.{k}.{m}"


def unet_modules(config: dict) -> dict[str, str]:
    """sgm module name -> diffusers module name for every module of the UNet `config` describes."""
    layout = unet_layout(config)
    n = len(layout["layers"])
    table = dict(UNET_FIXED)
    if config.get("addition_embed_type") == "text_time":
        table.update(UNET_TEXT_TIME)

    # input_blocks: [0] is conv_in; then per down block one (resnet[, transformer]) entry per
    # layer, and one entry holding the downsampler, except after the last block.
    i = 1
    for b in range(n):
        for j in range(layout["layers"][b]):
            _add_resnet(table, f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{j}")
            if layout["down_attention"][b]:
                _add_transformer(table, f"input_blocks.{i}.1", f"down_blocks.{b}.attentions.{j}", layout["down_depth"][b])
            i += 1
        if b < n - 1:
            table[f"input_blocks.{i}.0.op"] = f"down_blocks.{b}.downsamplers.0.conv"
            i += 1

    _add_resnet(table, "middle_block.0", "mid_block.resnets.0")
    _add_transformer(table, "middle_block.1", "mid_block.attentions.0", layout["mid_depth"])
    _add_resnet(table, "middle_block.2", "mid_block.resnets.1")

    # output_blocks: per up block one entry per layer (one more layer than the mirrored down
    # block, for the skip from its downsampler); the last entry of every block but the final
    # one also holds the upsampler, after the transformer if there is one.
    up_layers = layout["layers"][::-1]
    i = 0
    for b in range(n):
        for j in range(up_layers[b] + 1):
            _add_resnet(table, f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}")
            slot = 1
            if layout["up_attention"][b]:
                _add_transformer(table, f"output_blocks.{i}.1", f"up_blocks.{b}.attentions.{j}", layout["up_depth"][b])
                slot = 2
            if b < n - 1 and j == up_layers[b]:
                table[f"output_blocks.{i}.{slot}.conv"] = f"up_blocks.{b}.upsamplers.0.conv"
            i += 1
    return table


# ---------------------------------------------------------------- per component

# Module tables per component. The VAE (`first_stage_model.`: encoder/decoder down/up/mid
# blocks, attention q/k/v as 1x1 convs) and the text encoders (CLIP ViT-L under
# `conditioner.embedders.0.transformer.` is already in transformers' layout; OpenCLIP bigG
# under `conditioner.embedders.1.model.` has fused in_proj q/k/v to split) get their tables
# here when the models that read them land.
MODULE_TABLES = {
    "unet": unet_modules,
}


def _module_table(component: str, config: dict) -> dict[str, str]:
    if component not in SINGLE_FILE_PREFIXES:
        raise UserError(f"unknown component {component!r}: expected one of {', '.join(SINGLE_FILE_PREFIXES)}")
    if component not in MODULE_TABLES:
        raise UserError(
            f"reading the {component} from a single-file checkpoint is not supported yet: "
            f"pass a diffusers pipeline folder (with {component}/) instead"
        )
    return MODULE_TABLES[component](config)


def _unmapped_error(component: str, names: list[str], source: str, layout: str) -> UserError:
    shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
    return UserError(
        f"{source}: {len(names)} {component} tensor name(s) match no rule of the {layout} key map for this "
        f"config (is the config the checkpoint's?): {shown}"
    )


def sgm_to_diffusers(component: str, config: dict, sgm_keys: Iterable[str],
                     source: str = "single-file checkpoint") -> dict[str, str]:
    """Map the `component`'s keys among `sgm_keys` (full single-file names) to diffusers names.

    Keys of other components are ignored; a key of this component that no rule maps is a
    UserError listing it (`source` names the file in that message).
    """
    prefix = SINGLE_FILE_PREFIXES.get(component, "")
    modules = _module_table(component, config)
    mapping, unmapped = {}, []
    for key in sgm_keys:
        if not key.startswith(prefix):
            continue
        module, _, parameter = key[len(prefix):].rpartition(".")
        target = modules.get(module)
        if target is None or parameter not in PARAMETERS:
            unmapped.append(key)
        else:
            mapping[key] = f"{target}.{parameter}"
    if unmapped:
        raise _unmapped_error(component, unmapped, source, "single-file (SGM)")
    return mapping


def diffusers_to_sgm(component: str, config: dict, diffusers_keys: Iterable[str],
                     source: str = "diffusers checkpoint") -> dict[str, str]:
    """The inverse map: diffusers names of `component` -> full single-file (SGM) names."""
    prefix = SINGLE_FILE_PREFIXES.get(component, "")
    modules = {d: s for s, d in _module_table(component, config).items()}
    mapping, unmapped = {}, []
    for key in diffusers_keys:
        module, _, parameter = key.rpartition(".")
        target = modules.get(module)
        if target is None or parameter not in PARAMETERS:
            unmapped.append(key)
        else:
            mapping[key] = f"{prefix}{target}.{parameter}"
    if unmapped:
        raise _unmapped_error(component, unmapped, source, "diffusers")
    return mapping
