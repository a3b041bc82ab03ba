"""Text to image: tokenizers -> both text encoders -> the UNet loop with classifier-free guidance -> VAE.

The pipeline runs on executors (`trt_sdxl.executors`): TensorRT engines on a GPU, or netexec
on the CPU — the same code either way, which is what lets the CPU oracle test prove the loop
against diffusers' StableDiffusionXLPipeline. Host-side math (guidance, scheduler steps) is
numpy here; the GPU runtime does the same steps with the kernels in `kernels/`, whose numpy
twins are tested against these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import UserError


@dataclass
class Conditioning:
    """What the UNet is conditioned on, for the uncond half then the cond half (CFG batch 2B)."""

    context: np.ndarray  # [2B, 77, C1 + C2]  encoder_hidden_states
    text_embeds: np.ndarray  # [2B, P]  pooled, projected text embedding of encoder 2
    time_ids: np.ndarray  # [2B, 6]  original size, crop top-left, target size (pixels)


def time_ids(height: int, width: int, batch: int) -> np.ndarray:
    """SDXL's micro-conditioning: (original h, w), crop (top, left) = (0, 0), target (h, w)."""
    return np.tile(np.array([height, width, 0, 0, height, width], np.float32), (batch, 1))


def guidance(eps: np.ndarray, scale: float) -> np.ndarray:
    """Classifier-free guidance on a [2B, ...] UNet output: uncond + scale * (cond - uncond)."""
    uncond, cond = np.split(eps.astype(np.float32), 2)
    return uncond + np.float32(scale) * (cond - uncond)


class Pipeline:
    """SDXL base text-to-image over four executors and two tokenizers."""

    def __init__(self, text_encoder, text_encoder_2, unet, vae, tokenizer, tokenizer_2, *,
                 scaling_factor: float = 0.13025, force_zeros_for_empty_prompt: bool = True):
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.unet = unet
        self.vae = vae
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scaling_factor = scaling_factor
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    # ------------------------------------------------------------ text

    def _encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids1 = self.tokenizer.encode(prompts)
        ids2 = self.tokenizer_2.encode(prompts)
        h1 = self.text_encoder.run({"input_ids": ids1})["hidden_states"]
        out2 = self.text_encoder_2.run({"input_ids": ids2})
        context = np.concatenate([h1.astype(np.float32), out2["hidden_states"].astype(np.float32)], axis=-1)
        return context, out2["text_embeds"].astype(np.float32)

    def encode_prompt(self, prompts: list[str], negatives: list[str] | None, height: int,
                      width: int) -> Conditioning:
        """Conditioning for CFG. `negatives=None` means no negative prompt: with SDXL's
        `force_zeros_for_empty_prompt` the uncond embeddings are zeros (as diffusers does)."""
        b = len(prompts)
        context, pooled = self._encode(prompts)
        if negatives is None and self.force_zeros_for_empty_prompt:
            neg_context, neg_pooled = np.zeros_like(context), np.zeros_like(pooled)
        else:
            negatives = negatives if negatives is not None else [""] * b
            if len(negatives) != b:
                raise UserError(f"{len(negatives)} negative prompts for {b} prompts: expected one per prompt")
            neg_context, neg_pooled = self._encode(negatives)
        return Conditioning(
            context=np.concatenate([neg_context, context]),
            text_embeds=np.concatenate([neg_pooled, pooled]),
            time_ids=time_ids(height, width, 2 * b),
        )

    # ------------------------------------------------------------ denoising

    def denoise(self, cond: Conditioning, latents: np.ndarray, scheduler, cfg: float,
                noise: Callable[[int], np.ndarray] | None = None,
                on_step: Callable[[int, float, dict], None] | None = None) -> np.ndarray:
        """The scheduler loop. `latents` are the initial latents (already times init_noise_sigma);
        `noise(step)` gives the standard normal draw a stochastic scheduler needs at that step;
        `on_step(step, timestep, unet_outputs)` sees every UNet call (calibration listens here)."""
        latents = latents.astype(np.float32)
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.scale_model_input(np.concatenate([latents, latents]), i)  # [2B, 4, h, w]
            outputs = self.unet.run({
                "sample": x,
                "timestep": np.full((x.shape[0],), t, np.float32),
                "encoder_hidden_states": cond.context,
                "text_embeds": cond.text_embeds,
                "time_ids": cond.time_ids,
            })
            if on_step is not None:
                on_step(i, float(t), outputs)
            eps = guidance(outputs["noise_pred"], cfg)
            latents = scheduler.step(eps, i, latents, noise=None if noise is None else noise(i)).astype(np.float32)
        return latents

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> image [B, 3, H, W] in [-1, 1] (the VAE network takes latents / scaling_factor)."""
        return self.vae.run({"latent": latents / np.float32(self.scaling_factor)})["image"].astype(np.float32)


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], rounding as diffusers' numpy_to_pil does."""
    x = np.clip(image.astype(np.float32) / 2 + 0.5, 0, 1)
    return np.round(x.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
