"""The CUDA driver API through cuda-python, every call checked: the GPU, device and pinned host
buffers, streams, events, CUDA graphs, and the NVRTC-compiled kernels of kernels/.

Only `cuda.bindings.driver` is used (no CUDA runtime API, no PyTorch). TensorRT runs in the
device's primary context, which `Device.open` makes current. A failed call raises `CudaError`
naming the call and the driver's error (`CUDA_ERROR_OUT_OF_MEMORY (out of memory)`).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .. import kernels as K
from . import nvrtc
from ..errors import UserError

try:
    from cuda.bindings import driver as cu
except ImportError:  # the `cuda` extra is not installed: nothing here can run, `probe` says why
    cu = None


class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the error."""


def check(result, what: str):
    """Unpack a cuda.bindings result tuple (error, *values): the value(s), or CudaError naming `what`."""
    err, *values = result
    if err != cu.CUresult.CUDA_SUCCESS:
        try:
            _, text = cu.cuGetErrorString(err)
            detail = f" ({text.decode()})" if text else ""
        except RuntimeError:  # the driver library itself is missing
            detail = ""
        raise CudaError(f"{what} failed: {getattr(err, 'name', err)}{detail}")
    return None if not values else values[0] if len(values) == 1 else tuple(values)


def call(name: str, *args, what: str = ""):
    """cu.<name>(*args), checked; `what` adds context to the error (e.g. the size asked for)."""
    return check(getattr(cu, name)(*args), f"{name}{f' ({what})' if what else ''}")


def probe() -> tuple[int, str]:
    """(number of CUDA GPUs, "" or why there is none), asking the driver; never raises."""
    if cu is None:
        return 0, "cuda-python is not installed (pip install 'trt_sdxl[cuda]')"
    try:
        (err,) = cu.cuInit(0)
    except RuntimeError:  # cuda.pathfinder: libcuda.so is not on this machine
        return 0, "the NVIDIA driver library (libcuda) is not installed"
    if err != cu.CUresult.CUDA_SUCCESS:
        return 0, f"the NVIDIA driver did not initialize ({getattr(err, 'name', err)})"
    err, count = cu.cuDeviceGetCount()
    if err != cu.CUresult.CUDA_SUCCESS or count == 0:
        return 0, "the NVIDIA driver reports no CUDA device"
    return count, ""


# ---------------------------------------------------------------- the GPU


@dataclass
class Device:
    """One GPU with its primary context current on this thread."""

    ordinal: int
    handle: object
    context: object
    name: str
    compute_capability: tuple[int, int]

    @classmethod
    def open(cls, ordinal: int = 0) -> Device:
        count, reason = probe()
        if count <= ordinal:
            raise UserError(f"GPU {ordinal}: not available ({reason or f'{count} GPU(s) present'})")
        handle = call("cuDeviceGet", ordinal)
        context = call("cuDevicePrimaryCtxRetain", handle)
        call("cuCtxSetCurrent", context)
        return cls(ordinal, handle, context, *_describe(handle))

    @property
    def sm(self) -> int:
        """89 for compute capability 8.9."""
        return 10 * self.compute_capability[0] + self.compute_capability[1]

    def synchronize(self) -> None:
        call("cuCtxSynchronize")

    def close(self) -> None:
        call("cuDevicePrimaryCtxRelease", self.handle)


def _describe(handle) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of a CUdevice."""
    name = call("cuDeviceGetName", 256, handle).split(b"\0")[0].decode(errors="replace")
    attr = cu.CUdevice_attribute
    major = call("cuDeviceGetAttribute", attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle)
    minor = call("cuDeviceGetAttribute", attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle)
    return name, (major, minor)


def current_gpu() -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of the GPU of the context current on this thread."""
    return _describe(call("cuCtxGetDevice"))


def memory_info() -> tuple[int, int]:
    """(free, total) bytes of the current context's GPU."""
    return call("cuMemGetInfo")


# ---------------------------------------------------------------- memory


