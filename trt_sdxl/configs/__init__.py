"""The published diffusers/transformers configs of SDXL base 1.0 and refiner 1.0, as package data.

They are the configs a single-file checkpoint (which carries no config) is read with, and the
reference the tests build full-size key sets from. Provenance:

- `sdxl_base_1.0/unet.json` and `sdxl_base_1.0/text_encoder.json` are byte-identical to the
  files in stabilityai/stable-diffusion-xl-base-1.0 (their sha256 equals the git-lfs object ids
  a public mirror of that repository records; a test checks it).
- The other base files hold the published values as quoted in public code; every file that is
  not byte-verified says where it comes from in its `"_source"` key.
- The refiner files are reconstructions (see their `"_source"`); the refiner has no
  `text_encoder`.

Keys starting with `_` are metadata that diffusers/transformers ignore.
"""

from __future__ import annotations

from importlib import resources

from ..errors import UserError
from ..files import load_json

VARIANTS = {
    "sdxl_base_1.0": ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"),
    "sdxl_refiner_1.0": ("unet", "vae", "text_encoder_2", "scheduler"),
}


def load(variant: str, component: str) -> dict:
    """A fresh copy of the packaged config of `component` in `variant` (e.g. "sdxl_base_1.0", "unet")."""
    if variant not in VARIANTS:
        raise UserError(f"unknown SDXL variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    if component not in VARIANTS[variant]:
        raise UserError(
            f"{variant} has no {component!r} config: expected one of {', '.join(VARIANTS[variant])}"
        )
    return load_json(resources.files(__package__).joinpath(variant, f"{component}.json"))
