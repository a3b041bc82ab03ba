"""Text to image: tokenizers -> both text encoders -> the UNet loop with classifier-free guidance -> VAE.

The pipeline runs on executors (`trt_sdxl.executors`): TensorRT engines on a GPU, or netexec
on the CPU — the same code either way, which is what lets the CPU oracle test prove the loop
against diffusers' StableDiffusionXLPipeline. The loop itself is trt_sdxl.denoising (the
kernels' numpy twins driven by the per-step plan the GPU loop runs too).

`ModelSettings` is what the pipeline reads from a model folder besides weights (scheduler
config, VAE scaling factor, empty-prompt rule).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import kernels
from .components import DEFAULT_SCALING_FACTOR
from .denoising import Conditioning, denoise, run_batched, time_ids
from .errors import UserError
from .files import load_json

# The VAE image to uint8 RGB [B, H, W, 3], rounding as diffusers' numpy_to_pil does.
to_uint8_rgb = kernels.image_to_rgb8


@dataclass
class ModelSettings:
    """What the pipeline reads from a diffusers folder besides weights (defaults: SDXL base's)."""

    scheduler_config: dict | None
    scaling_factor: float
    force_zeros_for_empty_prompt: bool

    @classmethod
    def read(cls, folder: Path) -> ModelSettings:
        folder = Path(folder)
        scheduler = load_json(folder / "scheduler" / "scheduler_config.json", missing={}) or None
        vae = load_json(folder / "vae" / "config.json", missing={})
        index = load_json(folder / "model_index.json", missing={})
        return cls(scheduler, float(vae.get("scaling_factor", DEFAULT_SCALING_FACTOR)),
                   bool(index.get("force_zeros_for_empty_prompt", True)))


# ---------------------------------------------------------------- the pipeline


class Pipeline:
    """SDXL base text-to-image over four executors and two tokenizers."""

    def __init__(self, text_encoder, text_encoder_2, unet, vae, tokenizer, tokenizer_2, *,
                 scaling_factor: float = DEFAULT_SCALING_FACTOR, force_zeros_for_empty_prompt: bool = True):
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.unet = unet
        self.vae = vae
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scaling_factor = scaling_factor
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    # ------------------------------------------------------------ text

    def _encode(self, prompts: list[str], on_truncate=None) -> tuple[np.ndarray, np.ndarray]:
        ids1 = self.tokenizer.encode(prompts, on_truncate)
        ids2 = self.tokenizer_2.encode(prompts, on_truncate)
        h1 = run_batched(self.text_encoder, {"input_ids": ids1})["hidden_states"]
        out2 = run_batched(self.text_encoder_2, {"input_ids": ids2})
        context = np.concatenate([h1.astype(np.float32), out2["hidden_states"].astype(np.float32)], axis=-1)
        return context, out2["text_embeds"].astype(np.float32)

    def _encode_chunked(self, texts: list[str], long_prompts: bool, weighting: bool, max_chunks: int | None,
                        on_truncate) -> tuple[np.ndarray, np.ndarray]:
        """Context [n, 77 k, C] and pooled [n, P] of `texts`, each in k chunks of 77 positions (trt_sdxl.weighting:
        every text padded with empty-prompt chunks to the most any of them needs), A1111's weights applied to
        each encoder's hidden states; the pooled embedding is encoder 2's for the first chunk."""
        from . import weighting as W

        per_encoder = []
        for tokenizer in (self.tokenizer, self.tokenizer_2):
            per_encoder.append([W.chunks(tokenizer, t, weighted=weighting, long=long_prompts, max_chunks=max_chunks)
                                for t in texts])
        dropped = [(row, c.dropped) for row, c in enumerate(per_encoder[0]) if c.dropped]
        if dropped:
            message = ("prompts longer than 75 tokens were truncated; tokens dropped: "
                       + ", ".join(f"prompt {row}: {n}" for row, n in dropped)
                       + " (generate --long-prompts encodes them in 75-token chunks)")
            if on_truncate is None:
                warnings.warn(message, stacklevel=3)
            else:
                on_truncate(message)
        k = max(len(c.ids) for found in per_encoder for c in found)
        hidden, pooled = [], None
        for (tokenizer, executor, found) in zip((self.tokenizer, self.tokenizer_2),
                                                 (self.text_encoder, self.text_encoder_2), per_encoder):
            padded = [W.pad_chunks(c, k, tokenizer) for c in found]
            ids = np.concatenate([c.ids for c in padded])  # [n k, 77]
            out = run_batched(executor, {"input_ids": ids})
            h = out["hidden_states"].astype(np.float32)
            h = h.reshape(len(texts), k * h.shape[1], h.shape[2])  # chunks joined along the token axis
            hidden.append(W.apply_weights(h, np.stack([c.weights.reshape(-1) for c in padded])))
            if "text_embeds" in out:
                pooled = out["text_embeds"].astype(np.float32).reshape(len(texts), k, -1)[:, 0]
        return np.concatenate(hidden, axis=-1), pooled

    def encode_prompt(self, prompts: list[str], negatives: list[str] | None, height: int,
                      width: int, log=None, long_prompts: bool = False, weighting: bool = False,
                      max_chunks: int | None = None) -> Conditioning:
        """Conditioning for CFG. `negatives=None` means no negative prompt: with SDXL's
        `force_zeros_for_empty_prompt` the uncond embeddings are zeros (as diffusers does).
        With `log`, a truncated prompt is one line through it, once per call (else a warning).
        `long_prompts`: prompts beyond 75 tokens in 75-token chunks, prompt and negative padded to one
        count (at most `max_chunks`, what the engines take); `weighting`: A1111's syntax
        (trt_sdxl.weighting). Neither: exactly diffusers' encoding, truncated at 75 tokens."""
        b = len(prompts)
        heard: list[str] = []
        on_truncate = None if log is None else heard.append
        zeros = negatives is None and self.force_zeros_for_empty_prompt
        negatives = None if zeros else (negatives if negatives is not None else [""] * b)
        if negatives is not None and len(negatives) != b:
            raise UserError(f"{len(negatives)} negative prompts for {b} prompts: expected one per prompt")
        if long_prompts or weighting:
            both, both_pooled = self._encode_chunked(prompts + (negatives or []), long_prompts, weighting, max_chunks,
                                                     on_truncate)
            context, pooled = both[:b], both_pooled[:b]
            neg_context, neg_pooled = (both[b:], both_pooled[b:]) if negatives is not None else \
                (np.zeros_like(context), np.zeros_like(pooled))
        else:
            context, pooled = self._encode(prompts, on_truncate)
            if negatives is None:
                neg_context, neg_pooled = np.zeros_like(context), np.zeros_like(pooled)
            else:
                neg_context, neg_pooled = self._encode(negatives, on_truncate)
        if heard:
            log(f"warning: {heard[0]}")
        return Conditioning(
            context=np.concatenate([neg_context, context]),
            text_embeds=np.concatenate([neg_pooled, pooled]),
            time_ids=time_ids(height, width, 2 * b),
        )

    # ------------------------------------------------------------ denoising

    def denoise(self, cond: Conditioning, latents: np.ndarray, scheduler, cfg: float,
                noise: Callable[[int], np.ndarray] | None = None,
                on_step: Callable[[int, float, dict], None] | None = None) -> np.ndarray:
        """The scheduler loop on this pipeline's UNet executor (trt_sdxl.denoising.denoise)."""
        return denoise(self.unet, cond, latents, scheduler, cfg, noise=noise, on_step=on_step)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> image [B, 3, H, W] in [-1, 1] (the VAE network takes latents / scaling_factor)."""
        latent = kernels.scale_cast(latents, 1.0 / self.scaling_factor, self.vae.inputs["latent"][1])
        return run_batched(self.vae, {"latent": latent})["image"].astype(np.float32)