class DeviceBuffer:
    """`nbytes` of device memory; `int(buffer)` is its address."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = int(call("cuMemAlloc", max(1, self.nbytes), what=f"{self.nbytes} bytes"))

    def __int__(self) -> int:
        return self.ptr

    def upload(self, host, stream: Stream, offset: int = 0) -> None:
        """Copy a HostBuffer (asynchronously) or a numpy array (pageable: the driver stages it) in. A copy
        from pageable memory cannot be captured into a CUDA graph: during a capture CUDA refuses it."""
        src, nbytes = _host_pointer(host)
        self._check_range(offset, nbytes)
        call("cuMemcpyHtoDAsync", self.ptr + offset, src, nbytes, stream.handle)

    def download(self, host, stream: Stream, offset: int = 0) -> None:
        """Copy into a HostBuffer or a writable numpy array; complete after `stream.synchronize()`."""
        dst, nbytes = _host_pointer(host)
        self._check_range(offset, nbytes)
        call("cuMemcpyDtoHAsync", dst, self.ptr + offset, nbytes, stream.handle)

    def copy_from(self, src: DeviceBuffer, nbytes: int, stream: Stream, dst_offset: int = 0,
                  src_offset: int = 0) -> None:
        self._check_range(dst_offset, nbytes)
        src._check_range(src_offset, nbytes)
        call("cuMemcpyDtoDAsync", self.ptr + dst_offset, src.ptr + src_offset, nbytes, stream.handle)

    def _check_range(self, offset: int, nbytes: int) -> None:
        if offset < 0 or offset + nbytes > self.nbytes:
            raise ValueError(f"bytes {offset}..{offset + nbytes} outside a device buffer of {self.nbytes} bytes")

    def free(self) -> None:
        if self.ptr:
            call("cuMemFree", self.ptr)
            self.ptr = 0


class HostBuffer:
    """Page-locked host memory seen as a numpy array (`.array`), for asynchronous copies; a copy
    captured into a CUDA graph reads or writes this memory each time the graph is replayed."""

    def __init__(self, shape, dtype):
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        self.nbytes = math.prod(shape) * dtype.itemsize
        self.ptr = int(call("cuMemHostAlloc", max(1, self.nbytes), 0, what=f"{self.nbytes} bytes"))
        raw = (ctypes.c_byte * max(1, self.nbytes)).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=np.uint8, count=self.nbytes).view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self.array = None
            call("cuMemFreeHost", self.ptr)
            self.ptr = 0


def _host_pointer(host) -> tuple[int, int]:
    if isinstance(host, HostBuffer):
        return host.ptr, host.nbytes
    if not isinstance(host, np.ndarray) or not host.flags.c_contiguous:
        raise TypeError("expected a HostBuffer or a C-contiguous numpy array")
    return host.__array_interface__["data"][0], host.nbytes  # the address of its first byte


# ---------------------------------------------------------------- streams, events, graphs


class Stream:
    """A non-blocking stream (it does not synchronize with the legacy default stream)."""

    def __init__(self):
        self.handle = call("cuStreamCreate", cu.CUstream_flags.CU_STREAM_NON_BLOCKING.value)

    def __int__(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        call("cuStreamSynchronize", self.handle)

    def wait(self, event: Event) -> None:
        """Work enqueued here from now on waits for `event`'s recorded work. During a capture this is how
        another stream joins it (fork: it waits on an event recorded on the capturing stream) and
        leaves it (join: the capturing stream waits on an event recorded on the other one)."""
        call("cuStreamWaitEvent", self.handle, event.handle, 0)

    @contextmanager
    def capture(self) -> Iterator[GraphCapture]:
        """Record the work enqueued inside the block into a CUDA graph instead of running it:

            with stream.capture() as captured:
                ...enqueue...; node = stream.captured_node()
            captured.graph.launch(stream)
        """
        call("cuStreamBeginCapture", self.handle, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        captured = GraphCapture()
        try:
            yield captured
        except BaseException:
            err, graph = cu.cuStreamEndCapture(self.handle)  # leave capture mode; the partial graph is dropped
            if err == cu.CUresult.CUDA_SUCCESS and int(graph):
                cu.cuGraphDestroy(graph)
            raise
        graph = call("cuStreamEndCapture", self.handle)
        try:
            captured.graph = Graph(call("cuGraphInstantiate", graph, 0), graph)
        except CudaError:
            call("cuGraphDestroy", graph)
            raise

    def captured_node(self):
        """The node the last operation enqueued during capture became (to update it later)."""
        status, _, _, dependencies, *_ = call("cuStreamGetCaptureInfo", self.handle)
        if status != cu.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_ACTIVE or len(dependencies) != 1:
            raise CudaError("captured_node: the stream is not capturing a single chain of operations")
        return dependencies[0]

    def destroy(self) -> None:
        if self.handle is not None:
            call("cuStreamDestroy", self.handle)
            self.handle = None


class GraphCapture:
    """Filled in when a `Stream.capture` block ends: `.graph`."""

    graph: Graph | None = None


class Graph:
    """An instantiated (executable) CUDA graph. Kernel nodes keep their structure between replays;
    `set_kernel_arguments` changes their scalar or pointer arguments for the next launches. The
    captured graph stays alive with it: its nodes are how the executable graph's nodes are named."""

    def __init__(self, handle, captured):
        self.handle, self.captured = handle, captured

    def launch(self, stream: Stream) -> None:
        call("cuGraphLaunch", self.handle, stream.handle)

    def set_kernel_arguments(self, node, kernel: LoadedKernel, n: int, *args) -> None:
        params = cu.CUDA_KERNEL_NODE_PARAMS()
        params.func = kernel.function
        params.gridDimX, params.gridDimY, params.gridDimZ = kernel.entry.grid(n), 1, 1
        params.blockDimX, params.blockDimY, params.blockDimZ = K.BLOCK_SIZE, 1, 1
        params.sharedMemBytes = 0
        params.kernelParams = kernel.entry.launch_args(*args)
        call("cuGraphExecKernelNodeSetParams", self.handle, node, params, what=kernel.entry.name)

    def destroy(self) -> None:
        if self.handle is not None:
            call("cuGraphExecDestroy", self.handle)
            call("cuGraphDestroy", self.captured)
            self.handle = self.captured = None


