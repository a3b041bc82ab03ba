"""End-to-end oracle on the CPU: our Pipeline (netexec executors for both text encoders, the UNet and
the VAE; the per-step plan run with the kernels' numpy twins) against diffusers'
StableDiffusionXLPipeline (PyTorch, CPU, float32) on the same tiny pipeline folder, with the same
initial latents and the same per-step noise handed to both.

Figure: relative L2 error of the final image in [0, 1] (diffusers' output_type="np"). Our text
encoders and UNet run in fp16 (as the engines do), diffusers in fp32, so the budget is fp16's 1e-2.
Also here: the per-step plan (`denoising_steps` + kernels.scheduler_step) against our own
schedulers' `step` over whole trajectories, and `run_batched`.
"""

from __future__ import annotations

import json
from pathlib import Path

import tiny_clip
import tiny_models
import tiny_vae
import numpy as np
from oracle import rel_l2
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionXLPipeline)
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from trt_sdxl import configs, kernels, schedulers
from trt_sdxl.errors import UserError
from trt_sdxl.executors import NetexecExecutor
from trt_sdxl.models import clip, unet, vae
from trt_sdxl.denoising import denoising_steps, run_batched, seeded_latents, seeded_step_noise
from trt_sdxl.pipeline import Pipeline
from trt_sdxl.tokenizer import open_tokenizer

BUDGET = 1e-2
SIZE = 64  # pixels; latents 8x8 (the tiny UNet halves twice, the tiny VAE upsamples 8x)
PROMPT = "a photograph of an astronaut riding a horse on the moon"


def sdxl_scheduler_config() -> dict:
    return {k: v for k, v in configs.load("sdxl_base_1.0", "scheduler").items() if k != "_source"}


def save_tiny_sdxl(folder) -> Path:
    """A complete tiny SDXL pipeline folder (diffusers/transformers save every component), with
    SDXL base's scheduler config."""
    folder = Path(folder)
    tiny_models.save_tiny_pipeline(folder)
    tiny_clip.save_tiny_text_components(folder)
    tiny_vae.save_tiny_vae(folder / "vae")
    (folder / "scheduler").mkdir()
    config = {"_class_name": "EulerDiscreteScheduler", **sdxl_scheduler_config()}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    index = json.loads((folder / "model_index.json").read_text())
    index.update({"vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                  "force_zeros_for_empty_prompt": True})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """diffusers runs thousands of tiny ops here; on a busy machine torch's thread pool makes each
    one cost milliseconds instead of microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("pipeline") / "tiny-sdxl")


@pytest.fixture(scope="module")
def ours(tiny_sdxl):
    latent = SIZE // 8
    return Pipeline(
        NetexecExecutor(clip.define(tiny_sdxl, 1)), NetexecExecutor(clip.define(tiny_sdxl, 2)),
        NetexecExecutor(unet.define(tiny_sdxl, batch=2, latent_height=latent, latent_width=latent)),
        NetexecExecutor(vae.define(tiny_sdxl, latent_height=latent, latent_width=latent)),
        open_tokenizer(tiny_sdxl, 1), open_tokenizer(tiny_sdxl, 2),
        scaling_factor=tiny_vae.TINY_VAE_CONFIG["scaling_factor"])


@pytest.fixture(scope="module")
def theirs(tiny_sdxl):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, torch_dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_scheduler(name: str, config: dict):
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True, algorithm_type="dpmsolver++",
                                                       solver_order=2)
    return DDIMScheduler.from_config(config)


# (scheduler, steps, negative prompt, CFG scale)
CASES = [
    ("euler", 6, None, 5.0),
    ("dpmpp_2m_karras", 6, "blurry, low quality", 7.0),
    ("euler_a", 5, None, 5.0),
]


