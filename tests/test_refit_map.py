"""The refit map: every weight a network binds, recomputed from a checkpoint with a LoRA merged in,
equals, bit for bit, what a fresh definition from that checkpoint binds (an 8-bit one: with the base
build's quant plan, which a refit keeps); only the weights the LoRA touches change; and TensorRT knows
every refittable weight by its map name."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_loras import tiny_default_lora
from test_quant import all_groups, calibrated

from trt_sdxl import lora, refit_map, weights
from trt_sdxl.components import DEFAULT_MODEL
from trt_sdxl.models import clip, unet
from trt_sdxl.quant.percentile import AmaxRule
from trt_sdxl.refit_map import NetworkWeights

UNET_TOUCHED = {f"down_blocks.1.attentions.0.transformer_blocks.0.attn1.{p}.weight" for p in ("to_q", "to_v")}


def bits(a: np.ndarray) -> np.ndarray:
    return a.view({2: np.uint16, 4: np.uint32}[a.itemsize])


def assert_binds(defined, recomputed: dict[str, np.ndarray]) -> None:
    """Every recomputed array equals, bit for bit, what `defined`'s network binds under that name."""
    bound = NetworkWeights(defined.network, recomputed)
    for name, array in recomputed.items():
        held = bound.get(name)
        assert array.dtype == held.dtype and array.size == held.size, (name, array.dtype, held.dtype)
        assert np.array_equal(bits(array.reshape(-1)), bits(held.reshape(-1))), \
            f"{name}: max |diff| {np.abs(array.astype(np.float64).reshape(-1) - held.astype(np.float64).reshape(-1)).max()}"


@pytest.fixture(scope="module")
def lora_set(tmp_path_factory):
    path = tiny_default_lora(tmp_path_factory.mktemp("lora") / "style.safetensors")
    return lora.LoRASet.load([f"{path}:0.8"])


@pytest.mark.parametrize("component", ["unet", "text_encoder", "text_encoder_2"])
def test_fp16_refit_weights_equal_a_fresh_definition_bit_for_bit(lora_set, component):
    base = weights.open_component(DEFAULT_MODEL, component)
    merged = lora.merged(weights.open_component(DEFAULT_MODEL, component), lora_set)

    def define(source):
        if component == "unet":
            return unet.define(source, batch=2, latent_height=8, latent_width=8)
        return clip.define(source, encoder=1 if component == "text_encoder" else 2)

    base_net, fresh = define(base), define(merged)
    refit = base_net.definition.refit
    assert_binds(fresh, refit_map.refit_weights(refit, merged))
    assert_binds(base_net, refit_map.refit_weights(refit, base))
    touched = refit_map.touched(refit, merged.deltas)
    expected = {"unet": UNET_TOUCHED, "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj.weight"},
                "text_encoder_2": {"text_model.encoder.layers.0.self_attn.q_proj.weight"}}[component]
    assert set(touched) == expected
    changed = {n for n in refit if not np.array_equal(refit_map.recompute(n, refit, base),
                                                      refit_map.recompute(n, refit, merged))}
    assert changed == expected  # nothing else moves
    assert [n for n, e in refit.items() if e.scale != 1.0], "the attention 1/sqrt(d) scale is in the map"
    assert set(refit_map.refittable(refit)) == {n for n, e in refit.items() if e.role == "weight"}


@pytest.fixture(scope="module")
def calibrated_unet():
    """The tiny default's UNet and its calibration (2 prompts). With every smoothing group at alpha 0.5,
    SmoothQuant folds into norms, to_v rows, GEGLU value rows and explicit multiplies: every transform of the map."""
    component = weights.open_component(DEFAULT_MODEL, "unet")
    table, _ = calibrated(component, prompts=2)
    return component, table


@pytest.mark.parametrize("recipe", ["int8", "fp8"])
def test_8bit_refit_requantizes_the_weights_with_the_build_plan_bit_for_bit(lora_set, calibrated_unet, recipe):
    """An 8-bit network keeps its plan (SmoothQuant factors, activation scales): the recomputed weights and their
    per-channel (int8) or per-tensor (fp8) scales equal what a definition of the merged checkpoint with that plan
    binds, and exactly the LoRA's weights and their scales change."""
    base, table = calibrated_unet
    alphas = all_groups(base, table, recipe)
    merged = lora.merged(weights.open_component(DEFAULT_MODEL, "unet"), lora_set)
    options = {"rule": AmaxRule(), "alphas": alphas}
    base_net = unet.define(base, recipe, batch=2, latent_height=8, latent_width=8, calibration=table,
                           quant_options=options)
    plan = base_net.definition.quant
    fresh = unet.define(merged, recipe, batch=2, latent_height=8, latent_width=8, quant_plan=plan)
    refit = base_net.definition.refit
    roles = {e.role for e in refit.values()}
    transforms = {e.transform for e in refit.values()}
    assert {"weight", "weight scale", "bias", "norm"} <= roles and {"smoothed", "norm fold"} <= transforms
    assert plan.norm_divisors and plan.row_divisors and plan.explicit  # every fold kind is in the plan
    assert_binds(fresh, refit_map.refit_weights(refit, merged, plan))
    assert_binds(base_net, refit_map.refit_weights(refit, base, plan))
    touched = set(refit_map.touched(refit, merged.deltas))
    assert touched == UNET_TOUCHED | {n.replace(".weight", ".weight_scale") for n in UNET_TOUCHED}
    v = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"
    assert all(refit[n].transform == "smoothed" for n in UNET_TOUCHED)
    if recipe == "fp8":  # FP8 quantizes attention-out, whose 1/s sits in to_v's rows: the fold is recomputed too
        assert v in plan.row_divisors
    scale = refit_map.recompute(f"{v}.weight_scale", refit, merged, plan)
    assert scale.shape == ((refit[f"{v}.weight"].shape[0],) if recipe == "int8" else ())


def test_every_refittable_weight_is_named_for_tensorrt():
    """mark_weights_refittable finds every refittable weight of an 8-bit UNet by its map name (constants,
    per-channel scales); and of an FP16 one (its convolutions' own kernels): what a refittable build marks."""
    from trt_sdxl.models.unet import placement_table

    component = weights.open_component(DEFAULT_MODEL, "unet")
    fp16 = unet.define(component, batch=2, latent_height=8, latent_width=8)
    int8 = unet.define(component, "int8", batch=2, latent_height=8, latent_width=8,
                       calibration=placement_table(component), quant_options={"rule": AmaxRule(), "alphas": {}})
    for net in (fp16, int8):
        names = refit_map.refittable(net.definition.refit)
        assert len(names) > 50
        assert all(net.network.mark_weights_refittable(n) for n in names), \
            [n for n in names if not net.network.are_weights_marked_refittable(n)][:5]
    convs = [n for n, e in fp16.definition.refit.items() if e.role == "weight" and len(e.shape) == 4]
    assert len(convs) > 20  # among them the FP16 convolutions' own kernels, which are Weights of the layer
