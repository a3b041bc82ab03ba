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
import tiny_single_file
import tiny_vae
from trt_sdxl import configs, keymap, weights
from trt_sdxl.unet_config import UNetConfig
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
    UNetConfig.parse(unet.config).check_weights(unet)
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


# ---------------------------------------------------------------- single file: text encoders and VAE

TEXT_AND_VAE = ("text_encoder", "text_encoder_2", "vae")


@pytest.fixture(scope="module")
def tiny_sdxl_file(tmp_path_factory):
    """A tiny SDXL base single file (UNet, both text encoders, VAE), and what it was written from."""
    components = tiny_single_file.tiny_sdxl(seed=7)
    path = tiny_single_file.write_single_file(tmp_path_factory.mktemp("single") / "sdxl.safetensors", components)
    return path, components


def assert_reads_as(component, state: dict, stored_dtype=np.float32):
    """Every tensor of `component` equals `state`'s (numpy) as float32, and as stored in `stored_dtype`."""
    assert sorted(component.keys()) == sorted(state)
    for key, want in state.items():
        assert component.shape(key) == want.shape, key
        got = component.get(key, dtype=np.float32, shape=want.shape)
        expected = want.astype(stored_dtype).astype(np.float32)
        assert np.array_equal(got, expected), f"{key}: max |diff| {np.abs(got - expected).max()}"
        assert got.flags.c_contiguous, key


@pytest.mark.parametrize("name", TEXT_AND_VAE)
def test_single_file_text_encoders_and_vae_read_as_the_originals(tiny_sdxl_file, name):
    path, components = tiny_sdxl_file
    config, state = components[name]
    component = weights.open_component(path, name, config=config)
    assert_reads_as(component, state)
    component.check_all_consumed()
    for key in component.keys():  # stored dtype: views of the file, row blocks and reshapes included
        assert component.dtype(key) == "float32"
        view = component.get(key, dtype=None)
        assert is_mmap_view(view) == (key != "text_projection.weight"), key
    prefix = keymap.SINGLE_FILE_PREFIXES[name]
    assert component.unused.keys() == {prefix + k for k in tiny_single_file.UNUSED_TENSORS.get(name, {})}
    # the fused q/k/v tensors count once
    stored = weights.SafetensorsFile(path).tensors
    assert component.weight_bytes == sum(e.nbytes for k, e in stored.items()
                                         if k.startswith(prefix) and k not in component.unused)


def test_text_encoders_and_vae_read_the_same_from_both_layouts(tmp_path, tiny_sdxl_file):
    path, components = tiny_sdxl_file
    folders = {
        "text_encoder": tiny_single_file.tiny_text_encoder("text_encoder", seed=9),
        "text_encoder_2": tiny_single_file.tiny_text_encoder("text_encoder_2", seed=10),
        "vae": tiny_vae.tiny_vae(seed=11),
    }
    for name, model in folders.items():
        model.save_pretrained(tmp_path / name)
        state = tiny_single_file.numpy_state(model)
        single = tiny_single_file.write_single_file(tmp_path / f"{name}.safetensors",
                                                    {name: (components[name][0], state)})
        for layout in (tmp_path, single):  # the pipeline-shaped folder reads its config.json
            component = weights.open_component(layout, name, config=None if layout == tmp_path else components[name][0])
            assert_reads_as(component, state)
            component.check_all_consumed()
    # transformers >= 5 saves CLIPTextModel without `text_model.`: its names are the published ones all the same
    folder_te1 = weights.open_component(tmp_path / "text_encoder", "text_encoder")
    assert all(k.startswith("text_model.") for k in folder_te1.keys())


def test_every_key_of_a_full_single_file_is_one_components(tiny_sdxl_file):
    path, components = tiny_sdxl_file
    opened = {name: weights.open_component(path, name, config=config) for name, (config, _) in components.items()}
    assert_reads_as(opened["unet"], components["unet"][1])
    claimed = [name for c in opened.values() for name in c.stored_names()]
    assert len(claimed) == len(set(claimed)), "a stored tensor claimed by two components"
    assert set(claimed) == set(weights.SafetensorsFile(path).tensors)


def test_refiner_single_file(tmp_path):
    components = tiny_single_file.tiny_sdxl(refiner=True, seed=8)
    path = tiny_single_file.write_single_file(tmp_path / "refiner.safetensors", components, refiner=True)
    te2 = weights.open_component(path, "text_encoder_2", config=components["text_encoder_2"][0])
    assert_reads_as(te2, components["text_encoder_2"][1])
    assert te2.unused == {"conditioner.embedders.0.model.logit_scale": keymap.OPEN_CLIP_UNUSED["logit_scale"]}
    claimed = set().union(*(weights.open_component(path, name, config=config).stored_names()
                            for name, (config, _) in components.items()))
    assert claimed == set(weights.SafetensorsFile(path).tensors)
    with pytest.raises(UserError, match=rf"{path}: no text_encoder tensors \(no names starting with "
                                        r"'conditioner\.embedders\.0\.transformer\.'\)"):
        weights.open_component(path, "text_encoder")


