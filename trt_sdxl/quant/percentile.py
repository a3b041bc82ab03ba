"""Activation amax from per-denoising-step abs-max statistics ("percentile quant").

The calibration run records, for every quantized layer input, the abs-max of each UNet call,
bucketed by denoising step, and combines the prompts of one step by mean, max or min. From
those per-step values a rule picks one amax:

- `max`: the largest value over all steps (plain max calibration).
- `reference`: NVIDIA's PercentileCalibrator rule — keep the leading (high-noise) fraction
  `p` of the steps and take the minimum over them, so rare extreme steps do not waste the
  8-bit range (their defaults: p = 1.0, mean across prompts; 0.4 in their MLPerf INT8 SDXL).
- `quantile`: the q-quantile of the per-step values over all steps (linear interpolation).

The tuning pipeline (trt_sdxl.calibration.tune) chooses the rule and its parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

COMBINES = ("mean", "max", "min")
METHODS = ("max", "reference", "quantile")


@dataclass(frozen=True)
class AmaxRule:
    method: str = "max"
    p: float = 1.0  # fraction of leading steps (reference) or quantile level (quantile)
    combine: str = "mean"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"amax method {self.method!r}: expected one of {METHODS}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine {self.combine!r}: expected one of {COMBINES}")
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"p={self.p}: expected 0 < p <= 1")

    def describe(self) -> str:
        if self.method == "max":
            return "max"
        return f"{self.method}(p={self.p:g}, {self.combine} over prompts)"

    def to_json(self) -> dict:
        return asdict(self)


def combine_prompts(per_prompt_step: np.ndarray, how: str) -> np.ndarray:
    """[prompts, steps] abs-max values -> [steps] by `how` (mean, max or min over prompts)."""
    return {"mean": np.mean, "max": np.max, "min": np.min}[how](per_prompt_step, axis=0)


def amax_from_steps(per_step: np.ndarray, rule: AmaxRule) -> float:
    """One amax from per-step values [steps] (step 0 = the first, noisiest step)."""
    values = np.asarray(per_step, dtype=np.float64)
    if rule.method == "max":
        return float(values.max())
    if rule.method == "reference":
        keep = max(1, math.ceil(rule.p * len(values)))
        return float(values[:keep].min())
    return float(np.quantile(values, rule.p))


def layer_amax(per_prompt_step: np.ndarray, rule: AmaxRule) -> float:
    """amax for one layer input from its [prompts, steps] per-call abs-max values."""
    if rule.method == "max":
        return float(np.max(per_prompt_step))
    return amax_from_steps(combine_prompts(per_prompt_step, rule.combine), rule)
