"""The tuning pipeline: SmoothQuant's alpha per layer group, and the amax rule per layer kind.

1. alpha, per group of quantized linear layers reading one tensor: the grid value (or no
   smoothing) minimizing the group's quantized output error on the calibration rows (cheap:
   per layer, on collected samples).
2. then the amax rules and the smoothing setting (the searched alphas, none, or alpha 0.8
   everywhere as NVIDIA's recipe uses), judged one of two ways, by what a network costs to make:

   - in image space (`tune`), where networks are cheap (netexec on the CPU): whole denoising runs
     of held-aside prompts, each with several seeds, decoded by the VAE and compared with the FP16
     network's images of the same seeds (mean PSNR). A coordinate search over: smoothing, the conv
     inputs' amax rule, the linear inputs' rule and, where the recipe quantizes them, the attention
     BMM inputs' rule. Plain max calibration without smoothing, and NVIDIA's own parameters
     (ModelOpt's percentile calibrator on convolutions, max and alpha 0.8 on linear layers), are
     candidates too, so the choice is never worse than either on the held-aside images.
   - per layer (`tune_layers`), where every candidate network would be a multi-minute engine build
     (a GPU): each quantized layer's output error on the rows calibration sampled from its input,
     MAC-weighted (`LayerErrors`), for every candidate at once — the same candidates and more (every
     smoothing x rule combination), no network built. Only the chosen recipe's network is built
     then; the workflow scores its held-aside images against FP16 for the report.

   Every candidate's score goes into the table's report.

Measured on trained models only (random-weight models rank these methods wrongly).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import denoising, schedulers
from ..denoising import Conditioning
from ..log import Log, format_seconds, silent
from ..reference import fake_quant
from ..quant.percentile import AmaxRule, RuleSet
from ..quant.plan import QuantPlan
from ..quant.recipe import QMAX, check_recipe, layer_kind
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


def kinds_of(recipe: str) -> tuple[str, ...]:
    """The layer kinds whose amax rule is tuned: the conv inputs where the recipe quantizes convolutions
    (fp8_gemm does not), the linear inputs, and the attention BMM inputs where it quantizes them."""
    spec = check_recipe(recipe)
    convs = any("conv" in pattern for pattern in spec["layers"])
    return (("conv",) if convs else ()) + ("linear",) + (("attention",) if spec["attention_bmm"] else ())


def smoothing_settings(alphas: dict) -> dict[str, dict]:
    """The smoothing candidates over the groups of `alphas` (the searched ones): setting -> alphas."""
    return {"searched": alphas, "none": {g: None for g in alphas}, "alpha 0.8": {g: NVIDIA_ALPHA for g in alphas}}


def image_space_candidates(recipe: str, has_groups: bool = True) -> int:
    """How many candidate networks `tune` runs at most (a candidate met twice runs once)."""
    smoothing = len(smoothing_settings({})) if has_groups else 1
    return smoothing + sum(len(CANDIDATE_RULES[k]) - 1 for k in kinds_of(recipe)) + has_groups


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


def log_alphas(recipe: str, alpha_report: dict, log: Log) -> None:
    if alpha_report:
        none = np.mean([r["none"] for r in alpha_report.values()])
        chosen = np.mean([r["chosen"] for r in alpha_report.values()])
        smoothed = sum(r["alpha"] is not None for r in alpha_report.values())
        log(f"tune {recipe}: SmoothQuant on {smoothed}/{len(alpha_report)} layer groups; mean layer error "
            f"{none:.3e} -> {chosen:.3e} ({none / max(chosen, 1e-30):.2f}x)")


@dataclass
class HeldAside:
    """The held-aside prompts x seeds as one batch: conditioning, seed of image 0, FP16 references."""

    cond: Conditioning
    seed: int
    latent_shape: tuple[int, ...]
    reference_latents: np.ndarray | None = None
    reference_images: np.ndarray | None = None

    @classmethod
    def of(cls, encode: Callable[[list[str]], Conditioning], heldout: list[str], seeds_per_prompt: int, seed: int,
           latent_shape: tuple[int, ...]) -> HeldAside:
        """Image i: prompt i % K of the K held-aside prompts, seed + 10000 + i (references not yet run)."""
        prompts = [p for _ in range(seeds_per_prompt) for p in heldout]
        return cls(encode(prompts), seed + 10_000, (len(prompts), *latent_shape))

    def run(self, executor, scheduler, cfg: float) -> np.ndarray:
        """The final latents of every held-aside image, through the UNet `executor` (at its own batch)."""
        return denoising.trajectory(executor, self.cond, scheduler, cfg, self.seed, self.latent_shape)

    def score(self, latents: np.ndarray, images: np.ndarray) -> dict:
        """PSNR (mean and worst image, finite ones) and latent rel. L2 error against the references."""
        image_psnr = psnr(images, self.reference_images)
        latent_error = float(np.linalg.norm(latents - self.reference_latents) / np.linalg.norm(self.reference_latents))
        finite = image_psnr[np.isfinite(image_psnr)]
        return {"psnr": float(finite.mean()) if finite.size else 99.0,
                "psnr_min": float(finite.min()) if finite.size else 99.0, "latent_error": latent_error}


def tune(table: CalibrationTable, recipe: str, weights, quantized_executor: Callable[[dict], object],
         fp16_executor, encode: Callable[[list[str]], Conditioning], decode: Callable[[np.ndarray], np.ndarray],
         heldout: list[str], *, scheduler: str, steps: int, cfg: float, seed: int, latent_shape: tuple[int, ...],
         seeds_per_prompt: int = SEEDS_PER_PROMPT, log: Log = silent) -> dict:
    """Tune `recipe` on `table` (in place: `table.set_choices`); returns the report.

    `quantized_executor(options)` and `fp16_executor` run the UNet at the CFG batch of
    len(heldout) x seeds_per_prompt images; `decode(latents)` gives images in [-1, 1].
    """
    alphas, alpha_report = tune_alphas(table, recipe, weights)
    log_alphas(recipe, alpha_report, log)
    sched = lambda: schedulers.create(scheduler, steps)  # noqa: E731 (a fresh scheduler per run)
    held = HeldAside.of(encode, heldout, seeds_per_prompt, seed, latent_shape)
    held.reference_latents = held.run(fp16_executor, sched(), cfg)
    held.reference_images = decode(held.reference_latents)
    settings = smoothing_settings(alphas)
    scores: dict[tuple[str, str], dict] = {}
    kinds = kinds_of(recipe)
    candidates_smoothing = [s for s in settings if alphas] or ["none"]
    planned = image_space_candidates(recipe, bool(alphas))
    started = time.perf_counter()

    def evaluate(rules: RuleSet, setting: str) -> float:
        key = (rules.describe(), setting)
        if key not in scores:
            executor = quantized_executor({"rule": rules, "alphas": settings[setting]})
            try:
                latents = held.run(executor, sched(), cfg)
            finally:
                executor.free()  # a GPU candidate holds device and pinned buffers
            scores[key] = {"rules": rules, "setting": setting, **held.score(latents, decode(latents))}
            left = (time.perf_counter() - started) / len(scores) * max(0, planned - len(scores))
            log(f"tune {recipe}: [{len(scores)}/{planned}] {setting:<9} amax {rules.describe():<60} PSNR "
                f"{scores[key]['psnr']:6.2f} dB (worst image {scores[key]['psnr_min']:5.2f}), latent error "
                f"{scores[key]['latent_error']:.4f}; about {format_seconds(left)} left")
        return scores[key]["psnr"]

    plain = RuleSet.uniform(MAX)
    best_setting = max(candidates_smoothing, key=lambda s: evaluate(plain, s))
    best = plain
    for kind in kinds:
        options = [RuleSet(**{**{k: best.for_kind(k) for k in ("conv", "linear", "attention")}, kind: rule})
                   for rule in CANDIDATE_RULES[kind]]
        best = max(options, key=lambda rules: evaluate(rules, best_setting))
    if alphas:  # NVIDIA's own parameters on this recipe's layers, as a candidate
        evaluate(RuleSet(conv=MODELOPT_CONV if "conv" in kinds else MAX, linear=MAX, attention=MAX), "alpha 0.8")
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


# ---------------------------------------------------------------- per layer, where networks are expensive


def noise_to_signal(approx: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """(||approx - exact||^2, ||exact||^2)."""
    diff = approx - exact
    return float(np.sum(diff * diff)), float(np.sum(exact * exact))


class LayerErrors:
    """Each quantized layer's output error on the rows calibration sampled from its input, under every
    candidate (smoothing setting, amax rule) at once, without building a network.

    A conv or linear layer's error is the noise-to-signal power ratio ||Y^ - Y||^2 / ||Y||^2 of its
    output on those rows, Y = X W^T (bias aside; a conv's rows are im2col patches, so Y is its output
    at the patch centres), Y^ = Q(X / s) Q(W s)^T with Q exactly as the network quantizes: the
    activation at the plan's input scale (its smoothing group's largest, from the candidate's amax
    rule), the weight per output channel or per tensor as the recipe says. That is the error
    clipping and rounding put on what the next layer reads — what an amax rule trades, and what
    smoothing changes — measured where it happens. An attention BMM input's error is its own
    quantization NSR (the BMM is linear in each input, so its output's relative error follows), on
    rows made from its projection's sampled input rows: q = x W_q^T / sqrt(head dim), k and v alike.

    `macs`: MACs of each layer per UNet call (convs and linears by path, BMMs `<att>.bmm1`/`.bmm2`);
    a kind's score is the MAC-weighted mean NSR of its layers. MAC weights make the score independent
    of how the work is split into layers (q, k and v as three GEMMs or one weigh the same) and put it
    where the 8-bit arithmetic is: a layer doing 1% of the work cannot outvote one doing 20%.
    `head_dims`: each attention's head dimension (its q scale). Deterministic: fixed rows, fixed
    order, float64 arithmetic (as the alpha search's)."""

    def __init__(self, table: CalibrationTable, recipe: str, weights, macs: dict[str, int],
                 head_dims: dict[str, int]):
        self.table, self.recipe, self.weights, self.macs, self.head_dims = table, recipe, weights, macs, head_dims
        self.format = check_recipe(recipe)["format"]

    @staticmethod
    def projection(path: str) -> str:
        """The linear layer that makes an attention BMM input: `<b>.attn1.attention.q` -> `<b>.attn1.to_q`."""
        att, part = path.rsplit(".", 1)
        return f"{att.rsplit('.', 1)[0]}.to_{part}"

    def rows(self, path: str) -> np.ndarray | None:
        """The sampled rows of a layer input, float64 [N, C] (conv: [N, C*k*k]); None without."""
        if layer_kind(path) != "attention":
            found = self.table.rows.get(path)
            return None if found is None else found.astype(np.float64)
        source, att = self.projection(path), path.rsplit(".", 1)[0]
        x = self.table.rows.get(source)
        if x is None or att not in self.head_dims:
            return None
        w = np.asarray(self.weights.get(f"{source}.weight", dtype=np.float32), np.float64)
        scale = 1.0 / np.sqrt(self.head_dims[att]) if path.endswith(".q") else 1.0
        return (x.astype(np.float64) @ w.T) * scale

    def layers(self, plan: QuantPlan) -> tuple[list[str], list[str]]:
        """(the quantized inputs with sampled rows, those without) in table order."""
        paths = [p for p in self.table.channel_amax
                 if (layer_kind(p) == "attention" and plan.quantize_bmm) or
                 (layer_kind(p) != "attention" and plan.is_quantized(p))]
        has = {p: (self.projection(p) if layer_kind(p) == "attention" else p) in self.table.rows for p in paths}
        return [p for p in paths if has[p]], [p for p in paths if not has[p]]

    def weight_of(self, path: str) -> int:
        if layer_kind(path) == "attention":
            att, part = path.rsplit(".", 1)
            return int(self.macs.get(f"{att}.{'bmm2' if part == 'v' else 'bmm1'}", 0))
        return int(self.macs.get(path, 0))

    def _quantized_weight(self, plan: QuantPlan, w: np.ndarray) -> np.ndarray:
        magnitude = np.abs(w)
        amax = np.maximum(magnitude.max(axis=1), 1e-8) if plan.weight_axis == 0 else max(float(magnitude.max()), 1e-8)
        return fake_quant(w, amax, self.format, axis=plan.weight_axis)

    def errors(self, plans: dict[str, QuantPlan], rules: dict[str, tuple[AmaxRule, ...]]) -> dict:
        """{path: {(setting, rule): (noise, signal)}} for the plans of each smoothing setting and the
        candidate rules of each kind."""
        first = next(iter(plans.values()))
        paths, _ = self.layers(first)
        out: dict[str, dict] = {}
        for path in paths:
            kind = layer_kind(path)
            x = self.rows(path)  # [N, C] (conv: [N, C*k*k])
            w = None if kind == "attention" else \
                np.asarray(self.weights.get(f"{path}.weight", dtype=np.float32), np.float64).reshape(
                    self.weights.shape(f"{path}.weight")[0], -1)
            exact = None if w is None else x @ w.T  # [N, O]
            found: dict[tuple, tuple[float, float]] = {}
            out[path] = {}
            for setting, base in plans.items():
                s = base.scales.get(path)
                key_s = setting if s is not None else None
                xs = x if s is None else x / np.repeat(s.astype(np.float64), x.shape[1] // s.size)
                wq = None if w is None else self._quantized_weight(
                    base, w if s is None else w * np.repeat(s.astype(np.float64), w.shape[1] // s.size))
                for rule in rules[kind]:
                    plan = copy.copy(base)
                    plan.rule = RuleSet(**{k: rule for k in ("conv", "linear", "attention")})
                    amax = (plan.act_scale(path) if kind == "attention" else plan.input_scale(path)) * QMAX[self.format]
                    key = (key_s, amax)
                    if key not in found:
                        xq = fake_quant(xs, amax, self.format)
                        found[key] = noise_to_signal(xq, xs) if w is None else noise_to_signal(xq @ wq.T, exact)
                    out[path][(setting, rule)] = found[key]
        return out

    def score(self, errors: dict, pick: Callable[[str], tuple[str, AmaxRule]], kinds) -> tuple[float, int]:
        """(MAC-weighted mean NSR, layers scored) over the layers of `kinds`, each at the candidate
        `pick(kind)` = (setting, rule)."""
        num = den = 0.0
        count = 0
        for path, by_candidate in errors.items():
            kind = layer_kind(path)
            if kind not in kinds:
                continue
            noise, signal = by_candidate[pick(kind)]
            weight = self.weight_of(path)
            num += weight * noise / max(signal, 1e-30)
            den += weight
            count += 1
        return (num / den if den else float("nan")), count


def sqnr_db(nsr: float) -> float | None:
    """Signal-to-quantization-noise ratio in dB of a noise-to-signal power ratio (None for no layers)."""
    return float(-10.0 * np.log10(max(nsr, 1e-30))) if np.isfinite(nsr) else None


def tune_layers(table: CalibrationTable, recipe: str, weights, macs: dict[str, int], head_dims: dict[str, int],
                log: Log = silent) -> dict:
    """Tune `recipe` per layer (in place: `table.set_choices`); returns the report (the workflow adds
    the chosen network's held-aside image scores).

    The conv rule is chosen on the conv layers alone (smoothing never touches them); then for each
    smoothing setting the best linear rule (and attention rule) on their layers, and the setting whose
    linear and attention layers score best together. The score is additive over layers and each
    layer's error depends on its own kind's rule only, so this is the best of every combination of
    the candidates, NVIDIA's parameters and plain max calibration among them."""
    alphas, alpha_report = tune_alphas(table, recipe, weights)
    log_alphas(recipe, alpha_report, log)
    settings = smoothing_settings(alphas)
    candidates_smoothing = [s for s in settings if alphas] or ["none"]
    kinds = kinds_of(recipe)
    started = time.perf_counter()
    plans = {s: QuantPlan(recipe, table, weights, rule=MAX, alphas=settings[s]) for s in candidates_smoothing}
    measure = LayerErrors(table, recipe, weights, macs, head_dims)
    _, unscored = measure.layers(plans[candidates_smoothing[0]])
    errors = measure.errors(plans, {k: CANDIDATE_RULES[k] for k in ("conv", "linear", "attention")})
    candidates = []
    best: dict[tuple[str, str], AmaxRule] = {}  # (setting, kind) -> the kind's best rule (ties: the first)
    for setting in candidates_smoothing:
        for kind in kinds:
            if kind == "conv" and setting != candidates_smoothing[0]:
                continue  # convolutions are never smoothed: one score per rule
            scored = []
            for rule in CANDIDATE_RULES[kind]:
                nsr, count = measure.score(errors, lambda k, s=setting, r=rule: (s, r), (kind,))
                scored += [(nsr, rule)] if np.isfinite(nsr) else []
                candidates.append({"smoothing": setting if kind != "conv" else None, "kind": kind,
                                   "amax_rule": rule.to_json(), "describe": rule.describe(), "layers": count,
                                   "layer_sqnr_db": sqnr_db(nsr)})
            best[setting, kind] = min(scored, key=lambda found: found[0])[1] if scored else MAX
    conv_rule = best[(candidates_smoothing[0], "conv")]

    def candidate_of(setting: str):
        return lambda kind: (setting if kind != "conv" else candidates_smoothing[0],
                             conv_rule if kind == "conv" else best[(setting, kind)])

    gemm_kinds = tuple(k for k in kinds if k != "conv")
    by_setting = {s: measure.score(errors, candidate_of(s), gemm_kinds)[0] for s in candidates_smoothing}
    setting = min(candidates_smoothing, key=lambda s: by_setting[s] if np.isfinite(by_setting[s]) else np.inf)
    rules = RuleSet(conv=conv_rule, linear=best[(setting, "linear")],
                    attention=best[(setting, "attention")] if "attention" in kinds else MAX)
    overall, count = measure.score(errors, candidate_of(setting), kinds)
    references = {"plain max, no smoothing": ("none", RuleSet.uniform(MAX))}
    if alphas:
        references["NVIDIA's parameters"] = ("alpha 0.8", RuleSet(conv=MODELOPT_CONV, linear=MAX, attention=MAX))
    compared = {}
    for name, (ref_setting, ref_rules) in references.items():
        if ref_setting in plans:
            nsr, _ = measure.score(errors, lambda k, s=ref_setting, r=ref_rules: (s, r.for_kind(k)), kinds)
            compared[name] = sqnr_db(nsr)
    log(f"tune {recipe}: per layer on the calibration rows ({count} layers"
        + (f"; {len(unscored)} without sampled rows left out" if unscored else "") + f", "
        f"{time.perf_counter() - started:.1f} s): chose {setting} smoothing, amax {rules.describe()}; "
        f"MAC-weighted layer SQNR {-10.0 * np.log10(max(overall, 1e-30)):.2f} dB"
        + "".join(f", {name} {db:.2f} dB" for name, db in compared.items() if db is not None))
    report = {
        "mode": "per-layer",
        "alphas": alpha_report,
        "candidates": candidates,
        "smoothing_scores_db": {s: sqnr_db(v) for s, v in by_setting.items()},
        "chosen_rule": rules.describe(),
        "smoothing": setting,
        "layer_sqnr_db": sqnr_db(overall),
        "layers_scored": count,
        "layers_without_rows": unscored,
        "compared_layer_sqnr_db": compared,
    }
    table.set_choices(recipe, rules, settings[setting], report)
    return report
