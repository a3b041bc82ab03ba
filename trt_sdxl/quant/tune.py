"""The tuning pipeline: choose SmoothQuant's alpha per layer group and the amax rule globally.

1. alpha, per group of quantized linear layers reading one tensor: the grid value (or no
   smoothing) minimizing the group's quantized output error on the calibration rows.
2. the amax rule (method, p, combine): the candidate minimizing the error of whole denoising
   trajectories of held-aside prompts against the FP16 network's, with the alphas of step 1.
Both print what they chose and what it bought; the choices go into the CalibrationTable.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

from .. import schedulers
from ..pipeline import Conditioning, Pipeline
from .calibrate import initial_latents, step_noise
from .percentile import AmaxRule
from .plan import QuantPlan
from .recipe import check_recipe
from .smoothquant import search_alpha
from .table import CalibrationTable

RULE_CANDIDATES = (
    AmaxRule("max"),
    AmaxRule("reference", 1.0, "mean"),
    AmaxRule("reference", 0.7, "mean"),
    AmaxRule("reference", 0.4, "mean"),
    AmaxRule("reference", 1.0, "max"),
    AmaxRule("quantile", 0.5, "mean"),
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
    sched = schedulers.create(scheduler, steps)
    shape = (1,) + tuple(latent_shape)
    latents = initial_latents(seed, shape) * np.float32(sched.init_noise_sigma)
    loop = Pipeline(None, None, unet_executor, None, None, None)
    return loop.denoise(cond, latents, sched, cfg, noise=step_noise(seed, shape))


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
         candidates=RULE_CANDIDATES, log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
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
    rule_errors = {}
    for rule in candidates:
        executor = quantized_executor({"rule": rule, "alphas": alphas})
        rule_errors[rule.describe()] = (rule, trajectory_error(executor, references, conds, seeds, **run))
        log(f"tune {recipe}: amax {rule.describe():<32} trajectory error {rule_errors[rule.describe()][1]:.4e}")
    best_name = min(rule_errors, key=lambda k: rule_errors[k][1])
    best_rule, best_error = rule_errors[best_name]
    max_error = rule_errors[AmaxRule("max").describe()][1] if AmaxRule("max").describe() in rule_errors else None
    log(f"tune {recipe}: chose amax {best_name} (trajectory error {best_error:.4e}"
        + (f", {max_error / best_error:.2f}x better than plain max)" if max_error else ")"))
    report = {
        "alphas": alpha_report,
        "rules": {k: v[1] for k, v in rule_errors.items()},
        "chosen_rule": best_name,
        "trajectory_error": best_error,
        "heldout_prompts": len(heldout),
    }
    table.set_choices(recipe, best_rule, alphas, report)
    return report
