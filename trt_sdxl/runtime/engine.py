"""TensorRT engines on the GPU: loading through the backend's runtime, tensor addresses,
`execute_async_v3`, and `EngineExecutor`, the executor seam (`run(feeds) -> outputs`) on an engine.

The executor returns every output the engine has, so the calibration engine (the FP16 UNet plus
`amax:<path>` / `rows:<path>` outputs, trt_sdxl.quant) runs through it unchanged.

With TensorRT-RTX an engine loaded from a file keeps its just-in-time compiled kernels in a runtime
cache next to it (trt_sdxl.runtime.runtime_cache), saved once the first enqueue has completed
(`save_runtime_cache`, which the executor and the denoiser call) and when the engine is released.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from .. import backend, dtypes
from ..errors import UserError
from . import cuda
from .cuda import CudaError, DeviceBuffer, HostBuffer, Stream
from .manifest import EnginesFolder
from .runtime_cache import RuntimeCache, RuntimeCacheFile

TensorSpecs = dict[str, tuple[tuple[int, ...], np.dtype]]


def check_backend_runs_here(name: str, rebuild: str | None = None) -> None:
    """TensorRT-RTX runs on the architectures it compiles kernels for (its ComputeCapability targets:
    GeForce RTX and RTX PRO GPUs, not Hopper's SM90 for instance); on another GPU it cannot load an
    engine, so say so, and how to go on: NVIDIA TensorRT, or the CPU. `rebuild`: the build command
    of the engines folder."""
    be = backend.get()
    if not be.is_rtx or not be.aot_targets:
        return
    gpu, (major, minor) = cuda.current_gpu()
    present = f"SM{major}{minor}"
    if present in be.aot_targets:
        return
    then = f"rebuild the engines with `TRT_SDXL_BACKEND=tensorrt {rebuild}`" if rebuild else \
        "run again with TRT_SDXL_BACKEND=tensorrt"
    raise UserError(f"{name}: {be.name} {be.version} does not run on this GPU ({gpu}, {present}); it supports "
                    f"{', '.join(be.aot_targets)}. On this GPU use NVIDIA TensorRT: pip install -e .[trt], then "
                    f"{then}; or run the networks on the CPU with --cpu")


def profile_for(profiles: list[dict], shapes: dict[str, tuple]) -> int | None:
    """Index of the first optimization profile ({input: (min, opt, max)}) whose ranges hold `shapes`."""
    for k, profile in enumerate(profiles):
        if all(all(lo <= v <= hi for lo, v, hi in zip(profile[n][0], shape, profile[n][2]))
               and len(shape) == len(profile[n][0]) for n, shape in shapes.items()):
            return k
    return None


def describe_profiles(profiles: list[dict]) -> str:
    return "; or ".join(", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, _, hi) in p.items()) for p in profiles)


class Engine:
    """A deserialized engine and one execution context; `inputs`/`outputs`: name -> (shape, numpy dtype),
    -1 on a dynamic axis, and `profiles` its optimization profiles ([{input: (min, opt, max)}], [] for a
    static engine). `set_shapes` gives the next enqueue its input shapes (switching the context to the
    profile that holds them); `max_shapes` is what buffers are allocated for. The context's own scratch
    memory is allocated by TensorRT, once, for the largest shapes of its profiles.
    `rebuild`: the command that makes the engine again, for the messages."""

    def __init__(self, plan: bytes, name: str, cache_file: RuntimeCacheFile | None = None,
                 rebuild: str | None = None):
        check_backend_runs_here(name, rebuild)
        be = backend.get()
        trt = be.module
        self.name = name
        self.runtime = trt.Runtime(backend.logger())
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise UserError(f"{name}: {be.name} {be.version} could not load this engine (its messages above say why)")
        self.runtime_cache = RuntimeCache(self.engine, cache_file) if be.has_runtime_cache else None
        if self.runtime_cache is not None and be.has_shape_specialization:
            # TensorRT-RTX compiles kernels specialized to each shape it meets; LAZY (its default) runs generic
            # ones until they are ready, in the background, and a CUDA graph captured meanwhile would keep the
            # generic ones. EAGER compiles them in the warm-up enqueue of each new shape, before the capture.
            self.runtime_cache.config.dynamic_shapes_kernel_specialization_strategy = \
                trt.DynamicShapesKernelSpecializationStrategy.EAGER
        if self.runtime_cache is None:
            self.context = self.engine.create_execution_context()
        else:
            self.context = self.engine.create_execution_context(self.runtime_cache.config)
        if self.context is None:
            raise CudaError(f"{name}: TensorRT could not create an execution context (out of GPU memory?)")
        self.inputs: TensorSpecs = {}
        self.outputs: TensorSpecs = {}
        for i in range(self.engine.num_io_tensors):
            tensor = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(tensor))
            trt_type = self.engine.get_tensor_dtype(tensor)
            np_type = dtypes.to_numpy(trt_type)
            if np_type is None:
                raise UserError(f"{name}: tensor {tensor!r} has data type {trt_type.name}, which has no numpy "
                                "equivalent")
            is_input = self.engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs)[tensor] = (shape, np_type)
        self.profiles: list[dict] = []
        if self.dynamic:
            for k in range(self.engine.num_optimization_profiles):
                self.profiles.append({n: tuple(tuple(int(v) for v in s) for s in
                                               self.engine.get_tensor_profile_shape(n, k)) for n in self.inputs})
        self.profile = 0  # the context's current optimization profile

    @property
    def dynamic(self) -> bool:
        return any(-1 in shape for shape, _ in self.inputs.values())

    def set_shapes(self, shapes: dict[str, tuple], stream: Stream) -> dict[str, tuple]:
        """The input shapes of the next enqueues -> every I/O tensor's shape (TensorRT infers the outputs').
        A static engine takes exactly its shapes; a dynamic one any inside one of its profiles."""
        if not self.dynamic:
            for n, shape in shapes.items():
                if tuple(shape) != self.inputs[n][0]:
                    raise UserError(f"{self.name}: input {n!r} is {tuple(shape)}, the engine takes {self.inputs[n][0]}")
            return {n: spec[0] for n, spec in {**self.inputs, **self.outputs}.items()}
        k = profile_for(self.profiles, shapes)
        if k is None:
            raise UserError(f"{self.name}: inputs {({n: tuple(s) for n, s in shapes.items()})} are outside its "
                            f"profiles ({describe_profiles(self.profiles)})")
        if k != self.profile:
            if not self.context.set_optimization_profile_async(k, int(stream)):
                raise CudaError(f"{self.name}: set_optimization_profile_async({k}) was refused")
            self.profile = k
        for n, shape in shapes.items():
            if not self.context.set_input_shape(n, tuple(int(v) for v in shape)):
                raise CudaError(f"{self.name}: set_input_shape({n!r}, {tuple(shape)}) was refused")
        out = {n: tuple(int(v) for v in shapes[n]) for n in self.inputs}
        out.update({n: tuple(int(v) for v in self.context.get_tensor_shape(n)) for n in self.outputs})
        return out

    def max_shapes(self, stream: Stream) -> dict[str, tuple]:
        """Each I/O tensor's largest shape over the profiles (outputs as TensorRT infers them there)."""
        if not self.dynamic:
            return {n: spec[0] for n, spec in {**self.inputs, **self.outputs}.items()}
        best: dict[str, tuple] = {}
        for profile in self.profiles:
            for n, shape in self.set_shapes({n: hi for n, (_, _, hi) in profile.items()}, stream).items():
                best[n] = tuple(max(a, b) for a, b in zip(best.get(n, shape), shape))
        return best

    @classmethod
    def load(cls, path: Path) -> Engine:
        be = backend.get()
        path = Path(path)
        rebuild = EnginesFolder(path.parent).rebuild_command() if (path.parent / "manifest.json").is_file() else None
        try:
            cache_file = RuntimeCacheFile(path, be.version) if be.has_runtime_cache else None
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as plan:
                # memory-mapped: TensorRT reads the plan from the page cache, with no host copy of a 5 GiB UNet
                return cls(plan, str(path), cache_file, rebuild)
        except OSError as e:
            raise UserError(f"{path}: cannot read the engine ({e.strerror})") from None
        except ValueError:  # mmap of an empty file
            raise UserError(f"{path}: the engine file is empty; rebuild with `{rebuild or 'python -m trt_sdxl.build'}`") \
                from None

    @classmethod
    def from_network(cls, defined, name: str) -> Engine:
        """Build a defined network (anything with `.definition`) for this GPU and load it, in memory:
        the way to run a network no engines folder holds, such as the calibration network."""
        from ..engines import build_engine

        check_backend_runs_here(name)
        plan, _ = build_engine(defined.definition, "native", profiles=defined.profiles if defined.dynamic else None)
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

    def save_runtime_cache(self) -> None:
        """Persist the kernels TensorRT-RTX compiled so far (call once an enqueue has completed)."""
        if self.runtime_cache is not None:
            self.runtime_cache.save()

    def release(self) -> None:
        """Save the runtime cache, then destroy what loading made in the reverse order: the execution
        context, the runtime config and cache it was created with, the engine, the runtime."""
        if self.context is None:
            return
        self.save_runtime_cache()
        self.context = None
        self.runtime_cache = None
        self.engine = None
        self.runtime = None


