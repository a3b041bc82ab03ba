"""Remake the embedded tiny default model, `weights/tiny-sdxl/`: a complete tiny SDXL pipeline folder.

Every component is saved by diffusers or transformers, so the layout is the real one and
`diffusers.StableDiffusionXLPipeline.from_pretrained("weights/tiny-sdxl")` loads it:

- `unet/`: the "sdxl_like" tiny UNet of tests/tiny_models.py in fp16, sample_size 16 (latent
  16x16, 128 px images), cross-attention width 64, pooled text width 32;
- `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`: tests/tiny_clip.py's encoders
  (hidden width 32 each, so their penultimate states concatenate to the UNet's 64; projection 32)
  and BPE tokenizers in the published SDXL file layout (`tokenizer_2` pads with "!");
- `vae/`: tests/tiny_vae.py's AutoencoderKL, four blocks like SDXL's, so it upsamples by
  2^(4-1) = 8 (latent 16x16 -> image 128x128); fp32, force_upcast as SDXL's config; its
  sample_size is the image size, as SDXL's (1024) is;
- `scheduler/scheduler_config.json`: SDXL base's published EulerDiscreteScheduler config;
- `model_index.json`: what diffusers' save_pretrained writes for StableDiffusionXLPipeline.

Seeded, so every run with the same torch/diffusers/transformers versions writes the same bytes.
The new folder is built next to the old one and swapped in only when complete. Uses torch,
diffusers and transformers (tools-time dependencies).

    python tools/make_tiny_default.py [--out FOLDER]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the package and its test helpers, uninstalled

import tiny_models  # noqa: E402  (sets HF_HUB_OFFLINE before diffusers loads)
import diffusers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import tiny_clip  # noqa: E402
import tiny_vae  # noqa: E402
from trt_sdxl import configs  # noqa: E402

TARGET = REPO / "weights" / "tiny-sdxl"
UNET_SEED = 0  # the UNet the existing figures and tests were made with
TEXT_SEED = 1  # text_encoder; text_encoder_2 gets TEXT_SEED + 1
VAE_SEED = 3
IMAGE_SIDE = tiny_models.TINY_UNET_CONFIGS["sdxl_like"]["sample_size"] * 8  # 128 px


def scheduler_config() -> dict:
    """SDXL base's EulerDiscreteScheduler config as published (the packaged copy without its `_` notes)."""
    config = {k: v for k, v in configs.load("sdxl_base_1.0", "scheduler").items() if not k.startswith("_")}
    return {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": diffusers.__version__, **config}


def model_index() -> dict:
    """The model_index.json diffusers writes for a StableDiffusionXLPipeline (SDXL base's entries)."""
    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make(folder: Path) -> Path:
    """Write the tiny pipeline into `folder` (created; expected empty); returns `folder`."""
    folder = Path(folder)
    tiny_models.save_tiny_unet(folder / "unet", "sdxl_like", seed=UNET_SEED, dtype=torch.float16)
    tiny_clip.save_tiny_text_components(folder, seed=TEXT_SEED)
    tiny_vae.save_tiny_vae(folder / "vae", seed=VAE_SEED, dtype=torch.float32, sample_size=IMAGE_SIDE)
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config())
    write_json(folder / "model_index.json", model_index())  # replaces the partial one tiny_clip merged into
    for path in folder.rglob("*"):  # safetensors writes private files; the folder is meant to be shared
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=TARGET, help="folder to (re)make (default: weights/tiny-sdxl)")
    target = p.parse_args(argv).out.resolve()
    transformers.utils.logging.disable_progress_bar()  # one line per file below is the report
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        make(staging)
        staging.chmod(0o755)  # mkdtemp makes it private
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    total = 0
    for path in sorted(p for p in target.rglob("*") if p.is_file()):
        size = path.stat().st_size
        total += size
        print(f"{size:>10,d}  {path.relative_to(target.parent)}")
    print(f"{total:>10,d}  bytes in total")


if __name__ == "__main__":
    main()
