"""The cuda-python runtime: checked driver calls (no GPU needed), and with the marker `gpu` (skipped
without a GPU, which is asked of the CUDA driver): buffers, pinned memory, streams, events, CUDA
graph capture and replay with updated kernel arguments against the kernels' numpy twins; where
TensorRT is installed too, engines against netexec (the UNet, the calibration network, the whole
graph-replayed denoising loop against the CPU loop).

Figures: bit equality where the same kernels run (graph vs direct launches), relative L2 error
against netexec with fp16's budget 1e-2 otherwise.
"""

from __future__ import annotations

import ctypes
import types

import numpy as np
from oracle import rel_l2
import pytest

from trt_sdxl import backend, kernels
from trt_sdxl.errors import UserError
from trt_sdxl.denoising import Conditioning, seeded_latents, seeded_step_noise
from trt_sdxl.pipeline import Pipeline
from trt_sdxl.runtime import cuda, nvrtc

BUDGET = 1e-2


# ---------------------------------------------------------------- without a GPU


def test_checked_calls_name_the_call_and_the_error():
    pytest.importorskip("cuda.bindings")
    ok = cuda.cu.CUresult.CUDA_SUCCESS
    assert cuda.check((ok,), "x") is None
    assert cuda.check((ok, 5), "x") == 5
    assert cuda.check((ok, 1, 2), "x") == (1, 2)
    with pytest.raises(cuda.CudaError, match=r"^cuMemAlloc \(1 GiB\) failed: CUDA_ERROR_OUT_OF_MEMORY"):
        cuda.check((cuda.cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY,), "cuMemAlloc (1 GiB)")


def test_probe_gives_a_reason_when_there_is_no_gpu():
    count, reason = cuda.probe()
    assert (count > 0 and reason == "") or (count == 0 and len(reason) > 10)


def test_engine_dtypes_are_tensorrt_types():
    try:
        trt = backend.trt()
    except UserError as e:
        pytest.skip(str(e))
    from trt_sdxl.dtypes import NUMPY as NUMPY_DTYPES

    missing = set(NUMPY_DTYPES) - set(trt.DataType.__members__)
    assert not missing, f"not TensorRT data types: {missing}"


# ---------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def gpu(tmp_path_factory):
    """(device, kernel library, stream) on GPU 0; kernels compiled into a fresh cache."""
    count, reason = cuda.probe()
    if not count:
        pytest.skip(reason)
    mp = pytest.MonkeyPatch()
    mp.setenv(nvrtc.CACHE_ENV, str(tmp_path_factory.mktemp("kernels")))
    device = cuda.Device.open()
    library = cuda.KernelLibrary(device)
    stream = cuda.Stream()
    yield device, library, stream
    stream.destroy()
    library.unload()
    device.close()
    mp.undo()


@pytest.mark.gpu
def test_gpu_buffers_streams_events(gpu):
    _, _, stream = gpu
    data = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    pinned_in, pinned_out = cuda.HostBuffer((1000,), np.float32), cuda.HostBuffer((1000,), np.float32)
    a, b = cuda.DeviceBuffer(4000), cuda.DeviceBuffer(8000)
    start, end = cuda.Event(), cuda.Event()
    pinned_in.array[...] = data
    start.record(stream)
    a.upload(pinned_in, stream)
    b.copy_from(a, 4000, stream, dst_offset=4000)
    b.download(pinned_out, stream, offset=4000)
    end.record(stream)
    end.synchronize()
    assert np.array_equal(pinned_out.array, data)
    pageable = np.empty(1000, np.float32)
    a.download(pageable, stream)
    stream.synchronize()
    assert np.array_equal(pageable, data)
    assert cuda.Event.elapsed_ms(start, end) >= 0
    with pytest.raises(ValueError, match="outside a device buffer"):
        b.copy_from(a, 4000, stream, dst_offset=4004)
    for item in (a, b, pinned_in, pinned_out):
        item.free()
    start.destroy()
    end.destroy()


