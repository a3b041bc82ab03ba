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
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import __version__, backend
from .errors import UserError, run_cli
from .files import write_json, write_temporary

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "tiny-sdxl"
DEFAULT_OUT = Path("engines")
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")  # in the order the pipeline runs them
ENCODERS = {"text_encoder": 1, "text_encoder_2": 2}
PRECISIONS = ("fp16", "int8", "fp8")  # the UNet's
FP8_MIN_SM = 89
TEXT_PRECISION = "fp16"
BF16_MIN_SM = 80  # bfloat16 arithmetic starts with Ampere (SM 8.0)


def log(message: str) -> None:
    print(f"[trt_sdxl.build] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- files


def read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        # An unreadable manifest from an older build is replaced, not merged.
        return {}


def engine_filename(component: str, precision: str, target: str) -> str:
    return f"{component}.{precision}.{backend.get().tag}.{target.lower()}.plan"


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
    if vae_precision not in vae.PRECISIONS:
        raise UserError(f"--vae-precision {vae_precision}: expected one of {', '.join(vae.PRECISIONS)} "
                        "(the VAE is not quantized)")


def check_target_takes(target: str, vae_precision: str, precision: str = "fp16") -> None:
    """bfloat16 engines need an SM 8.0+ target (the builder's own error for SM75 is a compiler message);
    FP8 needs SM 8.9+ (Ada, Hopper, Blackwell tensor cores)."""
    if precision == "fp8" and target.startswith("SM") and int(target[2:]) < FP8_MIN_SM:
        raise UserError(f"--precision fp8: {target} has no FP8 tensor cores (they need SM{FP8_MIN_SM} or newer); "
                        "use --precision int8 for this GPU")
    if vae_precision == "bf16" and target.startswith("SM") and int(target[2:]) < BF16_MIN_SM:
        raise UserError(f"--vae-precision bf16: {target} has no bfloat16 (it needs SM{BF16_MIN_SM} or newer); "
                        "use --vae-precision fp32")


def check_tokenizer(model, component: str, checkpoint) -> str | None:
    """The folder of the tokenizer that feeds text encoder `component`, checked: it opens, and its
    ids index the encoder's token embedding table. None when `model` is not a pipeline folder (a
    single file or the encoder's own folder carries no tokenizer)."""
    from .tokenizer import FOLDERS, open_tokenizer

    encoder = ENCODERS[component]
    folder = Path(model).expanduser()
    if not (folder.is_dir() and ((folder / "model_index.json").is_file() or (folder / FOLDERS[encoder]).is_dir())):
        log(f"{component}: {model} carries no {FOLDERS[encoder]}/; the pipeline will need SDXL's")
        return None
    tokenizer = open_tokenizer(folder, encoder)
    rows = checkpoint.shape("text_model.embeddings.token_embedding.weight")[0]
    largest = max(tokenizer.vocab.values())
    if largest >= rows:
        raise UserError(f"{tokenizer.folder / 'vocab.json'}: token ids go up to {largest}, but the {component} has "
                        f"{rows} token embeddings (do the tokenizer and the text encoder belong together?)")
    return str(tokenizer.folder)


def image_size(model, jobs: dict, height: int | None, width: int | None) -> tuple[int, int]:
    """Default image side: the UNet config's sample_size in pixels (1024 for SDXL, 128 for the tiny
    default); for a checkpoint without a UNet, the VAE config's sample_size (SDXL's is the image side)."""
    from . import weights
    from .models import unet as unet_model

    if height and width:
        return height, width
    try:
        unet = jobs["unet"].checkpoint if "unet" in jobs else weights.open_component(model, "unet")
        side = unet_model.default_image_side(unet.config)
    except UserError:
        if "vae" not in jobs:
            raise
        side = int(jobs["vae"].checkpoint.config.get("sample_size", 1024))
    return height or side, width or side


def check_vae_upscale(checkpoint) -> None:
    from .models import vae

    upscale = vae.parse_config(checkpoint.config).upscale
    if upscale != 8:
        raise UserError(f"{checkpoint.source}: this VAE turns a latent pixel into {upscale}x{upscale} image pixels; "
                        "SDXL's UNet latents are 1/8 of the image (expected 4 VAE blocks)")


# ---------------------------------------------------------------- target


def present_gpu_target() -> str | None:
    """'SM89'-style name of the first GPU, from nvidia-smi; None without a GPU."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return "SM" + out[0].replace(".", "") if out else None


def choose_target(requested: str | None) -> str:
    be = backend.get()
    if requested:
        requested = requested.upper() if requested.lower() != "native" else "native"
        if requested != "native" and not requested.startswith("SM"):
            raise UserError(f"--target {requested}: expected e.g. SM89, SM120 or native")
        if requested != "native" and requested not in be.aot_targets:
            raise UserError(f"--target {requested}: {be.name} {be.version} cannot build ahead of time for it; "
                            f"it can build for: {', '.join(be.aot_targets) or 'only the GPU present'}")
        return requested
    gpu = present_gpu_target()
    if gpu:
        return gpu if gpu in be.aot_targets else "native"
    if "SM89" in be.aot_targets:
        return "SM89"
    raise UserError(f"no GPU found and {be.name} {be.version} cannot build ahead of time; pass --target or "
                    "run on a machine with the target GPU")


# ---------------------------------------------------------------- building


class _Progress:
    """Prints the builder's phases (TensorRT IProgressMonitor), at most a few lines per second."""

    @staticmethod
    def attach(config) -> None:
        trt = backend.trt()
        if not hasattr(trt, "IProgressMonitor") or not hasattr(config, "progress_monitor"):
            return

        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)
                self.last = 0.0

            def phase_start(self, phase_name, parent_phase, num_steps):
                if parent_phase is None:
                    log(f"  build phase: {phase_name}")

            def step_complete(self, phase_name, step):
                return True

            def phase_finish(self, phase_name):
                pass

        config.progress_monitor = Monitor()


