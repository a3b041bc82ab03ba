"""A tiny SDXL-shaped AutoencoderKL for tests, saved by diffusers itself so the key layout is the real one.

Test-only: imports torch and diffusers. SDXL's VAE has four blocks (128, 256, 512, 512), two
layers per block, 4 latent channels and 32 groups; the tiny one keeps the block count, the
last two blocks' equal width, the layers per block and the latent channels, at 1/16 the width.
Parameters are re-drawn as in `tiny_models.randomize`, so no norm is the identity and no bias zero.
"""

from __future__ import annotations

from pathlib import Path

import tiny_models  # sets HF_HUB_OFFLINE before diffusers loads
import torch
from diffusers import AutoencoderKL

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 32),  # SDXL's 1:2:4:4
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.13025,
    force_upcast=True,  # as SDXL's original VAE config; the fp16-fix VAE's config sets it False
)


def tiny_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    """The tiny VAE in float32 with seeded random weights; `overrides` change config entries."""
    return tiny_models.randomize(AutoencoderKL(**{**TINY_VAE_CONFIG, **overrides}), seed).eval()


def save_tiny_vae(folder, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Save the tiny VAE with diffusers' `save_pretrained` into `folder` (weights in `dtype`); returns `folder`."""
    folder = Path(folder)
    tiny_vae(seed, **overrides).to(dtype).save_pretrained(folder)
    return folder
