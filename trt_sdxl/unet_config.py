"""The one UNet config class: diffusers' UNet2DConditionModel config parsed, checked against what
we can write, and checked against a checkpoint's weight shapes.

`UNetConfig.parse(config)` is what the single-file key map (block arithmetic), the weight loader
(config vs weights) and the UNet network (structure) all read; `check_weights(component)` finds a
config that does not describe the checkpoint before anything is defined.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

DOWN_BLOCKS = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # type -> has attentions
UP_BLOCKS = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)

# Settings every SDXL-style UNet has; anything else is a model this network does not write.
_EXPECTED = {
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


def per_block(value, n: int, key: str) -> tuple[int, ...]:
    """A config value given as one integer or one integer per block, as a tuple of `n` integers."""
    if isinstance(value, int):
        return (value,) * n
    values = tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(values) != n or not all(isinstance(v, int) for v in values):
        raise UserError(f"unet config {key}={value!r}: expected one integer or {n} integers (one per block)")
    return values


@dataclass(frozen=True)
class UNetConfig:
    """The parts of a UNet2DConditionModel config the network, the key map and the checks depend on."""

    raw: dict
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers: tuple[int, ...]  # resnets per down block (the up block b has layers[n-1-b] + 1)
    heads: tuple[int, ...]  # per down block
    transformer_depth: tuple[int, ...]  # per down block
    transformer_depth_up: tuple[int, ...]  # per up block
    cross_attention_dim: int
    norm_num_groups: int
    norm_eps: float
    addition_embed_type: str | None
    addition_time_embed_dim: int
    projection_class_embeddings_input_dim: int
    flip_sin_to_cos: bool
    freq_shift: float
    time_embedding_dim: int | None
    sample_size: int

    # ------------------------------------------------------------ parsing

    @classmethod
    def parse(cls, cfg: dict, strict: bool = True) -> UNetConfig:
        """Extract the structure; `strict` also refuses configs that are not SDXL-style (the key
        map needs only the block structure and reads any such config)."""
        if strict:
            for key, value in _EXPECTED.items():
                got = cfg.get(key, value)
                if isinstance(got, list):
                    got = got[0] if len(set(got)) == 1 else got
                if value is False and got is None:  # published configs write null for "off"
                    got = False
                if got != value:
                    raise UserError(f"unet config {key}={got!r} is not supported (SDXL UNets use {value!r})")
        down = tuple(cfg["down_block_types"])
        up = tuple(cfg["up_block_types"])
        n = len(cfg["block_out_channels"])
        if len(down) != n or len(up) != n:
            raise UserError(f"unet config: {len(down)} down_block_types and {len(up)} up_block_types, "
                            f"expected one per block_out_channels entry ({n})")
        for key, types, known in (("down_block_types", down, DOWN_BLOCKS), ("up_block_types", up, UP_BLOCKS)):
            for b, kind in enumerate(types):
                if kind not in known:
                    raise UserError(f"unet config {key}[{b}]={kind!r}: expected one of {', '.join(known)}")
        mid_type = cfg.get("mid_block_type") or MID_BLOCKS[0]
        if mid_type not in MID_BLOCKS:
            raise UserError(f"unet config mid_block_type={mid_type!r}: expected {MID_BLOCKS[0]}")
        depth = per_block(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
        reverse = cfg.get("reverse_transformer_layers_per_block")
        if reverse is not None and any(isinstance(x, list) and len(set(x)) > 1 for x in reverse):
            raise UserError("unet config reverse_transformer_layers_per_block with per-layer depths is not supported")
        depth_up = (per_block([max(x) if isinstance(x, list) else x for x in reverse], n,
                              "reverse_transformer_layers_per_block") if reverse is not None else depth[::-1])
        cross = cfg.get("cross_attention_dim", 1280)
        if strict and not isinstance(cross, int):
            raise UserError(f"unet config cross_attention_dim={cross}: expected one integer")
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        return cls(
            raw=cfg,
            in_channels=int(cfg.get("in_channels", 4)),
            out_channels=int(cfg.get("out_channels", 4)),
            block_out_channels=tuple(int(c) for c in cfg["block_out_channels"]),
            down_block_types=down,
            up_block_types=up,
            layers=per_block(cfg.get("layers_per_block", 2), n, "layers_per_block"),
            heads=per_block(heads, n, "attention_head_dim"),
            transformer_depth=depth,
            transformer_depth_up=depth_up,
            cross_attention_dim=cross if isinstance(cross, int) else int(cross[0]),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            norm_eps=float(cfg.get("norm_eps", 1e-5)),
            addition_embed_type=cfg.get("addition_embed_type"),
            addition_time_embed_dim=int(cfg.get("addition_time_embed_dim") or 0),
            projection_class_embeddings_input_dim=int(cfg.get("projection_class_embeddings_input_dim") or 0),
            flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
            freq_shift=float(cfg.get("freq_shift", 0)),
            time_embedding_dim=cfg.get("time_embedding_dim"),
            sample_size=int(cfg.get("sample_size") or 128),
        )

    # ------------------------------------------------------------ derived

    @property
    def blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def down_attention(self) -> tuple[bool, ...]:
        return tuple(DOWN_BLOCKS[t] for t in self.down_block_types)

    @property
    def up_attention(self) -> tuple[bool, ...]:
        return tuple(UP_BLOCKS[t] for t in self.up_block_types)

    @property
    def mid_depth(self) -> int:
        """diffusers builds the mid block with the last down block's depth."""
        return self.transformer_depth[-1]

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

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

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be multiples of this (each down block but the last halves them)."""
        return 2 ** (self.blocks - 1)

    @property
    def image_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's 8 times the UNet's downsampling (32 for SDXL)."""
        return 8 * self.latent_multiple

    @property
    def default_image_side(self) -> int:
        """The image side the UNet was made for: its latent sample_size x 8 (SDXL: 128 -> 1024)."""
        return 8 * self.sample_size

    # ------------------------------------------------------------ config vs weights

    def check_weights(self, component) -> None:
        """UserError unless this config agrees with the weight shapes of `component` (a
        weights.Component of a UNet): channels, blocks, depths, widths."""
        cfg = self.raw
        channels = list(self.block_out_channels)
        n = self.blocks
        shape = component.shape

        def expect(config_key: str, config_value, tensor: str, found, what: str) -> None:
            if config_value != found:
                raise UserError(f"{component.source}: unet config {config_key}={config_value} but tensor {tensor!r} "
                                f"(shape {component.shape(tensor)}) says {what} {found}")

        def count(pattern: str) -> int:
            """How many of pattern.format(0), pattern.format(1), ... the checkpoint holds, in a row."""
            k = 0
            while pattern.format(k) in component:
                k += 1
            return k

        def expect_count(config_key: str, config_value: int, pattern: str, what: str) -> None:
            found = count(pattern)
            if found != config_value:
                raise UserError(f"{component.source}: unet config {config_key}={config_value} but the checkpoint "
                                f"has {found} {what} ({pattern.format('<k>')})")

        expect("block_out_channels[0]", channels[0], "conv_in.weight", shape("conv_in.weight")[0], "output channels")
        expect("in_channels", cfg.get("in_channels", 4), "conv_in.weight", shape("conv_in.weight")[1],
               "input channels")
        expect("out_channels", cfg.get("out_channels", 4), "conv_out.weight", shape("conv_out.weight")[0],
               "output channels")
        time_key = "time_embedding_dim" if cfg.get("time_embedding_dim") else "block_out_channels[0]*4"
        expect(time_key, self.time_embed_dim, "time_embedding.linear_1.weight",
               shape("time_embedding.linear_1.weight")[0], "time embedding width")
        if self.addition_embed_type == "text_time":
            expect("projection_class_embeddings_input_dim", cfg.get("projection_class_embeddings_input_dim"),
                   "add_embedding.linear_1.weight", shape("add_embedding.linear_1.weight")[1], "input width")

        expect_count("block_out_channels (number of blocks)", n, "down_blocks.{}.resnets.0.conv1.weight",
                     "down blocks")
        for b in range(n):
            first = f"down_blocks.{b}.resnets.0.conv1.weight"
            expect(f"block_out_channels[{b}]", channels[b], first, shape(first)[0], "output channels")
            expect_count(f"layers_per_block[{b}]", self.layers[b], f"down_blocks.{b}.resnets.{{}}.conv1.weight",
                         f"resnets in down block {b}")
        up_layers = self.layers[::-1]
        for b in range(n):
            expect_count(f"layers_per_block[{n - 1 - b}] (+1 in up block {b})", up_layers[b] + 1,
                         f"up_blocks.{b}.resnets.{{}}.conv1.weight", f"resnets in up block {b}")
        for side, attentions, depths in (("down", self.down_attention, self.transformer_depth),
                                         ("up", self.up_attention, self.transformer_depth_up)):
            for b, (attention, depth) in enumerate(zip(attentions, depths)):
                attn = f"{side}_blocks.{b}.attentions.0"
                if attention != (f"{attn}.proj_in.weight" in component):
                    raise UserError(f"{component.source}: unet config {side}_block_types[{b}]="
                                    f"{cfg[f'{side}_block_types'][b]!r} but the checkpoint "
                                    f"{'lacks' if attention else 'has'} {attn}.proj_in.weight")
                if attention:
                    expect_count(f"transformer_layers_per_block ({side} block {b})", depth,
                                 f"{attn}.transformer_blocks.{{}}.attn1.to_q.weight", f"transformer blocks in {attn}")
        expect_count("transformer_layers_per_block[-1] (mid block)", self.mid_depth,
                     "mid_block.attentions.0.transformer_blocks.{}.attn1.to_q.weight",
                     "transformer blocks in the mid block")
        # The text width every cross-attention reads: from the first block that has attentions.
        first_attention = next((b for b in range(n) if self.down_attention[b]), None)
        if first_attention is not None:
            to_k = f"down_blocks.{first_attention}.attentions.0.transformer_blocks.0.attn2.to_k.weight"
            expect("cross_attention_dim", cfg.get("cross_attention_dim"), to_k, shape(to_k)[1], "input width")


def check_image_size(height, width, multiple: int, default: int) -> tuple[int, int]:
    """(height, width) in pixels: given sides must be positive multiples of `multiple`."""
    sides = {}
    for flag, value in (("height", height), ("width", width)):
        if value is None:
            sides[flag] = default
            continue
        if not isinstance(value, int) or value <= 0 or value % multiple:
            raise UserError(f"--{flag} {value}: expected a positive multiple of {multiple} (8 for the VAE times the "
                            f"UNet's {multiple // 8}x downsampling)")
        sides[flag] = value
    return sides["height"], sides["width"]
