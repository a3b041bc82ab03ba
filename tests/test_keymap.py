"""trt_sdxl.keymap against diffusers: round trips, and diffusers' own single-file converters as the independent judges."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tiny_models  # first: it sets HF_HUB_OFFLINE before diffusers is imported
import tiny_single_file
import tiny_vae
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig
from trt_sdxl import configs, keymap
from trt_sdxl.errors import UserError

PREFIX = keymap.SINGLE_FILE_PREFIXES["unet"]


def meta_unet_keys(config: dict) -> list[str]:
    """The real parameter names of the UNet `config` describes, without allocating its weights."""
    with torch.device("meta"):
        model = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    return list(model.state_dict())


def assert_round_trip(config: dict, keys: list[str], component: str = "unet") -> dict[str, str]:
    """diffusers names -> SGM names -> diffusers names gives the names back; returns the first map."""
    to_sgm = keymap.diffusers_to_sgm(component, config, keys)
    if component != "text_encoder_2":  # there (only) q, k and v share one fused SGM tensor
        assert len(set(to_sgm.values())) == len(keys), "two diffusers names map to one SGM name"
    assert all(name.startswith(keymap.SINGLE_FILE_PREFIXES[component]) for name in to_sgm.values())
    back = keymap.sgm_to_diffusers(component, config, set(to_sgm.values()))
    assert {d: s.key for d, s in back.sources.items()} == to_sgm and not back.unused
    return to_sgm


@pytest.mark.parametrize("name", tiny_models.TINY_UNET_CONFIGS)
def test_tiny_single_file_converts_back_with_diffusers(tmp_path, name):
    folder = tiny_models.save_tiny_unet(tmp_path / name, name, seed=5)
    config = json.loads((folder / "config.json").read_text())
    original = load_file(folder / "diffusion_pytorch_model.safetensors")
    assert_round_trip(config, list(original))

    single = load_file(tiny_models.make_single_file(folder, tmp_path / f"{name}.safetensors"))
    converted = convert_ldm_unet_checkpoint(single, config)
    assert sorted(converted) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(converted[key], tensor), f"{key}: max |diff| {(converted[key] - tensor).abs().max()}"


@pytest.mark.parametrize("variant, n_keys", [("sdxl_base_1.0", 1680), ("sdxl_refiner_1.0", 1220)])
def test_full_size_sdxl_key_sets_agree_with_diffusers(variant, n_keys):
    config = configs.load(variant, "unet")
    keys = meta_unet_keys(config)
    assert len(keys) == n_keys
    to_sgm = assert_round_trip(config, keys)
    # diffusers' converter only moves dict values, so names stand in for tensors: what it
    # files under each diffusers name is the SGM name it read it from.
    converted = convert_ldm_unet_checkpoint({sgm: sgm for sgm in to_sgm.values()}, config)
    assert converted == to_sgm


def test_sdxl_base_landmarks():
    # SGM names pinned from the published SDXL layout: diffusers' converter also accepts an
    # upsampler at `output_blocks.i.1.conv` after a transformer, so it cannot catch that slot.
    config = configs.load("sdxl_base_1.0", "unet")
    to_sgm = keymap.diffusers_to_sgm("unet", config, [
        "down_blocks.0.downsamplers.0.conv.weight",
        "down_blocks.1.attentions.1.transformer_blocks.1.ff.net.0.proj.weight",
        "mid_block.attentions.0.transformer_blocks.9.attn2.to_k.weight",
        "up_blocks.0.attentions.2.transformer_blocks.9.norm3.bias",
        "up_blocks.1.upsamplers.0.conv.bias",
        "up_blocks.2.resnets.2.conv_shortcut.weight",
        "add_embedding.linear_2.bias",
    ])
    assert list(to_sgm.values()) == [PREFIX + k for k in (
        "input_blocks.3.0.op.weight",
        "input_blocks.5.1.transformer_blocks.1.ff.net.0.proj.weight",
        "middle_block.1.transformer_blocks.9.attn2.to_k.weight",
        "output_blocks.2.1.transformer_blocks.9.norm3.bias",
        "output_blocks.5.2.conv.bias",
        "output_blocks.8.0.skip_connection.weight",
        "label_emb.0.2.bias",
    )]


def test_unmapped_single_file_keys_are_listed():
    config = configs.load("sdxl_base_1.0", "unet")
    keys = [
        PREFIX + "input_blocks.0.0.weight",
        PREFIX + "input_blocks.4.1.transformer_blocks.2.attn1.to_q.weight",  # block 1 has depth 2
        PREFIX + "input_blocks.1.1.proj_in.weight",  # block 0 has no attention
        PREFIX + "time_embed.0.scale",
        "first_stage_model.decoder.conv_in.weight",  # another component: ignored
    ]
    with pytest.raises(UserError) as error:
        keymap.sgm_to_diffusers("unet", config, keys, source="ckpt.safetensors")
    message = str(error.value)
    assert message.startswith("ckpt.safetensors: 3 unet tensor name(s) match no rule")
    assert all(key in message for key in keys[1:4]) and "first_stage_model" not in message
    with pytest.raises(UserError, match=r"2 unet tensor name\(s\) match no rule of the diffusers key map.*conv_in\.scale"):
        keymap.diffusers_to_sgm("unet", config, ["conv_in.weight", "conv_in.scale", "no_such.weight"])


def test_unknown_components_and_bad_configs():
    with pytest.raises(UserError, match="unknown component 'controlnet': expected one of unet, vae, text_encoder"):
        keymap.sgm_to_diffusers("controlnet", {}, ["control_model.input_blocks.0.0.weight"])
    config = configs.load("sdxl_base_1.0", "unet")
    with pytest.raises(UserError, match=r"down_block_types\[0\]='AttnDownBlock2D': expected one of DownBlock2D, "
                                        r"CrossAttnDownBlock2D"):
        keymap.unet_modules({**config, "down_block_types": ["AttnDownBlock2D"] + config["down_block_types"][1:]})
    with pytest.raises(UserError, match=r"transformer_layers_per_block=\[1, 2\]: expected one integer or 3 integers"):
        keymap.unet_modules({**config, "transformer_layers_per_block": [1, 2]})


# ---------------------------------------------------------------- text encoders and VAE

REFINER_PREFIX = tiny_single_file.REFINER_PREFIXES["text_encoder_2"]


def torch_state(tensors: dict) -> dict:
    return {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}


def assert_same_state(converted: dict, original: dict, what: str) -> None:
    assert sorted(converted) == sorted(original), what
    for key, tensor in original.items():
        assert converted[key].shape == tensor.shape, f"{what} {key}: {tuple(converted[key].shape)} vs {tuple(tensor.shape)}"
        assert torch.equal(converted[key], tensor), f"{what} {key}: max |diff| {(converted[key] - tensor).abs().max()}"


def tiny_component(component: str, seed: int):
    if component == "vae":
        return tiny_vae.TINY_VAE_CONFIG, tiny_vae.tiny_vae(seed)
    return tiny_single_file.TINY_TEXT_ENCODER_CONFIGS[component], tiny_single_file.tiny_text_encoder(component, seed)


# diffusers' converter per component: (single-file torch state, model, config, prefix) -> diffusers state
DIFFUSERS_CONVERTERS = {
    "text_encoder": lambda single, model, config, prefix: convert_ldm_clip_checkpoint(single),
    "text_encoder_2": lambda single, model, config, prefix: convert_open_clip_checkpoint(model, single, prefix=prefix),
    "vae": lambda single, model, config, prefix: convert_ldm_vae_checkpoint(single, config),
}


@pytest.mark.parametrize("component, prefix", [
    ("text_encoder", None), ("text_encoder_2", None), ("text_encoder_2", REFINER_PREFIX), ("vae", None),
])
def test_tiny_single_file_converts_back_with_diffusers_converters(component, prefix):
    config, model = tiny_component(component, seed=21)
    original = torch_state(tiny_single_file.numpy_state(model))
    assert_round_trip(config, list(original), component)
    # written as a real file holds it: with CLIP's position_ids and OpenCLIP's logit_scale
    single = tiny_single_file.single_file_tensors(component, config, original, prefix)
    prefix = prefix or keymap.SINGLE_FILE_PREFIXES[component]
    assert all(k.startswith(prefix) for k in single)

    expected = dict(original)
    if component == "text_encoder":  # diffusers' CLIP converter keeps every key, the buffer included
        expected["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    converted = DIFFUSERS_CONVERTERS[component](torch_state(single), model, config, prefix)
    assert_same_state(converted, expected, f"{component} under {prefix!r}")

    layout = keymap.sgm_to_diffusers(component, config, single)
    assert layout.prefix == prefix and sorted(layout.sources) == sorted(original)
    unused = set(tiny_single_file.UNUSED_TENSORS.get(component, {}))
    assert set(layout.unused) == {prefix + k for k in unused}
    assert {s.key for s in layout.sources.values()} | set(layout.unused) == set(single)


def test_which_tensors_are_transformed():
    """Which tensors are row blocks, transposes or reshaped 1x1 convolutions; all others are renames."""
    def layout(component, config, model):
        return keymap.sgm_to_diffusers(component, config, keymap.diffusers_to_sgm(
            component, config, tiny_single_file.numpy_state(model)).values())

    te2 = layout("text_encoder_2", tiny_single_file.TINY_TEXT_ENCODER_CONFIGS["text_encoder_2"],
                 tiny_single_file.tiny_text_encoder("text_encoder_2"))
    transforms = {d: s.transform for d, s in te2.sources.items() if s.transform != keymap.SAME}
    layer = "text_model.encoder.layers.2.self_attn"
    assert transforms[f"{layer}.q_proj.weight"] == keymap.Rows(0, 3)
    assert transforms[f"{layer}.k_proj.bias"] == keymap.Rows(1, 3)
    assert transforms[f"{layer}.v_proj.weight"] == keymap.Rows(2, 3)
    assert te2.sources[f"{layer}.v_proj.weight"].key == \
        "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"
    assert transforms.pop("text_projection.weight") == keymap.TRANSPOSED
    assert len(transforms) == 3 * 6 and all(isinstance(t, keymap.Rows) for t in transforms.values())

    te1 = layout("text_encoder", tiny_single_file.TINY_TEXT_ENCODER_CONFIGS["text_encoder"],
                 tiny_single_file.tiny_text_encoder("text_encoder"))
    assert all(s.transform == keymap.SAME and s.key == keymap.SINGLE_FILE_PREFIXES["text_encoder"] + d
               for d, s in te1.sources.items())
    vae = layout("vae", tiny_vae.TINY_VAE_CONFIG, tiny_vae.tiny_vae())
    reshaped = sorted(d for d, s in vae.sources.items() if s.transform != keymap.SAME)
    assert reshaped == sorted(f"{side}.mid_block.attentions.0.{m}.weight" for side in ("decoder", "encoder")
                              for m in ("to_k", "to_out.0", "to_q", "to_v"))
    assert {vae.sources[k].transform for k in reshaped} == {keymap.CONV_TO_LINEAR}


def meta_state(component: str, config: dict) -> dict:
    """The real parameter names and shapes of the full-size `component`, without allocating its weights."""
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        if component == "vae":
            model = AutoencoderKL(**kwargs)
        else:
            model = tiny_single_file.TEXT_ENCODER_CLASSES[component](CLIPTextConfig(**kwargs))
    state = model.state_dict()
    if component == "text_encoder" and not any(k.startswith("text_model.") for k in state):  # transformers >= 5
        state = {"text_model." + k: v for k, v in state.items()}
    return state


@pytest.mark.parametrize("component, n_keys, n_sgm", [("text_encoder", 196, 196), ("text_encoder_2", 517, 389),
                                                      ("vae", 248, 248)])
def test_full_size_sdxl_text_encoders_and_vae(component, n_keys, n_sgm):
    config = configs.load("sdxl_base_1.0", component)
    state = meta_state(component, config)
    assert len(state) == n_keys
    to_sgm = assert_round_trip(config, list(state), component)
    assert len(set(to_sgm.values())) == n_sgm
    if component == "text_encoder":  # diffusers' CLIP converter only moves values: names stand in for tensors
        assert convert_ldm_clip_checkpoint({s: s for s in to_sgm.values()}) == {k: to_sgm[k] for k in state}


def test_sdxl_text_encoder_and_vae_landmarks():
    # SGM names pinned from the published SDXL single-file layout.
    expected = {
        "text_encoder": {
            "text_model.encoder.layers.11.mlp.fc2.weight":
                "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
        },
        "text_encoder_2": {
            "text_model.encoder.layers.31.self_attn.v_proj.bias":
                "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias",
            "text_model.encoder.layers.0.mlp.fc2.weight":
                "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.weight",
            "text_model.embeddings.position_embedding.weight": "conditioner.embedders.1.model.positional_embedding",
            "text_projection.weight": "conditioner.embedders.1.model.text_projection",
            "text_model.final_layer_norm.bias": "conditioner.embedders.1.model.ln_final.bias",
        },
        "vae": {
            "decoder.up_blocks.0.resnets.2.conv2.weight": "first_stage_model.decoder.up.3.block.2.conv2.weight",
            "decoder.up_blocks.2.resnets.0.conv_shortcut.weight":
                "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
            "decoder.up_blocks.2.upsamplers.0.conv.bias": "first_stage_model.decoder.up.1.upsample.conv.bias",
            "encoder.down_blocks.2.downsamplers.0.conv.bias": "first_stage_model.encoder.down.2.downsample.conv.bias",
            "decoder.mid_block.attentions.0.to_out.0.weight": "first_stage_model.decoder.mid.attn_1.proj_out.weight",
            "encoder.conv_norm_out.weight": "first_stage_model.encoder.norm_out.weight",
            "post_quant_conv.bias": "first_stage_model.post_quant_conv.bias",
        },
    }
    for component, names in expected.items():
        config = configs.load("sdxl_base_1.0", component)
        assert keymap.diffusers_to_sgm(component, config, names) == names, component
    refiner = keymap.diffusers_to_sgm("text_encoder_2", configs.load("sdxl_refiner_1.0", "text_encoder_2"),
                                      ["text_projection.weight"], prefix=REFINER_PREFIX)
    assert refiner == {"text_projection.weight": "conditioner.embedders.0.model.text_projection"}


def test_text_encoder_and_vae_unmapped_keys_are_listed():
    config = tiny_single_file.TINY_TEXT_ENCODER_CONFIGS["text_encoder_2"]
    prefix = keymap.SINGLE_FILE_PREFIXES["text_encoder_2"]
    stray = [prefix + k for k in ("transformer.resblocks.3.ln_1.weight",  # 3 layers: 0..2
                                  "transformer.resblocks.0.attn.in_proj_scale", "visual.proj")]
    keys = [prefix + "logit_scale", prefix + "transformer.resblocks.0.attn.in_proj_weight", *stray]
    with pytest.raises(UserError) as error:
        keymap.sgm_to_diffusers("text_encoder_2", config, keys, source="ckpt.safetensors")
    message = str(error.value)
    assert message.startswith("ckpt.safetensors: 3 text_encoder_2 tensor name(s) match no rule")
    assert all(k in message for k in stray) and "logit_scale" not in message and "in_proj_weight" not in message

    vae_config = tiny_vae.TINY_VAE_CONFIG
    with pytest.raises(UserError, match=r"1 vae tensor name\(s\).*first_stage_model\.decoder\.up\.0\.upsample\.conv\.weight"):
        keymap.sgm_to_diffusers("vae", vae_config, ["first_stage_model.decoder.up.0.upsample.conv.weight",
                                                    "first_stage_model.decoder.up.1.upsample.conv.weight"])
    with pytest.raises(UserError, match=r"1 vae tensor name\(s\).*first_stage_model\.quant_conv\.weight"):
        keymap.sgm_to_diffusers("vae", {**vae_config, "use_quant_conv": False}, ["first_stage_model.quant_conv.weight"])
    with pytest.raises(UserError, match=r"1 text_encoder tensor name\(s\).*text_projection\.weight"):
        keymap.diffusers_to_sgm("text_encoder", tiny_single_file.TINY_TEXT_ENCODER_CONFIGS["text_encoder"],
                                ["text_projection.weight", "text_model.final_layer_norm.weight"])


def test_single_file_state_needs_every_part_of_a_fused_tensor():
    config = tiny_single_file.TINY_TEXT_ENCODER_CONFIGS["text_encoder_2"]
    state = tiny_single_file.numpy_state(tiny_single_file.tiny_text_encoder("text_encoder_2"))
    del state["text_model.encoder.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(UserError, match=r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.1\.attn\."
                                        r"in_proj_weight is assembled from .*q_proj\.weight, .*k_proj\.weight, "
                                        r".*v_proj\.weight, but text_model\.encoder\.layers\.1\.self_attn\."
                                        r"k_proj\.weight is missing"):
        keymap.to_single_file_state("text_encoder_2", config, state)


def test_prefixes_and_bad_text_encoder_and_vae_configs():
    keys = ["conditioner.embedders.1.model.ln_final.weight", "conditioner.embedders.0.model.ln_final.weight"]
    assert keymap.find_prefix("text_encoder_2", keys[1:]) == REFINER_PREFIX
    assert keymap.find_prefix("text_encoder", keys) is None
    with pytest.raises(UserError, match=r"x\.safetensors: text_encoder_2 tensors under both "
                                        r"'conditioner\.embedders\.1\.model\.' and 'conditioner\.embedders\.0\.model\.'"):
        keymap.find_prefix("text_encoder_2", keys, "x.safetensors")
    with pytest.raises(UserError, match=r"text_encoder config num_hidden_layers=None: expected a positive integer"):
        keymap.key_table("text_encoder", {})
    vae = tiny_vae.TINY_VAE_CONFIG
    with pytest.raises(UserError, match=r"vae config down_block_types=\['AttnDownEncoderBlock2D', .*expected "
                                        r"DownEncoderBlock2D once per block_out_channels entry \(4\)"):
        keymap.key_table("vae", {**vae, "down_block_types": ["AttnDownEncoderBlock2D"] + ["DownEncoderBlock2D"] * 3})
    with pytest.raises(UserError, match=r"vae config up_block_types=\['UpDecoderBlock2D'\]: expected UpDecoderBlock2D "
                                        r"once per block_out_channels entry \(4\)"):
        keymap.key_table("vae", {**vae, "up_block_types": ["UpDecoderBlock2D"]})


def test_transform_shapes():
    assert keymap.Rows(1, 3).shape((96, 32)) == (32, 32) and keymap.Rows(2, 3).shape((96,)) == (32,)
    assert keymap.TRANSPOSED.shape((32, 24)) == (24, 32)
    assert keymap.CONV_TO_LINEAR.shape((8, 16, 1, 1)) == (8, 16) == keymap.CONV_TO_LINEAR.shape((8, 16))
    for transform, stored, reason in [(keymap.Rows(0, 3), (97, 32), "97 rows do not split into 3 equal parts"),
                                      (keymap.Rows(0, 3), (), "a scalar has no rows"),
                                      (keymap.TRANSPOSED, (32,), "expected a matrix"),
                                      (keymap.CONV_TO_LINEAR, (8, 16, 3, 3), "expected a 1x1 convolution")]:
        with pytest.raises(ValueError, match=reason):
            transform.shape(stored)
    rows = np.arange(12.0).reshape(6, 2)
    assert np.array_equal(keymap.Rows(1, 3).apply(rows), rows[2:4]) and np.shares_memory(keymap.Rows(1, 3).apply(rows), rows)