@pytest.mark.parametrize("name,steps,negative,cfg", CASES)
def test_pipeline_matches_diffusers(ours, theirs, tiny_sdxl, monkeypatch, name, steps, negative, cfg):
    seed = 20240901 + steps
    shape = (1, 4, SIZE // 8, SIZE // 8)
    config = json.loads((tiny_sdxl / "scheduler" / "scheduler_config.json").read_text())
    scheduler = schedulers.create(name, steps, config)
    cond = ours.encode_prompt([PROMPT], None if negative is None else [negative], SIZE, SIZE)
    noise = seeded_step_noise(seed, shape)
    latents = ours.denoise(cond, seeded_latents(seed, shape, scheduler.init_noise_sigma), scheduler, cfg, noise=noise)
    image = ours.decode(latents)  # [1, 3, H, W] in [-1, 1]
    mine = np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)

    draws = iter(range(steps))  # diffusers' euler_a draws its step noise with randn_tensor: hand it ours

    def our_noise(shape_, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(noise(next(draws))).to(dtype)

    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", our_noise)
    theirs.scheduler = diffusers_scheduler(name, theirs.scheduler.config)
    final = {}

    def keep_latents(pipe, i, t, tensors):
        final["latents"] = tensors["latents"].numpy().copy()
        return tensors

    with torch.no_grad():
        ref = theirs(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg,
                     height=SIZE, width=SIZE, latents=torch.from_numpy(kernels.gaussian_noise(seed, 0, shape)),
                     output_type="np", callback_on_step_end=keep_latents).images
    err, latent_err = rel_l2(mine, ref), rel_l2(latents, final["latents"])
    rgb_diff = np.abs(kernels.image_to_rgb8(image).astype(int) - np.round(ref * 255).astype(int)).max()
    print(f"\n{name} ({steps} steps, CFG {cfg}, negative {negative!r}): image rel L2 {err:.2e}, "
          f"latents {latent_err:.2e}, max |RGB8 diff| {rgb_diff}")
    assert mine.shape == ref.shape == (1, SIZE, SIZE, 3)
    assert ref.std() > 0.02, "the reference image is flat: the comparison would prove little"
    assert err <= BUDGET, f"{name}: image rel L2 {err:.3e} > {BUDGET:.0e}"
    assert latent_err <= BUDGET, f"{name}: final latents rel L2 {latent_err:.3e} > {BUDGET:.0e}"


# ---------------------------------------------------------------- the per-step plan


@pytest.mark.parametrize("name", schedulers.NAMES)
@pytest.mark.parametrize("steps", [4, 20])
def test_denoising_steps_follow_the_schedulers(name, steps):
    """The linear update the kernels apply, fed the same model outputs, tracks our schedulers'
    `step` (themselves proven against diffusers in test_schedulers.py) over a whole trajectory."""
    rng = np.random.default_rng(7)
    shape = (1, 4, 6, 6)
    scheduler = schedulers.create(name, steps)
    plan = denoising_steps(scheduler)
    assert [s.timestep for s in plan] == [float(t) for t in scheduler.timesteps]
    x_ref = rng.standard_normal(shape).astype(np.float32) * np.float32(scheduler.init_noise_sigma)
    x, prev = x_ref.copy(), np.zeros_like(x_ref)
    for step in plan:
        probe = np.ones(shape, np.float32)
        assert np.allclose(scheduler.scale_model_input(probe, step.index), step.input_scale, rtol=1e-6)
        eps = rng.standard_normal(shape).astype(np.float32)
        noise = rng.standard_normal(shape).astype(np.float32) if scheduler.needs_noise else None
        x_ref = scheduler.step(eps, step.index, x_ref, noise=noise)
        x, prev = kernels.scheduler_step(x, eps, step.coefficients, prev=prev,
                                         noise=noise if step.adds_noise else None)
        err = rel_l2(x, x_ref)
        assert err <= 2e-6, f"{name} ({steps} steps) step {step.index}: rel L2 {err:.2e}"


def test_unsupported_scheduler_settings_are_user_errors():
    config = sdxl_scheduler_config()
    with pytest.raises(UserError, match="prediction_type='v_prediction'"):
        denoising_steps(schedulers.create("euler", 4, {**config, "prediction_type": "v_prediction"}))
    with pytest.raises(UserError, match="clip_sample"):
        denoising_steps(schedulers.create("ddim", 4, {**config, "clip_sample": True}))
    with pytest.raises(UserError, match="solver_type='heun'"):
        denoising_steps(schedulers.create("dpmpp_2m_karras", 4, {**config, "solver_type": "heun"}))


def test_noise_streams_are_seeded_and_distinct():
    shape = (1, 4, 8, 8)
    first = seeded_latents(5, shape, 1.0)
    assert np.array_equal(first, seeded_latents(5, shape, 1.0))
    assert np.array_equal(seeded_latents(5, shape, 14.6), kernels.scale_cast(first, 14.6))
    step0, step1 = seeded_step_noise(5, shape)(0), seeded_step_noise(5, shape)(1)
    assert np.array_equal(step0, kernels.gaussian_noise(5, 1, shape))
    assert not np.array_equal(step0, first) and not np.array_equal(step0, step1)
    assert not np.array_equal(first, seeded_latents(6, shape, 1.0))


class Doubler:
    """An executor taking batch 2 that doubles `x` and sums each row into `total`."""

    inputs = {"x": ((2, 3), np.float32)}

    def __init__(self):
        self.calls = 0

    def run(self, feeds):
        self.calls += 1
        assert feeds["x"].shape == (2, 3)
        return {"y": 2 * feeds["x"], "total": feeds["x"].sum(axis=1)}


def test_run_batched_slices_and_pads():
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    executor = Doubler()
    out = run_batched(executor, {"x": x})
    assert executor.calls == 3
    assert np.array_equal(out["y"], 2 * x) and np.array_equal(out["total"], x.sum(axis=1))
    out = run_batched(executor, {"x": x[:1]})  # fewer rows than the batch: padded, then cut
    assert np.array_equal(out["y"], 2 * x[:1])


def test_long_weighted_prompts_through_our_encoders(ours, tiny_sdxl):
    """Pipeline.encode_prompt with --long-prompts on our fp16 networks (netexec) against compel on the
    transformers encoders (plain 75-token splits, compel's BRUTAL mode): the prompt in 3 chunks, the short
    negative prompt padded with empty-prompt chunks to 3, pooled from chunk 0; with --weighting, A1111's
    rule on those chunks (weighting.apply_weights, itself checked against a numpy reference)."""
    from compel import Compel, ReturnedEmbeddingsType, SplitLongTextMode
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from trt_sdxl import weighting

    prompt = ", ".join(["an astronaut riding a horse on the moon with a red flag"] * 12)  # 3 chunks
    tokenizers = [CLIPTokenizer.from_pretrained(tiny_sdxl / f) for f in ("tokenizer", "tokenizer_2")]
    encoders = [CLIPTextModel.from_pretrained(tiny_sdxl / "text_encoder").eval(),
                CLIPTextModelWithProjection.from_pretrained(tiny_sdxl / "text_encoder_2").eval()]
    compel = Compel(tokenizer=tokenizers, text_encoder=encoders, requires_pooled=[False, True],
                    returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                    truncate_long_prompts=False, split_long_text_mode=SplitLongTextMode.BRUTAL)
    with torch.no_grad():
        cond, pooled = (t.numpy() for t in compel(prompt))
        negative, negative_pooled = (t.numpy() for t in compel("blurry"))
        empty, _ = (t.numpy() for t in compel(""))
    negative = np.concatenate([negative, empty, empty], axis=1)  # compel's padding: empty-prompt chunks
    got = ours.encode_prompt([prompt], ["blurry"], SIZE, SIZE, long_prompts=True)
    assert got.context.shape == (2, 3 * 77, 64) and cond.shape == (1, 3 * 77, 64)
    for name, value, expected in (("negative context", got.context[:1], negative), ("context", got.context[1:], cond),
                                  ("negative pooled", got.text_embeds[:1], negative_pooled),
                                  ("pooled", got.text_embeds[1:], pooled)):
        assert rel_l2(value, expected) <= BUDGET, f"{name}: rel L2 {rel_l2(value, expected):.2e}"

    weighted = prompt.replace("red flag", "(red flag:1.4)", 1).replace("horse", "[horse]", 1)
    got_weighted = ours.encode_prompt([weighted], ["blurry"], SIZE, SIZE, long_prompts=True, weighting=True)
    plain = ours.encode_prompt([weighted.replace("(", "").replace(")", "").replace(":1.4", "").replace("[", "")
                                .replace("]", "")], ["blurry"], SIZE, SIZE, long_prompts=True)
    expected = np.concatenate([weighting.apply_weights(plain.context[1:, :, 32 * e:32 * (e + 1)],
                                                       weighting.chunks(tok, weighted).weights.reshape(1, -1))
                               for e, tok in enumerate((ours.tokenizer, ours.tokenizer_2))], axis=-1)
    np.testing.assert_allclose(got_weighted.context[1:], expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got_weighted.context[1:], plain.context[1:])
    np.testing.assert_array_equal(got_weighted.text_embeds, plain.text_embeds)  # pooled: chunk 0, unweighted
    with pytest.raises(UserError, match="built for 2 chunk"):
        ours.encode_prompt([prompt], None, SIZE, SIZE, long_prompts=True, max_chunks=2)
