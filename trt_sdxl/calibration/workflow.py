"""calibrate -> tune -> CalibrationTable: the quantization workflow `python -m trt_sdxl.build` runs.

Executors come from a factory: TensorRT engines built for and run on the GPU present (the
runtime's EngineExecutor), else netexec on the CPU — fine for tiny models, hours for a
full-size one, so a full-size model without a GPU is refused with a pointer to
`--calibration FILE`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import UserError
from ..executors import NETEXEC_MAX_UNET_BYTES
from ..log import Log, silent
from ..pipeline import Pipeline
from ..quant.percentile import AmaxRule
from ..quant.plan import QuantPlan, fixed_choices
from ..quant.table import CalibrationTable
from .calibrate import run_calibration
from .prompts import load_prompts, model_prompts
from .tune import SEEDS_PER_PROMPT, tune

CALIBRATION_BATCH = 8  # prompts per calibration call (CFG batch 16): netexec's per-layer cost is shared
TUNE_STEPS = 10  # denoising steps of the tuning runs (quantized and FP16 alike)


def heldout_count(prompts: int) -> int:
    """Prompts held aside from calibration for the trajectory-level tuning: an eighth, 2 to 8
    (the 72 built-in prompts: 64 calibrate, 8 tune)."""
    return max(2, min(8, prompts // 8))


def _factory(model, batch: int, latent_h: int, latent_w: int, run):
    """make(kind, images=batch, **define_options) -> executor of that network for `images` images
    (the UNet takes their CFG batch), where `run(defined, name)` makes the executor: the
    calibration network, the FP16 UNet, each tuning candidate, the text encoders, the VAE."""
    from ..models import clip, unet, vae

    def make(kind: str, images: int | None = None, **options):
        images = images or batch
        if kind == "unet":
            return run(unet.define(model, batch=2 * images, latent_height=latent_h, latent_width=latent_w,
                                   **options), kind)
        if kind.startswith("text_encoder"):
            return run(clip.define(model, encoder=2 if kind.endswith("_2") else 1, batch=images), kind)
        if kind == "vae":
            return run(vae.define(model, batch=images, latent_height=latent_h, latent_width=latent_w), kind)
        raise ValueError(kind)

    return make


def netexec_factory(model, batch: int, latent_h: int, latent_w: int):
    """Executors run by netexec on the CPU."""
    from ..executors import NetexecExecutor

    return _factory(model, batch, latent_h, latent_w, lambda defined, name: NetexecExecutor(defined))


def gpu_factory(model, batch: int, latent_h: int, latent_w: int, log: Log = silent):
    """Executors that are TensorRT engines built for, and run on, the GPU present (each network is
    built in memory; a full-size UNet build takes minutes, once per tuning candidate)."""
    from ..runtime import cuda
    from ..runtime.engine import Engine, EngineExecutor

    cuda.Device.open()

    def run(defined, name):
        log(f"calibration: building the {name} network for this GPU")
        return EngineExecutor(Engine.from_network(defined, name))

    return _factory(model, batch, latent_h, latent_w, run)


def check_can_calibrate(model, unet_component, recipe: str, calibration: str | None) -> None:
    """Before any network is defined: an 8-bit build that must calibrate needs a pipeline folder (its
    tokenizers) and, for a UNet too large for netexec, a GPU."""
    from ..runtime import cuda

    if calibration:
        return  # a table is given: whether it needs tuning is known once it is read
    if not Path(model).is_dir():
        raise UserError(f"--precision {recipe}: calibrating runs prompts through the text encoders, which needs the "
                        f"tokenizers of a diffusers pipeline folder; {model} is not one. Pass --calibration FILE "
                        f"(a table tuned for {recipe}) or a pipeline folder as --model")
    if unet_component.weight_bytes > NETEXEC_MAX_UNET_BYTES and cuda.probe()[0] == 0:
        raise UserError(
            f"--precision {recipe}: calibrating this {unet_component.weight_bytes / 2**30:.1f} GiB UNet needs a GPU "
            "(with netexec on the CPU it would take hours); calibrate on a machine with a GPU and TensorRT, then "
            "pass the table (OUT/calibration.npz) with --calibration FILE")


def default_factory(model, unet_component, recipe: str, batch: int, latent_h: int, latent_w: int,
                    log: Log = silent):
    """The GPU when one is usable, else netexec (check_can_calibrate has refused full-size UNets then)."""
    from ..runtime import cuda

    if cuda.probe()[0] > 0:
        return gpu_factory(model, batch, latent_h, latent_w, log)
    return netexec_factory(model, batch, latent_h, latent_w)


def text_conditioning(model, make, height: int, width: int):
    """encode([prompt]) -> Conditioning, through our tokenizers and text encoder networks."""
    from ..tokenizer import open_tokenizer

    pipe = Pipeline(make("text_encoder"), make("text_encoder_2"), None, None,
                    open_tokenizer(model, encoder=1), open_tokenizer(model, encoder=2))
    return lambda prompts: pipe.encode_prompt(prompts, None, height, width)


def cached_calibration(path: Path | None, fingerprint: str, prompts: list[str], steps: int, scheduler: str,
                       cfg: float, seed: int, latent: tuple, log: Log) -> CalibrationTable | None:
    """The finished calibration an interrupted build left at `path`, if it was made for exactly this."""
    if path is None or not Path(path).is_file():
        return None
    try:
        table = CalibrationTable.load(path, fingerprint)
    except UserError:
        return None
    meta = table.meta
    wanted = {"steps": steps, "scheduler": scheduler, "cfg": cfg, "seed": seed, "latent_shape": list(latent),
              "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
    if any(meta.get(k) != v for k, v in wanted.items()):
        return None
    log(f"calibration: resuming from the finished calibration in {path} ({meta['prompts']} prompts x {steps} steps)")
    return table


def image_decoder(model, make):
    """decode(latents) -> images [B, 3, H, W] in [-1, 1], through the model's VAE network."""
    from ..pipeline import ModelSettings

    pipe = Pipeline(None, None, None, make("vae"), None, None,
                    scaling_factor=ModelSettings.read(model).scaling_factor)
    return pipe.decode


