"""Tiny SDXL text encoders, and SGM single-file checkpoints of tiny components, for tests.

Test-only: imports torch, transformers and diffusers. The tiny encoders keep SDXL's
architectures (CLIP ViT-L with quick_gelu; OpenCLIP bigG with gelu and a projection) at hidden
size 32, 3 layers, 2 heads, intermediate size 64 and a 1000-token vocabulary: their hidden
sizes add up to the tiny UNets' cross_attention_dim, and the projection is their pooled width.
Weights are re-drawn as in `tiny_models.randomize`. Single files are written with our own
inverse key map (`keymap.to_single_file_state`) plus the tensors real SDXL files carry that
no model reads (CLIP's `position_ids`, OpenCLIP's `logit_scale`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tiny_models  # first: it sets HF_HUB_OFFLINE before diffusers is imported
import tiny_vae
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trt_sdxl import keymap

_TINY_CLIP = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=1000,
    max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
TINY_TEXT_ENCODER_CONFIGS = {
    "text_encoder": dict(_TINY_CLIP, hidden_act="quick_gelu", projection_dim=tiny_models.TINY_POOLED_DIM),
    "text_encoder_2": dict(_TINY_CLIP, hidden_act="gelu", projection_dim=tiny_models.TINY_POOLED_DIM),
}
TEXT_ENCODER_CLASSES = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}

# Tensors real SDXL single files hold that no model reads, by name under the component's prefix.
UNUSED_TENSORS = {
    "text_encoder": {"text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None]},
    "text_encoder_2": {"logit_scale": np.array(np.log(1 / 0.07), dtype=np.float32)},
}

# Where the refiner keeps its only text encoder.
REFINER_PREFIXES = {"text_encoder_2": "conditioner.embedders.0.model."}


def tiny_text_encoder(component: str, seed: int = 0):
    """Tiny `component` ("text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection),
    float32, seeded random weights."""
    config = CLIPTextConfig(**TINY_TEXT_ENCODER_CONFIGS[component])
    return tiny_models.randomize(TEXT_ENCODER_CLASSES[component](config), seed).eval()


def numpy_state(model) -> dict[str, np.ndarray]:
    """The model's state dict (persistent tensors) as numpy arrays, under the names trt_sdxl reads:
    transformers >= 5 names CLIPTextModel's tensors without the `text_model.` that its 4.x
    versions, the published SDXL text_encoder and single files put first."""
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if isinstance(model, CLIPTextModel) and not any(k.startswith("text_model.") for k in state):
        state = {"text_model." + k: v for k, v in state.items()}
    return state


def tiny_sdxl(refiner: bool = False, seed: int = 0) -> dict[str, tuple[dict, dict[str, np.ndarray]]]:
    """component -> (config, diffusers state) of a tiny SDXL base, or refiner (which has no text_encoder)."""
    components = {
        "unet": (tiny_models.TINY_UNET_CONFIGS["refiner_like" if refiner else "sdxl_like"],
                 numpy_state(tiny_models.tiny_unet("refiner_like" if refiner else "sdxl_like", seed))),
        "vae": (tiny_vae.TINY_VAE_CONFIG, numpy_state(tiny_vae.tiny_vae(seed + 1))),
        "text_encoder_2": (TINY_TEXT_ENCODER_CONFIGS["text_encoder_2"],
                           numpy_state(tiny_text_encoder("text_encoder_2", seed + 3))),
    }
    if not refiner:
        components["text_encoder"] = (TINY_TEXT_ENCODER_CONFIGS["text_encoder"],
                                      numpy_state(tiny_text_encoder("text_encoder", seed + 2)))
    return components


def single_file_tensors(component: str, config: dict, state: dict, prefix: str | None = None,
                        unused: bool = True) -> dict[str, np.ndarray]:
    """The `component`'s tensors as a single file holds them, under `prefix` (default: SDXL base's);
    with `unused`, also the tensors of UNUSED_TENSORS."""
    prefix = keymap.SINGLE_FILE_PREFIXES[component] if prefix is None else prefix
    tensors = keymap.to_single_file_state(component, config, state, prefix=prefix)
    if unused:
        tensors.update({prefix + k: v for k, v in UNUSED_TENSORS.get(component, {}).items()})
    return tensors


def write_single_file(path, components: dict, refiner: bool = False, unused: bool = True,
                      dtype=None) -> Path:
    """Write `components` (as `tiny_sdxl` returns them) as one SGM single file at `path`, float
    tensors converted to `dtype` if given; the refiner layout puts text_encoder_2 at embedders.0."""
    tensors = {}
    for component, (config, state) in components.items():
        prefix = REFINER_PREFIXES.get(component) if refiner else None
        tensors.update(single_file_tensors(component, config, state, prefix, unused))
    if dtype is not None:
        tensors = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in tensors.items()}
    save_file(tensors, str(path))
    return Path(path)
