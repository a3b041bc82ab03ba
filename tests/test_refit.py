"""The refit map: every weight a network binds, recomputed from a checkpoint with a LoRA merged in,
equals, bit for bit, what a fresh definition from that checkpoint binds; only the weights the LoRA
touches change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_build import tiny_default_lora

from trt_sdxl import backend, lora, refit, weights
from trt_sdxl.components import DEFAULT_MODEL
from trt_sdxl.errors import UserError
from trt_sdxl.models import clip, unet


def as_array(w) -> np.ndarray:
    return w if isinstance(w, np.ndarray) else w.numpy()


def bound_weights(defined) -> dict[str, np.ndarray]:
    """The arrays the network holds, by refit name: constants by their layer name, a convolution's own
    kernel and bias as `<layer>.weight` / `<layer>.bias`."""
    trt = backend.trt()
    found = {}
    network = defined.network
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.CONSTANT:
            layer.__class__ = trt.IConstantLayer
            found[layer.name] = np.array(as_array(layer.weights)).reshape(tuple(layer.shape))
        elif layer.type == trt.LayerType.CONVOLUTION:
            layer.__class__ = trt.IConvolutionLayer
            kernel, bias = as_array(layer.kernel), as_array(layer.bias)
            if kernel.size:
                found[f"{layer.name}.weight"] = np.array(kernel).reshape(layer.num_output_maps, -1, *layer.kernel_size_nd)
            if bias.size:
                found[f"{layer.name}.bias"] = np.array(bias)
    return found


@pytest.mark.parametrize("component", ["unet", "text_encoder", "text_encoder_2"])
def test_refit_weights_equal_a_fresh_definition_bit_for_bit(tmp_path, component):
    lora_set = lora.LoRASet.load([f"{tiny_default_lora(tmp_path / 'style.safetensors')}:0.8"])
    base = weights.open_component(DEFAULT_MODEL, component)
    merged = lora.merged(weights.open_component(DEFAULT_MODEL, component), lora_set)

    def define(source):
        if component == "unet":
            return unet.define(source, batch=2, latent_height=8, latent_width=8)
        return clip.define(source, encoder=1 if component == "text_encoder" else 2)

    base_net, fresh = define(base), define(merged)
    recomputed = refit.refit_weights(base_net, merged)
    bound = bound_weights(fresh)
    assert recomputed and set(recomputed) <= set(bound), sorted(set(recomputed) - set(bound))[:5]
    for name, array in recomputed.items():
        assert array.dtype == bound[name].dtype and array.shape == bound[name].shape, name
        assert np.array_equal(array.view(np.uint16 if array.itemsize == 2 else np.uint32),
                              bound[name].view(np.uint16 if array.itemsize == 2 else np.uint32)), name
    touched = refit.changed(base_net, base, merged)
    expected = {"unet": {f"down_blocks.1.attentions.0.transformer_blocks.0.attn1.{p}.weight" for p in ("to_q", "to_v")},
                "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj.weight"},
                "text_encoder_2": {"text_model.encoder.layers.0.self_attn.q_proj.weight"}}[component]
    assert set(touched) == expected
    scaled = [n for n, e in base_net.definition.refit.items() if e.scale != 1.0]
    assert scaled, "the attention 1/sqrt(d) scale is in the map"


def test_8bit_weights_are_refused_by_name(tmp_path):
    from test_build import FEW_PROMPTS  # noqa: F401  (the module's fixtures are not needed here)
    from trt_sdxl.models.unet import placement_table
    from trt_sdxl.quant.percentile import AmaxRule

    component = weights.open_component(DEFAULT_MODEL, "unet")
    net = unet.define(component, precision="int8", batch=2, latent_height=8, latent_width=8,
                      calibration=placement_table(component), quant_options={"rule": AmaxRule(), "alphas": {}})
    quantized = [n for n, e in net.definition.refit.items() if e.transform == "smoothed+quantized"]
    assert quantized
    with pytest.raises(UserError, match="smoothed\\+quantized .*not implemented; rebuild the engine with the LoRA"):
        refit.refit_weights(net, component, names=quantized[:1])
