"""A simulated CUDA driver for the runtime tests on machines without a GPU.

Enough of cuda.bindings.driver to run trt_sdxl.runtime.cuda, the GraphDenoiser and the
ImageDecoder on the CPU: "device" memory is host memory (addresses are real), operations on a
stream run at once or, while the stream captures, become graph nodes that replay in order; kernels
run their numpy twins (`KernelNode`, extended per test through `SimulatedDriver.kernels`).

Of CUDA's capture rules it keeps the ones the runtime's logic depends on: a stream joins a capture
by waiting on an event recorded in it (a fork) and must be joined back before the capture ends; a
copy between the device and pageable host memory is refused while capturing, and invalidates the
capture. It checks the loop's orchestration (buffers, offsets, slices, which scalars each replay
gets, what is freed), not CUDA itself: the `gpu` tests do that.
"""

from __future__ import annotations

import ctypes
import types

import numpy as np

from trt_sdxl import kernels

TOTAL_MEMORY = 1 << 40


class CapturedGraph(list):
    """The operations a capture recorded, in an order that respects its dependencies."""

    def __int__(self) -> int:
        return id(self)


class Capture:
    """One capture sequence: its operations, its origin stream, and the streams forked into it with
    the number of operations each enqueued since it was last joined back."""

    def __init__(self, origin):
        self.origin, self.ops, self.invalid = origin, CapturedGraph(), False
        self.unjoined: dict = {}


class SimulatedDriver:
    def __init__(self):
        from cuda.bindings import driver as real

        for enum in ("CUresult", "CUstream_flags", "CUstreamCaptureMode", "CUstreamCaptureStatus", "CUevent_flags"):
            setattr(self, enum, getattr(real, enum))
        self.ok = real.CUresult.CUDA_SUCCESS
        self.memory, self.host = {}, set()  # address -> block; the addresses of pinned host blocks
        self.capturing: dict = {}  # stream -> its Capture
        self.events: dict = {}  # event -> (stream, Capture or None, ops that stream had enqueued in it)
        self.destroyed = []
        self.kernels: dict = {}  # extra kernels: entry name -> function(values)
        self.CUDA_KERNEL_NODE_PARAMS = type("KernelNodeParams", (), {})

    # memory
    def cuMemAlloc(self, nbytes, *flags):
        block = np.zeros(max(1, nbytes), np.uint8)
        self.memory[block.ctypes.data] = block
        return self.ok, block.ctypes.data

    def cuMemHostAlloc(self, nbytes, *flags):
        err, ptr = self.cuMemAlloc(nbytes)
        self.host.add(ptr)
        return err, ptr

    def cuMemFree(self, ptr):
        del self.memory[ptr]
        self.host.discard(ptr)
        return (self.ok,)

    cuMemFreeHost = cuMemFree

    def cuMemGetInfo(self):
        return self.ok, TOTAL_MEMORY - sum(b.nbytes for b in self.memory.values()), TOTAL_MEMORY

    def _pinned_or_device(self, ptr: int, nbytes: int) -> bool:
        return any(base <= ptr and ptr + nbytes <= base + block.nbytes for base, block in self.memory.items())

    def _copy(self, dst, src, nbytes, stream, host):
        if stream in self.capturing and not self._pinned_or_device(int(host), nbytes):
            self.capturing[stream].invalid = True  # as CUDA does: the whole capture is lost
            return (self.CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)
        return self._enqueue(stream, lambda: ctypes.memmove(int(dst), int(src), nbytes))

    def cuMemcpyHtoDAsync(self, dst, src, nbytes, stream):
        return self._copy(dst, src, nbytes, stream, src)

    def cuMemcpyDtoHAsync(self, dst, src, nbytes, stream):
        return self._copy(dst, src, nbytes, stream, dst)

    def cuMemcpyDtoDAsync(self, dst, src, nbytes, stream):
        return self._enqueue(stream, lambda: ctypes.memmove(int(dst), int(src), nbytes))

    # streams, graphs, events
    def _enqueue(self, stream, op):
        capture = self.capturing.get(stream)
        if capture is None:
            op()
            return (self.ok,)
        if capture.invalid:
            return (self.CUresult.CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,)
        capture.ops.append(op)
        if stream is not capture.origin:
            capture.unjoined[stream] = capture.unjoined.get(stream, 0) + 1
        return (self.ok,)

    def _done(self, *args):
        return (self.ok,)

    def _new_handle(self, *args):
        return self.ok, object()

    cuStreamCreate = cuEventCreate = cuModuleLoadData = _new_handle
    cuCtxSynchronize = cuModuleUnload = cuEventSynchronize = cuGraphExecDestroy = _done

    def cuStreamSynchronize(self, stream):
        if stream in self.capturing:  # not allowed while capturing
            return (self.CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)
        return (self.ok,)

    def cuStreamDestroy(self, stream):
        assert stream not in self.capturing, "destroyed a stream that is capturing"
        return (self.ok,)

    def cuEventRecord(self, event, stream):
        capture = self.capturing.get(stream)
        self.events[event] = (stream, capture, capture.unjoined.get(stream, 0) if capture else 0)
        return (self.ok,)

    def cuStreamWaitEvent(self, stream, event, flags):
        source, capture, count = self.events[event]
        if capture is None:
            return (self.ok,)  # eager work runs in program order: nothing to wait for
        if stream not in self.capturing:  # a fork: the stream joins the capture
            self.capturing[stream] = capture
            capture.unjoined.setdefault(stream, 0)
        elif source is not capture.origin and capture.unjoined.get(source) == count:
            capture.unjoined[source] = 0  # a join: everything `source` enqueued is now a dependency
        return (self.ok,)

    def cuEventDestroy(self, event):
        self.events.pop(event, None)
        return (self.ok,)

    def cuGraphDestroy(self, graph):
        self.destroyed.append(graph)
        return (self.ok,)

    def cuStreamBeginCapture(self, stream, mode):
        assert stream not in self.capturing, "a stream that captures already cannot begin a capture"
        self.capturing[stream] = Capture(stream)
        return (self.ok,)

    def cuStreamEndCapture(self, stream):
        capture = self.capturing[stream]
        for s in [s for s, c in self.capturing.items() if c is capture]:
            del self.capturing[s]
        if capture.invalid:
            return self.CUresult.CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, None
        if any(capture.unjoined.values()):
            return self.CUresult.CUDA_ERROR_STREAM_CAPTURE_UNJOINED, None
        return self.ok, capture.ops

    def cuStreamGetCaptureInfo(self, stream):
        status = self.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_ACTIVE
        return self.ok, status, 0, None, [self.capturing[stream].ops[-1]], [], 1

    def cuGraphInstantiate(self, graph, flags):
        return self.ok, types.SimpleNamespace(nodes=list(graph), source=graph)

    def cuGraphLaunch(self, graph, stream):
        return self._enqueue(stream, lambda: [op() for op in graph.nodes])

    def cuGraphExecKernelNodeSetParams(self, graph, node, params):
        assert not any(g is graph.source for g in self.destroyed), "a node of a destroyed graph names nothing"
        assert node in graph.nodes and node.function is params.func, "updated a node that is not this kernel's"
        node.values = params.kernelParams[0]
        return (self.ok,)

    def cuEventElapsedTime(self, start, end):
        return self.ok, 0.5

    def cuGetErrorString(self, err):
        return self.ok, b"refused by the simulated driver"

    # kernels
    def cuDriverGetVersion(self):
        return self.ok, 13000

    def cuModuleGetFunction(self, module, name):
        return self.ok, name.decode()

    def cuLaunchKernel(self, function, gx, gy, gz, bx, by, bz, shared, stream, args, extra):
        return self._enqueue(stream, KernelNode(function, args[0], self.kernels))


