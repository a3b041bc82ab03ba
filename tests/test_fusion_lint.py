"""The fusion lint: zero findings on the full-size SDXL 8-bit UNets, and each rule catches the graph
it is about (one deliberately broken network per rule)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from trt_sdxl import backend, fusion_lint

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))


class Net:
    """A small strongly typed network to break rules in."""

    def __init__(self):
        self.trt = backend.trt()
        self.builder, self.network = backend.get().create_network()
        self.keep = []

    def input(self, name, shape):
        return self.network.add_input(name, self.trt.float16, shape)

    def const(self, array):
        array = np.ascontiguousarray(array)
        self.keep.append(array)
        return self.network.add_constant(array.shape, self.trt.Weights(array)).get_output(0)

    def qdq(self, x, scale=0.01):
        s = self.const(np.array(scale, np.float32))
        q = self.network.add_quantize(x, s, self.trt.int8)
        return self.network.add_dequantize(q.get_output(0), s, self.trt.float16).get_output(0)

    def weight(self, shape):
        return self.qdq(self.const(np.full(shape, 0.5, np.float16)))

    def conv(self, x, w):
        layer = self.network.add_convolution_nd(x, w.shape[0], (1, 1), self.trt.Weights(), self.trt.Weights())
        layer.set_input(1, w)
        return layer.get_output(0)

    def rules(self):
        return {f.rule for f in fusion_lint.lint(self.network)}


def test_a_well_placed_conv_and_gemm_pass():
    n = Net()
    x = n.input("x", (1, 4, 8, 8))
    y = n.conv(n.qdq(x), n.weight((4, 4, 1, 1)))
    act = n.network.add_activation(y, n.trt.ActivationType.RELU).get_output(0)
    a = n.network.add_shuffle(act)
    a.reshape_dims = (1, 4, 64)
    w = n.network.add_shuffle(n.weight((4, 4)))
    w.reshape_dims = (1, 4, 4)
    out = n.network.add_matrix_multiply(w.get_output(0), n.trt.MatrixOperation.NONE, n.qdq(a.get_output(0)),
                                        n.trt.MatrixOperation.NONE)
    n.network.mark_output(out.get_output(0))
    assert fusion_lint.lint(n.network) == []


def test_dq_consumer_a_dequantize_feeding_an_add():
    n = Net()
    x = n.input("x", (1, 4, 8, 8))
    n.network.mark_output(n.network.add_elementwise(n.qdq(x), x, n.trt.ElementWiseOperation.SUM).get_output(0))
    assert "dq-consumer" in n.rules()


def test_qdq_pair_a_quantize_without_its_dequantize():
    n = Net()
    x = n.input("x", (1, 4, 8, 8))
    q = n.network.add_quantize(x, n.const(np.array(0.01, np.float32)), n.trt.int8)
    cast = n.network.add_cast(q.get_output(0), n.trt.float16)
    n.network.mark_output(cast.get_output(0))
    assert "qdq-pair" in n.rules()


def test_weight_chain_a_quantized_constant_as_the_data_input():
    n = Net()
    x = n.input("x", (4, 4, 1, 1))
    n.network.mark_output(n.conv(n.weight((1, 4, 8, 8)), n.qdq(x)))
    assert "weight-chain" in n.rules()


def test_both_inputs_an_8_bit_input_with_a_high_precision_kernel():
    n = Net()
    x = n.input("x", (1, 4, 8, 8))
    n.network.mark_output(n.conv(n.qdq(x), n.const(np.full((4, 4, 1, 1), 0.5, np.float16))))
    assert n.rules() == {"both-inputs"}


@pytest.mark.skipif(not backend.get().has_attention_layer, reason="no attention layer in this backend")
def test_mha_direct_attention_qdq_before_the_head_shuffle():
    n = Net()
    trt = n.trt
    ins = []
    for name in "qkv":
        x = n.input(name, (2, 16, 64))  # [B, S, C] before the head split
        split = n.network.add_shuffle(n.qdq(x))
        split.reshape_dims = (2, 16, 2, 32)
        split.second_transpose = (0, 2, 1, 3)
        ins.append(split.get_output(0))
    att = n.network.add_attention(*ins, trt.AttentionNormalizationOp.SOFTMAX, False)
    n.network.mark_output(att.get_output(0))
    assert n.rules() == {"mha-direct"}


def test_one_q_per_tensor_two_quantizers_on_one_tensor():
    n = Net()
    x = n.input("x", (1, 4, 8, 8))
    n.network.mark_output(n.conv(n.qdq(x, 0.01), n.weight((4, 4, 1, 1))))
    n.network.mark_output(n.conv(n.qdq(x, 0.02), n.weight((4, 4, 1, 1))))
    found = fusion_lint.lint(n.network)
    assert [f.rule for f in found] == ["one-q-per-tensor"]
    assert "different scales" in found[0].message


def test_q_producer_a_quantize_after_a_reduction():
    n = Net()
    x = n.input("x", (1, 4, 8, 8))
    r = n.network.add_reduce(x, n.trt.ReduceOperation.MAX, 1 << 3, True).get_output(0)  # [1, 4, 8, 1]
    n.network.mark_output(n.conv(n.qdq(r), n.weight((4, 4, 1, 1))))
    assert n.rules() == {"q-producer"}


def test_report_counts_by_rule():
    n = Net()
    x = n.input("x", (1, 4, 8, 8))
    n.network.mark_output(n.network.add_elementwise(n.qdq(x), x, n.trt.ElementWiseOperation.SUM).get_output(0))
    r = fusion_lint.report(fusion_lint.lint(n.network))
    assert r["findings"] == 1 and r["by_rule"] == {"dq-consumer": 1} and r["first"][0].startswith("dq-consumer: ")


# ---------------------------------------------------------------- the real networks


@pytest.fixture(scope="module")
def full_size():
    """The full-size SDXL base UNet (zeros in the real layout) and a unit calibration table (which
    layers carry Q/DQ does not depend on the scales)."""
    pytest.importorskip("diffusers")
    import bench_build

    from trt_sdxl.models import unet

    component = bench_build.shape_only_component("unet")
    table = unet.placement_table(component)
    return component, table


@pytest.mark.parametrize("recipe", ["int8", "fp8"])
def test_full_size_sdxl_8bit_unet_has_no_findings(full_size, recipe):
    from trt_sdxl.models import unet
    from trt_sdxl.quant.percentile import AmaxRule

    component, table = full_size
    net = unet.define(component, recipe, batch=2, latent_height=128, latent_width=128, calibration=table,
                      quant_options={"rule": AmaxRule(), "alphas": {}})
    layers = [net.network.get_layer(i) for i in range(net.network.num_layers)]
    assert sum(layer.type.name == "QUANTIZE" for layer in layers) > 500  # the lint had Q/DQ to check
    found = fusion_lint.lint(net.network)
    assert found == [], "\n".join(map(str, found[:20]))


@pytest.mark.parametrize("recipe", ["int8", "int8_level3", "fp8", "fp8_gemm", "nvidia_modelopt_fp8"])
@pytest.mark.parametrize("unfused_attention", [False, True])
def test_default_model_with_smoothing_everywhere_has_no_findings(recipe, unfused_attention, monkeypatch):
    """Every recipe, with SmoothQuant's explicit multiplies and folds on every group, in both
    attention forms (the attention layer, and matmul-softmax-matmul for backends without it)."""
    from trt_sdxl import weights
    from trt_sdxl.components import DEFAULT_MODEL
    from trt_sdxl.models import unet
    from trt_sdxl.quant.percentile import AmaxRule
    from trt_sdxl.quant.plan import QuantPlan

    if unfused_attention:
        monkeypatch.setattr(backend.Backend, "has_attention_layer", property(lambda self: False))
    component = weights.open_component(DEFAULT_MODEL, "unet")
    table = unet.placement_table(component)
    groups = QuantPlan(recipe, table, component, rule=AmaxRule(), alphas={}).groups()
    net = unet.define(component, recipe, batch=2, latent_height=8, latent_width=8, calibration=table,
                      quant_options={"rule": AmaxRule(), "alphas": {g: 0.5 for g in groups}})
    assert groups and net.definition.quant.scales
    found = fusion_lint.lint(net.network)
    assert found == [], "\n".join(map(str, found[:20]))
