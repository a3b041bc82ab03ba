"""Remake the embedded tiny default model, `weights/tiny-sdxl/` (a diffusers pipeline folder).

For now it holds `model_index.json` and `unet/` (config.json + fp16
diffusion_pytorch_model.safetensors): the "sdxl_like" tiny UNet of tests/tiny_models.py,
SDXL-shaped, sample_size 16 (128 px images), seeded, so every run writes the same bytes.
Uses torch and diffusers (tools-time dependencies). The new folder is built next to the old
one and swapped in only when complete.

    python tools/make_tiny_default.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the package and its test helpers, uninstalled

import tiny_models  # noqa: E402

TARGET = REPO / "weights" / "tiny-sdxl"
SEED = 0


def main() -> None:
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-sdxl-", dir=TARGET.parent))
    try:
        tiny_models.save_tiny_pipeline(staging, "sdxl_like", seed=SEED, dtype=torch.float16)
        staging.chmod(0o755)  # mkdtemp makes it private
        if TARGET.exists():
            shutil.rmtree(TARGET)
        staging.rename(TARGET)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    total = 0
    for path in sorted(p for p in TARGET.rglob("*") if p.is_file()):
        size = path.stat().st_size
        total += size
        print(f"{size:>10,d}  {path.relative_to(REPO)}")
    print(f"{total:>10,d}  bytes in total")


if __name__ == "__main__":
    main()