@pytest.mark.gpu
def test_gpu_out_of_memory_is_readable(gpu):
    with pytest.raises(cuda.CudaError, match="cuMemAlloc .*CUDA_ERROR_OUT_OF_MEMORY"):
        cuda.DeviceBuffer(1 << 52)


@pytest.mark.gpu
def test_gpu_graph_replay_with_new_arguments(gpu):
    """A captured step (pinned copy, scale_cast, scheduler_step), replayed with each step's scalars set
    on its kernel nodes, gives bit for bit what the twins give step by step."""
    _, library, stream = gpu
    rng = np.random.default_rng(2)
    n = 4 * 24 * 20
    x0, eps = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    x, prev, d_eps, scaled = (cuda.DeviceBuffer(4 * n) for _ in range(4))
    stamp_host, stamp = cuda.HostBuffer((4,), np.float32), cuda.DeviceBuffer(16)
    x.upload(x0, stream)
    d_eps.upload(eps, stream)
    stream.synchronize()
    plans = [(0.5, kernels.StepCoefficients.dpmpp_2m(7.0, 4.0)),
             (0.25, kernels.StepCoefficients.dpmpp_2m(4.0, 2.0, 7.0)),
             (0.125, kernels.StepCoefficients.euler(2.0, 1.0))]

    def args(plan):
        scale, c = plan
        return {"scale": (library["scale_cast_f32"], n, scaled, x, scale, n, 1),
                "step": (library["scheduler_step_f32"], n, x, prev, d_eps, 0, c.a, c.b, c.c, c.d, c.e, c.f, n)}

    nodes = {}
    with stream.capture() as captured:
        stamp.upload(stamp_host, stream)
        for key, (kernel, count, *values) in args(plans[0]).items():
            library.launch(kernel.entry.name, count, stream, *values)
            nodes[key] = stream.captured_node()
    graph = captured.graph
    ref_x, ref_prev = x0, None
    for i, plan in enumerate(plans):
        stamp_host.array[...] = i + 0.5
        for key, node in nodes.items():
            graph.set_kernel_arguments(node, *args(plan)[key])
        graph.launch(stream)
        got_scaled, got_x, got_stamp = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(4, np.float32)
        scaled.download(got_scaled, stream)
        x.download(got_x, stream)
        stamp.download(got_stamp, stream)
        stream.synchronize()
        assert np.array_equal(got_stamp, np.full(4, i + 0.5, np.float32)), f"replay {i}: the copy did not re-read"
        assert np.array_equal(got_scaled, kernels.scale_cast(ref_x, plan[0])), f"replay {i}: scale_cast"
        ref_x, ref_prev = kernels.scheduler_step(ref_x, eps, plan[1], prev=ref_prev)
        assert np.array_equal(got_x, ref_x), f"replay {i}: scheduler_step differs from its twin"
    graph.destroy()
    for buffer in (x, prev, d_eps, scaled, stamp, stamp_host):
        buffer.free()


