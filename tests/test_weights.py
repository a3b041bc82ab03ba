"""trt_sdxl.weights and trt_sdxl.configs: every checkpoint layout, zero-copy reads, conversions, and the errors users see."""

from __future__ import annotations

import hashlib
import json
import mmap
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models
from trt_sdxl import configs, weights
from trt_sdxl.errors import UserError


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    """The tiny "sdxl_like" UNet saved by diffusers in float32."""
    return tiny_models.save_tiny_unet(tmp_path_factory.mktemp("unet"), "sdxl_like", seed=1)


@pytest.fixture(scope="module")
def reference(unet_folder):
    """The same tensors as torch reads them (independent of our parser)."""
    return load_file(unet_folder / "diffusion_pytorch_model.safetensors")


def assert_same_tensors(component, reference, dtype=np.float32):
    assert sorted(component.keys()) == sorted(reference)
    for key, tensor in reference.items():
        got = component.get(key, dtype=dtype)
        want = tensor.to(torch.float32).numpy().astype(dtype)
        assert got.shape == want.shape, key
        assert np.array_equal(got, want), f"{key}: max |diff| {np.abs(got.astype(np.float64) - want).max()}"


def is_mmap_view(array: np.ndarray) -> bool:
    """True when `array` is a view whose base chain ends at a memory map (no copy was made)."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def write_component(folder, tensors: dict, config: dict | None = None):
    """A component folder holding `tensors` (torch) and the tiny UNet config."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    config = config or {"_class_name": "UNet2DConditionModel", **tiny_models.TINY_UNET_CONFIGS["sdxl_like"]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ---------------------------------------------------------------- layouts


def test_component_folder_reads_every_tensor_exactly(unet_folder, reference):
    with weights.open_component(unet_folder, "unet") as unet:
        assert unet.name == "unet" and unet.source == str(unet_folder)
        assert unet.config["block_out_channels"] == [16, 32, 64]
        assert_same_tensors(unet, reference)
        unet.check_all_consumed()


def test_pipeline_folder_opens_its_unet(tmp_path, reference):
    pipeline = tiny_models.save_tiny_pipeline(tmp_path / "pipe", "sdxl_like", seed=1)
    unet = weights.open_component(pipeline, "unet")
    assert unet.source == str(pipeline / "unet")
    assert_same_tensors(unet, reference)
    assert weights.open_component(unet, "unet") is unet
    with pytest.raises(UserError, match=r"pipe: this pipeline folder has no vae/ folder"):
        weights.open_component(pipeline, "vae")
    with pytest.raises(UserError, match="opened as the unet, but the vae was asked for"):
        weights.open_component(unet, "vae")


def test_fp16_variant_is_used_only_without_full_precision(tmp_path):
    folder = tiny_models.save_tiny_unet(tmp_path / "unet", "sdxl_like", seed=2)
    tiny_models.save_tiny_unet(folder, "sdxl_like", seed=2, dtype=torch.float16, variant="fp16")
    assert weights.open_component(folder, "unet").dtype("conv_in.weight") == "float32"

    (folder / "diffusion_pytorch_model.safetensors").unlink()
    unet = weights.open_component(folder, "unet")
    assert unet.dtype("conv_in.weight") == "float16"
    assert_same_tensors(unet, load_file(folder / "diffusion_pytorch_model.fp16.safetensors"), np.float16)


def test_sharded_index(tmp_path, reference):
    folder = tiny_models.save_tiny_unet(tmp_path / "unet", "sdxl_like", seed=1, max_shard_size="1MB")
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    unet = weights.open_component(folder, "unet")
    assert len(unet.files) == len(set(index["weight_map"].values()))
    assert_same_tensors(unet, reference)

    index["weight_map"]["conv_in.weight"] = "missing-shard.safetensors"
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"index\.json: shard 'missing-shard\.safetensors' \(for tensor 'conv_in\.weight'\)"):
        weights.open_component(folder, "unet")


