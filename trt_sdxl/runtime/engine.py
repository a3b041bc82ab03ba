"""TensorRT engines on the GPU: loading through the backend's runtime, tensor addresses,
`execute_async_v3`, and `EngineExecutor`, the executor seam (`run(feeds) -> outputs`) on an engine.

The executor returns every output the engine has, so the calibration engine (the FP16 UNet plus
`amax:<path>` / `rows:<path>` outputs, trt_sdxl.quant) runs through it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import backend, dtypes
from ..errors import UserError
from .cuda import CudaError, DeviceBuffer, HostBuffer, Stream

TensorSpecs = dict[str, tuple[tuple[int, ...], np.dtype]]


class Engine:
    """A deserialized engine and one execution context; `inputs`/`outputs`: name -> (shape, numpy dtype)."""

    def __init__(self, plan: bytes, name: str):
        trt = backend.trt()
        self.name = name
        self.runtime = trt.Runtime(backend.logger())
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            be = backend.get()
            raise UserError(f"{name}: {be.name} {be.version} could not load this engine (its messages above say why)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise CudaError(f"{name}: TensorRT could not create an execution context (out of GPU memory?)")
        self.inputs: TensorSpecs = {}
        self.outputs: TensorSpecs = {}
        for i in range(self.engine.num_io_tensors):
            tensor = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(tensor))
            if any(d < 0 for d in shape):
                raise UserError(f"{name}: tensor {tensor!r} has a dynamic shape {shape}; this runtime runs engines "
                                "with fixed shapes, as trt_sdxl.build writes them")
            trt_type = self.engine.get_tensor_dtype(tensor)
            np_type = dtypes.to_numpy(trt_type)
            if np_type is None:
                raise UserError(f"{name}: tensor {tensor!r} has data type {trt_type.name}, which has no numpy "
                                "equivalent")
            is_input = self.engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs)[tensor] = (shape, np_type)

    @classmethod
    def load(cls, path: Path) -> Engine:
        try:
            plan = Path(path).read_bytes()
        except OSError as e:
            raise UserError(f"{path}: cannot read the engine ({e.strerror})") from None
        return cls(plan, str(path))

    @classmethod
    def from_network(cls, defined, name: str) -> Engine:
        """Build a defined network (anything with `.definition`) for this GPU and load it, in memory:
        the way to run a network no engines folder holds, such as the calibration network."""
        from ..engines import build_engine

        plan, _ = build_engine(defined.definition, "native")
        return cls(plan, name)

    def set_address(self, tensor: str, buffer: DeviceBuffer | int) -> None:
        if not self.context.set_tensor_address(tensor, int(buffer)):
            raise CudaError(f"{self.name}: set_tensor_address({tensor!r}) was refused (misaligned address?)")

    def capturable(self, stream: Stream) -> bool:
        """Whether an enqueue on `stream` may be captured into a CUDA graph."""
        check = getattr(self.context, "is_stream_capturable", None)
        return True if check is None else bool(check(int(stream)))

    def enqueue(self, stream: Stream) -> None:
        if not self.context.execute_async_v3(int(stream)):
            raise CudaError(f"{self.name}: execute_async_v3 failed (TensorRT's messages above say why)")


def nbytes(spec: tuple[tuple[int, ...], np.dtype]) -> int:
    shape, dtype = spec
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


class EngineExecutor:
    """Runs an engine on named numpy inputs and returns every output as numpy, through pinned host
    buffers and device buffers allocated once; one stream, synchronized at the end of each run."""

    def __init__(self, engine: Engine, stream: Stream | None = None):
        self.engine = engine
        self.inputs = engine.inputs
        self.outputs = engine.outputs
        self.stream = stream or Stream()
        specs = {**engine.inputs, **engine.outputs}
        self.device = {name: DeviceBuffer(nbytes(spec)) for name, spec in specs.items()}
        self.host = {name: HostBuffer(*spec) for name, spec in specs.items()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing, unknown = set(self.inputs) - set(feeds), set(feeds) - set(self.inputs)
        if missing or unknown:
            raise ValueError(f"{self.engine.name}: inputs missing {sorted(missing)}, unknown {sorted(unknown)}")
        for name, (shape, dtype) in self.inputs.items():
            value = np.asarray(feeds[name])
            if value.shape != shape:
                raise ValueError(f"{self.engine.name}: input {name!r} has shape {value.shape}, "
                                 f"the engine takes {shape}")
            self.host[name].array[...] = value.astype(dtype, copy=False)
            self.device[name].upload(self.host[name], self.stream)
        for name, buffer in self.device.items():  # every run: another user of the context may have moved them
            self.engine.set_address(name, buffer)
        self.engine.enqueue(self.stream)
        for name in self.outputs:
            self.device[name].download(self.host[name], self.stream)
        self.stream.synchronize()
        return {name: self.host[name].array.copy() for name in self.outputs}

    def free(self) -> None:
        for buffer in (*self.device.values(), *self.host.values()):
            buffer.free()