# ---------------------------------------------------------------- TensorRT engines on a GPU


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A pipeline folder with the tiny SDXL-like UNet (torch and diffusers imported only here)."""
    import tiny_models

    return tiny_models.save_tiny_pipeline(tmp_path_factory.mktemp("runtime") / "tiny")


@pytest.fixture(scope="module")
def trt_gpu(gpu):
    """The GPU fixture, where a TensorRT that can build for this GPU is installed."""
    device = gpu[0]
    try:
        be = backend.get()
    except UserError as e:
        pytest.skip(str(e))
    if be.is_rtx and f"SM{device.sm}" not in be.aot_targets:
        pytest.skip(f"{be.name} {be.version} does not build for SM{device.sm}")
    return gpu


def unet_feeds(defined, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {k: rng.standard_normal(shape).astype(dtype) for k, (shape, dtype) in defined.inputs.items()}
    feeds["timestep"] = np.full(defined.inputs["timestep"][0], 421.0, np.float32)
    feeds["time_ids"] = np.tile(np.array([64, 64, 0, 0, 64, 64], np.float32), (defined.inputs["time_ids"][0][0], 1))
    return feeds


@pytest.mark.gpu
@pytest.mark.parametrize("taps", [False, True], ids=["unet", "calibration"])
def test_engine_matches_netexec(trt_gpu, tiny_folder, taps):
    """The executor seam on an engine returns what netexec returns, every output included (the
    calibration network's amax:/rows: outputs too)."""
    from trt_sdxl.executors import NetexecExecutor
    from trt_sdxl.models import unet
    from trt_sdxl.runtime.engine import Engine, EngineExecutor

    _, _, stream = trt_gpu
    defined = unet.define(tiny_folder, batch=2, latent_height=8, latent_width=8, calibration_taps=taps)
    engine = EngineExecutor(Engine.from_network(defined, "tiny unet"), stream)
    feeds = unet_feeds(defined, 3)
    got, expected = engine.run(feeds), NetexecExecutor(defined).run(feeds)
    assert set(got) == set(expected), f"outputs {sorted(got)} vs netexec {sorted(expected)}"
    errors = {name: rel_l2(got[name].astype(np.float32), expected[name].astype(np.float32)) for name in expected}
    print("\nengine vs netexec: " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(errors.items())[:6]))
    for name, err in errors.items():
        assert err <= BUDGET, f"{name}: rel L2 {err:.3e}"
    engine.free()


@pytest.mark.gpu
@pytest.mark.parametrize("scheduler,engine_batch", [("euler_a", 2), ("dpmpp_2m_karras", 1)])
def test_graph_denoiser_matches_the_cpu_loop(trt_gpu, tiny_folder, scheduler, engine_batch):
    """The CUDA-graph loop (kernels, Philox noise on the GPU, a UNet engine of the whole CFG batch or
    of half of it) against Pipeline.denoise (netexec and the twins), from the same seed; and the graph
    against the same steps launched without one."""
    from trt_sdxl import schedulers
    from trt_sdxl.executors import NetexecExecutor
    from trt_sdxl.models import unet
    from trt_sdxl.runtime.denoiser import GraphDenoiser
    from trt_sdxl.runtime.engine import Engine

    _, library, stream = trt_gpu
    folder = tiny_folder
    steps, seed, cfg, shape = 4, 99, 6.0, (1, 4, 8, 8)
    rng = np.random.default_rng(4)
    cond = Conditioning(rng.standard_normal((2, 77, 64)).astype(np.float32),
                        rng.standard_normal((2, 32)).astype(np.float32),
                        np.tile(np.array([64, 64, 0, 0, 64, 64], np.float32), (2, 1)))
    cpu_unet = NetexecExecutor(unet.define(folder, batch=2, latent_height=8, latent_width=8))
    sched = schedulers.create(scheduler, steps)
    expected = Pipeline(None, None, cpu_unet, None, None, None).denoise(
        cond, seeded_latents(seed, shape, sched.init_noise_sigma), sched, cfg, noise=seeded_step_noise(seed, shape))
    engine = Engine.from_network(unet.define(folder, batch=engine_batch, latent_height=8, latent_width=8), "tiny unet")
    times = []
    with_graph = GraphDenoiser(engine, library, stream)
    got = with_graph.denoise(cond, schedulers.create(scheduler, steps), cfg, seed,
                             on_step=lambda i, ms: times.append(ms))
    eager = GraphDenoiser(engine, library, stream, use_graph=False).denoise(cond, schedulers.create(scheduler, steps),
                                                                            cfg, seed)
    err = rel_l2(got, expected)
    print(f"\n{scheduler}, UNet engine batch {engine_batch}: GPU loop vs CPU loop rel L2 {err:.2e}; graph "
          f"{with_graph.use_graph}; {np.mean(times):.2f} ms/step")
    assert len(times) == steps
    replay_err = rel_l2(got, eager)
    assert replay_err <= 1e-5, f"graph replay vs the same steps launched directly: rel L2 {replay_err:.2e}"
    assert err <= BUDGET, f"{scheduler}: rel L2 {err:.3e}"


