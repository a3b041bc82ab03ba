"""SDXL's two CLIP text encoders as TensorRT networks, layer by layer, named like the checkpoint.

Encoder 1 (`text_encoder`: CLIP ViT-L/14's text tower, transformers' CLIPTextModel) and encoder 2
(`text_encoder_2`: OpenCLIP ViT-bigG/14's, CLIPTextModelWithProjection) share one structure, read
from the config: token + position embedding, pre-LN transformer layers with causal self-attention,
a final LayerNorm. SDXL reads the penultimate layer's hidden states (before the final LayerNorm)
and, from encoder 2 only, the end-of-text token after the final LayerNorm projected by
`text_projection`. Encoder 1's last layer and final LayerNorm feed nothing SDXL reads, so they are
not emitted; their tensors are marked skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import layers as L
from ..components import ENCODERS
from ..errors import UserError
from ..layers import Definition, shape
from ..shapes import ImageProfile, box, text_rows
from ..tokenizer import MAX_LENGTH

COMPONENTS = {number: name for name, number in ENCODERS.items()}
ACTIVATIONS = {"quick_gelu": L.quick_gelu, "gelu": L.gelu}
# transformers' CLIPTextConfig defaults, for keys a config leaves out
DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "projection_dim": 512,
            "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407}
# Configs before transformers PR #24773 (SDXL's among them) carry eos_token_id 2; transformers then
# pools at input_ids.argmax(), relying on the end-of-text id being the largest.
LEGACY_EOS_TOKEN_ID = 2


@dataclass(frozen=True)
class TextEncoderConfig:
    """The parts of transformers' CLIPTextConfig this network depends on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int
    projection_dim: int | None  # encoder 2 only

    @property
    def legacy_pooling(self) -> bool:
        return self.eos_token_id == LEGACY_EOS_TOKEN_ID


