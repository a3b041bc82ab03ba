"""The cuda-python runtime: checked driver calls, TensorRT-RTX's build flag for stream capture, its
runtime cache on disk (over a fake runtime) and its refusal of a GPU it does not support (no GPU
needed); with the marker `gpu` (skipped without a GPU, which is asked of the CUDA driver): buffers,
pinned memory, streams, events, CUDA graph capture and replay with updated kernel arguments against
the kernels' numpy twins; where TensorRT is installed too, engines against netexec (the UNet, the
calibration network, the whole graph-replayed denoising loop against the CPU loop), and the same
loop over a netexec 'engine' on the simulated driver (tests/simulated_cuda.py). The loop over fake
engines on CUDA itself, without TensorRT, is tests/test_fake_engine.py.

Figures: bit equality where the same kernels run (graph vs direct launches), relative L2 error
against netexec with fp16's budget 1e-2 otherwise.
"""

from __future__ import annotations

import types

import numpy as np
from oracle import rel_l2
import pytest
import simulated_cuda
from simulated_cuda import KernelNode

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


def rtx_backend():
    try:
        be = backend.get()
    except UserError as e:
        pytest.skip(str(e))
    if not be.is_rtx:
        pytest.skip(f"{be.name} is installed; these are TensorRT-RTX features")
    return be


class RecordingBuilder:
    """A TensorRT builder that keeps the builder configs it makes, to read them back after a build."""

    def __init__(self, builder):
        self.builder, self.configs = builder, []

    def create_builder_config(self):
        self.configs.append(self.builder.create_builder_config())
        return self.configs[-1]

    def build_serialized_network(self, network, config):
        return self.builder.build_serialized_network(network, config)


def test_tensorrt_rtx_engines_are_built_for_stream_capture():
    """build_engine sets REQUIRE_USER_ALLOCATION where the flag exists, and a real (CPU, ahead-of-time)
    TensorRT-RTX build accepts it for a fixed-shape network."""
    from trt_sdxl.engines import build_engine

    be = rtx_backend()
    if not be.has_require_user_allocation or "SM89" not in be.aot_targets:
        pytest.skip(f"{be.name} {be.version} has no REQUIRE_USER_ALLOCATION or cannot build for SM89 here")
    trt = be.module
    builder, network = be.create_network()
    x = network.add_input("x", trt.float16, (2, 4, 8, 8))
    network.mark_output(network.add_activation(x, trt.ActivationType.RELU).get_output(0))
    recording = RecordingBuilder(builder)
    plan, _ = build_engine(types.SimpleNamespace(builder=recording, network=network), "SM89")
    assert plan is not None and plan.nbytes > 0
    (config,) = recording.configs
    assert config.get_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
    assert be.has_runtime_cache, f"{be.name} {be.version}: no IRuntimeConfig.create_runtime_cache"


def test_tensorrt_rtx_refuses_an_unsupported_gpu_with_the_way_out(tmp_path, monkeypatch):
    """On a GPU TensorRT-RTX has no kernels for (our H200), loading an engine is one clear line: use
    NVIDIA TensorRT and rebuild (the folder's own build command), or the CPU."""
    from trt_sdxl.files import write_json
    from trt_sdxl.runtime.engine import Engine, check_backend_runs_here

    be = rtx_backend()
    write_json(tmp_path / "manifest.json", {"engines": {"unet": {
        "file": "unet.plan", "backend": be.name, "backend_version": be.version, "target": "native",
        "checkpoint": "/models/sdxl", "precision": "fp16", "batch": 1, "image_height": 1024, "image_width": 1024}}})
    (tmp_path / "unet.plan").write_bytes(b"an engine")
    monkeypatch.setattr(cuda, "current_gpu", lambda: ("NVIDIA H200", (9, 0)))
    with pytest.raises(UserError, match=r"unet\.plan: tensorrt_rtx \S+ does not run on this GPU \(NVIDIA H200, SM90\); "
                                        r"it supports .*SM89.*pip install -e \.\[trt\].*`TRT_SDXL_BACKEND=tensorrt "
                                        r"python -m trt_sdxl\.build --model /models/sdxl .*`.*--cpu") as raised:
        Engine.load(tmp_path / "unet.plan")
    print(f"\n{raised.value}")
    monkeypatch.setattr(cuda, "current_gpu", lambda: ("NVIDIA GeForce RTX 4090", (8, 9)))
    check_backend_runs_here("unet.plan")  # supported: no complaint