def test_sharded_fp16_variant(tmp_path, reference):
    folder = tiny_models.save_tiny_unet(tmp_path / "unet", "sdxl_like", seed=1, dtype=torch.float16,
                                        variant="fp16", max_shard_size="1MB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    unet = weights.open_component(folder, "unet")
    assert len(unet.files) > 1
    assert_same_tensors(unet, {k: v.to(torch.float16) for k, v in reference.items()}, np.float16)


def test_single_file_exposes_diffusers_names(tmp_path, unet_folder, reference):
    single = tiny_models.make_single_file(unet_folder, tmp_path / "tiny.safetensors")
    config = json.loads((unet_folder / "config.json").read_text())
    unet = weights.open_component(single, "unet", config=config)
    assert unet.source == str(single)
    assert_same_tensors(unet, reference)
    weights.check_unet_config(unet)
    with pytest.raises(UserError) as error:
        unet.get("conv_in.weight", shape=(1, 2, 3, 3))
    assert "tiny.safetensors: tensor 'conv_in.weight' (stored as 'model.diffusion_model.input_blocks.0.0.weight')" \
        in str(error.value)


@pytest.mark.parametrize("width, variant", [(320, "sdxl_base_1.0"), (384, "sdxl_refiner_1.0")])
def test_single_file_without_config_gets_the_packaged_sdxl_config(tmp_path, width, variant):
    path = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(width, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, str(path))
    unet = weights.open_component(path, "unet")
    assert unet.config == configs.load(variant, "unet")
    assert unet.keys() == ["conv_in.weight"]  # the VAE's tensor is not the UNet's


def test_single_file_that_is_not_sdxl(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(100, 4, 3, 3)}, str(path))
    with pytest.raises(UserError, match=r"other\.safetensors: no config\.json, and the UNet's first convolution "
                                        r"'model\.diffusion_model\.input_blocks\.0\.0\.weight' has 100 output channels"):
        weights.open_component(path, "unet")
    save_file({"cond_stage_model.x.weight": torch.zeros(2)}, str(path))
    with pytest.raises(UserError, match=r"other\.safetensors: no unet tensors \(no names starting with 'model\.diffusion_model\.'\)"):
        weights.open_component(path, "unet")


# ---------------------------------------------------------------- reading


def test_zero_copy_when_dtype_matches(unet_folder, reference):
    unet = weights.open_component(unet_folder, "unet")
    view = unet.get("conv_in.weight", dtype=np.float32)
    assert is_mmap_view(view) and not view.flags.writeable
    converted = unet.get("conv_in.weight", dtype=np.float16)
    assert not is_mmap_view(converted) and converted.dtype == np.float16
    assert np.array_equal(converted, reference["conv_in.weight"].to(torch.float16).numpy())


def test_bf16_source_converts_like_torch(tmp_path):
    folder = tiny_models.save_tiny_unet(tmp_path / "unet", "sdxl_like", seed=3, dtype=torch.bfloat16)
    reference = load_file(folder / "diffusion_pytorch_model.safetensors")
    unet = weights.open_component(folder, "unet")
    for key, tensor in reference.items():
        assert unet.dtype(key) == "bfloat16"
        as_bf16 = unet.get(key, dtype=ml_dtypes.bfloat16)
        assert is_mmap_view(as_bf16)
        assert np.array_equal(as_bf16.view(np.uint16), tensor.view(torch.int16).numpy().view(np.uint16)), key
        assert np.array_equal(unet.get(key, dtype=np.float32), tensor.to(torch.float32).numpy()), key
        # bf16 -> fp16 must round once, exactly as torch does it
        assert np.array_equal(unet.get(key, dtype=np.float16), tensor.to(torch.float16).numpy()), key


def test_shapes_dtypes_and_sizes(unet_folder, reference):
    unet = weights.open_component(unet_folder, "unet")
    for key, tensor in reference.items():
        assert key in unet
        assert unet.shape(key) == tuple(tensor.shape)
        assert unet.dtype(key) == "float32"
    assert "conv_in.bias.extra" not in unet
    assert unet.weight_bytes == sum(t.numel() * t.element_size() for t in reference.values())
    assert not unet.consumed  # shape/dtype lookups read nothing


def test_int_tensor_reads_as_stored_only(tmp_path):
    folder = write_component(tmp_path / "unet", {"conv_in.weight": torch.zeros(16, 4, 3, 3),
                                                "position_ids": torch.arange(5)})
    unet = weights.open_component(folder, "unet")
    assert unet.dtype("position_ids") == "int64"
    assert unet.get("position_ids", dtype=None).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(UserError, match=r"tensor 'position_ids' is stored as int64 and cannot be read as float16"):
        unet.get("position_ids")


