"""The weights a refit binds: each network weight recomputed from a checkpoint through the refit map
its definition recorded (trt_sdxl.layers.Definition.refit: checkpoint tensor, dtype, the 1/sqrt(d)
scale, the bound shape).

`refit_weights(defined, component)` gives, for every weight of `defined` that comes from the
checkpoint, the array a fresh definition of the same network from `component` (a LoRA merged in,
say) would bind, bit for bit (tests/test_refit.py). `changed` names the ones that differ, the
weights a refit has to send. The engine side (building refittable engines, TensorRT's Refitter) is
not here: TensorRT for RTX 1.7 builds refittable engines only with a GPU present.

8-bit networks: their weights pass through SmoothQuant's factors and per-channel quantization
(entries whose `transform` says so); recomputing those is not implemented and is refused.
"""

from __future__ import annotations

import numpy as np

from .errors import UserError


def recompute(entry, component) -> np.ndarray:
    """One weight as the network binds it, from `component`."""
    if entry.transform is not None:
        raise UserError(f"{entry.key}: refitting a weight that is {entry.transform} (an 8-bit network) is not "
                        "implemented; rebuild the engine with the LoRA (build --lora)")
    dtype = np.dtype(entry.dtype)
    array = component.get(entry.key, dtype=dtype, shape=entry.shape)
    if entry.scale != 1.0:
        array = (array.astype(np.float32) * entry.scale).astype(dtype)
    return np.ascontiguousarray(array.reshape(entry.bound_shape))


def refit_weights(defined, component, names=None) -> dict[str, np.ndarray]:
    """{weight name: array} of `defined`'s checkpoint weights (or of `names`), recomputed from `component`."""
    refit = defined.definition.refit
    return {name: recompute(refit[name], component) for name in (names or refit)}


def changed(defined, base, component) -> list[str]:
    """The weights that differ between `base` and `component` (those a LoRA touches)."""
    return [name for name, entry in defined.definition.refit.items()
            if not np.array_equal(recompute(entry, base), recompute(entry, component))]
