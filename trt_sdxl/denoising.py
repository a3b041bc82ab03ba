"""The denoising loop on the CPU, and what it shares with the GPU loop: the conditioning, the
per-step plan the kernels execute, and the seeded noise.

`denoise` runs the scheduler loop with the kernels' numpy twins (`trt_sdxl.kernels`: scale_cast,
cfg_combine, scheduler_step, gaussian_noise) over any executor (`run(feeds) -> outputs`);
`denoising_steps` is the per-step plan, the same one the GPU loop (`trt_sdxl.runtime.denoiser`)
hands to the kernels themselves.

Noise: Philox4x32 keyed by the seed; image i of a batch uses seed + i; stream 0 gives its initial
latents, stream k + 1 the noise of denoising step k (`seeded_latents`, `seeded_step_noise`), so a
seed gives the same image on the CPU and on any GPU (up to the kernels' few-ulp Box-Muller
rounding), alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import kernels
from .errors import UserError
from .kernels import StepCoefficients


@dataclass
class Conditioning:
    """What the UNet is conditioned on, for the uncond half then the cond half (CFG batch 2B)."""

    context: np.ndarray  # [2B, 77, C1 + C2]  encoder_hidden_states
    text_embeds: np.ndarray  # [2B, P]  pooled, projected text embedding of encoder 2
    time_ids: np.ndarray  # [2B, 6]  original size, crop top-left, target size (pixels)


def time_ids(height: int, width: int, batch: int) -> np.ndarray:
    """SDXL's micro-conditioning: (original h, w), crop (top, left) = (0, 0), target (h, w)."""
    return np.tile(np.array([height, width, 0, 0, height, width], np.float32), (batch, 1))


# ---------------------------------------------------------------- the per-step plan


@dataclass(frozen=True)
class DenoisingStep:
    """One step as the kernels see it: the UNet gets `scale_cast(x, input_scale)` (both CFG halves)
    and `timestep`; then `x, prev <- scheduler_step(x, eps, coefficients, prev, noise)`."""

    index: int
    timestep: float
    input_scale: float  # the scheduler's scale_model_input as a factor
    coefficients: StepCoefficients

    @property
    def adds_noise(self) -> bool:
        return self.coefficients.d != 0.0


def denoising_steps(scheduler) -> list[DenoisingStep]:
    """The plan of a `trt_sdxl.schedulers` scheduler: per step, the UNet's timestep and input scale
    and the coefficients of the linear update (formulas in kernels.StepCoefficients). A setting the
    linear update cannot express is a UserError naming it."""
    s = scheduler.settings
    name, count = scheduler.name, scheduler.num_inference_steps
    if s["prediction_type"] != "epsilon":
        raise UserError(f"scheduler config: prediction_type={s['prediction_type']!r}: the denoising step kernel "
                        "implements epsilon prediction (SDXL's) only")
    if name == "ddim" and (scheduler.eta != 0 or s["clip_sample"]):
        raise UserError("scheduler config: ddim with eta > 0 or clip_sample=true is not supported by the step kernel "
                        "(SDXL's config has clip_sample false)")
    if name == "dpmpp_2m_karras" and s["solver_type"] != "midpoint":
        raise UserError(f"scheduler config: solver_type={s['solver_type']!r}: dpmpp_2m_karras supports 'midpoint'")
    steps = []
    for i, t in enumerate(scheduler.timesteps):
        scale = 1.0
        if name in ("euler", "euler_a"):
            sigma, sigma_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
            scale = kernels.euler_input_scale(sigma)
            make = StepCoefficients.euler if name == "euler" else StepCoefficients.euler_ancestral
            coefficients = make(sigma, sigma_next)
        elif name == "dpmpp_2m_karras":
            sigma, sigma_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
            last = i == count - 1
            # as DPMSolverPP2MKarras.step: first order without history, at a lower-order final
            # step, and where sigma does not move (h = 0)
            first_order = i == 0 or sigma_next == sigma or last and (
                s["euler_at_final"] or (s["lower_order_final"] and count < 15) or s["final_sigmas_type"] == "zero")
            coefficients = StepCoefficients.dpmpp_2m(sigma, sigma_next,
                                                     None if first_order else float(scheduler.sigmas[i - 1]))
        elif name == "ddim":
            prev_t = int(t) - s["num_train_timesteps"] // count
            alpha_prev = float(scheduler.alphas_cumprod[prev_t]) if prev_t >= 0 else scheduler.final_alpha_cumprod
            coefficients = StepCoefficients.ddim(float(scheduler.alphas_cumprod[int(t)]), alpha_prev)
        else:
            raise UserError(f"scheduler {name!r} has no denoising step plan")
        steps.append(DenoisingStep(i, float(t), scale, coefficients))
    return steps


