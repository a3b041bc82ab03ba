"""8-bit UNet: calibration, percentile rules, SmoothQuant folding and tuning, Q/DQ placement.

Numbers come from netexec runs of tiny UNets; conditioning is random but fixed per prompt
(the text encoders are exercised by the build test), so these tests isolate the UNet.
"""

from __future__ import annotations

import hashlib

import tiny_models
import numpy as np
from oracle import rel_l2
import pytest

from trt_sdxl import denoising, schedulers, weights
from trt_sdxl.errors import UserError
from trt_sdxl.executors import NetexecExecutor
from trt_sdxl.models import unet
from trt_sdxl.denoising import Conditioning, time_ids
from trt_sdxl.calibration import calibrate, tune
from trt_sdxl.quant import percentile, recipe, smoothquant
from trt_sdxl.quant.percentile import AmaxRule
from trt_sdxl.quant.plan import QuantPlan
from trt_sdxl.quant.table import CalibrationTable
from trt_sdxl.unet_config import UNetConfig

LATENT = 8
RUN = dict(scheduler="euler", steps=6, cfg=5.0, latent_shape=(4, LATENT, LATENT))


def random_encoder(cfg):
    """Conditioning drawn from a generator seeded by the prompt's hash: fixed per prompt."""

    def encode(prompts):
        contexts, embeds = [], []
        for prompt in prompts:
            rng = np.random.default_rng(int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16))
            contexts.append(rng.standard_normal((2, 77, cfg.cross_attention_dim)).astype(np.float32))
            embeds.append(rng.standard_normal((2, cfg.text_embeds_dim)).astype(np.float32))
        return Conditioning(  # the uncond halves of every prompt, then the cond halves
            context=np.concatenate([c[:1] for c in contexts] + [c[1:] for c in contexts]),
            text_embeds=np.concatenate([e[:1] for e in embeds] + [e[1:] for e in embeds]),
            time_ids=time_ids(8 * LATENT, 8 * LATENT, 2 * len(prompts)))

    return encode


def define(component, precision="fp16", **kw):
    return unet.define(component, precision, batch=2, latent_height=LATENT, latent_width=LATENT, **kw)


def calibrated(component, prompts=6):
    cfg = UNetConfig.parse(component.config)
    cal = define(component, calibration_taps=True)
    table = calibrate.run_calibration(NetexecExecutor(cal), random_encoder(cfg), [f"calibration {i}" for i in
                                      range(prompts)], steps=RUN["steps"], latent_shape=RUN["latent_shape"],
                                      unet_fingerprint=component.fingerprint(), log=lambda m: None)
    return table, cfg


@pytest.fixture(scope="module")
def tiny():
    component = weights.open_component("weights/tiny-sdxl", "unet")
    table, cfg = calibrated(component, prompts=4)
    return component, table, cfg


def all_groups(component, table, fmt):
    return {g: 0.5 for g in QuantPlan(fmt, table, component, AmaxRule(), {}).groups()}


def one_call(component, cfg, net, seed=0):
    rng = np.random.default_rng(seed)
    c = random_encoder(cfg)(["a test prompt"])
    feeds = {"sample": rng.standard_normal((2, 4, LATENT, LATENT)).astype(np.float32),
             "timestep": np.array([500.0, 500.0], np.float32), "encoder_hidden_states": c.context,
             "text_embeds": c.text_embeds, "time_ids": c.time_ids}
    return NetexecExecutor(net).run(feeds)["noise_pred"]


# ---------------------------------------------------------------- percentile rules


def test_amax_rules_follow_their_definitions():
    per_step = np.array([9.0, 4.0, 7.0, 3.0, 5.0])
    assert percentile.amax_from_steps(per_step, AmaxRule("max")) == 9.0
    # leading_min: the leading ceil(p * steps) steps, then their minimum
    assert percentile.amax_from_steps(per_step, AmaxRule("leading_min", 1.0)) == 3.0
    assert percentile.amax_from_steps(per_step, AmaxRule("leading_min", 0.4)) == 4.0  # steps 0, 1
    assert percentile.amax_from_steps(per_step, AmaxRule("leading_min", 0.2)) == 9.0  # step 0 only
    assert percentile.amax_from_steps(per_step, AmaxRule("quantile", 0.5)) == 5.0
    prompts_steps = np.array([[1.0, 8.0], [3.0, 2.0]])
    assert np.array_equal(percentile.combine_prompts(prompts_steps, "mean"), [2.0, 5.0])
    assert percentile.layer_amax(prompts_steps, AmaxRule("leading_min", 1.0, "max")) == 3.0
    with pytest.raises(ValueError):
        AmaxRule("leading_min", 0.0)