# ---------------------------------------------------------------- the graph loop on a simulated driver


class SimulatedDriver:
    """Enough of cuda.bindings.driver to run runtime.cuda and the GraphDenoiser on the CPU: "device"
    memory is host memory (addresses are real), operations on a stream run at once or, while the
    stream captures, become graph nodes that replay in order; kernels run their numpy twins. It checks
    the loop's orchestration (buffers, offsets, slices, which scalars each replay gets), not CUDA."""

    def __init__(self):
        from cuda.bindings import driver as real

        for enum in ("CUresult", "CUstream_flags", "CUstreamCaptureMode", "CUstreamCaptureStatus", "CUevent_flags"):
            setattr(self, enum, getattr(real, enum))
        self.ok = real.CUresult.CUDA_SUCCESS
        self.memory, self.capturing, self.destroyed = {}, {}, []
        self.CUDA_KERNEL_NODE_PARAMS = type("KernelNodeParams", (), {})

    # memory
    def cuMemAlloc(self, nbytes, *flags):
        block = np.zeros(max(1, nbytes), np.uint8)
        self.memory[block.ctypes.data] = block
        return self.ok, block.ctypes.data

    cuMemHostAlloc = cuMemAlloc

    def cuMemFree(self, ptr):
        del self.memory[ptr]
        return (self.ok,)

    cuMemFreeHost = cuMemFree

    def cuMemcpyHtoDAsync(self, dst, src, nbytes, stream):
        return self._enqueue(stream, lambda: ctypes.memmove(int(dst), int(src), nbytes))

    cuMemcpyDtoHAsync = cuMemcpyDtoDAsync = cuMemcpyHtoDAsync

    # streams, graphs, events
    def _enqueue(self, stream, op):
        if stream in self.capturing:
            self.capturing[stream].append(op)
        else:
            op()
        return (self.ok,)

    def _done(self, *args):
        return (self.ok,)

    def _new_handle(self, *args):
        return self.ok, object()

    cuStreamCreate = cuEventCreate = cuModuleLoadData = _new_handle
    cuStreamSynchronize = cuStreamDestroy = cuCtxSynchronize = cuModuleUnload = _done
    cuEventRecord = cuEventSynchronize = cuEventDestroy = cuGraphExecDestroy = _done

    def cuGraphDestroy(self, graph):
        self.destroyed.append(graph)
        return (self.ok,)

    def cuStreamBeginCapture(self, stream, mode):
        self.capturing[stream] = []
        return (self.ok,)

    def cuStreamEndCapture(self, stream):
        return self.ok, self.capturing.pop(stream)

    def cuStreamGetCaptureInfo(self, stream):
        status = self.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_ACTIVE
        return self.ok, status, 0, None, [self.capturing[stream][-1]], [], 1

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

    # kernels
    def cuDriverGetVersion(self):
        return self.ok, 13000

    def cuModuleGetFunction(self, module, name):
        return self.ok, name.decode()

    def cuLaunchKernel(self, function, gx, gy, gz, bx, by, bz, shared, stream, args, extra):
        return self._enqueue(stream, KernelNode(function, args[0]))


class KernelNode:
    """A launch of `function` (an entry point's name) with `values`, run by the kernels' numpy twins."""

    def __init__(self, function, values):
        self.function, self.values = function, values

    @staticmethod
    def view(ptr, count, dtype):
        dtype = np.dtype(dtype)
        return np.frombuffer((ctypes.c_byte * (count * dtype.itemsize)).from_address(ptr), dtype)

    def __call__(self):
        name, v, view = self.function, self.values, self.view
        if name.startswith("scale_cast_"):
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
        else:
            raise AssertionError(f"the simulated driver has no kernel {name}")