def build_engine(definition, target: str) -> tuple[bytes, float]:
    """Serialize the network for `target`; returns the engine bytes and the seconds it took."""
    be = backend.get()
    config = definition.builder.create_builder_config()
    be.set_target(config, target)
    _Progress.attach(config)
    start = time.perf_counter()
    serialized = definition.builder.build_serialized_network(definition.network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise UserError(f"{be.name} {be.version} could not build the network for {target} "
                        "(the builder's messages above say why)")
    return serialized, seconds


def tensor_specs(network, which: str) -> list[dict]:
    count = network.num_inputs if which == "inputs" else network.num_outputs
    get = network.get_input if which == "inputs" else network.get_output
    return [{"name": t.name, "shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1].lower()}
            for t in (get(i) for i in range(count))]


def report_entry(definition, seconds: float) -> dict:
    macs = definition.macs
    plan = definition.quant
    entry = {
        "macs_total": int(sum(m.macs for m in macs)),
        "macs_8bit": int(sum(m.macs for m in macs if m.quantized)),
        "layers": int(definition.network.num_layers),
        "layers_quantized": int(sum(1 for m in macs if m.quantized)),
        "smoothing_muls": int(plan.smoothing_muls) if plan is not None else 0,
        "build_seconds": round(seconds, 2),
    }
    if plan is not None:
        tuned = plan.table.meta["tuned"][plan.recipe]
        entry["quantization"] = {
            "recipe": plan.recipe,
            "amax_rule": plan.rule.to_json(),
            "smoothing": tuned["report"].get("smoothing"),
            "smoothed_groups": sum(a is not None for a in plan.alphas.values()),
            "alphas": plan.alphas,
            "tuning_trajectory_error": tuned["report"].get("trajectory_error"),
            "calibration": {k: plan.table.meta[k] for k in ("scheduler", "steps", "cfg", "prompts", "seed")},
        }
    return entry


def define_component(component: str, checkpoint, precision: str, batch: int, latent_h: int, latent_w: int,
                     calibration=None):
    """The network of `component`; `batch` is the engine's own batch dimension. Warnings the model
    code raises (e.g. fp16 for a VAE known to overflow) are logged as one line each."""
    from .models import clip, unet, vae

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if component == "unet":
            net = unet.define(checkpoint, precision=precision, batch=batch, latent_height=latent_h,
                              latent_width=latent_w, progress=lambda message: log(f"{component}: {message}"),
                              calibration=calibration)
        elif component in ENCODERS:
            net = clip.define(checkpoint, encoder=ENCODERS[component], batch=batch, precision=precision)
        else:
            net = vae.define(checkpoint, precision=precision, batch=batch, latent_height=latent_h,
                             latent_width=latent_w)
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
                 batch: int) -> dict[str, EngineJob]:
    """Open every component's weights (and the text encoders' tokenizers): a missing or broken one
    is a UserError here, before anything is defined or built."""
    from . import weights

    precisions = {"text_encoder": TEXT_PRECISION, "text_encoder_2": TEXT_PRECISION, "unet": precision,
                  "vae": vae_precision}
    jobs = {}
    for component in components:
        start = time.perf_counter()
        log(f"{component}: opening weights")
        checkpoint = weights.open_component(model, component)
        log(f"{component}: {len(checkpoint.keys())} tensors, {checkpoint.weight_bytes / 2**20:.1f} MiB "
            f"({time.perf_counter() - start:.1f} s)")
        jobs[component] = EngineJob(component, precisions[component], 2 * batch if component == "unet" else batch,
                                    checkpoint)
    for component in [c for c in jobs if c in ENCODERS]:
        jobs[component].tokenizer = check_tokenizer(model, component, jobs[component].checkpoint)
    if "vae" in jobs:
        check_vae_upscale(jobs["vae"].checkpoint)
    return jobs


def manifest_entry(job: EngineJob, file: str, target: str, batch: int, height: int, width: int) -> dict:
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
        entry["tokenizer"] = job.tokenizer
    else:
        entry.update({"image_height": height, "image_width": width})
    entry.update({
        "inputs": tensor_specs(job.network.network, "inputs"),
        "outputs": tensor_specs(job.network.network, "outputs"),
        "checkpoint": str(job.checkpoint.source),
        "checkpoint_fingerprint": job.checkpoint.fingerprint(),
    })
    return entry


def warn_mixed_builds(manifest: dict, built, batch: int, target: str, height: int, width: int) -> None:
    """Log engines kept from an earlier build whose batch, target or image size differs from this build's."""
    for component, entry in manifest["engines"].items():
        if component in built:
            continue
        size = (entry.get("image_height"), entry.get("image_width"))
        sized = "image_height" in entry and height
        if (entry.get("batch"), entry.get("target")) != (batch, target) or (sized and size != (height, width)):
            log(f"manifest: keeps {component} from an earlier build (batch {entry.get('batch')}, "
                f"{entry.get('target')}" + (f", {size[1]}x{size[0]}" if sized else "") + f"), unlike this one "
                f"(batch {batch}, {target}" + (f", {width}x{height}" if sized else "") + f"); rebuild it with "
                f"--components {component} for one consistent set")


def build(model, out: Path, precision: str = "fp16", batch: int = 1, height: int | None = None,
          width: int | None = None, target: str | None = None, components=COMPONENTS,
          vae_precision: str = "fp32", calibration: str | None = None, calibration_prompts: str | None = None,
          calibration_steps: int = 20) -> dict:
    """Build the engines of `components`; returns the manifest written to `out/manifest.json`."""
    components = parse_components(components)
    check_precisions(precision, vae_precision)
    if batch < 1:
        raise UserError(f"--batch {batch}: expected a positive integer")
    be = backend.get()
    target = choose_target(target)
    check_target_takes(target, vae_precision if "vae" in components else "fp32",
                       precision if "unet" in components else "fp16")
    log(f"model {model}; {be.name} {be.version}; target {target}; components {', '.join(components)}; "
        f"precision: unet {precision}, vae {vae_precision}, text encoders {TEXT_PRECISION}; "
        f"batch {batch} (unet {2 * batch}: uncond + cond)")

    # Everything a user can get wrong is found before the builder runs.
    jobs = plan_engines(model, components, precision, vae_precision, batch)
    height, width = image_size(model, jobs, height, width) if {"unet", "vae"} & jobs.keys() else (0, 0)
    if height % 8 or width % 8 or height < 0 or width < 0:
        raise UserError(f"--height {height} --width {width}: image sides must be positive multiples of 8")
    if height:
        log(f"image {width}x{height} (latent {width // 8}x{height // 8})")
    if calibration_steps < 1:
        raise UserError(f"--calibration-steps {calibration_steps}: expected a positive integer")
    eight_bit = "unet" in jobs and precision in ("int8", "fp8")

    def define(job: EngineJob, precision: str, table=None):
        start = time.perf_counter()
        log(f"{job.component}: defining the network (batch {job.batch}, {precision})")
        job.network = define_component(job.component, job.checkpoint, precision, job.batch,
                                       height // 8, width // 8, calibration=table)
        log(f"{job.component}: {job.network.network.num_layers} layers defined ({time.perf_counter() - start:.1f} s)")

    # Every other network, and the FP16 UNet as a check of the checkpoint, is defined before an
    # 8-bit UNet's calibration starts: a broken component must not wait for it.
    for job in jobs.values():
        define(job, "fp16" if job.component == "unet" and eight_bit else job.precision)
    if eight_bit:
        from .quant.workflow import calibrate_and_tune

        table = calibrate_and_tune(model, jobs["unet"].checkpoint, precision, height=height, width=width,
                                   table_path=Path(out) / "calibration.npz", calibration=calibration,
                                   prompts_file=calibration_prompts, steps=calibration_steps)
        define(jobs["unet"], precision, table)

    out = Path(out)
    manifest = read_json(out / "manifest.json")
    manifest.update({"trt_sdxl_version": __version__, "backend": be.name, "backend_version": be.version})
    manifest.setdefault("engines", {})
    report = read_json(out / "build_report.json")
    staged: dict[str, Path] = {}  # final engine name -> its temporary file, renamed once all are built
    try:
        for i, job in enumerate(jobs.values(), start=1):
            step = f"[{i}/{len(jobs)}] {job.component}"
            log(f"{step}: building for {target}")
            engine, seconds = build_engine(job.network.definition, target)
            name = engine_filename(job.component, job.precision, target)
            staged[name] = write_temporary(out / name, engine)
            log(f"{step}: built {name} ({engine.nbytes / 2**20:.1f} MiB, {seconds:.1f} s)")
            manifest["engines"][job.component] = manifest_entry(job, name, target, batch, height, width)
            report[job.component] = {"precision": job.precision, **report_entry(job.network.definition, seconds)}
            job.network = engine = None  # let the builder's memory go before the next engine
        for name, tmp in list(staged.items()):
            os.replace(tmp, out / name)
            del staged[name]
            log(f"wrote {out / name}")
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    warn_mixed_builds(manifest, jobs, batch, target, height, width)
    write_json(out / "build_report.json", report)
    write_json(out / "manifest.json", manifest)
    log(f"manifest: {out / 'manifest.json'}")
    return manifest


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trt_sdxl.build", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="diffusers pipeline folder, component folder or single-file .safetensors "
                        "(default: the embedded tiny model, weights/tiny-sdxl)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: ./engines)")
    p.add_argument("--components", default=",".join(COMPONENTS), metavar="LIST",
                   help=f"comma-separated engines to build (default: all four, {','.join(COMPONENTS)})")
    p.add_argument("--precision", default="fp16",
                   help="the UNet's precision: fp16, int8 or fp8 (8-bit: SmoothQuant + percentile quant, calibrated "
                        "and tuned on this model; fp8 needs SM89+); the text encoders are fp16")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="reuse a calibration table (OUT/calibration.npz of an earlier 8-bit build of this model)")
    p.add_argument("--calibration-prompts", default=None, metavar="FILE",
                   help="calibration prompts, one per line (default: the 72 built-in prompts)")
    p.add_argument("--calibration-steps", type=int, default=20, metavar="N",
                   help="denoising steps per calibration prompt (default 20)")
    p.add_argument("--vae-precision", default="fp32",
                   help="fp32 (default: SDXL's VAE overflows in fp16), bf16, or fp16 for fp16-fix weights")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="images per prompt (default 1): the text encoders and the VAE take N, the UNet 2N "
                        "(classifier-free guidance runs uncond and cond in one call)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--target", default=None,
                   help="compute capability to build for, e.g. SM89, SM120, or 'native' "
                        "(default: the GPU present, else SM89 ahead of time)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli("trt_sdxl.build", lambda: build(
        args.model, Path(args.out), precision=args.precision, batch=args.batch, height=args.height,
        width=args.width, target=args.target, components=args.components, vae_precision=args.vae_precision,
        calibration=args.calibration, calibration_prompts=args.calibration_prompts,
        calibration_steps=args.calibration_steps), "nothing was left half-written")


if __name__ == "__main__":
    sys.exit(main())
