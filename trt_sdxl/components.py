"""The components of an SDXL pipeline and the facts about them that several floors share.

One list, in the order the pipeline runs them (text encoders, UNet, VAE); the text encoders'
numbers (1 = CLIP ViT-L, 2 = OpenCLIP bigG) and tokenizer folders; the embedded default
model; SDXL's VAE scaling factor where a model folder does not say.
"""

from __future__ import annotations

from pathlib import Path

COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")
ENCODERS = {"text_encoder": 1, "text_encoder_2": 2}
# What a LoRA changes (trt_sdxl.lora), and so which engines a refittable build makes refittable.
LORA_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")
TOKENIZER_FOLDERS = {1: "tokenizer", 2: "tokenizer_2"}

# The embedded tiny default model: a complete diffusers SDXL pipeline folder.
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "tiny-sdxl"

# SDXL's VAE config (latents are multiplied by it after encoding, divided before decoding).
DEFAULT_SCALING_FACTOR = 0.13025
