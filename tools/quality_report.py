"""8-bit image quality, measured on trained models: FP16 against plain max calibration, NVIDIA's
recipe (ModelOpt's, `nvidia_modelopt` / `nvidia_modelopt_fp8`) and ours (the tuned `int8` / `fp8`).

For the trained default (weights/tiny-sdxl) and its outlier twin (tools/outlier_twin.py: SDXL-like
activation outlier channels, same function), each method's networks are run by netexec exactly as
the engines would be built (same Q/DQ, same calibration table, calibrated and tuned with the build's
defaults), and its images are compared with the FP16 network's images of the same prompts and seeds
— the protocol SVDQuant uses on real SDXL (PSNR / LPIPS against the FP16 model's own images):

- PSNR (dB) and SSIM (Gaussian window 11, sigma 1.5, on the gray image) against FP16;
- classifier agreement: the share of images a Fashion-MNIST classifier (trained on real images,
  tools/train_tiny_default.py's) puts in the same class as the FP16 image;
- a Frechet distance in that classifier's feature space (its last convolution, pooled) against
  the real test images (lower is better; FP16's own is the floor).

Each of `--seeds` seed sets draws `--images` images (the 10 classes' prompts in turn); figures are
mean ± spread (standard deviation) over the seed sets. Writes tools/quality_report.json, a picture
grid docs/quality_grid.png, and prints the table. Needs the test extras (torch, for the
classifier) and Fashion-MNIST (Debian's dataset-fashion-mnist).

    python tools/quality_report.py [--images 200] [--seeds 3] [--steps 10] [--cfg 2.0] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import numpy as np  # noqa: E402

from trt_sdxl import denoising, kernels, schedulers, weights  # noqa: E402
from trt_sdxl.calibration import workflow  # noqa: E402
from trt_sdxl.executors import NetexecExecutor  # noqa: E402
from trt_sdxl.log import format_seconds, logger  # noqa: E402
from trt_sdxl.models import unet, vae  # noqa: E402
from trt_sdxl.pipeline import ModelSettings, Pipeline  # noqa: E402
from trt_sdxl.quant.percentile import AmaxRule  # noqa: E402
from trt_sdxl.quant.table import CalibrationTable  # noqa: E402

MODEL = REPO / "weights" / "tiny-sdxl"
JSON_OUT = REPO / "tools" / "quality_report.json"
GRID_OUT = REPO / "docs" / "quality_grid.png"
# method -> (recipe, quant options: None = the table's choices, "plain" = max calibration, no smoothing)
METHODS = {
    "FP16": (None, None),
    "INT8 plain max": ("int8", "plain"),
    "INT8 nvidia_modelopt": ("nvidia_modelopt", None),
    "INT8 ours": ("int8", None),
    "INT8 ours, level 3": ("int8_level3", None),
    "FP8 plain max": ("fp8", "plain"),
    "FP8 nvidia_modelopt": ("nvidia_modelopt_fp8", None),
    "FP8 ours": ("fp8", None),
}
BATCH = 25  # images per UNet call (CFG batch 50)
log = logger("quality_report")


# ---------------------------------------------------------------- metrics


def psnr(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Per image, in dB, of uint8 [N, H, W, 3] images against references."""
    mse = np.mean((images.astype(np.float64) - references.astype(np.float64)) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return np.minimum(10 * np.log10(255.0**2 / mse), 100.0)  # identical images count as 100 dB


def _gaussian_filter(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian blur of [N, H, W] (valid region only, as SSIM's reference code)."""
    t = np.arange(-radius, radius + 1)
    g = np.exp(-t**2 / (2 * sigma**2))
    g /= g.sum()
    x = np.apply_along_axis(lambda r: np.convolve(r, g, mode="valid"), 2, x)
    return np.apply_along_axis(lambda c: np.convolve(c, g, mode="valid"), 1, x)


def ssim(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Per image SSIM (Wang et al. 2004: K1 0.01, K2 0.03, Gaussian window 11, sigma 1.5) of the gray images."""
    a = images.astype(np.float64).mean(axis=-1)  # [N, H, W]
    b = references.astype(np.float64).mean(axis=-1)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    var_a = _gaussian_filter(a * a) - mu_a**2
    var_b = _gaussian_filter(b * b) - mu_b**2
    cov = _gaussian_filter(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(axis=(1, 2))


def frechet(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of two feature sets [N, D]."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    ca, cb = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ cb @ root_a)  # the eigenvalues of C_a C_b, through a symmetric form
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * np.sum(np.sqrt(np.clip(cross, 0, None))))


# ---------------------------------------------------------------- images


def evaluation_prompts(images: int) -> tuple[list[str], list[int]]:
    """`images` prompts cycling over the 10 classes (and each class's phrasings); their class ids."""
    import train_tiny_default as T

    options = T.class_prompts()
    prompts, labels = [], []
    for i in range(images):
        c = i % 10
        prompts.append(options[c][(i // 10) % len(options[c])])
        labels.append(c)
    return prompts, labels


def calibrated_table(model: Path, workdir: Path, steps: int) -> Path:
    """One calibration of the model (the build's defaults but `steps`), tuned for every method's recipe."""
    component = weights.open_component(model, "unet")
    side = 8 * int(component.config.get("sample_size", 8))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "calibration.npz"
    table = True if path.is_file() else None  # a table left by an earlier run is reused (recipes it has are done)
    for recipe in ("int8", "int8_level3", "fp8", "nvidia_modelopt", "nvidia_modelopt_fp8"):
        table = workflow.calibrate_and_tune(model, component, recipe, height=side, width=side, steps=steps,
                                            calibration=str(path) if table is not None else None,
                                            log=lambda m: log(f"{model.name}: {m}"))
        table.save(path)
    return path


def method_images(model: Path, table_path: Path, method: str, prompts: list[str], seeds: int, steps: int,
                  cfg: float) -> np.ndarray:
    """uint8 [seeds, images, H, W, 3]: seed set s draws image i from seed 1000 s + i."""
    from trt_sdxl.tokenizer import open_tokenizer

    recipe, options = METHODS[method]
    component = weights.open_component(model, "unet")
    latent = int(component.config.get("sample_size", 8))
    table = CalibrationTable.load(table_path)
    quant = {}
    if recipe is not None:
        quant = {"precision": recipe, "calibration": table}
        if options == "plain":
            quant["quant_options"] = {"rule": AmaxRule("max"), "alphas": {}}
    make = workflow.netexec_factory(model, 1, latent, latent)
    unet_exec = NetexecExecutor(unet.define(model, batch=2 * BATCH, latent_height=latent, latent_width=latent, **quant))
    decoder = NetexecExecutor(vae.define(model, batch=BATCH, latent_height=latent, latent_width=latent))
    settings = ModelSettings.read(model)
    pipe = Pipeline(make("text_encoder"), make("text_encoder_2"), unet_exec, decoder,
                    open_tokenizer(model, 1), open_tokenizer(model, 2), scaling_factor=settings.scaling_factor)
    out = np.zeros((seeds, len(prompts), 8 * latent, 8 * latent, 3), np.uint8)
    started = time.perf_counter()
    for s in range(seeds):
        for first in range(0, len(prompts), BATCH):
            chunk = prompts[first:first + BATCH]
            cond = pipe.encode_prompt(chunk, None, 8 * latent, 8 * latent)
            sched = schedulers.create("euler", steps, settings.scheduler_config)
            latents = denoising.trajectory(unet_exec, cond, sched, cfg, 1000 * s + first, (len(chunk), 4, latent, latent))
            out[s, first:first + len(chunk)] = kernels.image_to_rgb8(pipe.decode(latents))
            done = s * len(prompts) + first + len(chunk)
            left = (time.perf_counter() - started) / done * (seeds * len(prompts) - done)
            log(f"{model.name}: {method}: {done}/{seeds * len(prompts)} images, about {format_seconds(left)} left")
    return out


def _method_job(args) -> tuple[str, str, np.ndarray]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    model, table_path, method, prompts, seeds, steps, cfg = args
    return str(model), method, method_images(Path(model), Path(table_path), method, prompts, seeds, steps, cfg)


# ---------------------------------------------------------------- report


def classifier_and_real():
    """The Fashion-MNIST classifier (trained as tools/train_tiny_default.py trains it), a feature
    function, and the real test images' features."""
    import torch

    import train_tiny_default as T

    torch.manual_seed(0)
    s = T.Settings()
    train_images, train_labels = T.fashion_mnist("train")
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(s.seed + 4))[:s.classifier_images]
    model, _ = T.train_classifier(train_images[pick], train_labels[pick], s)
    test_images, _ = T.fashion_mnist("test")
    real = T.to_pixels(T.upscale(test_images, torch.full((len(test_images),), T.IMAGE_SIDE)), channels=1)

    @torch.no_grad()
    def gray(rgb: np.ndarray):
        return torch.from_numpy(rgb.astype(np.float32).mean(-1) / 127.5 - 1).unsqueeze(1)  # [N, 1, H, W]

    @torch.no_grad()
    def features(pixels) -> np.ndarray:
        return torch.cat([model[:6](pixels[i:i + 500]).mean((2, 3)) for i in range(0, len(pixels), 500)]).numpy()

    def classify(rgb: np.ndarray) -> np.ndarray:
        return T.predict(model, gray(rgb)).numpy()

    return classify, lambda rgb: features(gray(rgb)), features(real)


def spread(values) -> dict:
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "per_seed": [float(v) for v in values]}


def grid(results: dict, models: dict[str, str], columns: int = 10, scale: int = 2):
    """PIL image: per model a block of rows (one per method, labelled), the first `columns` images of
    seed set 0, each `scale`x enlarged (Pillow for the labels)."""
    from PIL import Image, ImageDraw

    side = next(iter(next(iter(results.values())).values())).shape[2] * scale
    margin, gap = 200, 12
    rows = len(models) * len(METHODS)
    picture = Image.new("RGB", (margin + columns * side, rows * side + (len(models) - 1) * gap), "white")
    draw = ImageDraw.Draw(picture)
    y = 0
    for model, label in models.items():
        for method in METHODS:
            draw.text((4, y + side // 2 - 6), f"{label}: {method}", fill="black")
            for col in range(columns):
                tile = Image.fromarray(results[model][method][0, col]).resize((side, side), Image.NEAREST)
                picture.paste(tile, (margin + col * side, y))
            y += side
        y += gap
    return picture


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--images", type=int, default=200, help="images per seed set (default 200)")
    p.add_argument("--seeds", type=int, default=3, help="seed sets (default 3)")
    p.add_argument("--steps", type=int, default=10,
                   help="Euler steps (default 10, as the build's tuning runs; 3 x 200 images x 7 methods x 2 "
                        "models take about 30 min on 2 cores)")
    p.add_argument("--cfg", type=float, default=2.0,
                   help="guidance scale (default 2.0: at 5 the classifier agrees on nearly every image)")
    p.add_argument("--calibration-steps", type=int, default=20, help="as the build's (default 20)")
    p.add_argument("--jobs", type=int, default=2, help="processes (default 2)")
    p.add_argument("--workdir", default=None, help="where the twin and the tables go (default: a new temporary "
                   "folder); tables found there are reused")
    p.add_argument("--json", default=str(JSON_OUT))
    p.add_argument("--grid", default=str(GRID_OUT))
    args = p.parse_args(argv)
    from outlier_twin import make_outlier_twin

    started = time.perf_counter()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="quality_report."))
    model = Path(args.model).resolve()
    twin = make_outlier_twin(model, work / f"{model.name}-outlier-twin")
    models = [model, twin]
    prompts, labels = evaluation_prompts(args.images)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        tables = dict(zip(models, pool.map(calibrated_table, models, [work / "default", work / "twin"],
                                           [args.calibration_steps] * 2)))
        jobs = [(str(m), str(tables[m]), method, prompts, args.seeds, args.steps, args.cfg)
                for m in models for method in METHODS]
        results: dict[str, dict[str, np.ndarray]] = {}
        for m, method, images in pool.map(_method_job, jobs):
            results.setdefault(m, {})[method] = images
    classify, features, real_features = classifier_and_real()
    report = {"settings": {"images": args.images, "seeds": args.seeds, "steps": args.steps, "cfg": args.cfg,
                           "scheduler": "euler", "model": str(model.relative_to(REPO)) if model.is_relative_to(REPO)
                           else str(model), "calibration": "the build's defaults"}, "models": {}}
    for m in models:
        name = "trained default" if m == model else "outlier twin"
        fp16 = results[str(m)]["FP16"]
        rows = {}
        for method in METHODS:
            images = results[str(m)][method]
            per_seed = {"psnr": [], "ssim": [], "agreement": [], "frechet": []}
            for s in range(args.seeds):
                per_seed["psnr"].append(psnr(images[s], fp16[s]).mean())
                per_seed["ssim"].append(ssim(images[s], fp16[s]).mean())
                per_seed["agreement"].append(np.mean(classify(images[s]) == classify(fp16[s])))
                per_seed["frechet"].append(frechet(features(images[s]), real_features))
            rows[method] = {k: spread(v) for k, v in per_seed.items()}
            rows[method]["accuracy_vs_prompt"] = float(np.mean([np.mean(classify(images[s]) == np.array(labels))
                                                                 for s in range(args.seeds)]))
        tables_meta = CalibrationTable.load(tables[m]).meta["tuned"]
        report["models"][name] = {"methods": rows, "chosen": {r: {"rule": tables_meta[r]["rule"],
                                                                  "smoothing": tables_meta[r]["report"].get("smoothing")}
                                                              for r in ("int8", "fp8")}}
    report["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
    grid(results, {str(model): "default", str(twin): "outlier twin"}).save(args.grid)
    print(f"\n{'model':<16} {'method':<22} {'PSNR dB':>14} {'SSIM':>14} {'agree %':>12} {'Frechet':>14}")
    for name, entry in report["models"].items():
        for method, r in entry["methods"].items():
            print(f"{name:<16} {method:<22} {r['psnr']['mean']:7.2f} ± {r['psnr']['std']:4.2f} "
                  f"{r['ssim']['mean']:7.4f} ± {r['ssim']['std']:5.4f} {100 * r['agreement']['mean']:6.1f} ± "
                  f"{100 * r['agreement']['std']:3.1f} {r['frechet']['mean']:8.3f} ± {r['frechet']['std']:5.3f}")
    print(f"\n{args.seeds} seed sets x {args.images} images, {args.steps} Euler steps, CFG {args.cfg}; "
          f"{format_seconds(report['seconds'])}; {args.json}, {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