class FakeRuntimeCache:
    """TensorRT-RTX's IRuntimeCache as far as the runtime uses it: a blob of compiled-kernel names,
    rejected (False, cache unchanged) when it was not serialized by a cache of this 'environment'."""

    MAGIC = b"fake runtime cache:"

    def __init__(self):
        self.kernels: list[str] = []

    def serialize(self):
        return memoryview(self.MAGIC + ",".join(self.kernels).encode())

    def deserialize(self, blob) -> bool:
        blob = bytes(blob)
        if not blob.startswith(self.MAGIC):
            return False
        self.kernels = [k for k in blob[len(self.MAGIC):].decode().split(",") if k]
        return True


class FakeRuntimeConfig:
    def __init__(self):
        self.cache = None

    def create_runtime_cache(self):
        return FakeRuntimeCache()

    def set_runtime_cache(self, cache) -> bool:
        self.cache = cache
        return True


class FakeContext:
    """Compiles (names) a kernel into its config's runtime cache at its first enqueue, as TensorRT-RTX
    compiles just in time; `released` lists what was destroyed, in order."""

    def __init__(self, engine, config):
        self.engine, self.config = engine, config

    def execute_async_v3(self, stream) -> bool:
        cache = self.config.cache
        if f"kernel of {self.engine.plan}" not in cache.kernels:
            cache.kernels.append(f"kernel of {self.engine.plan}")
        return True

    def __del__(self):
        self.engine.released.append("context")


class FakeCudaEngine:
    def __init__(self, plan, released):
        self.plan, self.released = bytes(plan).decode(), released

    num_io_tensors = 1

    def get_tensor_name(self, i):
        return "x"

    def get_tensor_shape(self, name):
        return (2, 4)

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name="HALF")

    def get_tensor_mode(self, name):
        return "input"

    def create_runtime_config(self):
        return FakeRuntimeConfig()

    def create_execution_context(self, config=None):
        assert config is not None and config.cache is not None, "the context must be created with the cache"
        return FakeContext(self, config)

    def __del__(self):
        self.released.append("engine")


def fake_rtx(monkeypatch) -> list[str]:
    """A TensorRT-RTX backend whose runtime 'loads' any plan (on any GPU: it names no compute capability);
    returns the list of released objects."""
    released: list[str] = []
    module = types.SimpleNamespace(
        Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda plan: FakeCudaEngine(
            plan, released)),
        TensorIOMode=types.SimpleNamespace(INPUT="input"),
        IRuntimeConfig=FakeRuntimeConfig, IRuntimeCache=FakeRuntimeCache)
    fake = backend.Backend(module=module, name="tensorrt_rtx", version="1.7.1.116")
    monkeypatch.setattr(backend, "get", lambda: fake)
    monkeypatch.setattr(backend, "logger", lambda: None)
    return released