def test_position_ids_present_or_absent(tmp_path):
    config = tiny_single_file.TINY_TEXT_ENCODER_CONFIGS["text_encoder"]
    state = tiny_single_file.numpy_state(tiny_single_file.tiny_text_encoder("text_encoder", seed=4))
    read = {}
    for unused in (True, False):
        path = tiny_single_file.write_single_file(tmp_path / f"te1-{unused}.safetensors",
                                                  {"text_encoder": (config, state)}, unused=unused)
        te1 = weights.open_component(path, "text_encoder", config=config)
        assert bool(te1.unused) == unused
        assert_reads_as(te1, state)
        te1.check_all_consumed()
        read[unused] = te1.keys()
    assert read[True] == read[False]


def test_fp16_single_file_with_transforms(tmp_path):
    components = {name: tiny_single_file.tiny_sdxl(seed=5)[name] for name in ("text_encoder_2", "vae")}
    path = tiny_single_file.write_single_file(tmp_path / "fp16.safetensors", components, dtype=np.float16)
    for name, (config, state) in components.items():
        component = weights.open_component(path, name, config=config)
        assert_reads_as(component, state, stored_dtype=np.float16)
        q = component.get("text_model.encoder.layers.1.self_attn.q_proj.weight" if name == "text_encoder_2"
                          else "decoder.mid_block.attentions.0.to_q.weight", dtype=np.float16)
        assert is_mmap_view(q) and q.ndim == 2


def test_single_file_shape_errors_name_the_stored_tensor(tiny_sdxl_file, tmp_path):
    path, components = tiny_sdxl_file
    te2 = weights.open_component(path, "text_encoder_2", config=components["text_encoder_2"][0])
    key = "text_model.encoder.layers.0.self_attn.k_proj.weight"
    with pytest.raises(UserError) as error:
        te2.get(key, shape=(32, 64))
    assert (f"{path}: tensor {key!r} (stored as part 2 of 3 (rows) of "
            "'conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight') has shape (32, 32), "
            "expected (32, 64)") in str(error.value)
    assert key not in te2.consumed
    with pytest.raises(UserError, match=r"\(stored as 'conditioner\.embedders\.1\.model\.text_projection', "
                                        r"transposed\) has shape \(32, 32\), expected \(32, 16\)"):
        te2.get("text_projection.weight", shape=(32, 16))

    tensors = tiny_single_file.single_file_tensors("text_encoder_2", *components["text_encoder_2"])
    fused = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    tensors[fused] = tensors[fused][:-1]
    tiny_single_file.save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match=rf"bad\.safetensors: tensor '{fused}' has shape \(95, 32\), which cannot hold "
                                        r"text_encoder_2 tensor 'text_model\.encoder\.layers\.1\.self_attn\.q_proj\."
                                        r"weight': 95 rows do not split into 3 equal parts"):
        weights.open_component(tmp_path / "bad.safetensors", "text_encoder_2", config=components["text_encoder_2"][0])

    tensors = tiny_single_file.single_file_tensors("vae", *components["vae"])
    conv = "first_stage_model.decoder.mid.attn_1.v.weight"
    tensors[conv] = np.zeros((32, 32, 3, 3), np.float32)
    tiny_single_file.save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match=rf"tensor '{conv}' has shape \(32, 32, 3, 3\), which cannot hold vae tensor "
                                        r"'decoder\.mid_block\.attentions\.0\.to_v\.weight': expected a 1x1 convolution"):
        weights.open_component(tmp_path / "bad.safetensors", "vae", config=components["vae"][0])


def test_single_file_with_an_unknown_key_is_refused(tiny_sdxl_file, tmp_path):
    path, components = tiny_sdxl_file
    config, state = components["text_encoder"]
    tensors = tiny_single_file.single_file_tensors("text_encoder", config, state)
    stray = "conditioner.embedders.0.transformer.text_projection.weight"
    tensors[stray] = np.zeros((32, 32), np.float32)
    tiny_single_file.save_file(tensors, str(tmp_path / "stray.safetensors"))
    with pytest.raises(UserError, match=rf"stray\.safetensors: 1 text_encoder tensor name\(s\) match no rule .*{stray}"):
        weights.open_component(tmp_path / "stray.safetensors", "text_encoder", config=config)


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
        UNetConfig.parse(unet.config).check_weights(unet)
    message = str(error.value)
    assert str(unet_folder) in message and f"'{tensor}'" in message and "says" in message
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
        UNetConfig.parse(unet.config).check_weights(unet)


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
