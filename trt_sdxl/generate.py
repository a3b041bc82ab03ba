"""`python -m trt_sdxl.generate "prompt"`: text to PNG with the TensorRT engines of an engines folder
on a GPU, or with `--cpu`, the same pipeline on netexec (numpy) for a tiny model.

GPU: tokenizers (from the model folder the manifest records, or --model) -> text encoder engines
-> the UNet loop as a CUDA graph replayed per step (runtime.denoiser) -> VAE engine -> PNG.
CPU: the networks are defined from the model folder (default weights/tiny-sdxl) and run by
netexec; the loop is Pipeline.denoise with the kernels' numpy twins. Either way the PNG carries
an A1111-style `parameters` text chunk, and a seed gives the same latents (Philox4x32).

Every mistake a user can make ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__, schedulers
from .errors import UserError, run_cli
from .executors import NETEXEC_MAX_UNET_BYTES
from .files import write_atomic
from .pipeline import Pipeline, seeded_latents, seeded_step_noise, to_uint8_rgb

DEFAULT_ENGINES = Path("engines")
DEFAULT_CPU_MODEL = Path(__file__).resolve().parent.parent / "weights" / "tiny-sdxl"
# netexec runs a tiny UNet step in a fraction of a second; SDXL's 5 GB UNet would take hours.
CPU_MAX_UNET_BYTES = NETEXEC_MAX_UNET_BYTES
DEFAULT_SCALING_FACTOR = 0.13025  # SDXL's VAE config
SAMPLERS = {"euler": "Euler", "euler_a": "Euler a", "dpmpp_2m_karras": "DPM++ 2M Karras", "ddim": "DDIM"}
NO_GPU = ("a GPU is needed to run the TensorRT engines, and none is usable here: {reason}. To see the "
          "pipeline work on the CPU instead, run `python -m trt_sdxl.generate --cpu \"a prompt\"` (tiny model) or "
          "`python -m pytest tests/test_pipeline.py` (the end-to-end check against diffusers)")


def log(message: str) -> None:
    print(f"[trt_sdxl.generate] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trt_sdxl.generate",
                                description="Text to PNG: TensorRT engines on a GPU, or (--cpu) netexec on a "
                                            "tiny model.")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--negative", default=None, help="negative prompt (default: none, i.e. zero embeddings as SDXL)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (default 5.0)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: random, printed and saved)")
    p.add_argument("--scheduler", default="euler", help=f"one of {', '.join(schedulers.NAMES)} (default euler)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the engines' size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the engines' size)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--engines", default=str(DEFAULT_ENGINES), help="engines folder (default ./engines)")
    p.add_argument("--model", default=None,
                   help="model folder with the tokenizers (default: the checkpoint recorded in the engines' "
                        "manifest; with --cpu: weights/tiny-sdxl)")
    p.add_argument("--out", default="image.png", help="output PNG (default image.png; with --batch N: image-0.png ...)")
    p.add_argument("--cpu", action="store_true",
                   help="run the networks with netexec (numpy) on the CPU: tiny models only, no GPU needed")
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> None:
    """The checks that need neither a model nor a GPU."""
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: expected at least 1")
    if not args.cfg >= 0:  # also catches nan
        raise UserError(f"--cfg {args.cfg}: expected a guidance scale >= 0")
    if args.scheduler not in schedulers.NAMES:
        raise UserError(f"--scheduler {args.scheduler}: expected one of {', '.join(schedulers.NAMES)}")
    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: expected at least 1")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UserError(f"--seed {args.seed}: expected an integer from 0 to 2^64 - 1")
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"--{flag} {value}: expected a positive multiple of 8 (the VAE upsamples latents by 8)")
    for path in output_paths(Path(args.out), args.batch):
        check_output(path)


def output_paths(out: Path, batch: int) -> list[Path]:
    return [out] if batch == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(batch)]


def check_output(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"--out {path}: is a folder; expected a .png file path")
    if path.suffix.lower() != ".png":
        raise UserError(f"--out {path}: expected a file name ending in .png")
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"--out {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--out {path}: folder {folder} is not writable")


# ---------------------------------------------------------------- model folder settings


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable JSON ({e})") from None


@dataclass
class ModelSettings:
    """What the pipeline reads from a diffusers folder besides weights (defaults: SDXL base's)."""

    scheduler_config: dict | None
    scaling_factor: float
    force_zeros_for_empty_prompt: bool

    @classmethod
    def read(cls, folder: Path) -> ModelSettings:
        scheduler = _read_json(folder / "scheduler" / "scheduler_config.json") or None
        vae = _read_json(folder / "vae" / "config.json")
        index = _read_json(folder / "model_index.json")
        return cls(scheduler, float(vae.get("scaling_factor", DEFAULT_SCALING_FACTOR)),
                   bool(index.get("force_zeros_for_empty_prompt", True)))


def open_tokenizers(model: Path, tokenizer_2: Path | None = None):
    """Both tokenizers: from a pipeline folder (`model`), or from two tokenizer folders."""
    from .tokenizer import open_tokenizer

    if tokenizer_2 is not None:
        return open_tokenizer(model, 1), open_tokenizer(tokenizer_2, 2)
    if not model.is_dir():
        raise UserError(f"{model} is not a folder, so it holds no tokenizers: pass --model with a diffusers SDXL "
                        "folder that has tokenizer/ and tokenizer_2/")
    return open_tokenizer(model, 1), open_tokenizer(model, 2)


# ---------------------------------------------------------------- the two ways to run


@dataclass
class Setup:
    """A ready pipeline and how to denoise with it: `denoise(cond, scheduler, on_step(i, ms))` -> latents."""

    pipeline: Pipeline
    denoise: Callable
    settings: ModelSettings
    model: Path
    model_hash: str
    height: int
    width: int
    where: str


def cpu_setup(args, seed: int) -> Setup:
    from . import weights
    from .executors import NetexecExecutor
    from .models import clip, unet, vae

    model = Path(args.model) if args.model else DEFAULT_CPU_MODEL
    unet_weights = weights.open_component(model, "unet")
    if unet_weights.weight_bytes > CPU_MAX_UNET_BYTES:
        raise UserError(f"--cpu: {model} has a {unet_weights.weight_bytes / 2**30:.1f} GiB UNet; netexec (numpy) "
                        "would take hours on it. Use --cpu with a tiny model (weights/tiny-sdxl) and run full-size "
                        "models on a GPU")
    side = unet.default_image_side(unet_weights.config)
    height, width = args.height or side, args.width or side
    tokenizers = open_tokenizers(model)
    settings = ModelSettings.read(model)
    b, latent_h, latent_w = args.batch, height // 8, width // 8
    started = time.perf_counter()
    text_encoder = NetexecExecutor(clip.define(model, 1, batch=b))
    text_encoder_2 = NetexecExecutor(clip.define(model, 2, batch=b))
    unet_net = unet.define(unet_weights, batch=2 * b, latent_height=latent_h, latent_width=latent_w)
    decoder = NetexecExecutor(vae.define(model, batch=b, latent_height=latent_h, latent_width=latent_w))
    pipeline = Pipeline(text_encoder, text_encoder_2, NetexecExecutor(unet_net), decoder, *tokenizers,
                        scaling_factor=settings.scaling_factor,
                        force_zeros_for_empty_prompt=settings.force_zeros_for_empty_prompt)
    log(f"networks defined from {model} ({time.perf_counter() - started:.1f} s)")
    shape = (b, unet_net.config.in_channels, latent_h, latent_w)

    def denoise(cond, scheduler, on_step):
        last = time.perf_counter()

        def timed(i, t, outputs):
            nonlocal last
            now = time.perf_counter()
            on_step(i, 1000 * (now - last))
            last = now

        latents = seeded_latents(seed, shape, scheduler.init_noise_sigma)
        return pipeline.denoise(cond, latents, scheduler, args.cfg, noise=seeded_step_noise(seed, shape),
                                on_step=timed)

    return Setup(pipeline, denoise, settings, model, unet_weights.fingerprint()[:10], height, width,
                 "CPU (netexec, numpy)")


def gpu_setup(args, seed: int) -> Setup:
    from . import backend
    from .runtime import cuda, manifest
    from .runtime.denoiser import GraphDenoiser
    from .runtime.engine import Engine, EngineExecutor

    count, reason = cuda.probe()
    if not count:
        raise UserError(NO_GPU.format(reason=reason))
    engines = manifest.EnginesFolder(args.engines)
    entries = {c: engines.entry(c) for c in manifest.COMPONENTS}
    height, width = engines.check_resolution(entries["unet"], args.height, args.width)
    vae_size = (entries["vae"].get("image_height"), entries["vae"].get("image_width"))
    if vae_size != (height, width):
        raise UserError(f"{engines.folder}: the VAE engine was built for {vae_size[1]}x{vae_size[0]} images, the UNet "
                        f"for {width}x{height}; rebuild one of them, e.g. python -m trt_sdxl.build --components vae "
                        f"--height {height} --width {width} --out {engines.folder}")
    be = backend.get()
    for entry in entries.values():
        engines.check_backend(entry, be.name, be.version)
    model = Path(args.model) if args.model else manifest.model_folder(entries["unet"])
    recorded = None if args.model else engines.tokenizer_folders()
    tokenizers = open_tokenizers(model) if recorded is None else open_tokenizers(*recorded)
    settings = ModelSettings.read(model)
    device = cuda.Device.open()
    for entry in entries.values():
        engines.check_target(entry, device.compute_capability, device.name)
    started = time.perf_counter()
    stream = cuda.Stream()
    library = cuda.KernelLibrary(device)
    run = {c: EngineExecutor(Engine.load(entries[c]["path"]), stream)
           for c in ("text_encoder", "text_encoder_2", "vae")}
    denoiser = GraphDenoiser(Engine.load(entries["unet"]["path"]), library, stream)
    log(f"engines loaded from {engines.folder} ({time.perf_counter() - started:.1f} s); "
        f"{'CUDA graph' if denoiser.use_graph else 'no CUDA graph (TensorRT says not capturable)'}")
    pipeline = Pipeline(run["text_encoder"], run["text_encoder_2"], None, run["vae"], *tokenizers,
                        scaling_factor=settings.scaling_factor,
                        force_zeros_for_empty_prompt=settings.force_zeros_for_empty_prompt)

    def denoise(cond, scheduler, on_step):
        return denoiser.denoise(cond, scheduler, args.cfg, seed, on_step=on_step)

    return Setup(pipeline, denoise, settings, model, str(entries["unet"].get("checkpoint_fingerprint", ""))[:10],
                 height, width, f"{device.name} (SM{device.sm}), {be.name} {be.version}")


# ---------------------------------------------------------------- output


class Progress:
    """A one-line bar over the denoising steps on stderr, with the last step's time."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width, self.times = total, width, []

    def step(self, index: int, ms: float) -> None:
        self.times.append(ms)
        done = index + 1
        bar = "#" * (self.width * done // self.total)
        end = "\n" if done == self.total else ""
        print(f"\r  denoising [{bar:<{self.width}}] {done}/{self.total}  {ms:8.1f} ms/step", end=end,
              file=sys.stderr, flush=True)


def parameters(args, seed: int, setup: Setup, position: int) -> str:
    """A1111's `parameters` text: prompt, negative prompt line, then `key: value` pairs."""
    lines = [args.prompt]
    if args.negative:
        lines.append(f"Negative prompt: {args.negative}")
    fields = [("Steps", args.steps), ("Sampler", SAMPLERS[args.scheduler]), ("CFG scale", f"{args.cfg:g}"),
              ("Seed", seed), ("Size", f"{setup.width}x{setup.height}"), ("Model hash", setup.model_hash),
              ("Model", setup.model.name if setup.model.is_dir() else setup.model.stem)]
    if args.batch > 1:
        fields += [("Batch size", args.batch), ("Batch pos", position)]
    fields.append(("Version", f"trt_sdxl {__version__}"))
    lines.append(", ".join(f"{key}: {value}" for key, value in fields))
    return "\n".join(lines)


def write_png(path: Path, rgb: np.ndarray, text: dict[str, str]) -> None:
    """Through a temporary file in the same folder and a rename: never a half-written PNG."""
    from .png import encode_png

    try:
        write_atomic(path, encode_png(rgb, text))
    except OSError as e:
        raise UserError(f"--out {path}: cannot write it ({e.strerror})") from None


# ---------------------------------------------------------------- main


def generate(args: argparse.Namespace) -> list[Path]:
    """Everything `main` does; returns the PNG paths written."""
    validate(args)
    started = time.perf_counter()
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    setup = cpu_setup(args, seed) if args.cpu else gpu_setup(args, seed)
    scheduler = schedulers.create(args.scheduler, args.steps, setup.settings.scheduler_config)
    log(f"{setup.where}: {setup.width}x{setup.height}, batch {args.batch}, {args.steps} steps of "
        f"{args.scheduler}, CFG {args.cfg:g}, seed {seed}")
    prompts = [args.prompt] * args.batch
    negatives = None if args.negative is None else [args.negative] * args.batch
    t = time.perf_counter()
    cond = setup.pipeline.encode_prompt(prompts, negatives, setup.height, setup.width)
    text_s = time.perf_counter() - t
    progress = Progress(args.steps)
    t = time.perf_counter()
    latents = setup.denoise(cond, scheduler, progress.step)
    denoise_s = time.perf_counter() - t
    t = time.perf_counter()
    rgb = to_uint8_rgb(setup.pipeline.decode(latents))
    vae_s = time.perf_counter() - t
    paths = output_paths(Path(args.out), args.batch)
    for k, path in enumerate(paths):
        write_png(path, rgb[k], {"parameters": parameters(args, seed, setup, k)})
    log(f"text encoders {1000 * text_s:.0f} ms; denoising {denoise_s:.2f} s "
        f"({np.mean(progress.times):.1f} ms/step, fastest {min(progress.times):.1f}); VAE {1000 * vae_s:.0f} ms; "
        f"total {time.perf_counter() - started:.2f} s")
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)

    def work():
        for path in generate(args):
            print(path)

    return run_cli("trt_sdxl.generate", work, "no image written")


if __name__ == "__main__":
    sys.exit(main())
