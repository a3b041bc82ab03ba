"""What the layer helpers consult while defining a network: calibration taps or a quantization plan.

`CalibrationTaps` says which inputs the calibration network records: for every input of a
layer that some recipe quantizes the layer helpers add an in-graph reduction — the per-channel
abs-max — as an extra output (`amax:<path>`), and a few sampled rows (`rows:<path>`): token rows
of linear inputs, k x k patches (im2col rows) of convolution inputs — so only small vectors leave
the device. The rows feed the SmoothQuant alpha search and the per-layer error measures of the
tuning (trt_sdxl.calibration.tune), which gets an attention BMM input's rows from its projection's.

`QuantPlan` turns a CalibrationTable into what the quantized network needs: which layers
run in 8 bits, each activation's amax (after smoothing, by the table's amax rule), and the
SmoothQuant scales with where each 1/s is folded (norm affine, GEGLU value rows, to_v rows)
or, where no fold exists, the explicit multiply the layer helpers insert. Numbers only: nothing
here touches TensorRT.
"""

from __future__ import annotations

import numpy as np

from .percentile import AmaxRule, RuleSet, amax_from_steps, layer_amax
from .recipe import QMAX, RECIPES, check_recipe, is_quantized, layer_kind, smoothing_rule
from .smoothquant import smoothing_scales, weight_channel_amax
from .table import CalibrationTable

SAMPLE_POSITIONS = 8  # token rows sampled per linear input per call (x batch)
PATCH_GRID = 2  # conv inputs: PATCH_GRID x PATCH_GRID patches sampled per call (x batch)


def tapped(path: str) -> bool:
    """Layers whose inputs calibration records: those any recipe quantizes, and attention q/k/v."""
    return path.endswith((".attention.q", ".attention.k", ".attention.v")) or any(
        is_quantized(name, path) for name in RECIPES)


