"""`python -m trt_sdxl.build`: checkpoint -> TensorRT engine files + manifest.json + build_report.json.

With no arguments it builds the four engines of the embedded tiny default model
(`weights/tiny-sdxl`: text_encoder, text_encoder_2, unet, vae) into `./engines`. Every network is
defined before any engine is built, so a mistake in any of them (a missing component or
tokenizer, a size or precision the model cannot take) ends the run before the builder starts.
Engines are built one by one into temporary files and renamed into place, with the manifest and
report, only once all of them are built: a failed or interrupted build leaves the output folder
as it was.

Batch: `--batch N` is the number of images per prompt. The text encoders encode the N prompts
(and, in a second call, the N negative prompts) and the VAE decodes N latents; the UNet runs
classifier-free guidance as one call on the uncond and cond halves, so its engine takes 2N.

Shapes (trt_sdxl.shapes): by default every engine is static, for one image size (the model's, or
--height/--width) and one batch. `--resolutions` (repeatable: one optimization profile each),
`--batch 1-4` and `--prompt-chunks N` (prompts up to N x 75 tokens, for `generate --long-prompts`)
make engines with dynamic shapes that serve every request inside their profiles. An 8-bit UNet is
calibrated at the first profile's opt shape: its scales are per-tensor abs-max statistics of the
activations, and one set of them serves every shape of every profile.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import backend
from .version import __version__
from .components import COMPONENTS, DEFAULT_MODEL, ENCODERS, LORA_COMPONENTS, TOKENIZER_FOLDERS
from . import configs, fusion_lint, shapes, support
from .engines import (EIGHT_BIT_OPTIMIZATION_LEVEL, build_engine, check_can_build_refittable, check_target_takes,
                      choose_target, engine_filename, fused_attention_check, present_gpu, tensor_specs)
from .errors import UserError, run_cli
from .executors import NETEXEC_MAX_UNET_BYTES
from .files import json_bytes, load_json, write_json, write_temporary
from .log import logger
from .quant.recipe import RECIPES
from .unet_config import UNetConfig

DEFAULT_OUT = Path("engines")
# the UNet's --precision (8-bit: quant recipes; the matrix maps them), then the recipes kept for comparison
PRECISIONS = ("auto",) + support.PRECISIONS + support.OTHER_RECIPES
TEXT_PRECISION = "fp16"
MODEL_FOLDER = "model"  # the model copy inside an engines folder
LORA_FOLDER = "loras"  # inside the model copy: the LoRA files merged into the engines
CALIBRATION_FILE = "calibration.npz"
REFIT_MAP_FILE = "refit_map.json"  # refittable builds: per component, the refit map of its network (trt_sdxl.refit_map)
STATS_CACHE = ".calibration-stats.npz"  # a finished calibration kept until the build that tunes it succeeds
log = logger("trt_sdxl.build")


def read_manifest(path: Path) -> dict:
    """An earlier build's manifest or report to update; an unreadable one is replaced, not merged."""
    try:
        found = load_json(path, missing={})
    except UserError:
        return {}
    return found if isinstance(found, dict) else {}


def check_output_folder(out: Path) -> None:
    """`--out` must be (or become) a writable folder: checked before any work starts."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; expected a folder for the engines")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {existing or out} is not a writable folder")


# ---------------------------------------------------------------- what to build


def parse_components(value) -> tuple[str, ...]:
    """`"unet,vae"` (or a sequence of names) -> the named components, in pipeline order."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    text = value if isinstance(value, str) else ",".join(value)
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown or not names:
        what = f"{unknown[0]!r} is not a component" if unknown else "no component named"
        raise UserError(f"--components {text}: {what}; expected a comma-separated list of {', '.join(COMPONENTS)}")
    return tuple(c for c in COMPONENTS if c in names)


def check_precisions(precision: str, vae_precision: str) -> None:
    from .models import vae

    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    vae.check_precision(vae_precision)


def resolve_precision(precision: str, target: str, engines: bool) -> support.Resolution:
    """What `--precision` builds with this backend for `target` (the recipe matrix, trt_sdxl.support)."""
    be = backend.get()
    gpu = present_gpu()
    arch = gpu[0] if target == "native" and gpu else target
    resolution = support.resolve(precision, be.name, be.version, arch, gpu[1] if gpu else None, engines=engines)
    if resolution.recipe != precision:
        log(f"--precision {precision}: builds {resolution.recipe} for {arch} with {be.name} {be.version}"
            + (f" ({resolution.note})" if resolution.note else ""))
    return resolution


def check_tokenizer(model, component: str, checkpoint) -> str | None:
    """The folder of the tokenizer that feeds text encoder `component`, checked: it opens, and its
    ids index the encoder's token embedding table. None when `model` is not a pipeline folder (a
    single file or the encoder's own folder carries no tokenizer)."""
    from .tokenizer import open_tokenizer

    encoder = ENCODERS[component]
    folder = Path(model).expanduser()
    if not (folder.is_dir() and ((folder / "model_index.json").is_file() or (folder / TOKENIZER_FOLDERS[encoder]).is_dir())):
        log(f"{component}: {model} carries no {TOKENIZER_FOLDERS[encoder]}/; the pipeline will need SDXL's")
        return None
    tokenizer = open_tokenizer(folder, encoder)
    rows = checkpoint.shape("text_model.embeddings.token_embedding.weight")[0]
    largest = max(tokenizer.vocab.values())
    if largest >= rows:
        raise UserError(f"{tokenizer.folder / 'vocab.json'}: token ids go up to {largest}, but the {component} has "
                        f"{rows} token embeddings (do the tokenizer and the text encoder belong together?)")
    return str(tokenizer.folder)