def calibrate_and_tune(model, unet_component, recipe: str, *, height: int, width: int,
                       calibration: str | None = None, prompts_file: str | None = None, steps: int = 20,
                       scheduler: str = "euler", cfg: float = 5.0, seed: int = 0, factory=None,
                       batch: int = CALIBRATION_BATCH, tune_steps: int = TUNE_STEPS,
                       stats_cache: Path | None = None, log: Log = silent) -> CalibrationTable:
    """The table for `recipe`: read from `calibration` (tuned now if it lacks `recipe`), or measured
    (`batch` prompts per UNet call). A recipe with fixed parameters (NVIDIA's) takes them as they
    are; the others are tuned on the held-aside prompts with `tune_steps`-step runs. The caller
    writes the table (the build, together with the engines, so a failed build keeps the old one).

    `stats_cache`: where the finished calibration is kept before tuning starts, and taken from when
    it matches (same checkpoint, prompts, steps, scheduler, size), so a build interrupted after
    calibrating resumes without calibrating again."""
    fingerprint = unet_component.fingerprint()
    table = CalibrationTable.load(calibration, fingerprint) if calibration else None
    if table is not None and recipe in table.meta.get("tuned", {}):
        log(f"calibration: using {calibration} ({table.meta['prompts']} prompts, {table.meta['steps']} steps)")
        return table
    check_can_calibrate(model, unet_component, recipe, None)
    # A reused table is tuned at the size its statistics were measured at, whatever this build's size.
    latent = tuple(table.meta["latent_shape"]) if table is not None else (4, height // 8, width // 8)
    if factory is None:
        factory = default_factory(model, unet_component, recipe, 1, latent[1], latent[2], log)
    encode = text_conditioning(model, factory, 8 * latent[1], 8 * latent[2])
    if table is None:
        prompts_file = prompts_file or model_prompts(model)
        if prompts_file is not None:
            log(f"calibration: prompts from {prompts_file}")
        prompts = load_prompts(prompts_file)
        held = heldout_count(len(prompts))
        calib, heldout = prompts[:-held], prompts[-held:]
        table = cached_calibration(stats_cache, fingerprint, calib, steps, scheduler, cfg, seed, latent, log)
    if table is None:
        batch = max(1, min(batch, len(calib)))
        log(f"calibration: {len(calib)} prompts x {steps} steps ({scheduler}, CFG {cfg}), {batch} prompts per "
            f"call, {held} held aside for tuning")
        executor = factory("unet", images=batch, calibration_taps=True)
        try:
            table = run_calibration(executor, encode, calib, scheduler=scheduler, steps=steps, cfg=cfg, seed=seed,
                                    latent_shape=latent, unet_fingerprint=fingerprint, batch=batch, log=log)
        finally:
            executor.free()
        table.meta["heldout"] = heldout
        if stats_cache is not None:
            table.save(stats_cache)  # the finished calibration survives an interrupted tuning
    fixed = fixed_choices(recipe, QuantPlan(recipe, table, unet_component, rule=AmaxRule(), alphas={}).groups())
    if fixed is not None:
        log(f"{recipe}: NVIDIA's fixed parameters, not tuned (amax {fixed['rule'].describe()})")
        table.set_choices(recipe, fixed["rule"], fixed["alphas"], {"fixed": True})
        return table
    builtin = load_prompts(None)
    heldout = table.meta.get("heldout") or builtin[-heldout_count(len(builtin)):]
    images = len(heldout) * SEEDS_PER_PROMPT
    tune_steps = min(tune_steps, table.meta["steps"])
    log(f"tuning {recipe}: SmoothQuant alpha per layer group, then the amax rule per layer kind, judged on "
        f"{len(heldout)} held-aside prompts x {SEEDS_PER_PROMPT} seeds ({tune_steps} steps) against FP16 images")
    fp16 = factory("unet", images=images)
    decode = image_decoder(model, factory)
    try:
        tune(table, recipe, unet_component,
             lambda options: factory("unet", images=images, precision=recipe, calibration=table,
                                     quant_options=options),
             fp16, encode, decode, heldout, scheduler=table.meta["scheduler"], steps=tune_steps,
             cfg=table.meta["cfg"], seed=seed, latent_shape=latent, log=log)
    finally:
        fp16.free()
    return table