def test_views_outlive_close(unet_folder, reference):
    with weights.open_component(unet_folder, "unet") as unet:
        view = unet.get("conv_out.weight", dtype=np.float32)
    assert np.array_equal(view, reference["conv_out.weight"].numpy())


def test_fingerprint_is_content_based(tmp_path, unet_folder):
    first = weights.open_component(unet_folder, "unet").fingerprint()
    copy = shutil.copytree(unet_folder, tmp_path / "copy")
    assert weights.open_component(copy, "unet").fingerprint() == first

    # same header, different weights (a "fine-tune"): the sampled data blocks tell them apart
    other = tiny_models.save_tiny_unet(tmp_path / "other", "sdxl_like", seed=99)
    assert (other / "config.json").read_text() == (unet_folder / "config.json").read_text()
    assert weights.open_component(other, "unet").fingerprint() != first


# ---------------------------------------------------------------- errors


def test_wrong_shape_names_file_tensor_and_both_shapes(unet_folder):
    unet = weights.open_component(unet_folder, "unet")
    with pytest.raises(UserError) as error:
        unet.get("conv_in.weight", shape=(16, 8, 3, 3))
    message = str(error.value)
    assert "diffusion_pytorch_model.safetensors: tensor 'conv_in.weight'" in message
    assert "(16, 4, 3, 3), expected (16, 8, 3, 3)" in message
    assert "conv_in.weight" not in unet.consumed


def test_unknown_key_suggests_the_closest(unet_folder):
    unet = weights.open_component(unet_folder, "unet")
    with pytest.raises(UserError, match=rf"{unet_folder}: the unet has no tensor 'down_blocks\.0\.resnet\.0\.conv1\.weight'; "
                                        r"closest name there: 'down_blocks\.0\.resnets\.0\.conv1\.weight'"):
        unet.get("down_blocks.0.resnet.0.conv1.weight")


def test_unconsumed_tensors_are_reported(unet_folder, reference):
    unet = weights.open_component(unet_folder, "unet")
    for key in list(reference)[:-3]:
        unet.get(key)
    with pytest.raises(UserError) as error:
        unet.check_all_consumed()
    assert f"3 of the unet's {len(reference)} tensors were not used" in str(error.value)
    assert all(key in str(error.value) for key in list(reference)[-3:])


def _valid_file(path):
    save_file({"conv_in.weight": torch.ones(16, 4, 3, 3), "conv_in.bias": torch.ones(16)}, str(path))
    return path.read_bytes()


def _with_header(blob: bytes, header: dict) -> bytes:
    n = struct.unpack("<Q", blob[:8])[0]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


def _header(blob: bytes) -> dict:
    return json.loads(blob[8:8 + struct.unpack("<Q", blob[:8])[0]])