def seeded_latents(seed: int, shape: tuple[int, ...], init_noise_sigma: float) -> np.ndarray:
    """The initial latents [B, C, h, w]: image i is Philox stream 0 of seed + i (as A1111 seeds a
    batch, so any image can be made again alone), times the scheduler's init_noise_sigma."""
    return np.concatenate([kernels.gaussian_noise(seed + i, 0, (1, *shape[1:]), scale=init_noise_sigma)
                           for i in range(shape[0])])


def seeded_step_noise(seed: int, shape: tuple[int, ...]) -> Callable[[int], np.ndarray]:
    """The standard normal draw of denoising step k: for image i, Philox stream k + 1 of seed + i."""
    return lambda step: np.concatenate([kernels.gaussian_noise(seed + i, step + 1, (1, *shape[1:]))
                                        for i in range(shape[0])])


def run_batched(executor, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`executor.run` on feeds with more (or fewer) rows than the batch the executor takes: in
    slices of its batch, the last one padded with copies of its final row; outputs cut and joined.
    A dynamic batch (-1) takes every row in one run, up to the executor's `max_batch` if it has one."""
    rows = len(next(iter(feeds.values())))
    size = executor.inputs[next(iter(feeds))][0][0]
    if size < 0:
        size = min(rows, getattr(executor, "max_batch", None) or rows)
    if rows == size:
        return executor.run(feeds)
    parts = []
    for start in range(0, rows, size):
        chunk = {k: v[start:start + size] for k, v in feeds.items()}
        used = len(next(iter(chunk.values())))
        chunk = {k: np.concatenate([v, np.repeat(v[-1:], size - used, axis=0)]) for k, v in chunk.items()}
        out = executor.run(chunk)
        for k, v in out.items():
            if len(v) != size:
                raise ValueError(f"output {k!r} is not batched ({v.shape}): run the network at batch {rows}")
        parts.append({k: v[:used] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def denoise(unet, cond: Conditioning, latents: np.ndarray, scheduler, cfg: float,
            noise: Callable[[int], np.ndarray] | None = None,
            on_step: Callable[[int, float, dict], None] | None = None) -> np.ndarray:
    """The scheduler loop over the executor `unet`. `latents` are the initial latents (already times
    init_noise_sigma); `noise(step)` gives the standard normal draw a stochastic scheduler needs at
    that step; `on_step(step, timestep, unet_outputs)` sees every UNet call (calibration listens
    here; raising from it stops the loop)."""
    x = np.asarray(latents, np.float32)
    prev = np.zeros_like(x)  # the previous denoised estimate (DPM++ 2M)
    sample_dtype = unet.inputs["sample"][1]
    for step in denoising_steps(scheduler):
        sample = kernels.scale_cast(x, step.input_scale, sample_dtype, copies=2)  # [2B, 4, h, w]
        outputs = run_batched(unet, {
            "sample": sample,
            "timestep": np.full((sample.shape[0],), step.timestep, np.float32),
            "encoder_hidden_states": cond.context,
            "text_embeds": cond.text_embeds,
            "time_ids": cond.time_ids,
        })
        if on_step is not None:
            on_step(step.index, step.timestep, outputs)
        eps = kernels.cfg_combine(outputs["noise_pred"], cfg)  # [B, 4, h, w]
        z = None
        if step.adds_noise:
            if noise is None:
                raise ValueError(f"{scheduler.name} step {step.index} adds noise: pass `noise`")
            z = noise(step.index)
        x, prev = kernels.scheduler_step(x, eps, step.coefficients, prev=prev, noise=z)
    return x


def trajectory(unet, cond: Conditioning, scheduler, cfg: float, seed: int, latent_shape: tuple[int, ...],
               on_step: Callable[[int, float, dict], None] | None = None) -> np.ndarray:
    """Final latents of one seeded denoising run of batch latent_shape[0] (CFG batch 2x that)."""
    latents = seeded_latents(seed, latent_shape, scheduler.init_noise_sigma)
    return denoise(unet, cond, latents, scheduler, cfg, noise=seeded_step_noise(seed, latent_shape), on_step=on_step)