class EngineRefitter:
    """TensorRT's refitter over a loaded engine built refittable (`build --refittable`): `refit({name: array})`
    sets those weights — each must have the dtype and size the engine was built with — supplies any other
    weight TensorRT then asks for through `missing` (names -> arrays), and refits on `stream`. The engine's
    execution contexts stay valid (TensorRT's refit documentation); CUDA graphs captured before are the
    caller's to drop, since no documentation says they see the new weights."""

    def __init__(self, engine: Engine):
        trt = backend.trt()
        self.engine = engine
        self.refitter = trt.Refitter(engine.engine, backend.logger())
        self.names = set(self.refitter.get_all_weights())
        if not self.names:
            raise UserError(f"{engine.name}: the engine has no refittable weights; rebuild it with --refittable")

    def refit(self, weights: dict[str, np.ndarray], stream: Stream, missing=None) -> None:
        trt = backend.trt()
        unknown = sorted(set(weights) - self.names)
        if unknown:
            raise UserError(f"{self.engine.name}: weights {', '.join(unknown[:3])} are not refittable in this engine; "
                            "rebuild it with --refittable")
        held = []  # TensorRT reads host weights during the refit call: keep them alive until it returns

        def send(batch: dict[str, np.ndarray]) -> None:
            for name, array in batch.items():
                proto = self.refitter.get_weights_prototype(name)
                want = dtypes.to_numpy(proto.dtype)
                if want != array.dtype or proto.size != array.size:
                    raise UserError(f"{self.engine.name}: weight {name!r} is {want} x {proto.size} in the engine, "
                                    f"the refit has {array.dtype} x {array.size}; rebuild the engine")
                array = np.ascontiguousarray(array)
                held.append(array)
                if not self.refitter.set_named_weights(name, trt.Weights(array)):
                    raise CudaError(f"{self.engine.name}: TensorRT refused the weights of {name!r}")

        send(weights)
        asked = list(self.refitter.get_missing_weights())
        if asked and missing is not None:
            send(missing(asked))
            asked = list(self.refitter.get_missing_weights())
        if asked:
            raise CudaError(f"{self.engine.name}: TensorRT also wants weights {', '.join(asked[:3])} for this refit")
        if not self.refitter.refit_cuda_engine_async(int(stream)):
            raise CudaError(f"{self.engine.name}: the refit failed (TensorRT's messages above say why)")
        stream.synchronize()

    def serialize(self) -> bytes:
        """The refitted engine as a plan, to write in place of the old one."""
        plan = self.engine.engine.serialize()
        if plan is None:
            raise CudaError(f"{self.engine.name}: TensorRT could not serialize the refitted engine")
        return plan


