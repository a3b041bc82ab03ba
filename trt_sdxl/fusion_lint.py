"""Fusion lint: every Q/DQ of a defined 8-bit network checked against TensorRT's fusion rules.

An 8-bit engine is only faster than FP16 when the builder folds each Quantize into the kernel
that produces its input and each Dequantize into the 8-bit kernel that consumes it; a Q/DQ it
cannot fold runs as its own memory-bound pass, and a misplaced one can make the engine slower
than FP16. No engine runs on our machines, so the placement is checked here, statically, on the
network definition, against the rules of TensorRT's developer guide, "Working with Quantized
Types" -> "Explicit Quantization" (docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/
quantized-types-explicit-quantization.html):

- `dq-consumer` ("Q/DQ Fusion"; DQ propagates forward through layout-only layers, "commuting"
  ones): every Dequantize reaches, directly or through shuffles, only inputs of convolutions,
  matrix multiplies or attention — the operations with 8-bit kernels.
- `qdq-pair` ("Q/DQ Fusion"): every Quantize feeds Dequantize layers only, with the same scale.
- `weight-chain` ("Quantized Weights"): a quantized weight is constant -> Q -> DQ, the DQ feeding
  the weight input of its convolution or matrix multiply.
- `both-inputs` ("Q/DQ Layer-Placement Recommendations": quantize all inputs of weighted
  operations): a convolution or matrix multiply with one 8-bit input has both; an attention with
  an 8-bit q, k or v has all three.
- `mha-direct` ("Working with Transformers" -> "Multi-Head Attention Fusion", docs.nvidia.com/
  deeplearning/tensorrt/latest/inference-library/work-with-transformers.html: the 8-bit MHA
  pattern has its Q/DQ on the BMM inputs): the q, k, v of an 8-bit attention (or the operands of
  an activation x activation BMM) come straight out of their Dequantize, after the head
  reshape/transpose, as ModelOpt's FP8 MHA export and NVIDIA's SDXL demo place them — not through
  a shuffle.
- `one-q-per-tensor` ("Q/DQ Layer-Placement Recommendations"; one quantization of a tensor, its
  consumers sharing it): no tensor feeds two Quantize layers — whether their scales agree (a
  duplicate pass) or not (one tensor, two precisions).
- `q-producer` ("Q/DQ Fusion"; Q propagates backward through commuting layers — shuffle, slice,
  concatenation, nearest resize): walking back from a Quantize, every producer reached is one
  whose kernel can write the quantized output (a pointwise op, a normalization, a softmax, a
  convolution or matrix multiply, an attention output, a cast) — which also covers the residual
  adds and the GEGLU product that feed quantized layers — or a network input (its Quantize is
  one pass over the input, once per call).

`lint(network)` returns the findings; `report(findings)` what build_report.json records.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

LAYOUT = ("SHUFFLE",)  # DQ propagates forward through these to its consumer
COMMUTING = ("SHUFFLE", "SLICE", "CONCATENATION", "RESIZE")  # Q propagates backward through these
EIGHT_BIT_CONSUMERS = ("CONVOLUTION", "MATRIX_MULTIPLY", "ATTENTION_INPUT")
FUSABLE_PRODUCERS = ("ELEMENTWISE", "ACTIVATION", "UNARY", "NORMALIZATION", "SOFTMAX", "CONVOLUTION",
                     "MATRIX_MULTIPLY", "ATTENTION_OUTPUT", "CAST", "CONSTANT")
RULES = ("dq-consumer", "qdq-pair", "weight-chain", "both-inputs", "mha-direct", "one-q-per-tensor", "q-producer")


@dataclass(frozen=True)
class Finding:
    rule: str
    layer: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.layer}: {self.message}"


class _Graph:
    """Producers and consumers of every tensor of a network, by tensor name."""

    def __init__(self, network):
        self.layers = [network.get_layer(i) for i in range(network.num_layers)]
        self.producer: dict[str, object] = {}
        self.consumers: dict[str, list[tuple[object, int]]] = {}
        for layer in self.layers:
            for j in range(layer.num_outputs):
                self.producer[layer.get_output(j).name] = layer
            for j in range(layer.num_inputs):
                t = layer.get_input(j)
                if t is not None:
                    self.consumers.setdefault(t.name, []).append((layer, j))

    @staticmethod
    def kind(layer) -> str:
        return layer.type.name

    def source(self, tensor):
        """The layer producing `tensor`, looking through layout-only layers (None: a network input)."""
        layer = self.producer.get(tensor.name)
        while layer is not None and self.kind(layer) in LAYOUT:
            layer = self.producer.get(layer.get_input(0).name)
        return layer

    def uses(self, tensor) -> list[tuple[object, int]]:
        """(layer, input index) reading `tensor`, looking through layout-only layers."""
        out = []
        for layer, index in self.consumers.get(tensor.name, []):
            if self.kind(layer) in LAYOUT and index == 0:
                out.extend(self.uses(layer.get_output(0)))
            else:
                out.append((layer, index))
        return out

    def producers_back(self, tensor) -> list:
        """Producers reached walking back from `tensor` through commuting layers (None: an input)."""
        layer = self.producer.get(tensor.name)
        if layer is None:
            return [None]
        if self.kind(layer) not in COMMUTING:
            return [layer]
        if self.kind(layer) == "CONCATENATION":
            inputs = [layer.get_input(j) for j in range(layer.num_inputs)]
        else:
            inputs = [layer.get_input(0)]
        return [p for t in inputs if t is not None for p in self.producers_back(t)]

    def is_dq(self, tensor) -> bool:
        layer = self.source(tensor)
        return layer is not None and self.kind(layer) == "DEQUANTIZE"

    def is_weight(self, tensor) -> bool:
        """Whether `tensor` is a dequantized constant (a quantized weight), through layout layers."""
        dq = self.source(tensor)
        q = self.producer.get(dq.get_input(0).name) if dq is not None else None
        c = self.producer.get(q.get_input(0).name) if q is not None else None
        return c is not None and self.kind(c) == "CONSTANT"


def _data_inputs(graph: _Graph, layer) -> list:
    """The operand inputs of an 8-bit candidate (a convolution's data and kernel, both matmul operands,
    an attention's q, k, v)."""
    kind = graph.kind(layer)
    count = {"CONVOLUTION": 2, "MATRIX_MULTIPLY": 2, "ATTENTION_INPUT": 3}[kind]
    return [layer.get_input(j) for j in range(min(count, layer.num_inputs))]


def lint(network) -> list[Finding]:
    """Every rule's findings on `network` (an INetworkDefinition), in layer order."""
    g = _Graph(network)
    findings: list[Finding] = []
    quantized_tensors: Counter = Counter()
    for layer in g.layers:
        kind = g.kind(layer)
        if kind == "DEQUANTIZE":
            for consumer, index in g.uses(layer.get_output(0)):
                if g.kind(consumer) not in EIGHT_BIT_CONSUMERS:
                    findings.append(Finding("dq-consumer", layer.name, f"feeds {g.kind(consumer).lower()} "
                                            f"{consumer.name!r} (input {index}), which has no 8-bit kernel: the "
                                            "dequantize runs as its own pass"))
        elif kind == "QUANTIZE":
            x = layer.get_input(0)
            quantized_tensors[x.name] += 1
            scale = layer.get_input(1).name
            for consumer, _ in g.consumers.get(layer.get_output(0).name, []):
                if g.kind(consumer) != "DEQUANTIZE" or consumer.get_input(1).name != scale:
                    what = g.kind(consumer).lower() if g.kind(consumer) != "DEQUANTIZE" else "a dequantize of another scale"
                    findings.append(Finding("qdq-pair", layer.name, f"feeds {what} {consumer.name!r}"))
            source = g.producer.get(x.name)
            if source is not None and g.kind(source) == "CONSTANT":
                for dq, _ in g.consumers.get(layer.get_output(0).name, []):
                    for consumer, index in g.uses(dq.get_output(0)):
                        weight_input = (g.kind(consumer) == "CONVOLUTION" and index == 1) or \
                            g.kind(consumer) == "MATRIX_MULTIPLY"
                        if not weight_input:
                            findings.append(Finding("weight-chain", layer.name, f"a quantized constant reaches "
                                                    f"{consumer.name!r} input {index}, not a weight input"))
            else:
                for producer in g.producers_back(x):
                    if producer is not None and g.kind(producer) not in FUSABLE_PRODUCERS:
                        findings.append(Finding("q-producer", layer.name, f"quantizes the output of "
                                                f"{g.kind(producer).lower()} {producer.name!r}, which cannot write "
                                                "it quantized: the quantize runs as its own pass"))
        elif kind in EIGHT_BIT_CONSUMERS:
            operands = _data_inputs(g, layer)
            eight = [g.is_dq(t) for t in operands]
            if any(eight) and not all(eight):
                low = [j for j, e in enumerate(eight) if not e]
                findings.append(Finding("both-inputs", layer.name, f"8-bit on some operands, high precision on "
                                        f"input(s) {low}: it cannot run as an 8-bit kernel"))
            attention_like = kind == "ATTENTION_INPUT" or (
                kind == "MATRIX_MULTIPLY" and all(eight) and not any(g.is_weight(t) for t in operands))
            if attention_like and all(eight):
                for j, t in enumerate(operands):
                    direct = g.producer.get(t.name)
                    if g.kind(direct) != "DEQUANTIZE":
                        findings.append(Finding("mha-direct", layer.name, f"operand {j} reaches it through "
                                                f"{g.kind(direct).lower()} {direct.name!r} after its dequantize; "
                                                "place the Q/DQ after the head reshape/transpose"))
    for tensor, count in quantized_tensors.items():
        if count > 1:
            scales = {q.get_input(1).name for q, _ in g.consumers[tensor] if g.kind(q) == "QUANTIZE"}
            findings.append(Finding("one-q-per-tensor", tensor, f"quantized by {count} Quantize layers"
                                    + (" with different scales" if len(scales) > 1 else "")))
    return findings


def report(findings: list[Finding], limit: int = 20) -> dict:
    """{"findings": n, "by_rule": {rule: n}, "first": [message, ...]} for build_report.json."""
    return {"findings": len(findings), "by_rule": dict(Counter(f.rule for f in findings)),
            "first": [str(f) for f in findings[:limit]], "rules": list(RULES)}
