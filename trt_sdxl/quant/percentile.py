"""Activation amax from per-denoising-step abs-max statistics ("percentile quant").

The calibration run records, for every quantized layer input, the abs-max of each prompt's UNet
call (both CFG halves), bucketed by denoising step. From those [prompts, steps] values a rule
picks one amax:

- `max`: the largest value over all steps and prompts (plain max calibration).
- `leading_min`: combine the prompts of each step (mean, max or min), keep the leading
  (high-noise) ceil(p * steps) steps, take the minimum over them — the idea of NVIDIA's
  percentile calibrator, not its exact arithmetic.
- `quantile`: combine the prompts of each step, then the p-quantile over the steps.
- `modelopt`: NVIDIA ModelOpt's PercentileCalibrator exactly, as its diffusers example runs it
  (NVIDIA/TensorRT-Model-Optimizer, diffusers/quantization/calib/plugin_calib.py, commit
  7adf8483795790753e0673abf433479ae741caf7): prompts are calibrated `batch` at a time (2 in its
  SDXL recipe), so a call's amax is the max over its prompts; per step the calls are collected
  by `combine` — its collect_method — and the leading int(steps * p) steps kept:
  `global_min` min over steps of min over calls; `min-max` min over steps of max over calls;
  `mean-max` mean over steps of max over calls; `min-mean` min over steps of (sum over calls) /
  steps (ModelOpt divides by the step count, not the call count; kept as it is).

`RuleSet` lets the rule differ by layer kind (convolution, linear, attention BMM input); the
tuning pipeline (trt_sdxl.calibration.tune) chooses it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

COMBINES = ("mean", "max", "min")
MODELOPT_COLLECT = ("global_min", "min-max", "mean-max", "min-mean")
METHODS = ("max", "leading_min", "quantile", "modelopt")
KINDS = ("conv", "linear", "attention")


@dataclass(frozen=True)
class AmaxRule:
    method: str = "max"
    p: float = 1.0  # fraction of leading steps (leading_min, modelopt) or quantile level (quantile)
    combine: str = "mean"  # over prompts (leading_min, quantile), or ModelOpt's collect_method (modelopt)
    batch: int = 2  # modelopt: prompts per calibration call

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"amax method {self.method!r}: expected one of {METHODS}")
        allowed = MODELOPT_COLLECT if self.method == "modelopt" else COMBINES
        if self.method != "max" and self.combine not in allowed:
            raise ValueError(f"combine {self.combine!r} for {self.method}: expected one of {allowed}")
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"p={self.p}: expected 0 < p <= 1")
        if self.batch < 1:
            raise ValueError(f"batch={self.batch}: expected at least 1")

    def describe(self) -> str:
        if self.method == "max":
            return "max"
        if self.method == "modelopt":
            return f"modelopt(p={self.p:g}, {self.combine}, batch {self.batch})"
        return f"{self.method}(p={self.p:g}, {self.combine} over prompts)"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RuleSet:
    """One AmaxRule per layer kind: convolution inputs, linear inputs, attention BMM inputs."""

    conv: AmaxRule = AmaxRule()
    linear: AmaxRule = AmaxRule()
    attention: AmaxRule = AmaxRule()

    @classmethod
    def uniform(cls, rule: AmaxRule) -> RuleSet:
        return cls(rule, rule, rule)

    @classmethod
    def of(cls, rule) -> RuleSet:
        """A RuleSet as it is, or one AmaxRule for every kind."""
        return rule if isinstance(rule, RuleSet) else cls.uniform(rule)

    def for_kind(self, kind: str) -> AmaxRule:
        return getattr(self, kind)

    def describe(self) -> str:
        if self.conv == self.linear == self.attention:
            return self.conv.describe()
        return "; ".join(f"{kind} {self.for_kind(kind).describe()}" for kind in KINDS)

    def to_json(self) -> dict:
        return {kind: self.for_kind(kind).to_json() for kind in KINDS}

    @classmethod
    def from_json(cls, data: dict) -> RuleSet:
        if "method" in data:  # one rule for every kind
            return cls.uniform(AmaxRule(**data))
        return cls(**{kind: AmaxRule(**data[kind]) for kind in KINDS})


def combine_prompts(per_prompt_step: np.ndarray, how: str) -> np.ndarray:
    """[prompts, steps] abs-max values -> [steps] by `how` (mean, max or min over prompts)."""
    return {"mean": np.mean, "max": np.max, "min": np.min}[how](per_prompt_step, axis=0)


def amax_from_steps(per_step: np.ndarray, rule: AmaxRule) -> float:
    """One amax from per-step values [steps] (step 0 = the first, noisiest step)."""
    values = np.asarray(per_step, dtype=np.float64)
    if rule.method == "max":
        return float(values.max())
    if rule.method == "leading_min":
        keep = max(1, math.ceil(rule.p * len(values)))
        return float(values[:keep].min())
    if rule.method == "quantile":
        return float(np.quantile(values, rule.p))
    raise ValueError(f"{rule.describe()} needs per-prompt values (modelopt_amax)")


def modelopt_amax(per_prompt_step: np.ndarray, rule: AmaxRule) -> float:
    """ModelOpt's PercentileCalibrator over [prompts, steps] per-prompt abs-max values."""
    values = np.asarray(per_prompt_step, dtype=np.float64)
    prompts, steps = values.shape
    calls = max(1, prompts // rule.batch)  # ModelOpt runs calib_size // batch_size calls
    per_call = np.stack([values[c * rule.batch:(c + 1) * rule.batch].max(axis=0) for c in range(calls)])
    keep = max(1, int(steps * rule.p))
    if rule.combine == "global_min":
        return float(per_call.min(axis=0)[:keep].min())
    if rule.combine == "min-max":
        return float(per_call.max(axis=0)[:keep].min())
    if rule.combine == "mean-max":
        return float(per_call.max(axis=0)[:keep].mean())
    return float((per_call.sum(axis=0) / steps)[:keep].min())  # min-mean


def layer_amax(per_prompt_step: np.ndarray, rule: AmaxRule) -> float:
    """amax for one layer input from its [prompts, steps] per-call abs-max values."""
    if rule.method == "max":
        return float(np.max(per_prompt_step))
    if rule.method == "modelopt":
        return modelopt_amax(per_prompt_step, rule)
    return amax_from_steps(combine_prompts(per_prompt_step, rule.combine), rule)
