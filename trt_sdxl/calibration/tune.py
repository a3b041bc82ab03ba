"""The tuning pipeline: SmoothQuant's alpha per layer group, and the amax rule per layer kind.

1. alpha, per group of quantized linear layers reading one tensor: the grid value (or no
   smoothing) minimizing the group's quantized output error on the calibration rows (cheap:
   per layer, on collected samples).
2. then, judged in image space: whole denoising runs of held-aside prompts, each with several
   seeds, decoded by the VAE and compared with the FP16 network's images of the same seeds (mean
   PSNR). A coordinate search over: smoothing (the searched alphas, none, or alpha 0.8 everywhere
   as NVIDIA's recipe uses), the conv inputs' amax rule, the linear inputs' rule and, where the
   recipe quantizes them, the attention BMM inputs' rule. Plain max calibration without smoothing,
   and NVIDIA's own parameters (ModelOpt's percentile calibrator on convolutions, max and alpha 0.8
   on linear layers), are candidates too, so the choice is never worse than either on the
   held-aside images. Every candidate's score goes into the table's report.

Measured on trained models only (random-weight models rank these methods wrongly).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import denoising, schedulers
from ..denoising import Conditioning
from ..log import Log, format_seconds, silent
from ..quant.percentile import AmaxRule, RuleSet
from ..quant.plan import QuantPlan
from ..quant.recipe import check_recipe
from ..quant.smoothquant import search_alpha
from ..quant.table import CalibrationTable

MAX = AmaxRule("max")
MODELOPT_CONV = AmaxRule("modelopt", 1.0, "min-mean", 2)  # ModelOpt's SDXL INT8 setting
CANDIDATE_RULES = {
    "conv": (MAX, AmaxRule("leading_min", 1.0, "mean"), AmaxRule("leading_min", 0.5, "mean"),
             AmaxRule("quantile", 0.9, "max"), MODELOPT_CONV),
    "linear": (MAX, AmaxRule("leading_min", 1.0, "mean"), AmaxRule("quantile", 0.9, "max")),
    "attention": (MAX, AmaxRule("leading_min", 1.0, "mean")),
}
NVIDIA_ALPHA = 0.8
SEEDS_PER_PROMPT = 2
PSNR_PEAK = 2.0  # images in [-1, 1]


def tune_alphas(table: CalibrationTable, recipe: str, weights) -> tuple[dict, dict]:
    """{group: alpha or None} and {group: {"none": error, "chosen": error, "alpha": alpha}}."""
    fmt = check_recipe(recipe)["format"]
    plan = QuantPlan(recipe, table, weights, rule=MAX, alphas={})
    alphas, report = {}, {}
    for group, members in plan.groups().items():
        rows = table.rows.get(members[0])
        if rows is None:
            alphas[group] = None
            continue
        alpha, errors = search_alpha(rows.astype(np.float64), plan.group_weights(weights, members),
                                     table.channel_max(members[0]), fmt)
        alphas[group] = alpha
        report[group] = {"alpha": alpha, "none": errors["none"], "chosen": errors["none" if alpha is None else alpha]}
    return alphas, report


def psnr(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of [B, 3, H, W] images in [-1, 1] against references (inf where equal)."""
    mse = np.mean((images.astype(np.float64) - references.astype(np.float64)) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(PSNR_PEAK**2 / mse)


@dataclass
class HeldAside:
    """The held-aside prompts x seeds as one batch: conditioning, seed of image 0, FP16 references."""

    cond: Conditioning
    seed: int
    latent_shape: tuple[int, ...]
    reference_latents: np.ndarray
    reference_images: np.ndarray


def tune(table: CalibrationTable, recipe: str, weights, quantized_executor: Callable[[dict], object],
         fp16_executor, encode: Callable[[list[str]], Conditioning], decode: Callable[[np.ndarray], np.ndarray],
         heldout: list[str], *, scheduler: str, steps: int, cfg: float, seed: int, latent_shape: tuple[int, ...],
         seeds_per_prompt: int = SEEDS_PER_PROMPT, log: Log = silent) -> dict:
    """Tune `recipe` on `table` (in place: `table.set_choices`); returns the report.

    `quantized_executor(options)` and `fp16_executor` run the UNet at the CFG batch of
    len(heldout) x seeds_per_prompt images; `decode(latents)` gives images in [-1, 1].
    """
    fmt_has_bmm = check_recipe(recipe)["attention_bmm"]
    alphas, alpha_report = tune_alphas(table, recipe, weights)
    if alpha_report:
        none = np.mean([r["none"] for r in alpha_report.values()])
        chosen = np.mean([r["chosen"] for r in alpha_report.values()])
        smoothed = sum(r["alpha"] is not None for r in alpha_report.values())
        log(f"tune {recipe}: SmoothQuant on {smoothed}/{len(alpha_report)} layer groups; mean layer error "
            f"{none:.3e} -> {chosen:.3e} ({none / max(chosen, 1e-30):.2f}x)")
    prompts = [p for _ in range(seeds_per_prompt) for p in heldout]  # image i: prompt i % K, seed + i
    shape = (len(prompts), *latent_shape)
    cond = encode(prompts)
    base_seed = seed + 10_000
    sched = lambda: schedulers.create(scheduler, steps)  # noqa: E731 (a fresh scheduler per run)
    ref_latents = denoising.trajectory(fp16_executor, cond, sched(), cfg, base_seed, shape)
    held = HeldAside(cond, base_seed, shape, ref_latents, decode(ref_latents))
    settings = {"searched": alphas, "none": {g: None for g in alphas}, "alpha 0.8": {g: NVIDIA_ALPHA for g in alphas}}
    scores: dict[tuple[str, str], dict] = {}
    kinds = ("conv", "linear", "attention") if fmt_has_bmm else ("conv", "linear")
    candidates_smoothing = [s for s in settings if alphas] or ["none"]
    planned = len(candidates_smoothing) + sum(len(CANDIDATE_RULES[k]) - 1 for k in kinds) + bool(alphas)
    started = time.perf_counter()

    def evaluate(rules: RuleSet, setting: str) -> float:
        key = (rules.describe(), setting)
        if key not in scores:
            executor = quantized_executor({"rule": rules, "alphas": settings[setting]})
            try:
                latents = denoising.trajectory(executor, held.cond, sched(), cfg, held.seed, held.latent_shape)
            finally:
                executor.free()  # a GPU candidate holds device and pinned buffers
            image_psnr = psnr(decode(latents), held.reference_images)
            latent_error = float(np.linalg.norm(latents - held.reference_latents)
                                 / np.linalg.norm(held.reference_latents))
            finite = image_psnr[np.isfinite(image_psnr)]
            scores[key] = {"rules": rules, "setting": setting, "psnr": float(finite.mean()) if finite.size else 99.0,
                           "psnr_min": float(finite.min()) if finite.size else 99.0, "latent_error": latent_error}
            left = (time.perf_counter() - started) / len(scores) * max(0, planned - len(scores))
            log(f"tune {recipe}: [{len(scores)}/{planned}] {setting:<9} amax {rules.describe():<60} PSNR "
                f"{scores[key]['psnr']:6.2f} dB (worst image {scores[key]['psnr_min']:5.2f}), latent error "
                f"{latent_error:.4f}; about {format_seconds(left)} left")
        return scores[key]["psnr"]

    plain = RuleSet.uniform(MAX)
    best_setting = max(candidates_smoothing, key=lambda s: evaluate(plain, s))
    best = plain
    for kind in kinds:
        options = [RuleSet(**{**{k: best.for_kind(k) for k in ("conv", "linear", "attention")}, kind: rule})
                   for rule in CANDIDATE_RULES[kind]]
        best = max(options, key=lambda rules: evaluate(rules, best_setting))
    if alphas:  # NVIDIA's own parameters on this recipe's layers, as a candidate
        evaluate(RuleSet(conv=MODELOPT_CONV, linear=MAX, attention=MAX), "alpha 0.8")
    chosen = max(scores.values(), key=lambda s: s["psnr"])
    baseline = scores[(plain.describe(), "none")] if (plain.describe(), "none") in scores else None
    log(f"tune {recipe}: chose {chosen['setting']} smoothing, amax {chosen['rules'].describe()} (PSNR "
        f"{chosen['psnr']:.2f} dB vs FP16"
        + (f"; plain max calibration without smoothing {baseline['psnr']:.2f} dB" if baseline else "") + ")")
    report = {
        "alphas": alpha_report,
        "candidates": [{"smoothing": s["setting"], "amax_rule": s["rules"].to_json(),
                        "describe": s["rules"].describe(), "psnr": s["psnr"], "psnr_min": s["psnr_min"],
                        "latent_error": s["latent_error"]} for s in scores.values()],
        "chosen_rule": chosen["rules"].describe(),
        "smoothing": chosen["setting"],
        "psnr": chosen["psnr"],
        "trajectory_error": chosen["latent_error"],
        "heldout_prompts": len(heldout),
        "seeds_per_prompt": seeds_per_prompt,
        "steps": steps,
    }
    table.set_choices(recipe, chosen["rules"], settings[chosen["setting"]], report)
    return report