def image_profiles(model, jobs: dict, resolutions, batch, prompt_chunks, height: int | None,
                   width: int | None) -> list[shapes.ImageProfile]:
    """The build's profiles (trt_sdxl.shapes.image_profiles), sides checked against the model: the
    UNet's must be multiples of 8 x its downsampling (32 for SDXL); default, the UNet config's
    sample_size in pixels (1024 for SDXL). For a build without the UNet, multiples of 8 and the VAE
    config's sample_size (SDXL's is the image side)."""
    multiple, side = image_rule(model, jobs)
    return shapes.image_profiles(resolutions, batch, prompt_chunks, multiple, side, height, width)


def image_rule(model, jobs: dict) -> tuple[int, int]:
    """(multiple every image side must be, default side) in pixels."""
    from . import weights

    try:
        unet = jobs["unet"].checkpoint if "unet" in jobs else weights.open_component(model, "unet")
        cfg = UNetConfig.parse(unet.config)
        multiple, side = cfg.image_multiple, cfg.default_image_side
    except UserError:
        if "vae" not in jobs:
            if {"unet", "vae"} & jobs.keys():
                raise
            return 8, 1024  # text encoders only: no image side matters
        multiple, side = 8, int(jobs["vae"].checkpoint.config.get("sample_size", 1024))
    return multiple, side


def check_vae_upscale(checkpoint) -> None:
    from .models import vae

    upscale = vae.parse_config(checkpoint.config).upscale
    if upscale != 8:
        raise UserError(f"{checkpoint.source}: this VAE turns a latent pixel into {upscale}x{upscale} image pixels; "
                        "SDXL's UNet latents are 1/8 of the image (expected 4 VAE blocks)")


def report_entry(definition, seconds: float) -> dict:
    macs = definition.macs
    plan = definition.quant
    entry = {
        "macs_total": int(sum(m.macs for m in macs)),
        "macs_8bit": int(sum(m.macs for m in macs if m.quantized)),
        "layers": int(definition.network.num_layers),
        "layers_quantized": int(sum(1 for m in macs if m.quantized)),
        "smoothing_muls": int(definition.smoothing_muls),
        "build_seconds": round(seconds, 2),
    }
    if plan is not None:
        tuned = plan.table.meta["tuned"][plan.recipe]
        entry["quantization"] = {
            "recipe": plan.recipe,
            "amax_rule": plan.rule.to_json(),
            "fixed_parameters": bool(tuned["report"].get("fixed")),
            "smoothing": tuned["report"].get("smoothing"),
            "smoothed_groups": sum(a is not None for a in plan.alphas.values()),
            "alphas": plan.alphas,
            "tuning_psnr": tuned["report"].get("psnr"),
            "tuning_trajectory_error": tuned["report"].get("trajectory_error"),
            "tuning_candidates": tuned["report"].get("candidates"),
            "calibration": {k: plan.table.meta[k] for k in ("scheduler", "steps", "cfg", "prompts", "seed")}
            | {"loras": plan.table.meta.get("calibration_loras") or []},
        }
    return entry


def define_component(component: str, checkpoint, precision: str, batch: int, latent_h: int, latent_w: int,
                     calibration=None, attention_check=None, profiles=None):
    """The network of `component`; `batch` is the engine's own batch dimension, or `profiles` (image
    profiles, trt_sdxl.shapes) give its shapes. Warnings the model code raises (e.g. fp16 for a VAE
    known to overflow) are logged as one line each."""
    from .models import clip, unet, vae

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if component == "unet":
            net = unet.define(checkpoint, precision=precision, batch=batch, latent_height=latent_h,
                              latent_width=latent_w, progress=lambda message: log(f"{component}: {message}"),
                              calibration=calibration, attention_check=attention_check, profiles=profiles)
        elif component in ENCODERS:
            net = clip.define(checkpoint, encoder=ENCODERS[component], batch=batch, precision=precision,
                              profiles=profiles)
        else:
            net = vae.define(checkpoint, precision=precision, batch=batch, latent_height=latent_h,
                             latent_width=latent_w, profiles=profiles)
    for w in caught:
        log(f"{component}: warning: {w.message}")
    return net


@dataclass
class EngineJob:
    """One engine to build: what it is, the opened weights it reads, and (once defined) its network."""

    component: str
    precision: str
    batch: int  # the engine's own batch dimension: 2N for the UNet (uncond + cond), else N
    checkpoint: object  # weights.Component
    tokenizer: str | None = None  # text encoders: the tokenizer folder that feeds them
    network: object = None  # the defined network (UNetNetwork, TextEncoderNetwork, VAENetwork)


def plan_engines(model, components: tuple[str, ...], precision: str, vae_precision: str,
                 batch: int, lora_set=None) -> dict[str, EngineJob]:
    """Open every component's weights (and the text encoders' tokenizers): a missing or broken one
    is a UserError here, before anything is defined or built. `lora_set` (trt_sdxl.lora): LoRAs merged
    into the weights as they are read, before SmoothQuant and quantization."""
    from . import lora, weights

    precisions = {"text_encoder": TEXT_PRECISION, "text_encoder_2": TEXT_PRECISION, "unet": precision,
                  "vae": vae_precision}
    jobs = {}
    for component in components:
        start = time.perf_counter()
        log(f"{component}: opening weights")
        checkpoint = lora.merged(weights.open_component(model, component), lora_set)
        merged = component in (lora_set.components() if lora_set else ())
        log(f"{component}: {len(checkpoint.keys())} tensors, {checkpoint.weight_bytes / 2**20:.1f} MiB "
            f"({time.perf_counter() - start:.1f} s)" + ("; LoRA merged" if merged else ""))
        jobs[component] = EngineJob(component, precisions[component], 2 * batch if component == "unet" else batch,
                                    checkpoint)
    missing = sorted((lora_set.components() if lora_set else set()) - set(jobs))
    if missing:
        raise UserError(f"--lora: the LoRAs modify {', '.join(missing)}, which this build does not build (--components "
                        f"{','.join(jobs)}): build them too, or the engines would not all carry the LoRA")
    for component in [c for c in jobs if c in ENCODERS]:
        jobs[component].tokenizer = check_tokenizer(model, component, jobs[component].checkpoint)
    if "vae" in jobs:
        check_vae_upscale(jobs["vae"].checkpoint)
    return jobs


