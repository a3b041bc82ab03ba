"""The one key map between single-file (SGM/LDM) checkpoint names and diffusers names.

A single-file SDXL checkpoint stores every component under the module names of Stability's
`sgm` code (`model.diffusion_model.input_blocks.4.1.proj_in.weight`,
`conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight`); the rest of
trt_sdxl reads weights by their diffusers/transformers names
(`down_blocks.1.attentions.0.proj_in.weight`, `text_model.encoder.layers.3.self_attn.q_proj.weight`).

The map is data. Per component, block-index arithmetic turns the config into a `KeyTable`:
every single-file key (less the component's prefix) -> the diffusers tensors it holds, each
with the `Transform` that reads it (most are the tensor itself; OpenCLIP's fused q/k/v is
three row slices, its text projection a transpose, the VAE's attention 1x1 convolutions are
linear weights), plus the keys the layout declares unused and why. A key of the component
that is in neither is an error, never skipped. Index arithmetic is the one diffusers'
`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` and
`convert_open_clip_checkpoint` use; the tests check those converters against this map.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .unet_config import UNetConfig

# Where each component lives in an SGM single-file checkpoint (SDXL base layout).
SINGLE_FILE_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}
# Other places a component may live: in the refiner, whose only text encoder is OpenCLIP bigG,
# that encoder is `conditioner.embedders.0`.
OTHER_PREFIXES = {
    "text_encoder_2": ("conditioner.embedders.0.model.",),
}

PARAMETERS = ("weight", "bias")

# ---------------------------------------------------------------- transforms

# How a diffusers tensor is read out of the single-file tensor that holds it. Each transform
# gives the diffusers shape from the stored one (ValueError when the stored shape cannot hold
# it), applies itself to an array (`apply`), and, except Rows, undoes itself (`invert`, for
# writing single files); a Rows family is undone by concatenating its parts in order.


@dataclass(frozen=True)
class Same:
    """The diffusers tensor is the stored tensor."""

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        return stored

    def apply(self, array):
        return array

    def invert(self, array):
        return array

    def describe(self, name: str) -> str:
        return repr(name)


@dataclass(frozen=True)
class Rows:
    """Part `part` of `parts` equal row blocks of the stored tensor (a view: no copy).

    OpenCLIP stores q, k and v of an attention as one `in_proj` of 3C rows (torch's
    MultiheadAttention packing): q = rows 0:C, k = C:2C, v = 2C:3C.
    """

    part: int
    parts: int

    def _bounds(self, rows: int) -> tuple[int, int]:
        if rows % self.parts:
            raise ValueError(f"{rows} rows do not split into {self.parts} equal parts")
        size = rows // self.parts
        return self.part * size, (self.part + 1) * size

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        if not stored:
            raise ValueError("a scalar has no rows to split")
        begin, end = self._bounds(stored[0])
        return (end - begin,) + stored[1:]

    def apply(self, array):
        begin, end = self._bounds(array.shape[0])
        return array[begin:end]

    def describe(self, name: str) -> str:
        return f"part {self.part + 1} of {self.parts} (rows) of {name!r}"


@dataclass(frozen=True)
class Transposed:
    """The transpose of a stored matrix (a contiguous copy: only OpenCLIP's text projection, which is small).

    OpenCLIP's `text_projection` [C, P] multiplies from the right (x @ P); a linear layer's
    weight [P, C] from the left.
    """

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        if len(stored) != 2:
            raise ValueError("expected a matrix")
        return stored[::-1]

    def apply(self, array):
        return np.ascontiguousarray(array.T)

    invert = apply

    def describe(self, name: str) -> str:
        return f"{name!r}, transposed"


@dataclass(frozen=True)
class ConvToLinear:
    """A 1x1 convolution's weight [O, I, 1, 1] as a linear weight [O, I] (a reshape: no copy).

    An [O, I] tensor (a checkpoint re-exported from diffusers) is taken as it is; single files
    are written in the SGM layout, [O, I, 1, 1].
    """

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        if len(stored) == 2 or (len(stored) == 4 and stored[2:] == (1, 1)):
            return stored[:2]
        raise ValueError("expected a 1x1 convolution weight [O, I, 1, 1] or a linear weight [O, I]")

    def apply(self, array):
        return array.reshape(array.shape[:2])

    def invert(self, array):
        return array.reshape(array.shape[:2] + (1, 1))

    def describe(self, name: str) -> str:
        return f"{name!r}, a 1x1 convolution read as a linear weight"


Transform = Same | Rows | Transposed | ConvToLinear
SAME = Same()
TRANSPOSED = Transposed()
CONV_TO_LINEAR = ConvToLinear()


@dataclass(frozen=True)
class Source:
    """Where one diffusers tensor is in a single file: the stored (full) name, and how to read it."""

    key: str
    transform: Transform = SAME


@dataclass(frozen=True)
class KeyTable:
    """One component's single-file layout, in names relative to its prefix.

    `holds`: stored key -> the (diffusers key, transform) pairs it holds (three for a fused
    q/k/v, in row order); `unused`: stored key -> why the component reads nothing from it.
    """

    holds: dict[str, tuple[tuple[str, Transform], ...]]
    unused: dict[str, str]


def _add_module(holds: dict, sgm: str, diffusers: str, weight: Transform = SAME) -> None:
    """A module's `weight` (read with `weight`) and `bias`; a checkpoint may lack either."""
    holds[f"{sgm}.weight"] = ((f"{diffusers}.weight", weight),)
    holds[f"{sgm}.bias"] = ((f"{diffusers}.bias", SAME),)


def _add_tensor(holds: dict, sgm: str, diffusers: str, transform: Transform = SAME) -> None:
    holds[sgm] = ((diffusers, transform),)


def _config_int(component: str, config: dict, key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{component} config {key}={value!r}: expected a positive integer")
    return value


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
    layout = UNetConfig.parse(config, strict=False)
    n = layout.blocks
    table = dict(UNET_FIXED)
    if config.get("addition_embed_type") == "text_time":
        table.update(UNET_TEXT_TIME)

    # input_blocks: [0] is conv_in; then per down block one (resnet[, transformer]) entry per
    # layer, and one entry holding the downsampler, except after the last block.
    i = 1
    for b in range(n):
        for j in range(layout.layers[b]):
            _add_resnet(table, f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{j}")
            if layout.down_attention[b]:
                _add_transformer(table, f"input_blocks.{i}.1", f"down_blocks.{b}.attentions.{j}", layout.transformer_depth[b])
            i += 1
        if b < n - 1:
            table[f"input_blocks.{i}.0.op"] = f"down_blocks.{b}.downsamplers.0.conv"
            i += 1

    _add_resnet(table, "middle_block.0", "mid_block.resnets.0")
    _add_transformer(table, "middle_block.1", "mid_block.attentions.0", layout.mid_depth)
    _add_resnet(table, "middle_block.2", "mid_block.resnets.1")

    # output_blocks: per up block one entry per layer (one more layer than the mirrored down
    # block, for the skip from its downsampler); the last entry of every block but the final
    # one also holds the upsampler, after the transformer if there is one.
    up_layers = layout.layers[::-1]
    i = 0
    for b in range(n):
        for j in range(up_layers[b] + 1):
            _add_resnet(table, f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}")
            slot = 1
            if layout.up_attention[b]:
                _add_transformer(table, f"output_blocks.{i}.1", f"up_blocks.{b}.attentions.{j}", layout.transformer_depth_up[b])
                slot = 2
            if b < n - 1 and j == up_layers[b]:
                table[f"output_blocks.{i}.{slot}.conv"] = f"up_blocks.{b}.upsamplers.0.conv"
            i += 1
    return table


def unet_keys(config: dict) -> KeyTable:
    """The UNet's single-file layout: every module of `unet_modules` renamed, weights read as stored."""
    holds: dict = {}
    for sgm, diffusers in unet_modules(config).items():
        _add_module(holds, sgm, diffusers)
    return KeyTable(holds, {})


# ---------------------------------------------------------------- text encoders

# Text encoder 1, CLIP ViT-L: SGM keeps the transformers model whole under its prefix, so the
# names are the transformers names (the table still lists them, so a stray key is an error).
CLIP_LAYER_MODULES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
    "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2",
)
CLIP_UNUSED = {
    # transformers < 4.31 saved it; SDXL single files carry it (some with float rounding damage).
    "text_model.embeddings.position_ids": "a buffer of the positions 0..76, not a weight: the model builds it",
}


def clip_keys(config: dict) -> KeyTable:
    """Text encoder 1 (transformers CLIPTextModel) in a single file: its own names, less position_ids."""
    holds: dict = {}
    for m in ("token_embedding", "position_embedding"):
        _add_tensor(holds, f"text_model.embeddings.{m}.weight", f"text_model.embeddings.{m}.weight")
    for i in range(_config_int("text_encoder", config, "num_hidden_layers")):
        for m in CLIP_LAYER_MODULES:
            _add_module(holds, f"text_model.encoder.layers.{i}.{m}", f"text_model.encoder.layers.{i}.{m}")
    _add_module(holds, "text_model.final_layer_norm", "text_model.final_layer_norm")
    return KeyTable(holds, dict(CLIP_UNUSED))


# Text encoder 2, OpenCLIP ViT-bigG: open_clip's TextTransformer names -> transformers'
# CLIPTextModelWithProjection names.
OPEN_CLIP_LAYER_MODULES = (
    ("ln_1", "layer_norm1"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)
OPEN_CLIP_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # in_proj row order
OPEN_CLIP_UNUSED = {
    "logit_scale": "CLIP's contrastive-loss temperature: used in training only, not by the text model",
}


def open_clip_keys(config: dict) -> KeyTable:
    """Text encoder 2 (OpenCLIP bigG) in a single file, as transformers' CLIPTextModelWithProjection."""
    holds: dict = {}
    _add_tensor(holds, "token_embedding.weight", "text_model.embeddings.token_embedding.weight")
    _add_tensor(holds, "positional_embedding", "text_model.embeddings.position_embedding.weight")
    for i in range(_config_int("text_encoder_2", config, "num_hidden_layers")):
        sgm, diffusers = f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}"
        for s, d in OPEN_CLIP_LAYER_MODULES:
            _add_module(holds, f"{sgm}.{s}", f"{diffusers}.{d}")
        for parameter in PARAMETERS:
            holds[f"{sgm}.attn.in_proj_{parameter}"] = tuple(
                (f"{diffusers}.{m}.{parameter}", Rows(k, len(OPEN_CLIP_QKV))) for k, m in enumerate(OPEN_CLIP_QKV))
    _add_module(holds, "ln_final", "text_model.final_layer_norm")
    _add_tensor(holds, "text_projection", "text_projection.weight", TRANSPOSED)
    return KeyTable(holds, dict(OPEN_CLIP_UNUSED))


# ---------------------------------------------------------------- VAE

# ldm ResnetBlock (no time embedding) -> diffusers ResnetBlock2D.
VAE_RESNET_MODULES = (
    ("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
    ("nin_shortcut", "conv_shortcut"),
)
# ldm AttnBlock (q, k, v, proj_out are 1x1 convolutions) -> diffusers Attention (linear layers).
VAE_ATTENTION_MODULES = (
    ("norm", "group_norm", SAME),
    ("q", "to_q", CONV_TO_LINEAR),
    ("k", "to_k", CONV_TO_LINEAR),
    ("v", "to_v", CONV_TO_LINEAR),
    ("proj_out", "to_out.0", CONV_TO_LINEAR),
)
VAE_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


def _add_vae_resnet(holds: dict, sgm: str, diffusers: str) -> None:
    for s, d in VAE_RESNET_MODULES:
        _add_module(holds, f"{sgm}.{s}", f"{diffusers}.{d}")


def vae_keys(config: dict) -> KeyTable:
    """The VAE (diffusers AutoencoderKL; ldm's Encoder/Decoder) in a single file."""
    n = len(config.get("block_out_channels") or ())
    for key, kind in VAE_BLOCK_TYPES.items():
        types = tuple(config.get(key) or ())
        if len(types) != n or any(t != kind for t in types):
            raise UserError(f"vae config {key}={list(types)!r}: expected {kind} once per block_out_channels "
                            f"entry ({n})")
    if n == 0:
        raise UserError("vae config block_out_channels: expected at least one block")
    layers = _config_int("vae", config, "layers_per_block", 1)
    holds: dict = {}
    for side in ("encoder", "decoder"):
        _add_module(holds, f"{side}.conv_in", f"{side}.conv_in")
        _add_vae_resnet(holds, f"{side}.mid.block_1", f"{side}.mid_block.resnets.0")
        _add_vae_resnet(holds, f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")
        if config.get("mid_block_add_attention", True):
            for s, d, weight in VAE_ATTENTION_MODULES:
                _add_module(holds, f"{side}.mid.attn_1.{s}", f"{side}.mid_block.attentions.0.{d}", weight)
        _add_module(holds, f"{side}.norm_out", f"{side}.conv_norm_out")
        _add_module(holds, f"{side}.conv_out", f"{side}.conv_out")
    for b in range(n):
        for j in range(layers):
            _add_vae_resnet(holds, f"encoder.down.{b}.block.{j}", f"encoder.down_blocks.{b}.resnets.{j}")
        if b < n - 1:
            _add_module(holds, f"encoder.down.{b}.downsample.conv", f"encoder.down_blocks.{b}.downsamplers.0.conv")
    # ldm numbers the decoder's levels by resolution (up.0 is the full-resolution level, which
    # runs last); diffusers numbers its up blocks in running order. Each has one more resnet
    # than a down block, and all but the last to run upsample.
    for b in range(n):
        level = n - 1 - b
        for j in range(layers + 1):
            _add_vae_resnet(holds, f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{b}.resnets.{j}")
        if b < n - 1:
            _add_module(holds, f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{b}.upsamplers.0.conv")
    if config.get("use_quant_conv", True):
        _add_module(holds, "quant_conv", "quant_conv")
    if config.get("use_post_quant_conv", True):
        _add_module(holds, "post_quant_conv", "post_quant_conv")
    return KeyTable(holds, {})


# ---------------------------------------------------------------- per component

KEY_TABLES = {
    "unet": unet_keys,
    "vae": vae_keys,
    "text_encoder": clip_keys,
    "text_encoder_2": open_clip_keys,
}


def key_table(component: str, config: dict) -> KeyTable:
    """The single-file layout of `component` as its `config` describes it."""
    if component not in KEY_TABLES:
        raise UserError(f"unknown component {component!r}: expected one of {', '.join(KEY_TABLES)}")
    return KEY_TABLES[component](config)


def component_prefixes(component: str) -> tuple[str, ...]:
    """Every prefix the `component` may have in a single file, the base layout's first."""
    if component not in SINGLE_FILE_PREFIXES:
        raise UserError(f"unknown component {component!r}: expected one of {', '.join(SINGLE_FILE_PREFIXES)}")
    return (SINGLE_FILE_PREFIXES[component],) + OTHER_PREFIXES.get(component, ())


def find_prefix(component: str, sgm_keys: Iterable[str], source: str = "single-file checkpoint") -> str | None:
    """The prefix the `component`'s tensors have among `sgm_keys`; None when it has none there."""
    keys = list(sgm_keys)
    found = [p for p in component_prefixes(component) if any(k.startswith(p) for k in keys)]
    if len(found) > 1:
        raise UserError(f"{source}: {component} tensors under both {found[0]!r} and {found[1]!r}; "
                        "expected one of them")
    return found[0] if found else None


def _unmapped_error(component: str, names: list[str], source: str, layout: str) -> UserError:
    shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
    return UserError(
        f"{source}: {len(names)} {component} tensor name(s) match no rule of the {layout} key map for this "
        f"config (is the config the checkpoint's?): {shown}"
    )


@dataclass(frozen=True)
class SingleFileMap:
    """What one component reads from a single file.

    `sources`: diffusers key -> its `Source`; `unused`: stored (full) key -> why the component
    reads nothing from it. Together they account for every key under `prefix`.
    """

    prefix: str
    sources: dict[str, Source]
    unused: dict[str, str]


def sgm_to_diffusers(component: str, config: dict, sgm_keys: Iterable[str],
                     source: str = "single-file checkpoint") -> SingleFileMap:
    """Map the `component`'s keys among `sgm_keys` (full single-file names) to diffusers tensors.

    Keys of other components are ignored; a key of this component that the layout neither
    maps nor declares unused is a UserError listing it (`source` names the file in that message).
    """
    keys = list(sgm_keys)
    prefix = find_prefix(component, keys, source) or SINGLE_FILE_PREFIXES[component]
    table = key_table(component, config)
    sources, unused, unmapped = {}, {}, []
    for key in keys:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in table.unused:
            unused[key] = table.unused[name]
        elif name in table.holds:
            for diffusers, transform in table.holds[name]:
                sources[diffusers] = Source(key, transform)
        else:
            unmapped.append(key)
    if unmapped:
        raise _unmapped_error(component, unmapped, source, "single-file (SGM)")
    return SingleFileMap(prefix, sources, unused)


def _held_by(component: str, config: dict) -> dict[str, tuple[str, Transform]]:
    """diffusers key -> (stored key less the prefix, transform)."""
    return {diffusers: (sgm, transform)
            for sgm, targets in key_table(component, config).holds.items()
            for diffusers, transform in targets}


def diffusers_to_sgm(component: str, config: dict, diffusers_keys: Iterable[str],
                     source: str = "diffusers checkpoint", prefix: str | None = None) -> dict[str, str]:
    """The inverse map: diffusers names of `component` -> the full single-file names holding them.

    q/k/v of an OpenCLIP layer all map to its `in_proj`. `prefix` defaults to the base layout's.
    """
    prefix = SINGLE_FILE_PREFIXES[component] if prefix is None else prefix
    held_by = _held_by(component, config)
    keys = list(diffusers_keys)
    unmapped = [k for k in keys if k not in held_by]
    if unmapped:
        raise _unmapped_error(component, unmapped, source, "diffusers")
    return {k: prefix + held_by[k][0] for k in keys}


def to_single_file_state(component: str, config: dict, state: Mapping, source: str = "diffusers checkpoint",
                         prefix: str | None = None) -> dict[str, np.ndarray]:
    """The `component`'s single-file tensors (full names, contiguous numpy arrays) from its diffusers
    `state` (name -> numpy array, or anything `np.asarray` takes, such as a CPU torch tensor).

    The inverse of reading: transforms are undone, and a fused q/k/v is assembled from its parts,
    all of which `state` must hold. `prefix` defaults to the base layout's.
    """
    prefix = SINGLE_FILE_PREFIXES[component] if prefix is None else prefix
    diffusers_to_sgm(component, config, state, source)  # every name of `state` has a rule
    tensors = {}
    for sgm, targets in key_table(component, config).holds.items():
        present = [d for d, _ in targets if d in state]
        if not present:
            continue
        if len(present) != len(targets):
            missing = [d for d, _ in targets if d not in state]
            raise UserError(f"{source}: {prefix + sgm} is assembled from {', '.join(d for d, _ in targets)}, "
                            f"but {', '.join(missing)} is missing")
        if len(targets) == 1:
            (diffusers, transform), = targets
            tensors[prefix + sgm] = np.ascontiguousarray(transform.invert(np.asarray(state[diffusers])))
        else:  # the Rows parts, in row order
            tensors[prefix + sgm] = np.concatenate([np.asarray(state[d]) for d, _ in targets])
    return tensors
