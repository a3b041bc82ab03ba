"""The executor seam: something that runs one network on named numpy inputs.

The pipeline and the calibration loop only call `executor.run(feeds) -> outputs`. Two
implementations exist: `NetexecExecutor` (numpy, CPU; tiny models and tests) here, and the
TensorRT engine executor in `trt_sdxl.runtime` (GPU). `inputs` describes what the network
takes (name -> (shape, numpy dtype)), so callers can check sizes before running.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from . import netexec

# netexec runs UNets up to this size in seconds per step; beyond it (a full-size SDXL UNet is
# 4.8 GiB) the CPU path would take hours, and the entry points refuse it.
NETEXEC_MAX_UNET_BYTES = 64 * 2**20


class Executor(Protocol):
    inputs: dict[str, tuple[tuple[int, ...], object]]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def free(self) -> None:
        """Release what the executor holds (device memory for an engine; nothing for netexec)."""


class NetexecExecutor:
    """Runs a defined network (anything with `.network` and `.inputs`) with netexec."""

    def __init__(self, defined, outputs: list[str] | None = None):
        self.defined = defined  # keeps builder and weights alive with the network
        self.network = defined.network
        self.inputs = defined.inputs
        self.outputs = outputs
        self.program = netexec.Program(self.network, outputs)  # prepared once, run every call
        # A dynamic batch runs in slices of the rows the network was defined at (denoising.run_batched):
        # numpy's float32 GEMMs round a row differently with a different number of rows beside it, and so
        # an image of a batch stays the image made alone, bit for bit.
        first = next(iter(defined.inputs.values()))[0] if defined.inputs else ()
        opt = getattr(defined, "opt_inputs", defined.inputs)
        self.max_batch = next(iter(opt.values()))[0][0] if first and first[0] < 0 else None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cast = {k: np.asarray(v).astype(self.inputs[k][1], copy=False) for k, v in feeds.items()}
        return self.program.run(cast)

    def free(self) -> None:
        self.defined = self.network = self.program = None