class Event:
    """A timing event, `Event.elapsed_ms(start, end)` once `end` has completed; with `timing=False`,
    an event that only orders work between streams (cheaper, and what a captured fork or join uses)."""

    def __init__(self, timing: bool = True):
        flags = cu.CUevent_flags.CU_EVENT_DEFAULT if timing else cu.CUevent_flags.CU_EVENT_DISABLE_TIMING
        self.handle = call("cuEventCreate", flags.value)

    def record(self, stream: Stream) -> None:
        call("cuEventRecord", self.handle, stream.handle)

    def synchronize(self) -> None:
        call("cuEventSynchronize", self.handle)

    @staticmethod
    def elapsed_ms(start: Event, end: Event) -> float:
        return float(call("cuEventElapsedTime", start.handle, end.handle))

    def destroy(self) -> None:
        if self.handle is not None:
            call("cuEventDestroy", self.handle)
            self.handle = None


# ---------------------------------------------------------------- kernels


@dataclass(frozen=True)
class LoadedKernel:
    entry: K.EntryPoint
    function: object


class KernelLibrary:
    """Every kernel of kernels/ compiled for the device (NVRTC, cached) and loaded; `launch` by entry name."""

    def __init__(self, device: Device):
        driver_cuda = call("cuDriverGetVersion") // 1000
        nvrtc_cuda = nvrtc.nvrtc_version()[0]
        if driver_cuda < nvrtc_cuda:  # a CUBIN from NVRTC 13 needs a driver of CUDA 13 or later
            raise UserError(f"the NVIDIA driver supports CUDA {driver_cuda} but NVRTC is CUDA {nvrtc_cuda}: update "
                            f"the driver, or install cuda-bindings and nvidia-cuda-nvrtc of CUDA {driver_cuda}")
        self.modules, self.kernels = [], {}
        for compiled in nvrtc.compile_all(device.sm).values():
            module = call("cuModuleLoadData", compiled.image, what=compiled.kernel.file)
            self.modules.append(module)
            for entry in compiled.kernel.entries:
                self.kernels[entry.name] = LoadedKernel(entry, call("cuModuleGetFunction", module, entry.name.encode()))

    def __getitem__(self, name: str) -> LoadedKernel:
        return self.kernels[name]

    def launch(self, name: str, n: int, stream: Stream, *args) -> None:
        """Enqueue entry point `name` over `n` elements with `args` (device pointers as ints)."""
        kernel = self.kernels[name]
        call("cuLaunchKernel", kernel.function, kernel.entry.grid(n), 1, 1, K.BLOCK_SIZE, 1, 1, 0, stream.handle,
             kernel.entry.launch_args(*args), 0, what=name)

    def unload(self) -> None:
        for module in self.modules:
            call("cuModuleUnload", module)
        self.modules, self.kernels = [], {}