def parse_config(cfg: dict, encoder: int, source: str = "text encoder config") -> TextEncoderConfig:
    """Check that the config describes a CLIP text encoder we can write, and extract it."""
    values = {key: cfg.get(key, default) for key, default in DEFAULTS.items()}
    where = f"{source}: {COMPONENTS[encoder]} config"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "projection_dim", "eos_token_id"):
        value = values[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "eos_token_id" else 1):
            raise UserError(f"{where} {key}={value!r}: expected a positive integer")
    if values["hidden_act"] not in ACTIVATIONS:
        raise UserError(f"{where} hidden_act={values['hidden_act']!r} is not supported "
                        f"(expected one of {', '.join(ACTIVATIONS)})")
    if values["hidden_size"] % values["num_attention_heads"]:
        raise UserError(f"{where} hidden_size={values['hidden_size']} is not a multiple of "
                        f"num_attention_heads={values['num_attention_heads']}")
    if values["max_position_embeddings"] < MAX_LENGTH:
        raise UserError(f"{where} max_position_embeddings={values['max_position_embeddings']}: expected at least "
                        f"{MAX_LENGTH} (SDXL feeds {MAX_LENGTH} tokens)")
    if values["vocab_size"] * MAX_LENGTH > 2**24:
        raise UserError(f"{where} vocab_size={values['vocab_size']}: at most {2**24 // MAX_LENGTH} is supported "
                        "(pooling ranks token ids exactly in float32)")
    eps = values["layer_norm_eps"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        raise UserError(f"{where} layer_norm_eps={eps!r}: expected a small positive number")
    return TextEncoderConfig(
        vocab_size=values["vocab_size"],
        hidden_size=values["hidden_size"],
        intermediate_size=values["intermediate_size"],
        num_hidden_layers=values["num_hidden_layers"],
        num_attention_heads=values["num_attention_heads"],
        max_position_embeddings=values["max_position_embeddings"],
        hidden_act=values["hidden_act"],
        layer_norm_eps=float(eps),
        eos_token_id=values["eos_token_id"],
        projection_dim=values["projection_dim"] if encoder == 2 else None,
    )


# ---------------------------------------------------------------- blocks


def embeddings(d: Definition, ids, cfg: TextEncoderConfig):
    """CLIPTextEmbeddings: token embedding + position embedding of positions 0..S-1; ids [B, S] -> [B, S, C]."""
    path = "text_model.embeddings"
    s = shape(ids)[1]
    tokens = L.embedding(d, ids, f"{path}.token_embedding", cfg.vocab_size, cfg.hidden_size)  # [B, S, C]
    positions = L.constant(d, np.arange(s, dtype=np.int32).reshape(1, s))  # [1, S]
    position_emb = L.embedding(d, positions, f"{path}.position_embedding", cfg.max_position_embeddings,
                               cfg.hidden_size)  # [1, S, C]
    return L.add(d, tokens, position_emb, name=f"{path}.sum")  # [B, S, C]


def encoder_layer(d: Definition, x, path: str, cfg: TextEncoderConfig):
    """CLIPEncoderLayer: causal self-attention and MLP (fc1, activation, fc2), each pre-LN + residual."""
    h = L.layer_norm(d, x, f"{path}.layer_norm1", cfg.layer_norm_eps)  # [B, S, C]
    h = L.multi_head_attention(d, h, h, f"{path}.self_attn", cfg.num_attention_heads, qkv_bias=True, causal=True,
                               names=("q_proj", "k_proj", "v_proj", "out_proj"))  # [B, S, C]
    x = L.add(d, x, h, name=f"{path}.self_attn.residual")
    h = L.layer_norm(d, x, f"{path}.layer_norm2", cfg.layer_norm_eps)
    h = L.linear(d, h, f"{path}.mlp.fc1", cfg.intermediate_size)  # [B, S, I]
    h = ACTIVATIONS[cfg.hidden_act](d, h, name=f"{path}.mlp.act")
    h = L.linear(d, h, f"{path}.mlp.fc2", cfg.hidden_size)  # [B, S, C]
    return L.add(d, x, h, name=f"{path}.mlp.residual")


def pooled_position(d: Definition, ids, cfg: TextEncoderConfig):
    """Where transformers pools, int32 [B, 1]: legacy configs at input_ids.argmax() (the first
    end-of-text, its id being the largest), newer ones at the first position holding eos_token_id."""
    if cfg.legacy_pooling:
        return L.argmax_first(d, ids, cfg.vocab_size, name="text_model.pooled_position")
    eos = L.constant(d, np.full((1, 1), cfg.eos_token_id, np.int32))
    is_eos = L.cast(d, L.elementwise(d, ids, eos, "EQUAL"), np.int32)  # [B, S]: 1 at end-of-text tokens
    return L.argmax_first(d, is_eos, 2, name="text_model.pooled_position")


def text_encoder(d: Definition, cfg: TextEncoderConfig, ids, pooled: bool):
    """The text transformer on ids [B, S]: (penultimate hidden states [B, S, C], projected pooled
    token [B, P] or None). With `pooled` False the last layer is not emitted."""
    x = embeddings(d, ids, cfg)  # [B, S, C]
    last = cfg.num_hidden_layers - 1
    for i in range(last):
        x = encoder_layer(d, x, f"text_model.encoder.layers.{i}", cfg)
    penultimate = x  # transformers' hidden_states[-2]
    if not pooled:
        return penultimate, None
    x = encoder_layer(d, x, f"text_model.encoder.layers.{last}", cfg)  # [B, S, C]
    x = L.layer_norm(d, x, "text_model.final_layer_norm", cfg.layer_norm_eps)
    token = L.gather_tokens(d, x, pooled_position(d, ids, cfg), name="text_model.pooled")  # [B, C]
    return penultimate, L.linear(d, token, "text_projection", cfg.projection_dim, bias=False)  # [B, P]


# ---------------------------------------------------------------- the network


class TextEncoderNetwork(L.DefinedNetwork):
    """A defined text encoder: `.network` (INetworkDefinition) kept alive with its builder and weights."""

    def __init__(self, definition: Definition, config, encoder: int, inputs: dict[str, tuple]):
        super().__init__(definition, config, inputs)
        self.encoder = encoder


def input_profile(profile: ImageProfile) -> dict[str, tuple]:
    """{input: (min, opt, max)} of one profile: a call encodes images x prompt chunks rows of 77 ids."""
    return {"input_ids": box(text_rows(profile), MAX_LENGTH)}


def define(model, encoder: int = 1, batch: int = 1, precision: str = "fp16",
           profiles: list[ImageProfile] | None = None) -> TextEncoderNetwork:
    """Define text encoder `encoder` (1: `text_encoder`, 2: `text_encoder_2`) of `model` (pipeline
    folder, the component's folder, single file or opened component).

    Input `input_ids` int32 [B, 77]; outputs `hidden_states` [B, 77, C] (the penultimate layer, as
    SDXL reads it) and, for encoder 2, `text_embeds` [B, projection_dim]. `profiles`: define at the
    first one's opt rows and widen the batch axis where they vary (trt_sdxl.shapes).
    """
    from .. import weights as W

    if encoder not in COMPONENTS:
        raise UserError(f"encoder {encoder!r}: expected 1 (text_encoder) or 2 (text_encoder_2)")
    if profiles:
        batch = text_rows(profiles[0]).opt
    if not isinstance(batch, int) or batch < 1:
        raise UserError(f"batch {batch!r}: expected a positive integer")
    component = W.open_component(model, COMPONENTS[encoder])
    cfg = parse_config(component.config, encoder, component.source)
    d = L.new_definition(component, precision)
    specs = {"input_ids": ((batch, MAX_LENGTH), np.int32)}
    ids = L.add_input(d, "input_ids", *specs["input_ids"])
    pooled = encoder == 2
    hidden, text_embeds = text_encoder(d, cfg, ids, pooled)
    L.mark_output(d, hidden, "hidden_states")
    if pooled:
        L.mark_output(d, text_embeds, "text_embeds")
    else:
        last = f"text_model.encoder.layers.{cfg.num_hidden_layers - 1}."
        for key in component.keys():
            if key.startswith(last) or key.startswith("text_model.final_layer_norm."):
                component.skip(key, "SDXL reads encoder 1's penultimate layer: its last layer and final "
                                    "LayerNorm feed nothing it uses")
    if "text_model.embeddings.position_ids" in component:
        component.skip("text_model.embeddings.position_ids", "positions 0..76 are a constant of the network")
    component.check_all_consumed()
    net = TextEncoderNetwork(d, cfg, encoder, specs)
    if profiles:
        net.set_profiles([input_profile(p) for p in profiles])
    return net