class CalibrationTaps:
    """Which layer inputs the calibration network records (every tapped path once, even where layers
    share an input tensor, as q/k/v do: the reductions are cheap next to the matmuls, and the table
    stays keyed by layer alone). The layer helpers emit the reductions (trt_sdxl.layers.tap)."""

    def __init__(self):
        self.paths: list[str] = []

    def wants(self, path: str) -> bool:
        return tapped(path) and path not in self.paths

    def add(self, path: str) -> None:
        self.paths.append(path)

    @staticmethod
    def sample_positions(tokens: int) -> np.ndarray:
        """The token rows sampled from a linear input of `tokens` rows, evenly spread (int32)."""
        return np.linspace(0, tokens - 1, min(SAMPLE_POSITIONS, tokens)).round().astype(np.int32)

    @staticmethod
    def patch_windows(size: int, kernel: int) -> tuple[np.ndarray, np.ndarray]:
        """Along one spatial axis of `size`: the indices of PATCH_GRID windows of `kernel` positions,
        centred at floor((i + 1/2) size / PATCH_GRID) (int32, clamped into the axis), and a 0/1 mask
        that zeroes the positions past the border — the zero padding of a `kernel // 2`-padded conv."""
        centres = np.floor((np.arange(PATCH_GRID) + 0.5) * size / PATCH_GRID).astype(np.int64)
        raw = (centres[:, None] + np.arange(kernel) - kernel // 2).reshape(-1)  # [PATCH_GRID * kernel]
        inside = (raw >= 0) & (raw < size)
        return np.clip(raw, 0, size - 1).astype(np.int32), inside.astype(np.float32)


def fixed_choices(recipe: str, groups) -> dict | None:
    """A recipe's fixed parameters as QuantPlan options (rule, alphas over `groups`), or None when
    the recipe is tuned."""
    fixed = check_recipe(recipe).get("fixed")
    if fixed is None:
        return None
    return {"rule": RuleSet.from_json(fixed["rule"]), "alphas": {g: fixed["alpha"] for g in groups}}


class QuantPlan:
    """Quantization decisions for one recipe from one CalibrationTable (deterministic)."""

    def __init__(self, recipe: str, table: CalibrationTable, weights, rule: AmaxRule | RuleSet,
                 alphas: dict[str, float | None], qdq: bool = True, conv_alpha: float | None = None):
        # qdq=False applies SmoothQuant's transforms without quantizing: the network must then equal
        # the FP16 one up to rounding, whatever the alphas (how the tests prove every fold exact).
        self.qdq = qdq
        self.recipe = recipe
        self.format = check_recipe(recipe)["format"]
        self.quantize_bmm = RECIPES[recipe]["attention_bmm"] and qdq
        self.weight_axis = 0 if RECIPES[recipe]["weights"] == "channel" else None  # per output channel, or tensor
        self.table = table
        self.rule = RuleSet.of(rule)
        self.alphas = alphas
        self.scales: dict[str, np.ndarray] = {}  # consumer path -> s
        self.norm_divisors: dict[str, np.ndarray] = {}
        self.row_divisors: dict[str, np.ndarray] = {}
        self.explicit: dict[str, str] = {}  # consumer path -> group
        self._build_smoothing(weights)
        if conv_alpha is not None:
            self._smooth_convs(weights, conv_alpha)

    # ------------------------------------------------------------ smoothing

    def groups(self) -> dict[str, list[str]]:
        """Smoothing groups among this recipe's quantized linear layers: group -> member paths."""
        if getattr(self, "_groups", None) is None:
            self._groups = self._find_groups()
        return self._groups

    def _find_groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for path in self.table.channel_amax:
            if not is_quantized(self.recipe, path):
                continue
            found = smoothing_rule(path)
            if found:
                out.setdefault(found[2], []).append(path)
        return {g: sorted(m) for g, m in sorted(out.items())}

    def group_weights(self, weights, members: list[str]) -> list[np.ndarray]:
        return [np.asarray(weights.get(f"{p}.weight", dtype=np.float32)) for p in members]

    def _build_smoothing(self, weights) -> None:
        for group, members in self.groups().items():
            alpha = self.alphas.get(group)
            if alpha is None:
                continue
            w_amax = weight_channel_amax(self.group_weights(weights, members))
            s = smoothing_scales(self.input_channel_max(members[0]), w_amax, alpha).astype(np.float32)
            rule, producer, _ = smoothing_rule(members[0])
            for p in members:
                self.scales[p] = s
            if rule.fold == "norm":
                self.norm_divisors[producer] = s
            elif rule.fold == "linear_rows":
                self.row_divisors[producer] = s
                # V leaves to_v divided by s, so its (FP8) attention quantizer sees v / s too
                self.scales[producer.replace(".to_v", ".attention.v")] = s
            elif rule.fold == "geglu_value":
                self.row_divisors[producer] = np.concatenate([s, np.ones_like(s)])  # value half, then gate
            else:
                for p in members:
                    self.explicit[p] = group

    def _smooth_convs(self, weights, alpha: float) -> None:
        """SmoothQuant on the quantized convolutions too, as a measurement (tools/quant_report.py):
        a conv's input comes out of SiLU or a concatenation, so its 1/s is always an explicit multiply."""
        for path in self.table.channel_amax:
            if not self.is_quantized(path) or smoothing_rule(path) is not None:
                continue
            w = np.asarray(weights.get(f"{path}.weight", dtype=np.float32))
            if w.ndim != 4:
                continue
            self.scales[path] = smoothing_scales(self.input_channel_max(path), weight_channel_amax([w]),
                                                 alpha).astype(np.float32)
            self.explicit[path] = path

    def input_channel_max(self, path: str) -> np.ndarray:
        return self.table.channel_max(path)

    # ------------------------------------------------------------ what the layer helpers ask

    def has_stats(self, path: str) -> bool:
        return path in self.table.channel_amax

    def is_quantized(self, path: str) -> bool:
        return path in self.table.channel_amax and is_quantized(self.recipe, path)

    def act_amax(self, path: str) -> float:
        """Activation amax of `path`'s input as the quantizer sees it (after smoothing), by the rule.

        Unsmoothed, the per-step values combine the prompts' per-call maxima exactly. Smoothed, the
        per-call maxima of X/s were never recorded (s is chosen after calibration), so a step's value
        is max over channels of the prompt-combined channel maxima divided by s: exact for combine
        "max", and for "mean"/"min" a lower value (max_c mean_p <= mean_p max_c) — a mild clip.
        """
        rule = self.rule.for_kind(layer_kind(path))
        s = self.scales.get(path)
        if s is None:
            return layer_amax(self.table.tensor_amax[path], rule)
        stats = self.table.channel_amax[path] / s  # [3, T, C]: mean, max, min over prompts
        if rule.method == "max":
            return float(stats[1].max())
        if rule.method == "modelopt":
            raise ValueError(f"{path}: the modelopt rule reads per-prompt values, which a smoothed input lacks; "
                             "ModelOpt itself max-calibrates smoothed (linear) inputs")
        which = {"mean": 0, "max": 1, "min": 2}[rule.combine]
        return amax_from_steps(stats[which].max(axis=-1), rule)

    def act_scale(self, path: str) -> float:
        return max(self.act_amax(path), 1e-8) / QMAX[self.format]

    def input_scale(self, path: str) -> float:
        """The scale of the one Q/DQ on `path`'s input: the largest among the quantized layers of its
        smoothing group, which read the same tensor (equal when their statistics are)."""
        found = smoothing_rule(path)
        if found is None:
            return self.act_scale(path)
        members = [p for p in self.groups().get(found[2], ()) if self.is_quantized(p)] or [path]
        return max(self.act_scale(p) for p in members)

    def transform_weight(self, path: str, weight: np.ndarray) -> np.ndarray:
        """W * s on input channels (smoothing), / r on output rows (a consumer's 1/s folded here)."""
        s, r = self.scales.get(path), self.row_divisors.get(path)
        if s is None and r is None:
            return weight
        w = weight.astype(np.float32)
        if s is not None:
            w = w * s.reshape((1, -1) + (1,) * (w.ndim - 2))
        if r is not None:
            w = w / r.reshape((-1,) + (1,) * (w.ndim - 1))
        return w.astype(weight.dtype)

    def transform_bias(self, path: str, bias: np.ndarray) -> np.ndarray:
        r = self.row_divisors.get(path)
        return bias if r is None else (bias.astype(np.float32) / r).astype(bias.dtype)

    def fold_norm(self, path: str, gamma: np.ndarray, beta: np.ndarray):
        return self.fold_norm_part(path, gamma), self.fold_norm_part(path, beta)

    def fold_norm_part(self, path: str, a: np.ndarray) -> np.ndarray:
        """The norm `path`'s gamma or beta divided by the 1/s folded into it (itself where none is)."""
        s = self.norm_divisors.get(path)
        if s is None:
            return a
        return (a.reshape(-1).astype(np.float32) / s).astype(a.dtype).reshape(a.shape)

    def explicit_smoothing(self, path: str) -> tuple[str, np.ndarray] | None:
        """(group, 1/s) where `path`'s input needs an explicit multiply (no fold exists), else None;
        the layers of one group reading one tensor share the multiply (trt_sdxl.layers)."""
        group = self.explicit.get(path)
        return None if group is None else (group, (1.0 / self.scales[path]).astype(np.float32))


def weight_scales(weight: np.ndarray, fmt: str, axis: int | None) -> np.ndarray:
    """The quantization scale of a weight [O, ...]: per output channel (`axis` 0, [O]) or per tensor
    (`axis` None, a scalar), amax / QMAX (float32; a silent channel gets a tiny positive scale)."""
    magnitude = np.abs(weight.astype(np.float32)).reshape(weight.shape[0], -1)
    amax = magnitude.max(axis=1) if axis == 0 else magnitude.max()
    return np.asarray(np.maximum(amax, 1e-8) / QMAX[fmt], np.float32)
