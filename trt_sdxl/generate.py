"""`python -m trt_sdxl.generate "prompt"`: text to PNG through the library API (trt_sdxl.Generator).

GPU: the engines of `--engines` (default ./engines) with TensorRT. `--cpu`: the networks those
engines were built from (same precision, same calibration table) through netexec, so any engines
folder of a tiny model can be looked at without a GPU; `--cpu --model PATH` runs a checkpoint's
FP16 networks directly. Either way each PNG carries an A1111-style `parameters` text chunk, and
image i of a batch uses seed + i (so any image can be made again alone).

LoRAs on engines built `--refittable`, without a rebuild: `--lora FILE[:SCALE]` (repeatable), or A1111's
`<lora:name:0.8>` in the prompt with `--lora-dir DIR` to find `name` in; the engines are refit in memory
for this run (python -m trt_sdxl.refit changes the folder's files instead).

Every mistake a user can make ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path

from . import lora, schedulers
from .errors import UserError, run_cli
from .generator import NO_GPU, Generator, check_request
from .log import format_seconds, logger
from .runtime.manifest import EnginesFolder

DEFAULT_ENGINES = Path("engines")
log = logger("trt_sdxl.generate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trt_sdxl.generate",
                                description="Text to PNG: TensorRT engines on a GPU, or (--cpu) their networks "
                                            "through netexec on the CPU.")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--negative", default=None, help="negative prompt (default: none, i.e. zero embeddings as SDXL)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (default 5.0)")
    p.add_argument("--seed", type=int, default=None,
                   help="noise seed (default: random, printed and saved); image i of a batch uses seed + i")
    p.add_argument("--scheduler", default="euler", help=f"one of {', '.join(schedulers.NAMES)} (default euler)")
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels (default: the engines' opt size; any size their profiles serve)")
    p.add_argument("--width", type=int, default=None,
                   help="image width in pixels (default: the engines' opt size; any size their profiles serve)")
    p.add_argument("--long-prompts", action="store_true",
                   help="encode prompts beyond 75 tokens in 75-token chunks, as A1111 and compel do (default: "
                        "truncate at 75, as diffusers does); engines take as many chunks as build --prompt-chunks")
    p.add_argument("--weighting", action="store_true",
                   help="A1111 prompt weighting: (word:1.2), (word) x1.1, [word] /1.1, \\( for a literal "
                        "bracket, BREAK for a new chunk (default: the prompt is plain text, as diffusers reads it)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA at SCALE (default 1) refit into engines built --refittable, for this run; repeatable")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="where <lora:name:weight> tags in the prompt find their files (A1111's syntax)")
    p.add_argument("--engines", default=str(DEFAULT_ENGINES), help="engines folder (default ./engines)")
    p.add_argument("--model", default=None,
                   help="with --cpu: run this checkpoint's FP16 networks directly instead of an engines folder")
    p.add_argument("--out", default="image.png", help="output PNG (default image.png; with --batch N: image-0.png ...)")
    p.add_argument("--cpu", action="store_true",
                   help="run the engines' networks with netexec (numpy) on the CPU: tiny models only, no GPU needed")
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> None:
    """The checks that need neither a model nor a GPU."""
    check_request(args.steps, args.cfg, args.scheduler, args.batch, args.seed)
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"--{flag} {value}: expected a positive multiple of 8 (the VAE upsamples latents by 8; "
                            "SDXL's UNet needs multiples of 32)")
    if args.model is not None and not args.cpu:
        raise UserError("--model: runs a checkpoint directly on the CPU with --cpu; on a GPU, build engines from it "
                        "with `python -m trt_sdxl.build --model PATH` and pass --engines DIR")
    if args.model is not None and (args.lora or args.lora_dir):
        raise UserError("--lora/--lora-dir: refit an engines folder built --refittable (--engines DIR); for --model, "
                        "merge LoRAs at build time: python -m trt_sdxl.build --model PATH --lora FILE")
    for spec in args.lora:
        lora.parse_spec(spec)
    _, tags = lora.prompt_loras(args.prompt)
    if tags and args.lora_dir is None:
        raise UserError(f"prompt tag {tags[0].tag}: give --lora-dir DIR, the folder its LoRA file is in")
    if args.lora_dir is not None:
        lora.LoRAFolder(args.lora_dir).resolve(tags)
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


class Progress:
    """A one-line bar over the denoising steps on stderr, with the last step's time and the time left."""

    def __init__(self, width: int = 30):
        self.width, self.times = width, []

    def step(self, index: int, total: int, ms: float) -> None:
        self.times.append(ms)
        done = index + 1
        bar = "#" * (self.width * done // total)
        left = format_seconds(sum(self.times) / len(self.times) * (total - done) / 1000)
        end = "\n" if done == total else ""
        print(f"\r  denoising [{bar:<{self.width}}] {done}/{total}  {ms:8.1f} ms/step, {left} left ", end=end,
              file=sys.stderr, flush=True)


def load(args: argparse.Namespace) -> Generator:
    if args.cpu and args.model is not None:
        return Generator.from_model(args.model, height=args.height, width=args.width, batch=args.batch, log=log)
    if not args.cpu:
        from .runtime import cuda

        count, reason = cuda.probe()
        if not count:
            raise UserError(NO_GPU.format(reason=reason) + "; or run `python -m pytest tests/test_pipeline.py` "
                            "(the end-to-end check against diffusers)")
    folder = EnginesFolder(args.engines)
    entries = {c: folder.entry(c, need_file=not args.cpu) for c in ("text_encoder", "text_encoder_2", "unet", "vae")}
    height, width = folder.image_size(entries)
    folder.check_request(entries, args.batch, args.height or height, args.width or width)  # before any loading
    asks = "--lora" if args.lora else next((t.tag for t in lora.prompt_loras(args.prompt)[1]), None)
    if asks and not any(entries[c].get("refittable") for c in entries):
        raise UserError(f"{asks}: the engines of {folder.folder} were not built refittable; rebuild with "
                        f"`{folder.rebuild_command(refittable=True)}`, or merge the LoRA at build time with "
                        "build --lora")
    generator = Generator.load(folder, device="cpu" if args.cpu else "gpu", log=log, lora_dir=args.lora_dir)
    if args.lora:
        try:
            generator.set_loras(args.lora)
        except BaseException:
            generator.close()
            raise
    return generator


def generate(args: argparse.Namespace) -> list[Path]:
    """Everything `main` does; returns the PNG paths written."""
    validate(args)
    started = time.perf_counter()
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    generator = load(args)
    try:
        progress = Progress()
        images = generator.generate(args.prompt, args.negative, steps=args.steps, cfg=args.cfg, seed=seed,
                                    scheduler=args.scheduler, batch=args.batch, height=args.height, width=args.width,
                                    on_step=progress.step, long_prompts=args.long_prompts, weighting=args.weighting)
    finally:
        generator.close()
    paths = [image.save(path) for image, path in zip(images, output_paths(Path(args.out), args.batch))]
    log(f"wrote {len(paths)} image(s) in {time.perf_counter() - started:.1f} s (seed {seed}"
        + (f" to {seed + args.batch - 1}" if args.batch > 1 else "") + ")")
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)

    def work():
        for path in generate(args):
            print(path)

    return run_cli("trt_sdxl.generate", work, "no image written")


if __name__ == "__main__":
    sys.exit(main())