def test_modelopt_rule_is_its_percentile_calibrator():
    """Hand-computed from ModelOpt's PercentileCalibrator: 4 prompts in calls of 2, 4 steps; a call's
    amax is the max over its prompts; int(steps * p) leading steps are kept."""
    values = np.array([[4.0, 2.0, 6.0, 1.0],    # prompt 0  \ call 0: max -> [4, 3, 6, 2]
                       [1.0, 3.0, 5.0, 2.0],    # prompt 1  /
                       [2.0, 8.0, 1.0, 1.0],    # prompt 2  \ call 1: max -> [7, 8, 1, 4]
                       [7.0, 1.0, 1.0, 4.0]])   # prompt 3  /
    rule = lambda combine, p=1.0: AmaxRule("modelopt", p, combine, 2)  # noqa: E731
    assert percentile.layer_amax(values, rule("global_min")) == 1.0  # min over steps of min over calls
    assert percentile.layer_amax(values, rule("min-max")) == 4.0     # per step max over calls [7, 8, 6, 4]: min
    assert percentile.layer_amax(values, rule("min-max", 0.5)) == 7.0  # int(4 * 0.5) = 2 steps: [7, 8]
    assert percentile.layer_amax(values, rule("mean-max")) == 6.25   # mean of [7, 8, 6, 4]
    assert percentile.layer_amax(values, rule("min-mean")) == 1.5    # per step sum / 4 steps: [11, 11, 7, 6] / 4
    with pytest.raises(ValueError):
        AmaxRule("modelopt", 1.0, "mean")  # its collect methods only


def test_rule_set_applies_a_rule_per_layer_kind(tiny):
    component, table, _ = tiny
    conv_rule = AmaxRule("leading_min", 0.5, "max")
    rules = percentile.RuleSet(conv=conv_rule, linear=AmaxRule("max"), attention=AmaxRule("max"))
    plan = QuantPlan("int8", table, component, rules, {})
    conv = next(p for p in table.tensor_amax if recipe.layer_kind(p) == "conv" and plan.is_quantized(p))
    linear = next(p for p in table.tensor_amax if recipe.layer_kind(p) == "linear" and plan.is_quantized(p))
    assert plan.act_amax(conv) == percentile.layer_amax(table.tensor_amax[conv], conv_rule)
    assert plan.act_amax(linear) == float(np.max(table.tensor_amax[linear]))
    assert percentile.RuleSet.from_json(rules.to_json()) == rules
    assert recipe.layer_kind("down_blocks.1.attentions.0.transformer_blocks.0.attn1.attention.q") == "attention"
    assert recipe.layer_kind("up_blocks.0.upsamplers.0.conv") == "conv"


# ---------------------------------------------------------------- SmoothQuant


def test_alpha_search_smooths_outlier_channels():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 64))
    x[:, [3, 40]] *= 60.0  # two outlier channels
    w = rng.standard_normal((32, 64)) / 8
    alpha, errors = smoothquant.search_alpha(x, [w], np.abs(x).max(axis=0), "int8")
    assert alpha is not None and 0.3 <= alpha <= 1.0, errors
    assert errors[alpha] < errors["none"] / 3, f"smoothing bought only {errors['none'] / errors[alpha]:.2f}x"


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_smoothing_folds_are_exact(tiny, fmt):
    """SmoothQuant's transforms without quantization leave the network's function unchanged."""
    component, table, cfg = tiny
    fp16 = one_call(component, cfg, define(component))
    smoothed_net = define(component, fmt, calibration=table, quant_options={
        "rule": AmaxRule(), "alphas": all_groups(component, table, fmt), "qdq": False})
    err = rel_l2(one_call(component, cfg, smoothed_net), fp16)
    assert err < 3e-3, f"{fmt}: smoothing changed noise_pred by rel L2 {err:.2e}"
    plan = smoothed_net.definition.quant
    assert plan.norm_divisors and plan.row_divisors, "no fold was exercised"
    if fmt == "fp8":  # proj_out and attn2 k/v have no producer to fold into
        assert smoothed_net.definition.smoothing_muls > 0


# ---------------------------------------------------------------- Q/DQ placement


