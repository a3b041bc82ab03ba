"""Fixtures several test files share: the tiny default's LoRA and the folders built with it or for it.

Session-scoped and read-only: a test that changes a folder works on its own copy (`shutil.copytree`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_loras import tiny_default_lora

from trt_sdxl import build
from trt_sdxl.components import DEFAULT_MODEL

STYLE_SCALE = 0.8


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory) -> Path:
    """A LoRA folder (`--lora-dir`) holding `style.safetensors` (the tiny default's LoRA, kohya format)."""
    folder = tmp_path_factory.mktemp("loras")
    tiny_default_lora(folder / "style.safetensors", metadata={"ss_output_name": "house_style"})
    return folder


@pytest.fixture(scope="session")
def refittable_folder(tmp_path_factory) -> Path:
    """`build --refittable --no-engines` of the tiny default: FP16 networks a refit can change, for the CPU."""
    out = tmp_path_factory.mktemp("refittable") / "engines"
    build.build(DEFAULT_MODEL, out, engines=False, refittable=True)
    return out


@pytest.fixture(scope="session")
def style_folder(tmp_path_factory, lora_dir) -> Path:
    """`build --lora style.safetensors:0.8 --no-engines`: what a refit with that LoRA must equal."""
    out = tmp_path_factory.mktemp("style") / "engines"
    build.build(DEFAULT_MODEL, out, engines=False, loras=[f"{lora_dir / 'style.safetensors'}:{STYLE_SCALE}"])
    return out