class SimulatedEngine:
    """A UNet 'engine' that runs netexec on the tensors at the addresses it was given."""

    def __init__(self, executor, driver):
        self.executor, self.driver, self.name = executor, driver, "simulated unet"
        self.inputs = {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in executor.inputs.items()}
        out = executor.run({k: np.zeros(shape, dtype) for k, (shape, dtype) in self.inputs.items()})
        self.outputs = {k: (v.shape, v.dtype) for k, v in out.items()}
        self.addresses, self.calls = {}, 0

    def set_address(self, name, buffer):
        self.addresses[name] = int(buffer)

    def capturable(self, stream):
        return True

    def enqueue(self, stream):
        addresses = dict(self.addresses)

        def run():
            self.calls += 1
            feeds = {k: KernelNode.view(addresses[k], int(np.prod(s)), d).reshape(s)
                     for k, (s, d) in self.inputs.items()}
            (shape, dtype), = self.outputs.values()
            KernelNode.view(addresses["noise_pred"], int(np.prod(shape)), dtype)[:] = \
                self.executor.run(feeds)["noise_pred"].ravel()

        self.driver._enqueue(stream.handle, run)


@pytest.mark.parametrize("scheduler,engine_batch", [("euler_a", 2), ("dpmpp_2m_karras", 1)])
def test_graph_denoiser_on_a_simulated_driver(tiny_folder, tmp_path, monkeypatch, scheduler, engine_batch):
    """GraphDenoiser (capture once, replay with each step's scalars) against Pipeline.denoise with the
    same UNet network, on the simulated driver: the same numbers, bit for bit."""
    pytest.importorskip("cuda.bindings")
    from trt_sdxl import schedulers
    from trt_sdxl.executors import NetexecExecutor
    from trt_sdxl.models import unet
    from trt_sdxl.runtime.denoiser import GraphDenoiser

    driver = SimulatedDriver()
    monkeypatch.setattr(cuda, "cu", driver)
    monkeypatch.setenv(nvrtc.CACHE_ENV, str(tmp_path / "kernels"))
    monkeypatch.setattr(nvrtc, "compile_all", lambda arch: {name: types.SimpleNamespace(
        kernel=k, image=b"") for name, k in kernels.KERNELS.items()})
    folder = tiny_folder
    steps, seed, cfg, shape = 3, 99, 6.0, (1, 4, 8, 8)
    rng = np.random.default_rng(4)
    cond = Conditioning(rng.standard_normal((2, 77, 64)).astype(np.float32),
                        rng.standard_normal((2, 32)).astype(np.float32),
                        np.tile(np.array([64, 64, 0, 0, 64, 64], np.float32), (2, 1)))
    network = unet.define(folder, batch=engine_batch, latent_height=8, latent_width=8)
    sched = schedulers.create(scheduler, steps)
    expected = Pipeline(None, None, NetexecExecutor(network), None, None, None).denoise(
        cond, seeded_latents(seed, shape, sched.init_noise_sigma), sched, cfg, noise=seeded_step_noise(seed, shape))
    engine = SimulatedEngine(NetexecExecutor(network), driver)
    library = cuda.KernelLibrary(types.SimpleNamespace(sm=89))
    denoiser = GraphDenoiser(engine, library, cuda.Stream())
    times = []
    got = denoiser.denoise(cond, schedulers.create(scheduler, steps), cfg, seed, on_step=lambda i, ms: times.append(ms))
    assert denoiser.use_graph and times == [0.5] * steps
    assert engine.calls == (1 + steps) * (2 // engine_batch)  # one warm-up enqueue per slice, then the replays
    assert not driver.capturing and len(driver.memory) == 0, "the loop left memory allocated"
    err = rel_l2(got, expected)
    assert err == 0 or (engine_batch == 1 and err <= 1e-6), f"{scheduler}: rel L2 {err:.2e} vs Pipeline.denoise"