def test_nvidia_level_2_5_leaves_out_attention_out_and_projections(tiny):
    component, table, _ = tiny
    net = define(component, "int8", calibration=table, quant_options={"rule": AmaxRule(), "alphas": {}})
    quantized = {m.name for m in net.macs if m.quantized}
    assert any(n.endswith(".attn1.to_q") for n in quantized) and any(n.endswith(".ff.net.2") for n in quantized)
    assert not any(n.endswith((".to_out.0", ".proj_in", ".proj_out", ".conv_shortcut")) for n in quantized)


# The 8-bit share of the tiny UNet's MACs per recipe (its proportions differ from full-size SDXL's,
# where they are 79.4% / 88.4% / 98.5%: tools/quant_report.py).
SHARE_FLOOR = {"int8": 0.70, "int8_level3": 0.85, "fp8": 0.90}


@pytest.mark.parametrize("fmt", ["int8", "int8_level3", "fp8"])
def test_qdq_placement_follows_the_recipe(tiny, fmt):
    component, table, cfg = tiny
    net = define(component, fmt, calibration=table, quant_options={"rule": AmaxRule(), "alphas": {}})
    layers = {net.network.get_layer(i).name: net.network.get_layer(i) for i in range(net.network.num_layers)}
    producer = {layer.get_output(j).name: layer for layer in layers.values() for j in range(layer.num_outputs)}
    quantized_weights = {n[: -len(".weight.quantize")] for n in layers if n.endswith(".weight.quantize")}
    expected = {m.name for m in net.macs if m.kind in ("conv", "linear") and recipe.is_quantized(fmt, m.name)}
    assert quantized_weights == expected
    # each quantized layer reads a dequantized input; one Q/DQ per input tensor, shared by its readers
    read = {path: producer[layers[path].get_input(0).name] for path in expected}
    assert all(dq.type.name == "DEQUANTIZE" for dq in read.values())
    input_quantizers = [n for n in layers if n.endswith(".input.quantize")]
    assert len(input_quantizers) == len({dq.name for dq in read.values()}) < len(expected)
    for block in {p.rsplit(".attn1.", 1)[0] for p in expected if ".attn1.to_q" in p}:
        assert len({read[f"{block}.attn1.{n}"].name for n in ("to_q", "to_k", "to_v")}) == 1
        assert read[f"{block}.attn2.to_k"].name == read[f"{block}.attn2.to_v"].name
    quantized_inputs = expected
    for never in ("conv_in", "conv_out", "time_embedding.linear_1", "add_embedding.linear_2"):
        assert never not in quantized_inputs
    assert not any(n.endswith(".time_emb_proj") for n in quantized_inputs)
    assert any(n.endswith(".attn1.to_q") for n in quantized_inputs)
    assert any(n.endswith(".conv_shortcut") for n in quantized_inputs) == (fmt == "int8_level3")
    assert any(n.endswith(".attn1.to_out.0") for n in quantized_inputs) == (fmt != "int8")
    assert any(n.endswith(".proj_out") for n in quantized_inputs) == (fmt == "int8_level3")
    bmm_quantized = [m for m in net.macs if m.kind == "bmm" and m.quantized]
    assert bool(bmm_quantized) == (fmt == "fp8")
    share = sum(m.macs for m in net.macs if m.quantized) / sum(m.macs for m in net.macs)
    assert share > SHARE_FLOOR[fmt], f"{fmt}: 8-bit share of MACs {share:.3f}"
    err = rel_l2(one_call(component, cfg, net), one_call(component, cfg, define(component, "fp32")))
    assert err < 0.2, f"{fmt} one UNet call vs fp32: rel L2 {err:.3f}"


def test_fp8_attention_unfused_form_computes_what_the_attention_layer_does(tiny, monkeypatch):
    """Backends without the attention layer get matmul-softmax-matmul with FP32 between the FP8
    Q/DQ pairs (TensorRT's FP8 MHA pattern): the same quantization, so nearly the same numbers."""
    from trt_sdxl import backend

    component, table, cfg = tiny
    options = {"rule": AmaxRule(), "alphas": {}}
    fused = one_call(component, cfg, define(component, "fp8", calibration=table, quant_options=options))
    monkeypatch.setattr(backend.Backend, "has_attention_layer", property(lambda self: False))
    net = define(component, "fp8", calibration=table, quant_options=options)
    types = [net.network.get_layer(i).type.name for i in range(net.network.num_layers)]
    assert "ATTENTION_INPUT" not in types and "SOFTMAX" in types
    unfused = one_call(component, cfg, net)
    assert rel_l2(unfused, fused) < 2e-2, f"unfused FP8 attention vs the attention layer: {rel_l2(unfused, fused):.3e}"


