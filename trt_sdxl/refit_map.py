"""The refit map's arithmetic: every weight a network binds, recomputed from a checkpoint.

A definition records, per weight it binds from the checkpoint (trt_sdxl.layers.Definition.refit), the
tensor, the dtype, the attention's 1/sqrt(d) scale, which quant-plan transform it passes through
(SmoothQuant's factor and row divisors, a norm's folded 1/s) and the bound shape; an 8-bit weight's
quantization scale is an entry of its own, computed from the weight. `recompute` follows an entry
with the same operations in the same order as the layer helpers, so for a checkpoint with a LoRA
merged in (trt_sdxl.lora) it gives, bit for bit, what a fresh definition from that checkpoint binds
(tests/test_refit_map.py) — for an 8-bit network, a fresh definition with the same quant plan: the
SmoothQuant factors and activation scales of the build are kept, and the weights are re-quantized
per channel. `touched` names the weights a LoRA changes, the ones a refit sends.

`NetworkWeights` reads and sets the weights a defined network binds, by the same names: the CPU
twin of TensorRT's refitter (netexec reads the network's weights at every run), and how the tests
see what a definition bound.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import backend
from .errors import UserError
from .layers import RefitEntry
from .quant.plan import weight_scales

REFITTABLE_ROLES = ("weight", "weight scale")
REFIT_THREADS = 8  # what a LoRA changes: linear and conv weights, and 8-bit scales


def recompute(name: str, refit: dict[str, RefitEntry], component, plan=None) -> np.ndarray:
    """Weight `name` of a refit map as a definition from `component` (with quant plan `plan`) binds it."""
    entry = refit[name]
    if entry.role == "weight scale":
        if plan is None:
            raise ValueError(f"{name}: an 8-bit weight's scale needs the network's quant plan")
        return weight_scales(recompute(entry.of, refit, component, plan), plan.format, plan.weight_axis) \
            .reshape(entry.bound_shape)
    dtype = np.dtype(entry.dtype)
    array = component.get(entry.key, dtype=dtype, shape=entry.shape)
    if entry.scale != 1.0:
        array = (array.astype(np.float32) * entry.scale).astype(dtype)
    if entry.transform is not None:
        if plan is None:
            raise ValueError(f"{name}: a weight the quant plan transforms ({entry.transform}) needs the plan")
        path = entry.key.rsplit(".", 1)[0]
        if entry.transform == "norm fold":
            array = plan.fold_norm_part(path, array)
        elif entry.role == "bias":
            array = plan.transform_bias(path, array)
        else:
            array = plan.transform_weight(path, array)
    return np.ascontiguousarray(array.reshape(entry.bound_shape))


def refit_weights(refit: dict[str, RefitEntry], component, plan=None, names=None) -> dict[str, np.ndarray]:
    """{weight name: array} of the map's weights (or of `names`), recomputed from `component`: on up to
    REFIT_THREADS threads, since numpy's casts and BLAS run outside the GIL and a full-size SDXL LoRA touches
    2 billion weights (tools/bench_refit.py)."""
    names = list(refit if names is None else names)
    weights = [n for n in names if refit[n].role != "weight scale"]
    threads = min(REFIT_THREADS, os.cpu_count() or 1, len(weights))
    if threads <= 1:
        done = {name: recompute(name, refit, component, plan) for name in weights}
    else:
        with ThreadPoolExecutor(threads) as pool:
            done = dict(zip(weights, pool.map(lambda name: recompute(name, refit, component, plan), weights)))
    for name in names:  # an 8-bit weight's scale, from the weight just recomputed where it was
        entry = refit[name]
        if entry.role == "weight scale":
            done[name] = weight_scales(done[entry.of], plan.format, plan.weight_axis).reshape(entry.bound_shape) \
                if entry.of in done else recompute(name, refit, component, plan)
    return {name: done[name] for name in names}


def touched(refit: dict[str, RefitEntry], keys) -> list[str]:
    """The weights that change when checkpoint tensors `keys` do (a LoRA's targets): those read from them,
    and the quantization scales of those."""
    keys = set(keys)
    names = [n for n, e in refit.items() if e.role == "weight" and e.key in keys]
    chosen = set(names)
    return names + [n for n, e in refit.items() if e.role == "weight scale" and e.of in chosen]


def refittable(refit: dict[str, RefitEntry]) -> list[str]:
    """The weights a refittable engine marks (TensorRT's REFIT_INDIVIDUAL): linear and conv weights and their
    8-bit scales. Biases, norms and embeddings stay build-time constants the builder may fold."""
    return [n for n, e in refit.items() if e.role in REFITTABLE_ROLES]


def to_json(refit: dict[str, RefitEntry]) -> dict:
    return {name: [e.key, e.dtype, list(e.shape), list(e.bound_shape), e.scale, e.transform, e.role, e.of]
            for name, e in refit.items()}


def from_json(data: dict, where: str) -> dict[str, RefitEntry]:
    try:
        return {name: RefitEntry(key, dtype, tuple(shape), tuple(bound), float(scale), transform, role, of)
                for name, (key, dtype, shape, bound, scale, transform, role, of) in data.items()}
    except (TypeError, ValueError):
        raise UserError(f"{where}: not a refit map written by this trt_sdxl; rebuild the engines") from None


class NetworkWeights:
    """The weights a defined network binds, by refit-map name: constant layers by their name, a
    convolution's own kernel and bias as `<layer>.weight` / `.bias`. `get(name)` reads one back;
    `set(weights)` replaces them in the network (shape and dtype must match what it binds), so netexec,
    which reads the network's weights at each run, computes with the new ones."""

    def __init__(self, network, names):
        trt = backend.trt()
        wanted = set(names)
        self.network = network
        self._slots: dict[str, tuple] = {}  # name -> (layer, attribute, shape)
        self._kept: dict[str, np.ndarray] = {}  # TensorRT does not copy weights: the arrays set are kept here
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.CONSTANT and layer.name in wanted:
                layer.__class__ = trt.IConstantLayer
                self._slots[layer.name] = (layer, "weights", tuple(layer.shape))
            elif layer.type == trt.LayerType.CONVOLUTION:
                layer.__class__ = trt.IConvolutionLayer
                if f"{layer.name}.weight" in wanted:
                    shape = (layer.num_output_maps, -1, *layer.kernel_size_nd)
                    self._slots[f"{layer.name}.weight"] = (layer, "kernel", shape)
                if f"{layer.name}.bias" in wanted:
                    self._slots[f"{layer.name}.bias"] = (layer, "bias", (layer.num_output_maps,))
        missing = sorted(wanted - self._slots.keys())
        if missing:
            raise ValueError(f"the network binds no weights named {', '.join(missing[:5])}")

    def names(self) -> list[str]:
        return list(self._slots)

    def get(self, name: str) -> np.ndarray:
        layer, attribute, shape = self._slots[name]
        w = getattr(layer, attribute)
        array = w if isinstance(w, np.ndarray) else w.numpy()
        return np.array(array).reshape(shape)

    def set(self, weights: dict[str, np.ndarray]) -> None:
        for name, array in weights.items():
            old = self.get(name)
            if array.dtype != old.dtype or array.size != old.size:
                raise ValueError(f"{name}: the network binds {old.dtype} {old.shape}, not {array.dtype} {array.shape}")
            layer, attribute, _ = self._slots[name]
            kept = self._kept[name] = np.ascontiguousarray(array)
            setattr(layer, attribute, kept)
