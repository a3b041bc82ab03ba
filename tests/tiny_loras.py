"""LoRA files on the embedded tiny default, written with safetensors (numpy only: no torch needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trt_sdxl.components import DEFAULT_MODEL

TARGETS = [("unet", "lora_unet_", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
           ("unet", "lora_unet_", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"),
           ("text_encoder", "lora_te1_", "text_model.encoder.layers.0.self_attn.q_proj"),
           ("text_encoder_2", "lora_te2_", "text_model.encoder.layers.0.self_attn.q_proj")]


def tiny_default_lora(path: Path, seed: int = 3, components=("unet", "text_encoder", "text_encoder_2"),
                      metadata: dict | None = None) -> Path:
    """A kohya-format LoRA on the tiny default: the first transformer's attn1 to_q/to_v in the UNet (diffusers
    module paths with `_`) and the first layer's q_proj of each text encoder (those of `components`), rank 4,
    alpha 4; `metadata`: the file's __metadata__ (e.g. kohya's ss_output_name)."""
    from safetensors.numpy import save_file

    from trt_sdxl import weights

    rng = np.random.default_rng(seed)
    tensors = {}
    for component, prefix, module in TARGETS:
        if component not in components:
            continue
        out_f, in_f = weights.open_component(DEFAULT_MODEL, component).shape(f"{module}.weight")
        name = prefix + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = rng.standard_normal((4, in_f)).astype(np.float16)
        tensors[f"{name}.lora_up.weight"] = (0.5 * rng.standard_normal((out_f, 4))).astype(np.float16)
        tensors[f"{name}.alpha"] = np.array(4.0, np.float16)
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)