def test_runtime_cache_is_kept_next_to_the_engine_and_invalidated_with_it(tmp_path, monkeypatch):
    import os

    from trt_sdxl.runtime import runtime_cache
    from trt_sdxl.runtime.engine import Engine

    released = fake_rtx(monkeypatch)
    plan = tmp_path / "unet.fp16.trtrtx1.7.1.native.plan"
    plan.write_bytes(b"v1")
    folder = tmp_path / ".runtime-cache"

    first = Engine.load(plan)
    assert not first.runtime_cache.loaded and not folder.exists()
    first.enqueue(0)
    first.save_runtime_cache()
    (saved,) = folder.iterdir()
    assert saved.name.startswith(plan.name + ".") and saved.suffix == ".cache", saved.name
    assert saved.read_bytes() == FakeRuntimeCache.MAGIC + b"kernel of v1"
    stamp = saved.stat().st_mtime_ns
    first.release()
    assert released == ["context", "engine"], f"released in the order {released}"
    assert saved.stat().st_mtime_ns == stamp, "an unchanged cache was written again"

    second = Engine.load(plan)  # a warm start: the kernels are there before any enqueue
    assert second.runtime_cache.loaded and second.runtime_cache.cache.kernels == ["kernel of v1"]
    second.release()

    plan.write_bytes(b"v2")  # the engine rebuilt: its old cache is not used, and goes at the next save
    os.utime(plan, ns=(stamp + 10**9, stamp + 10**9))
    third = Engine.load(plan)
    assert not third.runtime_cache.loaded and third.runtime_cache.cache.kernels == []
    third.enqueue(0)
    third.release()
    (renewed,) = folder.iterdir()
    assert renewed != saved and renewed.read_bytes() == FakeRuntimeCache.MAGIC + b"kernel of v2"

    renewed.write_bytes(b"from another GPU")  # TensorRT-RTX rejects it: no cache, then a fresh one
    fourth = Engine.load(plan)
    assert not fourth.runtime_cache.loaded
    fourth.enqueue(0)
    fourth.release()
    assert renewed.read_bytes() == FakeRuntimeCache.MAGIC + b"kernel of v2"

    def unwritable(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(runtime_cache, "write_atomic", unwritable)
    renewed.unlink()
    fifth = Engine.load(plan)
    fifth.enqueue(0)
    with pytest.warns(UserWarning, match=r"runtime cache cannot be written \(Permission denied\)"):
        fifth.release()


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
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
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
          f"{with_graph.replayed_graph}; {np.mean(times):.2f} ms/step")
    assert len(times) == steps
    replay_err = rel_l2(got, eager)
    assert replay_err <= 1e-5, f"graph replay vs the same steps launched directly: rel L2 {replay_err:.2e}"
    assert err <= BUDGET, f"{scheduler}: rel L2 {err:.3e}"


# ---------------------------------------------------------------- the graph loop on a simulated driver


class SimulatedEngine:
    """A UNet 'engine' that runs netexec on the tensors at the addresses it was given."""

    def __init__(self, executor, driver):
        self.executor, self.driver, self.name = executor, driver, "simulated unet"
        self.inputs = {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in executor.inputs.items()}
        out = executor.run({k: np.zeros(shape, dtype) for k, (shape, dtype) in self.inputs.items()})
        self.outputs = {k: (v.shape, v.dtype) for k, v in out.items()}
        self.addresses, self.calls = {}, 0

    dynamic, profiles = False, []

    def set_shapes(self, shapes, stream):
        assert all(tuple(v) == self.inputs[k][0] for k, v in shapes.items()), shapes
        return {k: spec[0] for k, spec in {**self.inputs, **self.outputs}.items()}

    def max_shapes(self, stream):
        return {k: spec[0] for k, spec in {**self.inputs, **self.outputs}.items()}

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

    driver = simulated_cuda.install(monkeypatch, tmp_path)
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
    assert denoiser.replayed_graph and times == [0.5] * steps
    assert engine.calls == (1 + steps) * (2 // engine_batch)  # one warm-up enqueue per slice, then the replays
    assert len(driver.memory) > 0, "the shape's buffers stay for its next call"
    denoiser.release()
    assert not driver.capturing and len(driver.memory) == 0, "release left memory allocated"
    err = rel_l2(got, expected)
    assert err == 0 or (engine_batch == 1 and err <= 1e-6), f"{scheduler}: rel L2 {err:.2e} vs Pipeline.denoise"