def test_fp8_attention_without_a_fused_kernel_falls_back_to_fp16_bmms(tiny):
    """`attention_check` says which quantized attention shapes have a fused kernel; the others keep
    FP16 BMMs (no Q/DQ on them) and are listed, for the build to log."""
    component, table, _ = tiny
    options = {"rule": AmaxRule(), "alphas": {}}
    net = define(component, "fp8", calibration=table, quant_options=options,
                 attention_check=lambda fmt, q, k: q[2] != k[2])  # say: cross-attention kernels only
    fallbacks = net.definition.attention_fallbacks
    assert fallbacks and all(".attention" in f for f in fallbacks)
    bmm = {m.name.rsplit(".", 1)[0]: m.quantized for m in net.macs if m.kind == "bmm"}
    assert not any(bmm[f] for f in fallbacks) and any(bmm.values())
    assert all(".attn1." in f for f in fallbacks)


def test_same_table_gives_the_same_network(tiny, tmp_path):
    component, table, cfg = tiny
    table.set_choices("int8", AmaxRule("leading_min", 0.7, "mean"), all_groups(component, table, "int8"))
    path = tmp_path / "unet.calib.npz"
    table.save(path)
    outs = [one_call(component, cfg, define(component, "int8", calibration=str(path))) for _ in range(2)]
    assert np.array_equal(outs[0], outs[1])


def test_table_from_another_model_or_version_is_refused(tiny, tmp_path):
    component, table, _ = tiny
    path = tmp_path / "t.npz"
    table.save(path)
    with pytest.raises(UserError, match="made for another UNet checkpoint"):
        CalibrationTable.load(path, fingerprint="0" * 64)
    other = CalibrationTable(meta={**table.meta, "format_version": 99})
    other.save(tmp_path / "v.npz")
    with pytest.raises(UserError, match="format version 99"):
        CalibrationTable.load(tmp_path / "v.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated.npz: not a readable calibration table"):
        CalibrationTable.load(truncated)
    (tmp_path / "bad.npz").write_bytes(b"not a table")
    with pytest.raises(UserError, match="bad.npz: not a readable calibration table"):
        CalibrationTable.load(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="no tuned parameters for fp8"):
        CalibrationTable(meta={"tuned": {}}).choices("fp8")


# ---------------------------------------------------------------- the outlier model


@pytest.mark.slow
def test_tuned_int8_halves_plain_max_error_on_outlier_model(tmp_path):
    """SmoothQuant's reason to exist: with activation outlier channels, our tuned INT8 trajectory
    error (vs FP32) is at most half of plain max-calibrated INT8's."""
    component = weights.open_component(tiny_models.save_outlier_unet(tmp_path / "unet"), "unet")
    table, cfg = calibrated(component)
    encode = random_encoder(cfg)

    def quantized(options):
        return NetexecExecutor(define(component, "int8", calibration=table, quant_options=options))

    # a random-weight UNet has no VAE worth decoding with: the tuning compares latents (decode = identity)
    tune.tune(table, "int8", component, quantized, NetexecExecutor(define(component)), encode, lambda x: x,
              ["held aside 1", "held aside 2"], seed=0, log=lambda m: None, **RUN)
    cond = encode(["test 1", "test 2", "test 3"])
    fp32 = NetexecExecutor(define(component, "fp32"))
    shape = (3, *RUN["latent_shape"])

    def run(executor):
        return denoising.trajectory(executor, cond, schedulers.create(RUN["scheduler"], RUN["steps"]), RUN["cfg"],
                                    100, shape)

    ref = run(fp32)
    plain = rel_l2(run(quantized({"rule": AmaxRule("max"), "alphas": {}})), ref)
    tuned = rel_l2(run(quantized(table.choices("int8"))), ref)
    print(f"\noutlier model: tuned INT8 {tuned:.4f}, plain max INT8 {plain:.4f}, ratio {tuned / plain:.3f}")
    assert tuned <= 0.5 * plain, f"tuned INT8 {tuned:.4f} vs plain max INT8 {plain:.4f} ({tuned / plain:.2f}x)"