def input_profiles_json(network) -> list[dict]:
    """A defined network's optimization profiles as the manifest records them ([] when static)."""
    if not network.dynamic:
        return []
    return [{name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in p.items()}
            for p in network.profiles]


def manifest_entry(job: EngineJob, file: str, target: str, profiles: list[shapes.ImageProfile],
                   refit_weights: int | None = None) -> dict:
    opt = profiles[0]
    batch, height, width = opt.batch.opt, opt.height.opt, opt.width.opt
    be = backend.get()
    entry = {
        "file": file,
        "component": job.component,
        "precision": job.precision,
        "backend": be.name,
        "backend_version": be.version,
        "target": target,
        "batch": batch,  # images per prompt
        "cfg_batch": 2 * batch,  # the UNet's batch: uncond + cond
    }
    if job.component in ENCODERS:
        entry["tokenizer"] = f"{MODEL_FOLDER}/{TOKENIZER_FOLDERS[ENCODERS[job.component]]}" if job.tokenizer else None
    else:
        entry.update({"image_height": height, "image_width": width})
    entry.update({
        "profiles": [p.to_json() for p in profiles],  # what requests the engine serves, in image terms
        "inputs": tensor_specs(job.network.network, "inputs"),  # -1: a dynamic axis
        "input_profiles": input_profiles_json(job.network),  # TensorRT's optimization profiles, one per entry above
        "outputs": tensor_specs(job.network.network, "outputs"),
        "checkpoint": str(job.checkpoint.source),
        "checkpoint_fingerprint": job.checkpoint.fingerprint(),
        "refittable": refit_weights is not None,  # built with --refittable: python -m trt_sdxl.refit changes LoRAs
    })
    if refit_weights is not None:
        entry["refit_weights"] = refit_weights  # how many weights a refit may change
    return entry


def model_copy(model, jobs: dict[str, EngineJob]) -> tuple[dict[str, Path | dict], bool]:
    """What the engines folder keeps of the model, so that it can be used without the checkpoint:
    relative path (under model/) -> source file, or a config dict to write. The pipeline's
    model_index.json, scheduler config and tokenizers; each built component's config; and, when the
    UNet is small enough for the CPU preview (netexec), each built component's weight files byte for
    byte (so their fingerprints, and the calibration table's, still match). Second value: whether
    the weights are in."""
    folder = Path(model).expanduser()
    files: dict[str, Path | dict] = {}
    if folder.is_dir():
        for rel in ("model_index.json", "scheduler/scheduler_config.json"):
            if (folder / rel).is_file():
                files[rel] = folder / rel
        for tokenizer in TOKENIZER_FOLDERS.values():
            if (folder / tokenizer).is_dir():
                files.update({f"{tokenizer}/{f.name}": f for f in sorted((folder / tokenizer).iterdir()) if f.is_file()})
    unet = jobs.get("unet")
    weights_in = folder.is_dir() and (unet is None or unet.checkpoint.weight_bytes <= NETEXEC_MAX_UNET_BYTES)
    for component, job in jobs.items():
        source = Path(job.checkpoint.source)
        if not source.is_dir():  # a single file: its packaged config only
            files[f"{component}/config.json"] = job.checkpoint.config
            weights_in = False
            continue
        files[f"{component}/config.json"] = source / "config.json" if (source / "config.json").is_file() \
            else job.checkpoint.config
        if weights_in:
            for f in job.checkpoint.files:
                files[f"{component}/{f.path.name}"] = f.path
            files.update({f"{component}/{f.name}": f for f in source.glob("*.safetensors.index*.json")})
    return files, weights_in


def stage_model_copy(files: dict[str, Path | dict], out: Path) -> Path:
    """The model copy written into a hidden temporary folder inside `out`; renamed into place later."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_FOLDER}.", suffix=".tmp", dir=out))
    for rel, source in files.items():
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, dict):
            write_json(target, source)
        else:
            shutil.copyfile(source, target)
    return staging


def commit_model_copy(staging: Path, out: Path) -> None:
    """Each staged top-level entry replaces its counterpart under out/model/ (other components'
    copies from earlier builds stay)."""
    final = out / MODEL_FOLDER
    final.mkdir(exist_ok=True)
    for entry in sorted(staging.iterdir()):
        target = final / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(entry, target)
    staging.rmdir()


def warn_mixed_builds(manifest: dict, built, profiles: list[shapes.ImageProfile], target: str) -> None:
    """Log engines kept from an earlier build whose shapes (profiles) or target differ from this build's."""
    wanted = [p.to_json() for p in profiles]
    for component, entry in manifest["engines"].items():
        if component in built:
            continue
        if (entry.get("profiles"), entry.get("target")) != (wanted, target):
            theirs = "; ".join(shapes.ImageProfile.from_json(p).describe() for p in entry.get("profiles") or []) \
                or f"batch {entry.get('batch')}"
            log(f"manifest: keeps {component} from an earlier build ({theirs}; {entry.get('target')}), unlike this "
                f"one ({'; '.join(p.describe() for p in profiles)}; {target}); rebuild it with --components "
                f"{component} for one consistent set")