CORRUPTIONS = {
    "too short": (lambda b: b[:5], "too short for a safetensors file"),
    "truncated data": (lambda b: b[:-100], r"its data ends at byte \d+ but the file has only \d+ bytes \(truncated\?\)"),
    "header past end": (lambda b: struct.pack("<Q", len(b)) + b[8:], r"header length \d+ runs past the end"),
    "bad json": (lambda b: b[:8] + b"{" * struct.unpack("<Q", b[:8])[0] + b[8 + struct.unpack("<Q", b[:8])[0]:],
                 "header is not valid JSON"),
    "unsupported dtype": (lambda b: _with_header(b, {**_header(b), "conv_in.bias": {**_header(b)["conv_in.bias"], "dtype": "Q4"}}),
                          r"tensor 'conv_in.bias': dtype 'Q4' is not supported"),
    "size mismatch": (lambda b: _with_header(b, {**_header(b), "conv_in.bias": {**_header(b)["conv_in.bias"], "shape": [17]}}),
                      r"tensor 'conv_in.bias': 64 bytes of data, expected 68 for F32 \(17,\)"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_file_names_the_file_and_the_problem(tmp_path, kind):
    folder = write_component(tmp_path / "unet", {"x": torch.zeros(1)})
    path = folder / "diffusion_pytorch_model.safetensors"
    corrupt, expected = CORRUPTIONS[kind]
    path.write_bytes(corrupt(_valid_file(path)))
    with pytest.raises(UserError, match=expected) as error:
        weights.open_component(folder, "unet")
    assert str(path) in str(error.value)


def test_missing_things_name_what_was_looked_for(tmp_path):
    with pytest.raises(UserError, match=r"nowhere: no such file or folder \(expected a diffusers pipeline folder"):
        weights.open_component(tmp_path / "nowhere", "unet")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError) as error:
        weights.open_component(empty, "unet")
    message = str(error.value)
    assert f"{empty}: no unet weights found (looked for diffusion_pytorch_model.safetensors" in message
    assert "diffusion_pytorch_model.bin is a PyTorch pickle, convert it to .safetensors" in message
    with pytest.raises(UserError, match="unknown component 'text_encoder_3'"):
        weights.open_component(empty, "text_encoder_3")
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(UserError, match=r"model\.ckpt: expected a single-file \.safetensors checkpoint"):
        weights.open_component(tmp_path / "model.ckpt", "unet")


def test_config_of_another_class_is_refused(unet_folder):
    with pytest.raises(UserError, match=r"config\.json: describes a UNet2DConditionModel, but the vae is a AutoencoderKL"):
        weights.open_component(unet_folder, "vae")


# ---------------------------------------------------------------- config vs weights


@pytest.mark.parametrize("key, value, tensor, found", [
    ("cross_attention_dim", 48, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", 64),
    ("projection_class_embeddings_input_dim", 81, "add_embedding.linear_1.weight", 80),
    ("in_channels", 8, "conv_in.weight", 4),
    ("block_out_channels", [16, 48, 64], "down_blocks.1.resnets.0.conv1.weight", 32),
])
def test_config_that_disagrees_with_shapes(unet_folder, key, value, tensor, found):
    unet = weights.open_component(unet_folder, "unet")
    unet.config = {**unet.config, key: value}
    with pytest.raises(UserError) as error:
        weights.check_unet_config(unet)
    message = str(error.value)
    assert str(unet_folder) in message and f"'{tensor}'" in message and f"says" in message
    assert f"{value if not isinstance(value, list) else value[1]}" in message and f" {found}" in message


@pytest.mark.parametrize("key, value, expected", [
    ("transformer_layers_per_block", [1, 1, 3],
     r"transformer_layers_per_block \(down block 2\)=3 but the checkpoint has 2 transformer blocks"),
    ("layers_per_block", 3, r"layers_per_block\[0\]=3 but the checkpoint has 2 resnets in down block 0"),
    ("down_block_types", ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
     r"down_block_types\[0\]='CrossAttnDownBlock2D' but the checkpoint lacks down_blocks\.0\.attentions\.0"),
])
def test_config_that_disagrees_with_structure(unet_folder, key, value, expected):
    unet = weights.open_component(unet_folder, "unet")
    unet.config = {**unet.config, key: value}
    with pytest.raises(UserError, match=expected):
        weights.check_unet_config(unet)


# ---------------------------------------------------------------- packaged configs


# git-lfs object ids of the published files (recorded by a public mirror of
# stabilityai/stable-diffusion-xl-base-1.0): our copies must stay byte-identical.
PUBLISHED_SHA256 = {
    ("sdxl_base_1.0", "unet"): "30ebc70750223e59006f7f2b4e1e6c102570aa19a9c4ae3e1fbe7591332dbae6",
    ("sdxl_base_1.0", "text_encoder"): "39b8b2e4b1949e36969caa425b6c81c68bace99198dd9078ce05d16ad401fe7f",
}


def test_packaged_configs():
    from importlib import resources

    for (variant, component), sha in PUBLISHED_SHA256.items():
        data = resources.files(configs).joinpath(variant, f"{component}.json").read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha, (variant, component)
    for variant, components in configs.VARIANTS.items():
        for component in components:
            config = configs.load(variant, component)
            assert ("_source" in config) != ((variant, component) in PUBLISHED_SHA256), (variant, component)
    base, refiner = configs.load("sdxl_base_1.0", "unet"), configs.load("sdxl_refiner_1.0", "unet")
    assert base["attention_head_dim"] == [5, 10, 20] and base["transformer_layers_per_block"] == [1, 2, 10]
    assert refiner["block_out_channels"] == [384, 768, 1536, 1536] and refiner["cross_attention_dim"] == 1280
    assert configs.load("sdxl_base_1.0", "vae")["scaling_factor"] == 0.13025
    with pytest.raises(UserError, match="sdxl_refiner_1.0 has no 'text_encoder' config"):
        configs.load("sdxl_refiner_1.0", "text_encoder")
    with pytest.raises(UserError, match="unknown SDXL variant 'sd15'"):
        configs.load("sd15", "unet")