def view(ptr: int, count: int, dtype) -> np.ndarray:
    """`count` values of `dtype` at address `ptr`, as a writable numpy array over that memory."""
    dtype = np.dtype(dtype)
    return np.frombuffer((ctypes.c_byte * (count * dtype.itemsize)).from_address(ptr), dtype)


class KernelNode:
    """A launch of `function` (an entry point's name) with `values`, run by the kernels' numpy twins."""

    def __init__(self, function, values, extra: dict | None = None):
        self.function, self.values, self.extra = function, values, extra or {}

    view = staticmethod(view)

    def __call__(self):
        name, v = self.function, self.values
        if name in self.extra:
            self.extra[name](v)
        elif name.startswith("scale_cast_"):
            out, x, scale, n, copies = v
            dtype = kernels.DTYPES[name.rsplit("_", 1)[1]]
            view(out, n * copies, dtype)[:] = kernels.scale_cast(view(x, n, np.float32), scale, dtype, copies)
        elif name.startswith("cfg_combine_"):
            out, pred, scale, n = v
            view(out, n, np.float32)[:] = kernels.cfg_combine(view(pred, 2 * n, kernels.DTYPES[name.rsplit("_", 1)[1]]),
                                                              scale)
        elif name == "gaussian_noise_f32":
            out, seed, step, scale, n = v
            view(out, n, np.float32)[:] = kernels.gaussian_noise(seed, step, n, scale)
        elif name == "scheduler_step_f32":
            x, prev, eps, noise, *coefficients, n = v
            c = kernels.StepCoefficients(*coefficients)
            x_next, denoised = kernels.scheduler_step(view(x, n, np.float32), view(eps, n, np.float32), c,
                                                      prev=view(prev, n, np.float32) if c.c else None,
                                                      noise=view(noise, n, np.float32) if noise else None)
            view(x, n, np.float32)[:] = x_next
            view(prev, n, np.float32)[:] = denoised
        elif name == "image_to_rgb8_f32":
            out, image, batch, height, width = v
            n = batch * 3 * height * width
            view(out, n, np.uint8)[:] = kernels.image_to_rgb8(
                view(image, n, np.float32).reshape(batch, 3, height, width)).ravel()
        else:
            raise AssertionError(f"the simulated driver has no kernel {name}")


def install(monkeypatch, tmp_path) -> SimulatedDriver:
    """The simulated driver as runtime.cuda's `cu`, and kernel 'compilation' that needs no NVRTC."""
    from trt_sdxl.runtime import cuda, nvrtc

    driver = SimulatedDriver()
    monkeypatch.setattr(cuda, "cu", driver)
    monkeypatch.setenv(nvrtc.CACHE_ENV, str(tmp_path / "kernels"))
    monkeypatch.setattr(nvrtc, "compile_all", lambda arch: {name: types.SimpleNamespace(
        kernel=k, image=b"") for name, k in kernels.KERNELS.items()})
    return driver
