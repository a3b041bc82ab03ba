"""Which UNet layers run in 8 bits, and where SmoothQuant's 1/s goes: both as tables.

A recipe is a named level. Measured on the full-size SDXL base UNet at 1024x1024
(`tools/quant_report.py`), MACs split: feed-forward 41.7%, resnet convs 19.2%, attention
q/k/v 14.7%, attention BMMs 11.6%, to_out 6.9%, samplers 3.8%, proj_in/out 1.1%,
conv_shortcut 1.0%, conv_in + conv_out + time embeddings 0.01%.

- `int8` (default INT8): NVIDIA's "quant level 2.5" layer set — convolutions, feed-forward and
  attention q/k/v; `to_out`, `proj_in/out` and the 1x1 `conv_shortcut`s stay FP16, as do the
  attention BMMs (no INT8 fused attention above 512 tokens). 79.4% of the MACs in 8 bits. The
  level-3 set below models 4-7% faster on pro/data-centre GPUs and 13-15% on GeForce ones
  (`tools/roofline.py`, fused), but it is the set whose quantized `to_out` NVIDIA measured
  running slower than FP16 (NVIDIA/TensorRT#3724), and level 2.5 is the INT8 recipe NVIDIA
  measured on real GPUs (1.20x on an RTX 4090); its image quality is in BENCHMARKS.md.
- `int8_level3`: the level-2.5 set plus `to_out`, `proj_in/out` and `conv_shortcut`: 88.4% of the
  MACs; kept for comparison.
- `fp8` (default FP8): NVIDIA's level-4 set — every convolution and linear layer but its filter
  (`conv_shortcut` and `proj_out` stay FP16) plus the attention BMMs (q, k, v and the softmax
  output); weights per tensor (per-channel FP8 is GEMM-only, TensorRT >= 10.6/10.7).
- `fp8_gemm`: the linear layers of the `fp8` set only (feed-forward, q/k/v, to_out, proj_in);
  convolutions and attention stay FP16 — what `--precision fp8` builds on TensorRT for RTX, whose
  FP8 is GEMM-only (trt_sdxl.support).
- `nvidia_modelopt`, `nvidia_modelopt_fp8`: NVIDIA's recipes as ModelOpt's diffusers example
  defines them, with their fixed parameters — the baseline our tuning is measured against. With
  the same layers as `int8` / `fp8`, they differ from ours only in calibration and smoothing.
Always high precision: `conv_in`, `conv_out`, the time/added embeddings, all norms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Kept in high precision whatever the recipe says (matched against the module path).
ALWAYS_HIGH_PRECISION = (
    r"^conv_in$", r"^conv_out$", r"^time_embedding\.", r"^add_embedding\.", r"\.time_emb_proj$",
)

_ALL_CONV_LINEAR = (r"\.conv[12]$", r"\.conv_shortcut$", r"\.downsamplers\.0\.conv$", r"\.upsamplers\.0\.conv$",
                    r"\.ff\.net\.0\.proj$", r"\.ff\.net\.2$", r"\.attn[12]\.to_[qkv]$", r"\.attn[12]\.to_out\.0$",
                    r"\.proj_in$", r"\.proj_out$")

_LEVEL_2_5 = (r"\.conv[12]$", r"\.downsamplers\.0\.conv$", r"\.upsamplers\.0\.conv$",
              r"\.ff\.net\.0\.proj$", r"\.ff\.net\.2$", r"\.attn[12]\.to_[qkv]$")
# ModelOpt's level 3/4 linear set minus its filter_func (conv_shortcut and proj_out stay high precision)
_MODELOPT_ALL = (r"\.conv[12]$", r"\.downsamplers\.0\.conv$", r"\.upsamplers\.0\.conv$",
                 r"\.ff\.net\.0\.proj$", r"\.ff\.net\.2$", r"\.attn[12]\.to_[qkv]$", r"\.attn[12]\.to_out\.0$",
                 r"\.proj_in$")

_MODELOPT_LINEAR = tuple(p for p in _MODELOPT_ALL if "conv" not in p and "samplers" not in p)

# Module-path patterns per recipe: a conv/linear whose path matches is quantized. `weights`: scale
# per output channel or per tensor. `fixed`: parameters taken as they are instead of tuned — the
# amax rule per layer kind and one SmoothQuant alpha for every smoothing group (None: none).
RECIPES = {
    "int8": {"format": "int8", "layers": _LEVEL_2_5, "attention_bmm": False, "weights": "channel"},
    "int8_level3": {"format": "int8", "layers": _ALL_CONV_LINEAR, "attention_bmm": False, "weights": "channel"},
    "fp8": {"format": "fp8", "layers": _MODELOPT_ALL, "attention_bmm": True, "weights": "tensor"},
    "fp8_gemm": {"format": "fp8", "layers": _MODELOPT_LINEAR, "attention_bmm": False, "weights": "tensor"},
    # NVIDIA's recipe exactly as ModelOpt's diffusers example defines it (NVIDIA/TensorRT-Model-Optimizer,
    # diffusers/quantization/{config.py,utils.py,quantize.py,build_sdxl_8bit_engine.sh}, commit
    # 7adf8483795790753e0673abf433479ae741caf7): INT8 at quant level 2.5 (convolutions, feed-forward, q/k/v),
    # conv inputs by its PercentileCalibrator (collect_method min-mean, percentile 1.0, 2 prompts per call),
    # linear inputs by max after SmoothQuant alpha 0.8, weights per output channel.
    "nvidia_modelopt": {"format": "int8", "layers": _LEVEL_2_5, "attention_bmm": False, "weights": "channel",
                        "fixed": {"rule": {"conv": {"method": "modelopt", "p": 1.0, "combine": "min-mean", "batch": 2},
                                           "linear": {"method": "max"}, "attention": {"method": "max"}},
                                  "alpha": 0.8}},
    # ... and its FP8 (quant level 4): every conv and linear but its filter, plus the attention BMMs;
    # weights and activations per tensor, max calibration throughout, no SmoothQuant.
    "nvidia_modelopt_fp8": {"format": "fp8", "layers": _MODELOPT_ALL, "attention_bmm": True, "weights": "tensor",
                            "fixed": {"rule": {"method": "max"}, "alpha": None}},
}

# 8-bit maxima: scale = amax / QMAX (INT8 symmetric; FP8 e4m3's largest finite value).
QMAX = {"int8": 127.0, "fp8": 448.0}


@dataclass(frozen=True)
class SmoothingRule:
    """Where a linear layer's SmoothQuant 1/s is folded (or that an explicit multiply is needed).

    `producer` is a template over the consumer's groups: the module whose output is the
    consumer's input; `fold` says how: "norm" (scale the norm's gamma and beta),
    "geglu_value" (the value half of the GEGLU projection's rows), "linear_rows" (the
    output rows of a linear layer: attention is linear in V, so to_out's 1/s goes into to_v),
    or "explicit" (a constant multiply before the quantizer; counted as `smoothing_muls`).
    `group` names the set of layers that read the same tensor and so share one s.
    """

    consumer: str
    producer: str
    fold: str
    group: str


SMOOTHING_RULES = (
    SmoothingRule(r"^(?P<b>.+)\.attn1\.to_[qkv]$", "{b}.norm1", "norm", "{b}.attn1.qkv"),
    SmoothingRule(r"^(?P<b>.+)\.attn2\.to_q$", "{b}.norm2", "norm", "{b}.attn2.q"),
    SmoothingRule(r"^(?P<b>.+)\.attn2\.to_[kv]$", "{b}.attn2.context", "explicit", "{b}.attn2.kv"),
    SmoothingRule(r"^(?P<b>.+)\.ff\.net\.0\.proj$", "{b}.norm3", "norm", "{b}.ff.net.0.proj"),
    SmoothingRule(r"^(?P<b>.+)\.ff\.net\.2$", "{b}.ff.net.0.proj", "geglu_value", "{b}.ff.net.2"),
    SmoothingRule(r"^(?P<b>.+)\.(?P<a>attn[12])\.to_out\.0$", "{b}.{a}.to_v", "linear_rows", "{b}.{a}.to_out.0"),
    SmoothingRule(r"^(?P<t>.+)\.proj_in$", "{t}.norm", "norm", "{t}.proj_in"),
    SmoothingRule(r"^(?P<t>.+)\.proj_out$", "{t}.proj_out.input", "explicit", "{t}.proj_out"),
)


def check_recipe(name: str) -> dict:
    from ..errors import UserError

    if name not in RECIPES:
        raise UserError(f"quantization recipe {name!r}: expected one of {', '.join(RECIPES)}")
    return RECIPES[name]


def is_quantized(recipe: str, path: str) -> bool:
    """Whether the conv/linear at module `path` runs in 8 bits under `recipe`."""
    if any(re.search(p, path) for p in ALWAYS_HIGH_PRECISION):
        return False
    return any(re.search(p, path) for p in check_recipe(recipe)["layers"])


def layer_kind(path: str) -> str:
    """'attention' (a BMM input: `.attention.q/k/v`), 'conv' or 'linear', by module path."""
    if path.endswith((".attention.q", ".attention.k", ".attention.v")):
        return "attention"
    if re.search(r"(^conv_in$|^conv_out$|\.conv[12]$|\.conv_shortcut$|samplers\.0\.conv$)", path):
        return "conv"
    return "linear"


def smoothing_rule(path: str) -> tuple[SmoothingRule, str, str] | None:
    """(rule, producer path, group name) for a linear layer SmoothQuant may smooth; None for others."""
    for rule in SMOOTHING_RULES:
        m = re.match(rule.consumer, path)
        if m:
            return rule, rule.producer.format(**m.groupdict()), rule.group.format(**m.groupdict())
    return None