def nbytes(spec: tuple[tuple[int, ...], np.dtype]) -> int:
    shape, dtype = spec
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def shaped(host: HostBuffer, shape: tuple[int, ...]) -> np.ndarray:
    """The first prod(shape) elements of a pinned buffer, as an array of `shape` (still pinned memory)."""
    return host.array.reshape(-1)[:int(np.prod(shape, dtype=np.int64))].reshape(shape)


class EngineExecutor:
    """Runs an engine on named numpy inputs and returns every output as numpy, through pinned host
    buffers and device buffers allocated once, for the engine's largest shapes; one stream (its own
    unless one is given, destroyed by `free`), synchronized at the end of each run. A dynamic engine
    takes any shapes inside its profiles (`max_batch`: the most rows one run takes). The engine stays
    its owner's to release."""

    def __init__(self, engine: Engine, stream: Stream | None = None):
        self.engine = engine
        self.inputs = engine.inputs
        self.outputs = engine.outputs
        self.own_stream = stream is None
        self.stream = Stream() if stream is None else stream
        self.runs = 0
        largest = engine.max_shapes(self.stream)
        specs = {name: (largest[name], spec[1]) for name, spec in {**engine.inputs, **engine.outputs}.items()}
        self.max_batch = largest[next(iter(engine.inputs))][0] if engine.dynamic else None
        self.device = {name: DeviceBuffer(nbytes(spec)) for name, spec in specs.items()}
        self.host = {name: HostBuffer(*spec) for name, spec in specs.items()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing, unknown = set(self.inputs) - set(feeds), set(feeds) - set(self.inputs)
        if missing or unknown:
            raise ValueError(f"{self.engine.name}: inputs missing {sorted(missing)}, unknown {sorted(unknown)}")
        values = {name: np.asarray(feeds[name]) for name in self.inputs}
        if not self.engine.dynamic:
            for name, (shape, _) in self.inputs.items():
                if values[name].shape != shape:
                    raise ValueError(f"{self.engine.name}: input {name!r} has shape {values[name].shape}, "
                                     f"the engine takes {shape}")
        shapes = self.engine.set_shapes({name: v.shape for name, v in values.items()}, self.stream)
        for name, (_, dtype) in self.inputs.items():
            host = shaped(self.host[name], shapes[name])
            host[...] = values[name].astype(dtype, copy=False)
            self.device[name].upload(host, self.stream)
        for name, buffer in self.device.items():  # every run: another user of the context may have moved them
            self.engine.set_address(name, buffer)
        self.engine.enqueue(self.stream)
        for name in self.outputs:
            self.device[name].download(shaped(self.host[name], shapes[name]), self.stream)
        self.stream.synchronize()
        self.runs += 1
        if self.runs == 1:  # what TensorRT-RTX compiled for the first enqueue is worth keeping at once
            self.engine.save_runtime_cache()
        return {name: shaped(self.host[name], shapes[name]).copy() for name in self.outputs}

    def free(self) -> None:
        for buffer in (*self.device.values(), *self.host.values()):
            buffer.free()
        if self.own_stream:
            self.stream.destroy()
