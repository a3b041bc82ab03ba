"""Tiny SDXL-shaped checkpoints for tests, saved by diffusers itself so the key layout is the real one.

Test-only: imports torch and diffusers. Every parameter is re-drawn from a seeded generator
(weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.2^2), biases ~ N(0, 0.1^2)), so no norm
is the identity and no bias is zero, while activations stay O(1) through the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is offline; set before huggingface_hub is imported

import diffusers
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from trt_sdxl import keymap

# diffusers advises from_pretrained(torch_dtype=...) on every model.to(dtype); these models are built, not loaded.
diffusers.utils.logging.set_verbosity_error()

# Text widths the tiny text encoders will have: two encoders of hidden size 32 concatenated
# (cross_attention_dim 64) and a pooled/projected width of 32.
TINY_POOLED_DIM = 32
TINY_TIME_EMBED_DIM = 8  # addition_time_embed_dim; 6 time ids each embedded to this width

_SDXL_COMMON = dict(
    in_channels=4,
    out_channels=4,
    addition_embed_type="text_time",
    addition_time_embed_dim=TINY_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=TINY_TIME_EMBED_DIM * 6 + TINY_POOLED_DIM,
    use_linear_projection=True,
    cross_attention_dim=64,
    norm_num_groups=8,
    sample_size=16,  # 128 px images
)

# In SDXL configs `attention_head_dim` holds the number of heads (head size is 64); here the
# head counts are chosen so that heads != head size, which catches a swap of the two.
TINY_UNET_CONFIGS = {
    "sdxl_like": dict(
        _SDXL_COMMON,
        block_out_channels=(16, 32, 64),  # SDXL's 1:2:4
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, 1, 2],
        attention_head_dim=[1, 2, 4],  # heads; head size 16
    ),
    "deep": dict(
        _SDXL_COMMON,
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, 2, 3],
        attention_head_dim=[1, 2, 3],
    ),
    "refiner_like": dict(
        _SDXL_COMMON,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2,
        attention_head_dim=[2, 4, 4, 4],
        # the refiner embeds 5 time ids (with the aesthetic score) instead of 6, and attends to
        # text_encoder_2's hidden states alone, whose width is the pooled width
        projection_class_embeddings_input_dim=TINY_TIME_EMBED_DIM * 5 + TINY_POOLED_DIM,
        cross_attention_dim=TINY_POOLED_DIM,
    ),
}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every parameter of `model` from a generator seeded with `seed` (see module docstring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2:
                value = noise / (p[0].numel() ** 0.5)  # fan_in = product of all but the output axis
            elif "norm" in name and name.endswith("weight"):
                value = 1 + 0.2 * noise
            else:
                value = 0.1 * noise
            p.copy_(value)
    return model


def tiny_unet(name: str, seed: int = 0) -> UNet2DConditionModel:
    """The tiny UNet `name` (a key of TINY_UNET_CONFIGS), in float32, with seeded random weights."""
    return randomize(UNet2DConditionModel(**TINY_UNET_CONFIGS[name]), seed).eval()


def save_tiny_unet(folder, name: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                   variant: str | None = None, max_shard_size: str = "10GB") -> Path:
    """Save the tiny UNet `name` with diffusers' `save_pretrained` into `folder`; returns `folder`."""
    folder = Path(folder)
    tiny_unet(name, seed).to(dtype).save_pretrained(folder, variant=variant, max_shard_size=max_shard_size)
    return folder


def save_tiny_pipeline(folder, name: str = "sdxl_like", seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A diffusers pipeline-shaped folder: `model_index.json` and `unet/` (the only component so far)."""
    folder = Path(folder)
    save_tiny_unet(folder / "unet", name, seed, dtype)
    model_index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
    return folder


def make_single_file(diffusers_unet_folder, out_file, dtype: torch.dtype | None = None) -> Path:
    """Write the UNet in `diffusers_unet_folder` as an SGM single-file checkpoint (`model.diffusion_model.*`).

    Names come from our `keymap.diffusers_to_sgm`; `dtype` converts the tensors (kept as stored if None).
    """
    folder = Path(diffusers_unet_folder)
    config = json.loads((folder / "config.json").read_text())
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    names = keymap.diffusers_to_sgm("unet", config, state)
    sgm_state = {names[k]: (v if dtype is None else v.to(dtype)).contiguous() for k, v in state.items()}
    save_file(sgm_state, str(out_file))
    return Path(out_file)


def save_outlier_unet(folder, seed: int = 3, outlier_seed: int = 5) -> Path:
    """The tiny `sdxl_like` UNet with the activation outliers SmoothQuant exists for.

    In every transformer, two random channels of each norm that feeds a quantized linear layer
    (norm1 -> attn1 q/k/v, norm2 -> attn2 q, norm3 -> ff in, the GroupNorm -> proj_in) get their
    gain and bias multiplied by 30-100, and the consuming layers' weight columns for those
    channels divided by the same factor: the function is unchanged in exact arithmetic, but the
    layers' inputs now have a few channels 30-100x larger than the rest — as trained SDXL has.
    """
    model = tiny_unet("sdxl_like", seed)
    g = torch.Generator().manual_seed(outlier_seed)
    modules = dict(model.named_modules())
    consumers = {"norm1": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "norm2": ("attn2.to_q",),
                 "norm3": ("ff.net.0.proj",)}
    with torch.no_grad():
        for name, norm in modules.items():
            parent, _, leaf = name.rpartition(".")
            if ".transformer_blocks." in name and leaf in consumers:
                layers = [modules[f"{parent}.{c}"] for c in consumers[leaf]]
            elif leaf == "norm" and f"{parent}.proj_in" in modules:
                layers = [modules[f"{parent}.proj_in"]]
            else:
                continue
            channels = torch.randperm(norm.weight.numel(), generator=g)[:2]
            factor = 30 + 70 * torch.rand(2, generator=g)
            norm.weight[channels] *= factor
            norm.bias[channels] *= factor
            for layer in layers:
                layer.weight[:, channels] /= factor
    folder = Path(folder)
    model.save_pretrained(folder)
    return folder