@pytest.mark.parametrize("fmt,target", [("int8", "SM86"), ("int8", "SM89"), ("fp8", "SM89"), ("fp8", "SM120")])
def test_quantized_unet_aot_build(tiny, fmt, target):
    """A real TensorRT builder accepts every Q/DQ placement (and non-decomposable FP8 attention, where
    the builder says it has a kernel for the shape: the rest keep FP16 BMMs) of both recipes."""
    from trt_sdxl.engines import EIGHT_BIT_OPTIMIZATION_LEVEL, build_engine, fused_attention_check

    component, table, _ = tiny
    net = define(component, fmt, calibration=table, quant_options={
        "rule": AmaxRule("leading_min", 1.0, "mean"), "alphas": all_groups(component, table, fmt)},
        attention_check=fused_attention_check(target))
    if fmt == "fp8":
        assert any(m.quantized for m in net.macs if m.kind == "bmm")
    engine, _ = build_engine(net.definition, target, optimization_level=EIGHT_BIT_OPTIMIZATION_LEVEL)
    assert engine.nbytes > 100_000, f"{fmt} {target}: engine of {engine.nbytes} bytes"


def test_full_size_calibration_without_a_gpu_is_refused_with_the_way_out():
    from types import SimpleNamespace

    from trt_sdxl.calibration import workflow
    from trt_sdxl.runtime import cuda

    if cuda.probe()[0] > 0:
        pytest.skip("a GPU is present: calibration would run on it")
    full_size = SimpleNamespace(weight_bytes=5 * 2**30)
    with pytest.raises(UserError, match=r"5\.0 GiB UNet needs a GPU.*--calibration FILE"):
        workflow.check_can_calibrate("weights/tiny-sdxl", full_size, "int8", None)
    workflow.check_can_calibrate("weights/tiny-sdxl", full_size, "int8", "table.npz")  # a table needs no GPU


def test_saved_table_has_a_plain_file_mode(tiny, tmp_path):
    import os
    import stat

    component, table, _ = tiny
    table.save(tmp_path / "t.npz")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "t.npz").stat().st_mode) == 0o666 & ~mask


def test_8bit_from_a_single_file_needs_a_table(tiny, tmp_path):
    from trt_sdxl.calibration import workflow

    component, _, _ = tiny
    single = tiny_models.make_single_file("weights/tiny-sdxl/unet", tmp_path / "sdxl.safetensors")
    with pytest.raises(UserError, match="needs the tokenizers of a diffusers pipeline folder.*--calibration FILE"):
        workflow.calibrate_and_tune(single, component, "int8", height=64, width=64)


def test_calibrations_with_and_without_a_lora_join_as_more_prompts(tmp_path):
    """`build --calibrate-lora`: the prompts run again on the UNet with a LoRA merged, into the same statistics —
    per-call maxima side by side, channel maxima the larger, minima the smaller, means the mean of both."""
    from tiny_loras import tiny_default_lora

    from trt_sdxl import lora
    from trt_sdxl.calibration.calibrate import StatsCollector, calibrate_into

    component = weights.open_component("weights/tiny-sdxl", "unet")
    merged = lora.merged(weights.open_component("weights/tiny-sdxl", "unet"),
                         lora.LoRASet.load([tiny_default_lora(tmp_path / "style.safetensors", components=("unet",))]))
    cfg = UNetConfig.parse(component.config)
    encode, prompts = random_encoder(cfg), ["calibration 0", "calibration 1"]
    executors = [NetexecExecutor(define(c, calibration_taps=True)) for c in (component, merged)]
    run = dict(steps=RUN["steps"], latent_shape=RUN["latent_shape"])
    alone = [calibrate.run_calibration(e, encode, prompts, **run) for e in executors]
    joint = StatsCollector(2 * len(prompts), RUN["steps"])
    for k, e in enumerate(executors):
        calibrate_into(joint, e, encode, prompts, offset=k * len(prompts), **run)
    table = joint.table({})
    moved = 0
    for path, amax in table.tensor_amax.items():
        np.testing.assert_array_equal(amax, np.concatenate([t.tensor_amax[path] for t in alone]))
        a, b = (t.channel_amax[path] for t in alone)
        np.testing.assert_array_equal(table.channel_amax[path][1], np.maximum(a[1], b[1]))
        np.testing.assert_array_equal(table.channel_amax[path][2], np.minimum(a[2], b[2]))
        np.testing.assert_allclose(table.channel_amax[path][0], (a[0] + b[0]) / 2, rtol=1e-6)
        moved += not np.array_equal(a, b)
    assert moved > 10  # the LoRA changes what many layers see
