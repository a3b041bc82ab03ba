"""The tuning pipeline: choose SmoothQuant's alpha per layer group and the amax rule globally.

1. alpha, per group of quantized linear layers reading one tensor: the grid value (or no
   smoothing) minimizing the group's quantized output error on the calibration rows.
2. the amax rule (method, p, combine), and whether to keep step 1's smoothing at all: the
   candidate minimizing the error of whole denoising trajectories of held-aside prompts
   against the FP16 network's.
Both print what they chose and what it bought; the choices go into the CalibrationTable.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .. import denoising, schedulers
from ..denoising import Conditioning
from ..log import Log, silent
from ..quant.percentile import AmaxRule
from ..quant.plan import QuantPlan
from ..quant.recipe import check_recipe
from ..quant.smoothquant import search_alpha
from ..quant.table import CalibrationTable

RULE_CANDIDATES = (
    AmaxRule("max"),
    AmaxRule("reference", 1.0, "mean"),
    AmaxRule("reference", 0.7, "mean"),
    AmaxRule("reference", 0.4, "mean"),
    AmaxRule("reference", 1.0, "max"),
    AmaxRule("quantile", 0.75, "mean"),
    AmaxRule("quantile", 0.9, "max"),
)


def tune_alphas(table: CalibrationTable, recipe: str, weights) -> tuple[dict, dict]:
    """{group: alpha or None} and {group: {"none": error, "chosen": error, "alpha": alpha}}."""
    fmt = check_recipe(recipe)["format"]
    plan = QuantPlan(recipe, table, weights, rule=AmaxRule(), alphas={})
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


def trajectory(unet_executor, cond: Conditioning, *, scheduler: str, steps: int, cfg: float, seed: int,
               latent_shape: tuple[int, ...]) -> np.ndarray:
    """Final latents of one prompt's denoising (batch 1, CFG batch 2), reproducible from the seed."""
    return denoising.trajectory(unet_executor, cond, schedulers.create(scheduler, steps), cfg, seed,
                                (1, *latent_shape))


def trajectory_error(executor, references: list[np.ndarray], conds: list[Conditioning], seeds: list[int],
                     **run) -> float:
    """Relative L2 of final latents against the references, over all held-aside prompts."""
    num = den = 0.0
    for ref, cond, seed in zip(references, conds, seeds):
        out = trajectory(executor, cond, seed=seed, **run)
        num += float(np.sum((out - ref) ** 2))
        den += float(np.sum(ref**2))
    return float(np.sqrt(num / den))


def tune(table: CalibrationTable, recipe: str, weights, quantized_executor: Callable[[dict], object],
         fp16_executor, encode: Callable[[list[str]], Conditioning], heldout: list[str], *, scheduler: str,
         steps: int, cfg: float, seed: int, latent_shape: tuple[int, ...],
         candidates=RULE_CANDIDATES, log: Log = silent) -> dict:
    """Tune `recipe` on `table` (in place: `table.set_choices`); returns the report."""
    alphas, alpha_report = tune_alphas(table, recipe, weights)
    smoothed = {g: r for g, r in alpha_report.items() if r["alpha"] is not None}
    if alpha_report:
        gain = np.mean([r["none"] for r in alpha_report.values()]) / max(
            np.mean([r["chosen"] for r in alpha_report.values()]), 1e-30)
        log(f"tune {recipe}: SmoothQuant on {len(smoothed)}/{len(alpha_report)} layer groups; mean layer error "
            f"{np.mean([r['none'] for r in alpha_report.values()]):.3e} -> "
            f"{np.mean([r['chosen'] for r in alpha_report.values()]):.3e} ({gain:.2f}x)")
    run = dict(scheduler=scheduler, steps=steps, cfg=cfg, latent_shape=latent_shape)
    seeds = [seed + 10_000 + i for i in range(len(heldout))]
    conds = [encode([p]) for p in heldout]
    references = [trajectory(fp16_executor, c, seed=s, **run) for c, s in zip(conds, seeds)]
    # Smoothing is kept only where whole trajectories say so: a lower per-layer error does not
    # always survive the denoising loop (FP8's floating exponent already absorbs most outliers).
    # Stage A decides smoothing under plain max calibration, stage B the amax rule under that choice.
    settings = {"smoothed": alphas, "unsmoothed": {g: None for g in alphas}} if smoothed else {"unsmoothed": alphas}
    errors: dict[tuple[str, str], tuple[AmaxRule, float]] = {}

    def evaluate(rule: AmaxRule, setting: str) -> float:
        key = (rule.describe(), setting)
        if key not in errors:
            executor = quantized_executor({"rule": rule, "alphas": settings[setting]})
            try:
                errors[key] = (rule, trajectory_error(executor, references, conds, seeds, **run))
            finally:
                executor.free()  # a GPU candidate holds device and pinned buffers
            log(f"tune {recipe}: amax {rule.describe():<34} {setting:<10} trajectory error {errors[key][1]:.4e}")
        return errors[key][1]

    best_setting = min(settings, key=lambda setting: evaluate(AmaxRule("max"), setting))
    for rule in candidates:
        evaluate(rule, best_setting)
    (best_name, _), (best_rule, best_error) = min(((k, v) for k, v in errors.items() if k[1] == best_setting),
                                                  key=lambda kv: kv[1][1])
    plain = errors[(AmaxRule("max").describe(), "unsmoothed")]
    log(f"tune {recipe}: chose amax {best_name}, {best_setting} (trajectory error {best_error:.4e}; "
        f"plain max calibration without smoothing {plain[1]:.4e}, {plain[1] / best_error:.2f}x)")
    alphas = settings[best_setting]
    report = {
        "alphas": alpha_report,
        "trajectory_errors": {f"{k[0]} | {k[1]}": v[1] for k, v in errors.items()},
        "chosen_rule": best_name,
        "smoothing": best_setting,
        "trajectory_error": best_error,
        "heldout_prompts": len(heldout),
    }
    table.set_choices(recipe, best_rule, alphas, report)
    return report
