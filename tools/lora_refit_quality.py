"""8-bit engines and LoRAs: does a refit draw as well as a rebuild? Measured on a trained model and a trained LoRA.

A refit of an 8-bit engine keeps the build's SmoothQuant factors and activation scales (calibrated on the base
model) and re-quantizes the LoRA's weights per channel; a build with `--lora` calibrates the merged model. Each
8-bit folder's images are compared with the FP16 images of the same model, LoRA, prompts and seeds — the
protocol of tools/quality_report.py (PSNR on uint8 RGB, SSIM on the gray image; 10 Euler steps, CFG 2).

Model: the trained default (weights/tiny-sdxl). LoRA: its trained style LoRA, inverted.safetensors
(tools/train_tiny_lora.py: dark garments on a light background, a change of the whole picture). Folders, built
with the README's commands and their defaults (--no-engines: netexec runs the networks; --batch 10, so one call
draws ten seeds of a prompt):

- FP16, and FP16 + LoRA (`build --lora`): the references;
- for int8 and fp8: `build --precision R` (no LoRA, against FP16: the usual 8-bit error); `build --precision R
  --refittable` then `python -m trt_sdxl.refit --lora` (refit); `build --precision R --lora` (rebuild); and
  `build --precision R --refittable --calibrate-lora inverted.safetensors` (the calibration runs with the LoRA
  too), without a LoRA (against FP16) and refit with it.

Each of `--seeds` seed sets draws the ten classes' first prompts x 10 seeds; figures are mean ± spread over the
seed sets. Writes tools/lora_refit_quality.json, a picture grid docs/lora_refit_grid.png, and prints the table.

    python tools/lora_refit_quality.py [--seeds 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import numpy as np  # noqa: E402

from trt_sdxl import Generator, build, refit  # noqa: E402
from trt_sdxl.log import format_seconds, logger  # noqa: E402

_spec = importlib.util.spec_from_file_location("quality_report", REPO / "tools" / "quality_report.py")
quality_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality_report)

MODEL = REPO / "weights" / "tiny-sdxl"
LORA = REPO / "weights" / "tiny-sdxl-loras" / "inverted.safetensors"
JSON_OUT = REPO / "tools" / "lora_refit_quality.json"
GRID_OUT = REPO / "docs" / "lora_refit_grid.png"
PER_CALL = 10  # seeds drawn by one generate call (the folders' --batch)
log = logger("lora_refit_quality")


def folders(workdir: Path) -> dict[str, Path]:
    """Every folder of the comparison, built (or refit) once; a folder left by an earlier run is reused."""
    lora = str(LORA)
    plans = {"FP16": {}, "FP16 + LoRA": {"loras": [lora]}}
    for recipe in ("int8", "fp8"):
        R = recipe.upper()
        plans[f"{R}, no LoRA"] = {"precision": recipe}
        plans[f"{R} refit with the LoRA"] = {"precision": recipe, "refittable": True, "refit": [lora]}
        plans[f"{R} rebuilt with the LoRA"] = {"precision": recipe, "loras": [lora]}
        calibrated = {"precision": recipe, "refittable": True, "calibration_loras": [lora]}
        plans[f"{R} calibrated with it, no LoRA"] = calibrated
        plans[f"{R} calibrated with it, refit"] = {**calibrated, "refit": [lora]}
    out = {}
    for name, plan in plans.items():
        folder = workdir / name.lower().replace(" ", "_").replace(",", "").replace("+", "plus")
        if not (folder / "manifest.json").is_file():
            started = time.perf_counter()
            options = {k: v for k, v in plan.items() if k != "refit"}
            build.build(MODEL, folder, engines=False, batch=PER_CALL, **options)
            if "refit" in plan:
                refit.refit(folder, plan["refit"])
            log(f"{name}: built in {format_seconds(time.perf_counter() - started)}")
        out[name] = folder
    return out


def images(folder: Path, prompts: list[str], seed_set: int, steps: int, cfg: float) -> np.ndarray:
    """uint8 [classes x PER_CALL, H, W, 3]: prompt c with seeds 1000 s + 100 c + 0..PER_CALL-1."""
    with Generator.load(folder, device="cpu") as g:
        return np.concatenate([np.stack([im.rgb for im in g.generate(
            prompt, steps=steps, cfg=cfg, seed=1000 * seed_set + 100 * c, batch=PER_CALL)])
            for c, prompt in enumerate(prompts)])


def grid(drawn: dict, scale: int = 2):
    """PIL image: one row per folder (its name on the left), the first seed of each class of seed set 0."""
    from PIL import Image, ImageDraw

    side, margin = 64 * scale, 210
    picture = Image.new("RGB", (margin + 10 * side, len(drawn) * side), "white")
    draw = ImageDraw.Draw(picture)
    for row, (name, sets) in enumerate(drawn.items()):
        draw.text((4, row * side + side // 2 - 6), name, fill="black")
        for c in range(10):
            tile = Image.fromarray(sets[0][c * PER_CALL]).resize((side, side), Image.NEAREST)
            picture.paste(tile, (margin + c * side, row * side))
    return picture


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=2, help="seed sets (default 2)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--workdir", default=str(REPO / "build" / "lora_refit_quality"))
    args = p.parse_args()
    if not LORA.is_file():
        raise SystemExit(f"{LORA} not found: train it with python tools/train_tiny_lora.py")
    import train_tiny_default as T

    started = time.perf_counter()
    made = folders(Path(args.workdir))
    prompts = [options[0] for options in T.class_prompts()]
    drawn = {name: [] for name in made}
    for s in range(args.seeds):
        for name, folder in made.items():
            drawn[name].append(images(folder, prompts, s, args.steps, args.cfg))
            log(f"seed set {s + 1}/{args.seeds}: {name} drawn")
    rows = {}
    for name in made:
        if name.startswith("FP16"):
            continue
        reference = "FP16" if name.endswith("no LoRA") else "FP16 + LoRA"
        per_set = [(float(quality_report.psnr(a, b).mean()), float(quality_report.ssim(a, b).mean()))
                   for a, b in zip(drawn[name], drawn[reference])]
        rows[name] = {"against": reference, "psnr": quality_report.spread([x for x, _ in per_set]),
                      "ssim": quality_report.spread([y for _, y in per_set])}
    lora_moves = [float(quality_report.psnr(a, b).mean()) for a, b in zip(drawn["FP16 + LoRA"], drawn["FP16"])]
    result = {"date": date.today().isoformat(), "machine": platform.node(),
              "processor": platform.processor() or platform.machine(), "model": str(MODEL), "lora": str(LORA),
              "images_per_seed_set": len(prompts) * PER_CALL, "seed_sets": args.seeds, "steps": args.steps,
              "cfg": args.cfg, "fp16_lora_vs_fp16_psnr": quality_report.spread(lora_moves), "rows": rows,
              "seconds": round(time.perf_counter() - started, 1)}
    JSON_OUT.write_text(json.dumps(result, indent=2) + "\n")
    grid(drawn).save(GRID_OUT)
    print(f"trained default + trained LoRA 'inverted'; {len(prompts) * PER_CALL} images x {args.seeds} seed sets, "
          f"{args.steps} Euler steps, CFG {args.cfg:g}; the LoRA moves FP16's images to "
          f"{result['fp16_lora_vs_fp16_psnr']['mean']:.2f} dB PSNR")
    print(f"{'method':<36} {'against':<12} {'PSNR dB':>16} {'SSIM':>18}")
    for name, r in rows.items():
        print(f"{name:<36} {r['against']:<12} {r['psnr']['mean']:>8.2f} ± {r['psnr']['std']:.2f} "
              f"{r['ssim']['mean']:>9.4f} ± {r['ssim']['std']:.4f}")
    print(f"wrote {JSON_OUT} ({format_seconds(result['seconds'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
