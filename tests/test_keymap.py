"""trt_sdxl.keymap against diffusers: round trips, and diffusers' own single-file converter as the independent judge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import tiny_models  # first: it sets HF_HUB_OFFLINE before diffusers is imported
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from trt_sdxl import configs, keymap
from trt_sdxl.errors import UserError

PREFIX = keymap.SINGLE_FILE_PREFIXES["unet"]


def meta_unet_keys(config: dict) -> list[str]:
    """The real parameter names of the UNet `config` describes, without allocating its weights."""
    with torch.device("meta"):
        model = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    return list(model.state_dict())


def assert_round_trip(config: dict, keys: list[str]) -> dict[str, str]:
    to_sgm = keymap.diffusers_to_sgm("unet", config, keys)
    assert len(set(to_sgm.values())) == len(keys), "two diffusers names map to one SGM name"
    assert all(name.startswith(PREFIX) for name in to_sgm.values())
    back = keymap.sgm_to_diffusers("unet", config, to_sgm.values())
    assert {to_sgm[k]: k for k in keys} == back
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


def test_components_without_a_table_and_bad_configs():
    with pytest.raises(UserError, match="reading the vae from a single-file checkpoint is not supported yet"):
        keymap.sgm_to_diffusers("vae", {}, ["first_stage_model.decoder.conv_in.weight"])
    config = configs.load("sdxl_base_1.0", "unet")
    with pytest.raises(UserError, match=r"down_block_types\[0\]='AttnDownBlock2D': expected one of DownBlock2D, "
                                        r"CrossAttnDownBlock2D"):
        keymap.unet_modules({**config, "down_block_types": ["AttnDownBlock2D"] + config["down_block_types"][1:]})
    with pytest.raises(UserError, match=r"transformer_layers_per_block=\[1, 2\]: expected one integer or 3 integers"):
        keymap.unet_modules({**config, "transformer_layers_per_block": [1, 2]})