def check_arguments(components, precision: str, vae_precision: str, batch, calibration_steps: int,
                    optimization_level: int | None, prompt_chunks=1) -> tuple[str, ...]:
    """The flags a build and a dry run check before anything else; returns the components."""
    components = parse_components(components)
    check_precisions(precision, vae_precision)
    shapes.parse_range(batch, "--batch")
    shapes.parse_chunks(prompt_chunks)
    if calibration_steps < 1:
        raise UserError(f"--calibration-steps {calibration_steps}: expected a positive integer")
    if optimization_level is not None and not 0 <= optimization_level <= 5:
        raise UserError(f"--optimization-level {optimization_level}: expected 0 to 5")
    return components


def build(model, out: Path, precision: str = "fp16", batch: int | str = 1, height: int | None = None,
          width: int | None = None, target: str | None = None, components=COMPONENTS,
          vae_precision: str = "fp32", calibration: str | None = None, calibration_prompts: str | None = None,
          calibration_steps: int = 20, engines: bool = True, optimization_level: int | None = None,
          resolutions: list[str] | None = None, prompt_chunks: int | str = 1, loras: list[str] | None = None,
          refittable: bool = False, calibration_loras: list[str] | None = None) -> dict:
    """Build the engines of `components`; returns the manifest written to `out/manifest.json`.

    `precision` goes through the recipe matrix (trt_sdxl.support: `auto`, refusals, what this backend
    builds for the target). `engines=False` (`--no-engines`) defines, calibrates and writes the
    folder — manifest, calibration table, report, model copy — without engine files, for any
    precision: `generate --cpu` runs it. `optimization_level`: the builder's; default 4 for an 8-bit
    UNet (as NVIDIA builds them), TensorRT's own (3) otherwise. `batch` ("4" or a range "1-4"),
    `resolutions` (one profile each) and `prompt_chunks` give the engines' shapes (module docstring).
    `loras`: `FILE[:SCALE]` LoRAs merged into the weights before anything is defined (trt_sdxl.lora); the
    folder keeps a copy of each, so `generate --cpu` runs the merged networks too. `refittable`: the text
    encoders' and UNet's engines can take other LoRAs later without a rebuild (`python -m trt_sdxl.refit`,
    `Generator.set_loras`, `<lora:name:w>` in prompts): their linear and conv weights (and an 8-bit UNet's weight
    scales) are marked refittable, and the folder keeps each network's refit map (refit_map.json).
    `calibration_loras` (8-bit, refittable): calibrate with each of these LoRAs merged too, so the activation
    scales a refit keeps cover them (trt_sdxl.calibration.workflow)."""
    out = Path(out)
    check_output_folder(out)
    components = check_arguments(components, precision, vae_precision, batch, calibration_steps, optimization_level,
                                 prompt_chunks)
    if resolutions and not {"unet", "vae"} & set(components):
        raise UserError("--resolutions: only the UNet and VAE engines have an image size")
    be = backend.get()
    target = choose_target(target)
    if refittable and engines and set(LORA_COMPONENTS) & set(components):
        check_can_build_refittable(target)
    if "unet" in components:
        precision = resolve_precision(precision, target, engines).recipe
    elif precision == "auto":
        precision = "fp16"
    check_target_takes(target, vae_precision if "vae" in components else "fp32",
                       RECIPES[precision]["format"] if "unet" in components and precision in RECIPES else "fp16")
    if calibration_loras:
        from .lora import parse_spec

        for spec in calibration_loras:
            parse_spec(spec)
        if not refittable or "unet" not in components or precision not in RECIPES:
            raise UserError("--calibrate-lora: for an 8-bit --refittable build (a refit keeps the build's activation "
                            "scales, so they are calibrated with the LoRAs it will take)")
    log(f"model {model}; {be.name} {be.version}; target {target}; components {', '.join(components)}; "
        f"precision: unet {precision}, vae {vae_precision}, text encoders {TEXT_PRECISION}; "
        f"batch {batch} (unet {2 * shapes.parse_range(batch, '--batch').opt}: uncond + cond)")

    # Everything a user can get wrong is found before the builder runs.
    from . import lora

    lora_set = lora.LoRASet.load(loras) if loras else None
    jobs = plan_engines(model, components, precision, vae_precision, shapes.parse_range(batch, "--batch").opt,
                        lora_set)
    profiles = image_profiles(model, jobs, resolutions, batch, prompt_chunks, height, width)
    opt = profiles[0]
    batch, height, width = opt.batch.opt, opt.height.opt, opt.width.opt
    dynamic = not all(p.static for p in profiles) or len(profiles) > 1
    if {"unet", "vae"} & jobs.keys():
        log(f"image {width}x{height} (latent {width // 8}x{height // 8})" if not dynamic else
            f"shapes: {len(profiles)} profile{'s' if len(profiles) > 1 else ''}: "
            + "; ".join(p.describe() for p in profiles) + f"; opt {width}x{height}, batch {batch}")
    eight_bit = "unet" in jobs and precision != "fp16"
    if eight_bit:
        from .calibration.workflow import check_can_calibrate

        check_can_calibrate(model, jobs["unet"].checkpoint, precision, calibration)

    def define(job: EngineJob, precision: str, table=None):
        start = time.perf_counter()
        log(f"{job.component}: defining the network (batch {job.batch}, {precision})")
        check = fused_attention_check(target) if table is not None and engines else None
        job.network = define_component(job.component, job.checkpoint, precision, job.batch,
                                       height // 8, width // 8, calibration=table, attention_check=check,
                                       profiles=profiles)
        log(f"{job.component}: {job.network.network.num_layers} layers defined ({time.perf_counter() - start:.1f} s)")

    # Every other network, and the FP16 UNet as a check of the checkpoint, is defined before an
    # 8-bit UNet's calibration starts: a broken component must not wait for it.
    for job in jobs.values():
        define(job, "fp16" if job.component == "unet" and eight_bit else job.precision)
    table, lint = None, []
    # what the engines are built as, with the run's timing cache and the engines a GPU calibration built for it
    from .calibration.workflow import BuildEngines  # here: an FP16 build does not pay for the calibration imports

    for_folder = BuildEngines(target, batch, optimization_level, vae_precision, dynamic=dynamic) if engines else None
    if eight_bit:
        from .calibration.workflow import calibrate_and_tune

        if dynamic:
            log(f"unet: calibrating at the opt shape ({width}x{height}, batch {batch}): the 8-bit scales are "
                "per-tensor abs-max statistics, one set for every shape of the profiles")
        table = calibrate_and_tune(model, jobs["unet"].checkpoint, precision, height=height, width=width,
                                   calibration=calibration, prompts_file=calibration_prompts,
                                   steps=calibration_steps, stats_cache=out / STATS_CACHE, engines=for_folder,
                                   log=log, checkpoints={c: job.checkpoint for c, job in jobs.items()} if lora_set
                                   else None, calibration_loras=calibration_loras)
        define(jobs["unet"], precision, table)
        lint = fusion_lint.lint(jobs["unet"].network.network)
        log(f"unet: fusion lint: {len(lint)} findings" + "".join(f"\n  {f}" for f in lint[:10])
            + (" (every Q/DQ where TensorRT's rules fuse it)" if not lint else ""))
        fallbacks = jobs["unet"].network.definition.attention_fallbacks
        if fallbacks:
            log(f"unet: {len(fallbacks)} attention layers have no fused {RECIPES[precision]['format'].upper()} kernel "
                f"in {be.name} {be.version} for {target} at their shapes; they keep FP16 BMMs "
                f"(e.g. {fallbacks[0]})")

    manifest = read_manifest(out / "manifest.json")
    manifest.update({"trt_sdxl_version": __version__, "backend": be.name, "backend_version": be.version})
    manifest.setdefault("engines", {})
    report = read_manifest(out / "build_report.json")
    copied, weights_in = model_copy(model, jobs)
    lora_entries = []
    for f in lora_set.files if lora_set else ():
        rel = f"{LORA_FOLDER}/{f.path.name}"
        copied[rel] = f.path
        lora_entries.append({"file": f"{MODEL_FOLDER}/{rel}", "scale": f.scale, "components": sorted(f.modules)})
    staged: dict[str, Path] = {}  # final file name -> its temporary file, renamed once all engines are built
    staging = None
    refit_maps = read_manifest(out / REFIT_MAP_FILE)  # other components' maps stay; a rebuilt one's is replaced
    try:
        for i, job in enumerate(jobs.values(), start=1):
            step = f"[{i}/{len(jobs)}] {job.component}"
            name, seconds, level = None, 0.0, None
            marked = None  # the weights a refit may change, for a refittable engine
            refit_maps.pop(job.component, None)
            if refittable and job.component in LORA_COMPONENTS:
                from . import refit_map

                marked = refit_map.refittable(job.network.definition.refit)
                refit_maps[job.component] = refit_map.to_json(job.network.definition.refit)
            if engines:
                level = for_folder.level(job.component, job.precision)
                latent = (height // 8, width // 8) if job.component in ("unet", "vae") else None
                built = None if marked is not None else for_folder.take(  # an engine calibration built is not refittable
                    BuildEngines.key(job.component, job.precision, job.batch, latent, target, level,
                                     table if job.component == "unet" else None))
                if built is not None:
                    engine, seconds = built
                    log(f"{step}: the engine calibration built and ran for {target} (this network, these options): "
                        "written as it is")
                else:
                    log(f"{step}: building for {target}"
                        + (f" (optimization level {level})" if level is not None else ""))
                    engine, seconds = build_engine(job.network.definition, target, log, optimization_level=level,
                                                   timing_cache=for_folder.timing_cache,
                                                   profiles=job.network.profiles if job.network.dynamic else None,
                                                   refittable=marked)
                name = engine_filename(job.component, job.precision, target)
                staged[name] = write_temporary(out / name, engine)
                log(f"{step}: built {name} ({engine.nbytes / 2**20:.1f} MiB, {seconds:.1f} s)")
                engine = None
            manifest["engines"][job.component] = manifest_entry(job, name, target if engines else None, profiles,
                                                                None if marked is None else len(marked))
            if marked is not None:
                log(f"{step}: refittable: {len(marked)} weights (linear and conv"
                    + (", and their 8-bit scales)" if job.precision in RECIPES else ")"))
            report[job.component] = {"precision": job.precision, "optimization_level": level,
                                     **report_entry(job.network.definition, seconds)}
            if job.component == "unet" and job.precision in RECIPES:
                report["unet"]["fusion_lint"] = fusion_lint.report(lint)
                report["unet"]["attention_fallbacks"] = job.network.definition.attention_fallbacks
            job.network = None  # let the builder's memory go before the next engine
        if table is not None:
            staged[CALIBRATION_FILE] = write_temporary(out / CALIBRATION_FILE, table.to_bytes())
        if refit_maps:
            staged[REFIT_MAP_FILE] = write_temporary(out / REFIT_MAP_FILE, json_bytes(refit_maps, indent=None))
        staging = stage_model_copy(copied, out)
        for name, tmp in list(staged.items()):
            os.replace(tmp, out / name)
            del staged[name]
            log(f"wrote {out / name}")
        commit_model_copy(staging, out)
        staging = None
        (out / STATS_CACHE).unlink(missing_ok=True)
        if not refit_maps:  # no engine of the folder is refittable any more; only now, with the rest written
            (out / REFIT_MAP_FILE).unlink(missing_ok=True)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    if table is not None:
        manifest["calibration"] = CALIBRATION_FILE
    elif "unet" in jobs:
        manifest.pop("calibration", None)
    folder = Path(model).expanduser()
    manifest["loras"] = lora_entries  # merged into the engines' weights; generate --cpu merges them again
    manifest.update({"model": MODEL_FOLDER, "model_name": folder.name if folder.is_dir() else folder.stem,
                     "model_weights": weights_in and (manifest.get("model_weights", True) or set(jobs) == set(COMPONENTS))})
    warn_mixed_builds(manifest, jobs, profiles, target)
    write_json(out / "build_report.json", report)
    write_json(out / "manifest.json", manifest)
    log(f"manifest: {out / 'manifest.json'}; model copy: {out / MODEL_FOLDER}"
        + ("" if weights_in else " (configs, tokenizers and scheduler only: the weights are too large for the CPU "
                                 "preview)"))
    return manifest


# ---------------------------------------------------------------- the plan (--dry-run)


def unet_facts(model) -> tuple[dict, int | None, object]:
    """(UNet config, weight bytes, opened component) — bytes and component None for a folder with the
    UNet's config.json and no weights (a config-only copy of a model, to plan its build)."""
    from . import weights

    try:
        component = weights.open_component(model, "unet")
        return component.config, component.weight_bytes, component
    except UserError:
        folder = Path(model).expanduser()
        found = next((f for f in (folder / "unet" / "config.json", folder / "config.json") if f.is_file()), None)
        if found is None:
            raise
        return load_json(found, "a UNet config"), None, None


def is_sdxl_base(config: dict) -> bool:
    """Whether a UNet config is SDXL base 1.0's (its metadata keys aside)."""
    def plain(c):
        return {k: v for k, v in c.items() if not k.startswith("_")}

    return plain(config) == plain(configs.load("sdxl_base_1.0", "unet"))


def unet_macs_ratio(model, config: dict, component, height: int, width: int) -> tuple[float, str]:
    """The UNet's MACs per call (CFG batch 2, this image size) over full-size SDXL's at 1024x1024, and how
    they were found: counted on the FP16 network defined from the weights; from the image area for a
    config-only SDXL base UNet (exact at 1024x1024; attention's share grows faster than the area)."""
    from .calibration import estimate
    from .models import unet

    if component is not None:
        net = unet.define(component, batch=2, latent_height=height // 8, latent_width=width // 8)
        return sum(m.macs for m in net.macs) / estimate.FULL_SIZE_MACS, "counted on the FP16 network"
    if not is_sdxl_base(config):
        raise UserError(f"--model {model}: has no UNet weights, and without them the dry run plans SDXL base UNets "
                        "only (by their config); give the model with its weights")
    area = (height // 8) * (width // 8) / estimate.FULL_SIZE_LATENT**2
    return area, "SDXL base's, from its config and the image area"


def netexec_call_ms(component, rows: int, latent_h: int, latent_w: int) -> float:
    """One FP16 UNet call at CFG batch `rows` through netexec, timed now (zero inputs, a mid timestep)."""
    import numpy as np

    from .executors import NetexecExecutor
    from .models import unet

    net = unet.define(component, batch=rows, latent_height=latent_h, latent_width=latent_w)
    feeds = {name: np.zeros(shape, dtype) for name, (shape, dtype) in net.inputs.items()}
    feeds["timestep"] = np.full(feeds["timestep"].shape, 500.0, np.float32)
    executor = NetexecExecutor(net)
    start = time.perf_counter()
    executor.run(feeds)
    return 1000.0 * (time.perf_counter() - start)


def dry_run(model, precision: str = "fp16", batch: int = 1, height: int | None = None, width: int | None = None,
            target: str | None = None, components=COMPONENTS, vae_precision: str = "fp32",
            calibration: str | None = None, calibration_prompts: str | None = None, calibration_steps: int = 20,
            engines: bool = True, optimization_level: int | None = None, out=print,
            resolutions: list[str] | None = None, prompt_chunks: int | str = 1) -> dict:
    """What `build` with these arguments would build and run, and about how long it would take, printed
    through `out` and returned; no engine is built and no calibration runs (the UNet is defined, to count
    its MACs, and on the CPU one netexec call is timed). Where this backend refuses the precision (TensorRT
    for RTX has no INT8 activations), the plan is NVIDIA TensorRT's, and says so. Without a GPU here, a
    UNet too large for netexec is planned as the build would run on a GPU of the target."""
    from .calibration import estimate
    from .calibration.prompts import load_prompts, model_prompts
    from .calibration.workflow import plan_calibration
    from .quant.table import CalibrationTable
    from .runtime import cuda

    components = check_arguments(components, precision, vae_precision, batch, calibration_steps, optimization_level,
                                 prompt_chunks)
    be = backend.get()
    target = choose_target(target)
    gpu = present_gpu() if cuda.probe()[0] > 0 else None
    arch = gpu[0] if target == "native" and gpu else target
    backend_name, notes = be.name, []
    recipe = "fp16" if precision == "auto" else precision
    if "unet" in components:
        try:
            recipe = resolve_precision(precision, target, engines).recipe
        except UserError as refusal:
            if not be.is_rtx:
                raise
            recipe = support.resolve(precision, "tensorrt", "10", arch, gpu[1] if gpu else None, engines).recipe
            backend_name = "tensorrt"
            notes.append(f"{refusal}; planned for NVIDIA TensorRT instead")
    try:
        config, weight_bytes, component = unet_facts(model)
        cfg = UNetConfig.parse(config)
    except UserError:
        if "unet" in components:
            raise
        config = weight_bytes = component = None  # a build without the UNet: sized as SDXL's
    multiple, side = (cfg.image_multiple, cfg.default_image_side) if config is not None else (8, 1024)
    profiles = shapes.image_profiles(resolutions, batch, prompt_chunks, multiple, side, height, width)
    batch, height, width = profiles[0].batch.opt, profiles[0].height.opt, profiles[0].width.opt
    dynamic = len(profiles) > 1 or not profiles[0].static
    if config is not None:
        ratio, macs_how = unet_macs_ratio(model, config, component, height, width)
    else:
        ratio, macs_how = 1.0, "no UNet here: build times as full-size SDXL's"
    eight_bit = "unet" in components and recipe != "fp16"
    expensive = gpu is not None or weight_bytes is None or weight_bytes > NETEXEC_MAX_UNET_BYTES
    if gpu is None and expensive and eight_bit:
        size = "its full-size UNet" if weight_bytes is None else f"this {weight_bytes / 2**30:.1f} GiB UNet"
        notes.append(f"no GPU here, and {size} calibrates on a GPU only: planned for a machine with a GPU of the "
                     f"target ({arch})")
    keep = engines and expensive and not dynamic and (gpu is None or target in ("native", gpu[0]))
    plan = None
    if eight_bit:
        if calibration:
            meta = CalibrationTable.load(calibration, component.fingerprint() if component else None, arrays=False).meta
            plan = plan_calibration(recipe, expensive=expensive, table_meta=meta, build_images=batch, keep=keep)
        else:
            plan = plan_calibration(recipe, expensive=expensive,
                                    prompts=load_prompts(calibration_prompts or model_prompts(model)),
                                    steps=calibration_steps, build_images=batch, keep=keep)
    written = [c for c in components if engines and not (plan and c in plan.kept)]
    calls = plan.unet_calls if plan else []
    tuning_builds = ([("unet", prec) for _, prec in plan.unet_networks] + [(c, "fp16") for c in plan.other_networks]
                     if plan and expensive else [])  # on netexec they are definitions: seconds
    folder_builds = [(c, recipe if c == "unet" else "fp16") for c in written]
    build_minutes = sum(estimate.build_minutes(backend_name, c, prec, ratio)
                        for c, prec in tuning_builds + folder_builds)
    figures = estimate.gpu_figures(arch, gpu[1] if gpu else None) if expensive else None
    if not calls:
        call_minutes, where = 0.0, ""
    elif figures:
        ms = lambda prec: figures.unet_ms[estimate.SAME_LAYERS.get(prec, prec)]  # noqa: E731
        call_minutes = sum(n * estimate.unet_call_ms(figures, prec, rows, ratio) for _, n, rows, prec in calls) / 60_000
        where = (f"on the {figures.name} ({figures.how}; roofline per full-size UNet call: FP16 {ms('fp16'):.1f} ms"
                 + (f", {recipe} {ms(recipe):.1f} ms" if recipe != "fp16" else "") + ")")
    elif not expensive and component is not None:
        netexec_ms = {rows: netexec_call_ms(component, rows, height // 8, width // 8)
                      for rows in {r for _, _, r, _ in calls}}
        call_minutes = sum(n * netexec_ms[rows] for _, n, rows, _ in calls) / 60_000
        where = ("on this CPU (netexec: one FP16 UNet call timed now at each CFG batch, "
                 + ", ".join(f"{ms:.0f} ms at {rows}" for rows, ms in sorted(netexec_ms.items())) + ")")
    else:
        call_minutes, where = None, f"(no figures for {arch}: engine builds only)"

    out(f"dry run: {model}: UNet {recipe} for {target} with {backend_name}"
        + (f" {be.version}" if backend_name == be.name else "") + f", batch {batch}, {width}x{height}; "
        f"components {', '.join(components)}")
    for note in notes:
        out(f"  note: {note}")
    if plan and plan.tuning == "tuned in the table":
        out(f"  calibration and tuning: none (--calibration {calibration} has {recipe}'s choices)")
    elif plan:
        how = {"per layer": "candidates scored per layer on the calibration rows, the chosen network built once",
               "image space": "one network per candidate, its held-aside images against FP16's"}.get(plan.tuning)
        out(f"  calibration and tuning on the {'GPU' if expensive else 'CPU (netexec)'}: tuning {plan.tuning}"
            + (f" ({how})" if how else ""))
        kinds = Counter(what for what, _ in plan.unet_networks)
        if plan.unet_networks:
            out(f"  networks they {'build as engines' if expensive else 'define'}: unet x {len(plan.unet_networks)} ("
                + "; ".join(what + (f" x {n}" if n > 1 else "") for what, n in kinds.items()) + "), "
                + ", ".join(plan.other_networks))
        if calls:
            out("  UNet calls: " + ", ".join(f"{what} {n} at CFG batch {rows}" for what, n, rows, _ in calls)
                + f" ({sum(n for _, n, _, _ in calls)} in all); VAE decodes: {plan.vae_decodes}")
    if not engines:
        out("  engines the build writes: none (--no-engines)")
    else:
        taken = [c for c in components if c not in written]
        out(f"  engines the build writes: {', '.join(components)}"
            + (f" ({', '.join(taken)} as calibration built them; built again: {', '.join(written) or 'none'})"
               if taken else ""))
    unet_builds = sum(1 for c, _ in tuning_builds + folder_builds if c == "unet")
    out(f"  engine builds in all: {len(tuning_builds) + len(folder_builds)}, {unet_builds} of them the UNet's")
    total = None if call_minutes is None else call_minutes + build_minutes
    out(f"  estimate{' ' + where if where else ''}: "
        + (f"UNet calls {call_minutes:.1f} min, " if call_minutes is not None else "")
        + f"engine builds {build_minutes:.1f} min ({backend_name}; assumptions: trt_sdxl/calibration/estimate.py)"
        + (f", about {total:.0f} min in all" if total is not None and total >= 1 else
           f", about {60 * total:.0f} s in all" if total is not None else ""))
    out(f"  UNet MACs: {ratio:.3g} x full-size SDXL's at 1024x1024 ({macs_how})")
    return {"recipe": recipe, "backend": backend_name, "tuning": plan.tuning if plan else None,
            "unet_networks": plan.unet_networks if plan else [], "other_networks": plan.other_networks if plan else [],
            "unet_calls": calls, "written": written, "kept": list(plan.kept) if plan else [],
            "engine_builds": len(tuning_builds) + len(folder_builds), "unet_engine_builds": unet_builds,
            "gpu": figures.name if figures else None, "call_minutes": call_minutes, "build_minutes": build_minutes,
            "minutes": total}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trt_sdxl.build", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="diffusers pipeline folder, component folder or single-file .safetensors "
                        "(default: the embedded tiny model, weights/tiny-sdxl)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: ./engines)")
    p.add_argument("--components", default=",".join(COMPONENTS), metavar="LIST",
                   help=f"comma-separated engines to build (default: all four, {','.join(COMPONENTS)})")
    p.add_argument("--precision", default="fp16",
                   help="the UNet's precision: fp16, int8, fp8, auto (the fastest this backend runs on the target), "
                        "or NVIDIA's recipes nvidia_modelopt / nvidia_modelopt_fp8 (8-bit: SmoothQuant + percentile "
                        "quant, calibrated and tuned on this model; README: the recipe matrix); text encoders fp16")
    p.add_argument("--no-engines", action="store_true",
                   help="define, calibrate and write the folder (manifest, calibration table, report, model copy) "
                        "without building engines, for any precision: generate --cpu runs it")
    p.add_argument("--dry-run", action="store_true",
                   help="print what the build would build and run — engine builds per component, UNet calls of "
                        "calibration and tuning — and about how long it would take on the GPU present (or "
                        "--target's), without doing it")
    p.add_argument("--optimization-level", type=int, default=None, metavar="N",
                   help=f"the builder's optimization level, 0-5 (default: {EIGHT_BIT_OPTIMIZATION_LEVEL} for an "
                        "8-bit UNet, as NVIDIA builds them; TensorRT's default 3 otherwise)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="reuse a calibration table (OUT/calibration.npz of an earlier 8-bit build of this model)")
    p.add_argument("--calibration-prompts", default=None, metavar="FILE",
                   help="calibration prompts, one per line (default: the 72 built-in prompts)")
    p.add_argument("--calibration-steps", type=int, default=20, metavar="N",
                   help="denoising steps per calibration prompt (default 20)")
    p.add_argument("--vae-precision", default="fp32",
                   help="fp32 (default: SDXL's VAE overflows in fp16), bf16, or fp16 for fp16-fix weights")
    p.add_argument("--batch", default="1", metavar="N",
                   help="images per prompt, N or a range LO-HI (default 1): the text encoders and the VAE take N, "
                        "the UNet 2N (classifier-free guidance runs uncond and cond in one call)")
    p.add_argument("--resolutions", action="append", default=None, metavar="SPEC",
                   help="image sizes the engines serve: a range of sides (768-1344), sizes WIDTHxHEIGHT "
                        f"(1024x1024,832x1216) or {shapes.BUCKETS_NAME}; repeat for one optimization profile each "
                        "(default: one size, --height x --width); the first size is the opt shape")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="merge a LoRA (kohya/A1111 or diffusers/PEFT .safetensors) at SCALE (default 1) into the "
                        "UNet and text encoders before quantization; repeatable")
    p.add_argument("--refittable", action="store_true",
                   help="make the text encoders' and UNet's engines refittable, so that other LoRAs can be put in "
                        "later without a rebuild (python -m trt_sdxl.refit; <lora:name:w> in prompts with "
                        "--lora-dir); needs a GPU with TensorRT for RTX")
    p.add_argument("--calibrate-lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="8-bit --refittable builds: calibrate with this LoRA merged too (repeatable), so that the "
                        "activation scales a refit keeps cover it")
    p.add_argument("--prompt-chunks", default="1", metavar="N",
                   help="prompts up to N x 75 tokens (generate --long-prompts; default 1: 75 tokens)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--target", default=None,
                   help="compute capability to build for, e.g. SM89, SM120, or 'native' "
                        "(default: the GPU present, else SM89 ahead of time)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return run_cli("trt_sdxl.build", lambda: dry_run(
            args.model, precision=args.precision, batch=args.batch, height=args.height, width=args.width,
            target=args.target, components=args.components, vae_precision=args.vae_precision,
            calibration=args.calibration, calibration_prompts=args.calibration_prompts,
            calibration_steps=args.calibration_steps, engines=not args.no_engines,
            optimization_level=args.optimization_level, resolutions=args.resolutions,
            prompt_chunks=args.prompt_chunks), "nothing was written")
    return run_cli("trt_sdxl.build", lambda: build(
        args.model, Path(args.out), precision=args.precision, batch=args.batch, height=args.height,
        width=args.width, target=args.target, components=args.components, vae_precision=args.vae_precision,
        calibration=args.calibration, calibration_prompts=args.calibration_prompts,
        calibration_steps=args.calibration_steps, engines=not args.no_engines,
        optimization_level=args.optimization_level, resolutions=args.resolutions,
        prompt_chunks=args.prompt_chunks, loras=args.lora, refittable=args.refittable,
        calibration_loras=args.calibrate_lora),
        "nothing was left half-written")


if __name__ == "__main__":
    sys.exit(main())
