"""The GPU denoising loop and image decoder over fake engines: the runtime's CUDA without TensorRT.

`FakeUNet` has the Engine interface (inputs, outputs, set_address, capturable, enqueue) and does to
a stream what TensorRT's enqueue does: its work is three NVRTC-compiled fp16 kernels, one of them
on an auxiliary stream that forks from the caller's stream and joins it again through events, and
its scratch memory is allocated once, when it is created. `FakeUNetTwin`, its numpy twin, is an
executor for the CPU loop (trt_sdxl.denoising). `FakeVAE` and its twin do the same for the VAE.

Every test runs twice: on the simulated driver (tests/simulated_cuda.py; any machine, a small
latent) and, with the marker `gpu`, on CUDA itself at SDXL's full-size latent (128 x 128), which is
where capture rules, kernel-argument packing and real graph nodes are checked. For euler_a (UNet
engine of the whole CFG batch), dpmpp_2m_karras (engine batch 1: two slices per step) and ddim,
30 steps each: graph replay equals eager launches bit for bit; both are within 1e-5 (relative L2)
of the CPU loop with the twin given the same noise, which the gaussian_noise kernel draws (every
other kernel is exact, so this is bit equality in practice); with its own numpy noise the CPU loop
stays within 1e-3 (the kernel's Box-Muller is within a few ulp of the twin's, and a few-ulp change
of the latents flips roundings of the fp16 sample); a pageable copy inside the capture is refused
by CUDA and the loop falls back to eager launches with the same result; every allocation, stream,
event, module and graph is released and the GPU's free memory is back where it started. ms/step,
graph vs eager, go to the test report (`record_property`: tools/gpu_check.sh collects them).
"""

from __future__ import annotations

import re
import statistics
import types
from dataclasses import dataclass

import numpy as np
from oracle import rel_l2
import pytest
import simulated_cuda
from simulated_cuda import view

from trt_sdxl import kernels as K
from trt_sdxl import schedulers
from trt_sdxl.denoising import Conditioning, denoise, time_ids, trajectory
from trt_sdxl.pipeline import Pipeline, to_uint8_rgb
from trt_sdxl.runtime import cuda, nvrtc

STEPS, SEED, CFG = 30, 2024, 7.5
TOKENS, CONTEXT, POOLED = 77, 2048, 1280  # SDXL's conditioning sizes
SCALING_FACTOR = 0.13025
GPU_LATENT, SIMULATED_LATENT = (128, 128), (16, 24)

FAKE_CU = r"""
// Fake engines for the runtime tests: arithmetic in fp32 (compiled with --fmad=false, so the numpy
// twins in tests/test_fake_engine.py round identically), 16-bit storage rounded to nearest even.
#include "common.cuh"

// UNet, auxiliary stream: one scalar per CFG row from its conditioning, summed in order.
extern "C" __global__ void fake_unet_condition(float* cond, const half_t* context, const half_t* text_embeds,
                                               const float* timestep, const float* time_ids, int rows, int tokens,
                                               int channels, int pooled, int ids) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float acc = 0.0f;
    for (int t = 0; t < tokens; ++t) {
        acc = acc + to_float(context[((long long)r * tokens + t) * channels + (t * 7) % channels]);
    }
    for (int j = 0; j < 8; ++j) acc = acc + to_float(text_embeds[(long long)r * pooled + j]);
    acc = acc * 0.001f;
    acc = acc + timestep[r] * 1e-5f;
    acc = acc + time_ids[r * ids] * 1e-6f;
    cond[r] = acc;
}

// UNet, main stream meanwhile: mix[i] = s[c] / 2 + s[(c + 1) % 4] / 4, per row and pixel.
extern "C" __global__ void fake_unet_mix(float* mix, const half_t* sample, long long plane, long long n) {
    for (long long i = first_index(); i < n; i += grid_stride()) {
        long long c = (i / plane) % 4;
        mix[i] = to_float(sample[i]) * 0.5f + to_float(sample[i + ((c + 1) % 4 - c) * plane]) * 0.25f;
    }
}

// UNet, main stream after the join: noise_pred = fp16(mix + (c + 1) * cond[row]).
extern "C" __global__ void fake_unet_output(half_t* out, const float* mix, const float* cond, long long plane,
                                            long long n) {
    for (long long i = first_index(); i < n; i += grid_stride()) {
        long long c = (i / plane) % 4;
        out[i] = from_float<half_t>(mix[i] + cond[i / (4 * plane)] * (float)(c + 1));
    }
}

// VAE: image [B, 3, 8h, 8w] = 0.12 latent[c] - 0.05 latent[3], each latent pixel an 8 x 8 block.
extern "C" __global__ void fake_vae(float* image, const float* latent, int batch, int h, int w) {
    long long width = 8LL * w, plane = 64LL * h * w, n = (long long)batch * 3 * plane;
    for (long long o = first_index(); o < n; o += grid_stride()) {
        long long x = o % width, y = (o / width) % (8LL * h), c = (o / plane) % 3, b = o / (3 * plane);
        long long at = (y / 8) * w + x / 8, per_channel = (long long)h * w;
        image[o] = latent[(b * 4 + c) * per_channel + at] * 0.12f - latent[(b * 4 + 3) * per_channel + at] * 0.05f;
    }
}
"""

ENTRIES = {e.name: e for e in (
    K.EntryPoint("fake_unet_condition", (
        ("cond", K.PTR), ("context", K.PTR), ("text_embeds", K.PTR), ("timestep", K.PTR), ("time_ids", K.PTR),
        ("rows", K.I32), ("tokens", K.I32), ("channels", K.I32), ("pooled", K.I32), ("ids", K.I32))),
    K.EntryPoint("fake_unet_mix", (("mix", K.PTR), ("sample", K.PTR), ("plane", K.I64), ("n", K.I64))),
    K.EntryPoint("fake_unet_output", (("out", K.PTR), ("mix", K.PTR), ("cond", K.PTR), ("plane", K.I64),
                                      ("n", K.I64))),
    K.EntryPoint("fake_vae", (("image", K.PTR), ("latent", K.PTR), ("batch", K.I32), ("h", K.I32), ("w", K.I32))),
)}


# ---------------------------------------------------------------- the twins


def condition_twin(context, text_embeds, timestep, ids) -> np.ndarray:
    """fake_unet_condition: [rows] float32, term by term in the kernel's order."""
    acc = np.zeros(context.shape[0], np.float32)
    for t in range(context.shape[1]):
        acc = acc + context[:, t, (t * 7) % context.shape[2]].astype(np.float32)
    for j in range(8):
        acc = acc + text_embeds[:, j].astype(np.float32)
    acc = acc * np.float32(0.001)
    acc = acc + np.asarray(timestep, np.float32) * np.float32(1e-5)
    return acc + np.asarray(ids, np.float32)[:, 0] * np.float32(1e-6)


def mix_twin(sample) -> np.ndarray:
    """fake_unet_mix: [rows, 4, h, w] float32."""
    s = np.asarray(sample).astype(np.float32)
    return s * np.float32(0.5) + np.roll(s, -1, axis=1) * np.float32(0.25)


def output_twin(mix, cond) -> np.ndarray:
    """fake_unet_output: [rows, 4, h, w] float16."""
    channel = np.arange(1, 5, dtype=np.float32).reshape(1, 4, 1, 1)
    return (mix + cond.reshape(-1, 1, 1, 1) * channel).astype(np.float16)


def vae_twin(latent) -> np.ndarray:
    """fake_vae: [B, 4, h, w] -> [B, 3, 8h, 8w] float32."""
    big = np.asarray(latent, np.float32).repeat(8, axis=2).repeat(8, axis=3)
    return big[:, :3] * np.float32(0.12) - big[:, 3:4] * np.float32(0.05)


def unet_specs(batch: int, h: int, w: int, tokens: int = TOKENS) -> dict:
    return {"sample": ((batch, 4, h, w), np.dtype(np.float16)), "timestep": ((batch,), np.dtype(np.float32)),
            "encoder_hidden_states": ((batch, tokens, CONTEXT), np.dtype(np.float16)),
            "text_embeds": ((batch, POOLED), np.dtype(np.float16)), "time_ids": ((batch, 6), np.dtype(np.float32))}


class FakeUNetTwin:
    """The fake UNet as an executor (`inputs`, `run(feeds) -> outputs`) for the CPU loop."""

    def __init__(self, batch: int, h: int, w: int, tokens: int = TOKENS):
        self.inputs = unet_specs(batch, h, w, tokens)

    def run(self, feeds: dict) -> dict:
        cond = condition_twin(feeds["encoder_hidden_states"].astype(np.float16),
                              feeds["text_embeds"].astype(np.float16), feeds["timestep"], feeds["time_ids"])
        return {"noise_pred": output_twin(mix_twin(feeds["sample"]), cond)}


class FakeVAETwin:
    def __init__(self, batch: int, h: int, w: int):
        self.inputs = {"latent": ((batch, 4, h, w), np.dtype(np.float32))}

    def run(self, feeds: dict) -> dict:
        return {"image": vae_twin(feeds["latent"])}


def simulated_kernels() -> dict:
    """The fake kernels for the simulated driver: each reads its arguments' memory and runs its twin."""

    def condition(v):
        cond, context, text_embeds, timestep, ids, rows, tokens, channels, pooled, nids = v
        view(cond, rows, np.float32)[:] = condition_twin(
            view(context, rows * tokens * channels, np.float16).reshape(rows, tokens, channels),
            view(text_embeds, rows * pooled, np.float16).reshape(rows, pooled), view(timestep, rows, np.float32),
            view(ids, rows * nids, np.float32).reshape(rows, nids))

    def mix(v):
        out, sample, plane, n = v
        view(out, n, np.float32)[:] = mix_twin(view(sample, n, np.float16).reshape(-1, 4, plane)).ravel()

    def output(v):
        out, mixed, cond, plane, n = v
        rows = n // (4 * plane)
        view(out, n, np.float16)[:] = output_twin(view(mixed, n, np.float32).reshape(rows, 4, plane, 1),
                                                  view(cond, rows, np.float32)).ravel()

    def vae(v):
        image, latent, batch, h, w = v
        view(image, batch * 3 * 64 * h * w, np.float32)[:] = vae_twin(
            view(latent, batch * 4 * h * w, np.float32).reshape(batch, 4, h, w)).ravel()

    return {"fake_unet_condition": condition, "fake_unet_mix": mix, "fake_unet_output": output, "fake_vae": vae}


# ---------------------------------------------------------------- the fake engines


class FakeKernels:
    """FAKE_CU's module loaded into the current context; `launch(name, n, stream, *args)`."""

    def __init__(self, image: bytes):
        self.module = cuda.call("cuModuleLoadData", image, what="fake engine kernels")
        self.functions = {name: cuda.call("cuModuleGetFunction", self.module, name.encode()) for name in ENTRIES}

    def launch(self, name: str, n: int, stream: cuda.Stream, *args) -> None:
        entry = ENTRIES[name]
        cuda.call("cuLaunchKernel", self.functions[name], entry.grid(n), 1, 1, K.BLOCK_SIZE, 1, 1, 0, stream.handle,
                  entry.launch_args(*args), 0, what=name)

    def unload(self) -> None:
        cuda.call("cuModuleUnload", self.module)


class FakeEngine:
    """The Engine interface over FakeKernels: tensor addresses by name, input shapes (static, or any
    inside one profile: `profile` {input: (min, opt, max)}), one enqueue per call."""

    def __init__(self, kernels: FakeKernels, name: str, inputs: dict, outputs: dict, profile: dict | None = None):
        self.kernels, self.name = kernels, name
        self.profiles = [profile] if profile else []
        self.largest = {n: spec[0] for n, spec in {**inputs, **outputs}.items()}
        if profile:  # dynamic: every axis the profile lets vary is -1, as TensorRT reports it
            def widen(shape, lo, hi):
                return tuple(-1 if a != b else d for d, a, b in zip(shape, lo, hi))
            inputs = {n: (widen(shape, profile[n][0], profile[n][2]), dt) for n, (shape, dt) in inputs.items()}
            outputs = {n: ((-1, *shape[1:2], -1, -1), dt) for n, (shape, dt) in outputs.items()}
        self.inputs, self.outputs = inputs, outputs
        self.shapes = dict(self.largest)  # what the next enqueue runs at
        self.shape_calls = 0
        self.addresses: dict[str, int] = {}
        self.enqueues, self.enqueues_when_asked = 0, None

    @property
    def dynamic(self) -> bool:
        return bool(self.profiles)

    def output_shapes(self, inputs: dict) -> dict:
        raise NotImplementedError

    def set_shapes(self, shapes: dict, stream) -> dict:
        self.shape_calls += 1
        for n, shape in shapes.items():
            if self.profiles:
                lo, _, hi = self.profiles[0][n]
                assert all(a <= v <= b for a, v, b in zip(lo, shape, hi)), f"{n} {shape} outside {lo}..{hi}"
            else:
                assert tuple(shape) == self.inputs[n][0], f"{n} {shape}: the engine takes {self.inputs[n][0]}"
        self.shapes = {**{n: tuple(v) for n, v in shapes.items()}, **self.output_shapes(shapes)}
        return dict(self.shapes)

    def max_shapes(self, stream) -> dict:
        return dict(self.largest)

    def set_address(self, tensor: str, buffer) -> None:
        if tensor not in self.inputs and tensor not in self.outputs:
            raise KeyError(f"{self.name} has no tensor {tensor!r}")
        self.addresses[tensor] = int(buffer)

    def capturable(self, stream) -> bool:
        self.enqueues_when_asked = self.enqueues  # TensorRT answers properly only after its first enqueue
        return True

    def enqueue(self, stream: cuda.Stream) -> None:
        missing = (set(self.inputs) | set(self.outputs)) - set(self.addresses)
        assert not missing, f"{self.name}: no address for {sorted(missing)}"
        self._enqueue(stream, self.addresses)
        self.enqueues += 1


class FakeUNet(FakeEngine):
    """The fake UNet: fork to its auxiliary stream, conditioning scalars there while the main stream
    mixes the sample's channels, join, fp16 output. `pageable_copy`: every enqueue also copies a
    numpy (pageable) array to the device first, which CUDA refuses inside a capture."""

    def __init__(self, kernels: FakeKernels, batch: int, h: int, w: int, profile: dict | None = None,
                 tokens: int = TOKENS):
        super().__init__(kernels, f"fake unet (batch {batch})", unet_specs(batch, h, w, tokens),
                         {"noise_pred": ((batch, 4, h, w), np.dtype(np.float16))}, profile)
        self.aux = cuda.Stream()
        self.forked, self.joined = cuda.Event(timing=False), cuda.Event(timing=False)
        self.mix = cuda.DeviceBuffer(4 * batch * 4 * h * w)  # scratch, as an execution context has
        self.cond = cuda.DeviceBuffer(4 * batch)
        self.staging = cuda.DeviceBuffer(64)
        self.pageable_copy = False

    def output_shapes(self, inputs: dict) -> dict:
        return {"noise_pred": tuple(inputs["sample"])}

    def _enqueue(self, stream, a) -> None:
        rows, _, h, w = self.shapes["sample"]
        tokens = self.shapes["encoder_hidden_states"][1]
        self.plane = h * w
        n = rows * 4 * self.plane
        if self.pageable_copy:
            self.staging.upload(np.arange(16, dtype=np.float32), stream)
        self.forked.record(stream)
        self.aux.wait(self.forked)
        self.kernels.launch("fake_unet_condition", rows, self.aux, self.cond, a["encoder_hidden_states"],
                            a["text_embeds"], a["timestep"], a["time_ids"], rows, tokens, CONTEXT, POOLED, 6)
        self.kernels.launch("fake_unet_mix", n, stream, self.mix, a["sample"], self.plane, n)
        self.joined.record(self.aux)
        stream.wait(self.joined)
        self.kernels.launch("fake_unet_output", n, stream, a["noise_pred"], self.mix, self.cond, self.plane, n)

    def release(self) -> None:
        self.aux.synchronize()
        for buffer in (self.mix, self.cond, self.staging):
            buffer.free()
        for event in (self.forked, self.joined):
            event.destroy()
        self.aux.destroy()


class FakeVAE(FakeEngine):
    def __init__(self, kernels: FakeKernels, batch: int, h: int, w: int, profile: dict | None = None):
        super().__init__(kernels, f"fake vae (batch {batch})", {"latent": ((batch, 4, h, w), np.dtype(np.float32))},
                         {"image": ((batch, 3, 8 * h, 8 * w), np.dtype(np.float32))}, profile)

    def output_shapes(self, inputs: dict) -> dict:
        b, _, h, w = inputs["latent"]
        return {"image": (b, 3, 8 * h, 8 * w)}

    def _enqueue(self, stream, a) -> None:
        b, _, h, w = self.shapes["latent"]
        self.kernels.launch("fake_vae", b * 3 * 64 * h * w, stream, a["image"], a["latent"], b, h, w)

    def release(self) -> None:
        pass


# ---------------------------------------------------------------- the two drivers


@dataclass
class Runtime:
    kind: str  # "simulated" or "gpu"
    library: cuda.KernelLibrary
    kernels: FakeKernels
    stream: cuda.Stream
    latent: tuple[int, int]


@pytest.fixture(scope="module")
def gpu_runtime(tmp_path_factory):
    count, reason = cuda.probe()
    if not count:
        pytest.skip(reason)
    mp = pytest.MonkeyPatch()
    mp.setenv(nvrtc.CACHE_ENV, str(tmp_path_factory.mktemp("kernels")))
    device = cuda.Device.open()
    library = cuda.KernelLibrary(device)
    fakes = FakeKernels(nvrtc.compile_source(FAKE_CU, "fake_engines.cu", device.sm))
    stream = cuda.Stream()
    print(f"\n{device.name} (SM{device.sm})")
    yield Runtime("gpu", library, fakes, stream, GPU_LATENT)
    stream.destroy()
    fakes.unload()
    library.unload()
    device.close()
    mp.undo()


@pytest.fixture(params=["simulated", pytest.param("gpu", marks=pytest.mark.gpu)])
def runtime(request, tmp_path, monkeypatch):
    if request.param == "gpu":
        yield request.getfixturevalue("gpu_runtime")
        return
    pytest.importorskip("cuda.bindings")
    driver = simulated_cuda.install(monkeypatch, tmp_path)
    driver.kernels.update(simulated_kernels())
    library = cuda.KernelLibrary(types.SimpleNamespace(sm=89))
    fakes = FakeKernels(b"")
    stream = cuda.Stream()
    yield Runtime("simulated", library, fakes, stream, SIMULATED_LATENT)
    stream.destroy()
    fakes.unload()
    library.unload()


class Ledger:
    """Counts what the runtime creates and destroys through cuda.call, by kind."""

    PAIRS = {"cuMemAlloc": "cuMemFree", "cuMemHostAlloc": "cuMemFreeHost", "cuStreamCreate": "cuStreamDestroy",
             "cuEventCreate": "cuEventDestroy", "cuGraphInstantiate": "cuGraphExecDestroy",
             "cuStreamEndCapture": "cuGraphDestroy", "cuModuleLoadData": "cuModuleUnload"}

    def __init__(self, monkeypatch):
        self.counts: dict[str, int] = {}
        inner = cuda.call

        def counting(name, *args, what=""):
            result = inner(name, *args, what=what)
            self.counts[name] = self.counts.get(name, 0) + 1
            return result

        monkeypatch.setattr(cuda, "call", counting)

    def unbalanced(self) -> dict[str, tuple[int, int]]:
        return {f"{make}/{undo}": (self.counts.get(make, 0), self.counts.get(undo, 0))
                for make, undo in self.PAIRS.items() if self.counts.get(make, 0) != self.counts.get(undo, 0)}


def conditioning(seed: int = 7) -> Conditioning:
    """Random prompt embeddings of SDXL's sizes (uncond half first), SDXL's time ids."""
    rng = np.random.default_rng(seed)
    return Conditioning(rng.standard_normal((2, TOKENS, CONTEXT)).astype(np.float32),
                        rng.standard_normal((2, POOLED)).astype(np.float32), time_ids(1024, 1024, 2))


def assert_same_bits(name, got, expected):
    assert got.shape == expected.shape and got.dtype == expected.dtype, f"{name}: {got.shape} {got.dtype}"
    differ = np.flatnonzero(got.view(f"u{got.dtype.itemsize}") != expected.view(f"u{expected.dtype.itemsize}"))
    assert differ.size == 0, (f"{name}: {differ.size} of {got.size} values differ, first at flat index {differ[0]}: "
                              f"{got.ravel()[differ[0]]!r} vs {expected.ravel()[differ[0]]!r}")


# ---------------------------------------------------------------- without a GPU: the fake kernels themselves


def test_fake_kernels_compile_and_their_entry_points_match():
    from test_kernels import parse_entry_points

    assert parse_entry_points(FAKE_CU) == {name: e.params for name, e in ENTRIES.items()}
    pytest.importorskip("cuda.bindings")
    cubin = nvrtc.compile_source(FAKE_CU, "fake_engines.cu", 89)
    assert cubin[:4] == b"\x7fELF" and all(name.encode() in cubin for name in ENTRIES)
    ptx = nvrtc.compile_source(FAKE_CU, "fake_engines.cu", 89, output="ptx")
    assert not re.search(rb"\bfma\.", ptx), "--fmad=false: the twins round every product and sum separately"


# ---------------------------------------------------------------- the denoising loop


def device_noise(runtime: Runtime, shape: tuple[int, ...], init_noise_sigma: float):
    """(initial latents, noise(step)) as the loop draws them on the device: the gaussian_noise kernel,
    Philox stream 0 (times init_noise_sigma), then stream step + 1, of seed + i for image i."""
    per_image = int(np.prod(shape[1:]))
    buffer = cuda.DeviceBuffer(4 * int(np.prod(shape)))

    def draw(stream_index: int, scale: float) -> np.ndarray:
        for i in range(shape[0]):
            runtime.library.launch("gaussian_noise_f32", per_image, runtime.stream, int(buffer) + 4 * i * per_image,
                                   SEED + i, stream_index, scale, per_image)
        out = np.empty(shape, np.float32)
        buffer.download(out, runtime.stream)
        runtime.stream.synchronize()
        return out

    latents, steps = draw(0, init_noise_sigma), [draw(k + 1, 1.0) for k in range(STEPS)]
    buffer.free()
    return latents, steps.__getitem__


def timed_run(denoiser, scheduler: str, **kwargs):
    times: list[float] = []
    got = denoiser.denoise(conditioning(), schedulers.create(scheduler, STEPS), CFG, SEED,
                           on_step=lambda i, ms: times.append(ms), **kwargs)
    assert len(times) == STEPS
    return got, statistics.median(times)


@pytest.mark.parametrize("scheduler,engine_batch", [("euler_a", 2), ("dpmpp_2m_karras", 1), ("ddim", 2)])
def test_graph_replay_equals_eager_launches_and_the_cpu_loop(runtime, monkeypatch, record_property, scheduler,
                                                             engine_batch):
    from trt_sdxl.runtime.denoiser import GraphDenoiser

    h, w = runtime.latent
    shape, slices = (1, 4, h, w), 2 // engine_batch
    twin = FakeUNetTwin(engine_batch, h, w)
    latents, noise = device_noise(runtime, shape, schedulers.create(scheduler, STEPS).init_noise_sigma)
    expected = denoise(twin, conditioning(), latents, schedulers.create(scheduler, STEPS), CFG, noise=noise)
    numpy_noise = trajectory(twin, conditioning(), schedulers.create(scheduler, STEPS), CFG, SEED, shape)

    # the first run also loads what the GPU loads lazily (kernel code, allocator pools)
    unet = FakeUNet(runtime.kernels, engine_batch, h, w)
    denoiser = GraphDenoiser(unet, runtime.library, runtime.stream)
    graph, graph_ms = timed_run(denoiser, scheduler)
    assert denoiser.replayed_graph, "the step was not captured"
    assert unet.enqueues_when_asked == slices, (f"capturable() asked after {unet.enqueues_when_asked} enqueues; "
                                                f"TensorRT needs the warm-up enqueue of all {slices} slices first")
    assert unet.enqueues == 2 * slices, "the steps must replay the captured graph, not enqueue the engine"
    denoiser.release()
    unet.release()

    free_before = cuda.memory_info()[0]
    ledger = Ledger(monkeypatch)
    unet = FakeUNet(runtime.kernels, engine_batch, h, w)
    eager_denoiser = GraphDenoiser(unet, runtime.library, runtime.stream, use_graph=False)
    eager, eager_ms = timed_run(eager_denoiser, scheduler)
    graph_denoiser = GraphDenoiser(unet, runtime.library, runtime.stream)
    again, _ = timed_run(graph_denoiser, scheduler)
    enqueues = unet.enqueues
    replayed, _ = timed_run(graph_denoiser, scheduler)  # the same shape again: its cached graph, no warm-up
    assert unet.enqueues == enqueues and graph_denoiser.captures == 1
    unet.pageable_copy = True
    refused = GraphDenoiser(unet, runtime.library, runtime.stream)
    with pytest.warns(UserWarning, match=r"capture of the denoising step failed \(cuMemcpyHtoDAsync failed: "
                                         r"CUDA_ERROR_STREAM_CAPTURE_\w+"):
        fallback, _ = timed_run(refused, scheduler)
    assert not refused.replayed_graph
    for each in (eager_denoiser, graph_denoiser, refused):
        each.release()
    unet.release()
    free_after = cuda.memory_info()[0]

    err, err_numpy_noise = rel_l2(graph, expected), rel_l2(graph, numpy_noise)
    exact = np.array_equal(graph, expected)
    record_property("graph_ms_per_step", round(graph_ms, 4))
    record_property("eager_ms_per_step", round(eager_ms, 4))
    record_property("rel_l2_vs_cpu_loop", f"{err:.2e}")
    record_property("rel_l2_vs_cpu_loop_numpy_noise", f"{err_numpy_noise:.2e}")
    print(f"\n{runtime.kind} {scheduler}, engine batch {engine_batch}, latent {h}x{w}, {STEPS} steps: graph "
          f"{graph_ms:.3f} ms/step, eager {eager_ms:.3f} ms/step; vs the CPU loop rel L2 {err:.2e} "
          f"({'bit for bit' if exact else 'not bit for bit'}), with numpy's noise {err_numpy_noise:.2e}; free memory "
          f"{free_before} -> {free_after} bytes")
    assert_same_bits("graph replay vs eager launches", graph, eager)
    assert_same_bits("a second graph run", again, graph)
    assert_same_bits("the cached graph replayed by a second call", replayed, graph)
    assert_same_bits("the eager fallback after the refused capture", fallback, graph)
    assert err <= 1e-5, f"{scheduler}: GPU loop vs the CPU loop with the twin: rel L2 {err:.2e} > 1e-5"
    assert err_numpy_noise <= 1e-3, f"{scheduler}: vs the CPU loop with numpy's noise: rel L2 {err_numpy_noise:.2e}"
    assert not ledger.unbalanced(), f"created/destroyed: {ledger.unbalanced()}"
    assert free_after == free_before, f"free GPU memory {free_before} -> {free_after} bytes"


# ---------------------------------------------------------------- latents to RGB on the device


def test_latents_become_rgb_on_the_device(runtime, monkeypatch):
    from trt_sdxl.runtime.decoder import ImageDecoder
    from trt_sdxl.runtime.denoiser import DeviceLatents, GraphDenoiser

    h, w = runtime.latent
    ledger = Ledger(monkeypatch)
    vae = FakeVAE(runtime.kernels, 1, h, w)  # batch 1: the two images of the call are decoded one by one
    decoder = ImageDecoder(vae, runtime.library, runtime.stream, SCALING_FACTOR)
    cpu = Pipeline(None, None, None, FakeVAETwin(1, h, w), None, None, scaling_factor=SCALING_FACTOR)

    latents = np.random.default_rng(3).standard_normal((2, 4, h, w)).astype(np.float32)
    latents[0, :, 0, :3] = [[-9.0, 0.0, 9.0]] * 4  # beyond both ends of [-1, 1], and the middle
    expected = to_uint8_rgb(cpu.decode(latents))
    assert 0 < expected.mean() < 255
    assert_same_bits("decode(numpy latents)", decoder.decode(latents), expected)

    unet = FakeUNet(runtime.kernels, 2, h, w)
    denoiser = GraphDenoiser(unet, runtime.library, runtime.stream)
    run = dict(cond=conditioning(), cfg=CFG, seed=SEED)
    on_host = denoiser.denoise(scheduler=schedulers.create("euler", 8), **run)
    kept = denoiser.denoise(scheduler=schedulers.create("euler", 8), keep_on_device=True, **run)
    assert isinstance(kept, DeviceLatents) and kept.shape == (1, 4, h, w)
    assert_same_bits("decode(latents kept on the device)", decoder.decode(kept), to_uint8_rgb(cpu.decode(on_host)))
    assert kept.buffer.ptr == 0, "the decoder frees the latents it was given"
    denoiser.release()
    unet.release()
    decoder.release()
    assert not ledger.unbalanced(), f"created/destroyed: {ledger.unbalanced()}"


# ---------------------------------------------------------------- one engine, many shapes


def cfg_conditioning(rows: int, tokens: int, height: int, width: int, seed: int) -> Conditioning:
    rng = np.random.default_rng(seed)
    return Conditioning(rng.standard_normal((rows, tokens, CONTEXT)).astype(np.float32),
                        rng.standard_normal((rows, POOLED)).astype(np.float32), time_ids(height, width, rows))


def test_a_dynamic_engine_serves_many_shapes_with_one_cached_graph_each(runtime, monkeypatch):
    """A UNet engine with one profile (CFG batch 2-4, latent sides up to the runtime's, 77-154 tokens) and a
    dynamic VAE: every request shape matches the CPU loop on the twin at that shape; a shape seen again
    replays its cached graph (no warm-up enqueue, no new capture); `release` frees everything."""
    from trt_sdxl.runtime.decoder import ImageDecoder
    from trt_sdxl.runtime.denoiser import GraphDenoiser

    h, w = runtime.latent
    profile = {"sample": ((2, 4, 4, 4), (2, 4, h, w), (4, 4, h, w)), "timestep": ((2,), (2,), (4,)),
               "encoder_hidden_states": ((2, TOKENS, CONTEXT), (2, TOKENS, CONTEXT), (4, 2 * TOKENS, CONTEXT)),
               "text_embeds": ((2, POOLED), (2, POOLED), (4, POOLED)), "time_ids": ((2, 6), (2, 6), (4, 6))}
    free_before = cuda.memory_info()[0]
    ledger = Ledger(monkeypatch)
    unet = FakeUNet(runtime.kernels, 4, h, w, profile=profile, tokens=2 * TOKENS)
    assert unet.inputs["sample"][0] == (-1, 4, -1, -1)
    vae = FakeVAE(runtime.kernels, 2, h, w, profile={"latent": ((1, 4, 4, 4), (1, 4, h, w), (2, 4, h, w))})
    denoiser = GraphDenoiser(unet, runtime.library, runtime.stream)
    decoder = ImageDecoder(vae, runtime.library, runtime.stream, SCALING_FACTOR)
    cpu_vae = Pipeline(None, None, None, FakeVAETwin(2, h, w), None, None, scaling_factor=SCALING_FACTOR)
    shapes = [(2, h, w, TOKENS), (4, h // 2, w // 2, 2 * TOKENS), (2, h // 4 * 3, w // 3, TOKENS), (2, h, w, TOKENS)]
    steps = 6
    for call, (rows, lh, lw, tokens) in enumerate(shapes):
        cond = cfg_conditioning(rows, tokens, 8 * lh, 8 * lw, seed=call)
        scheduler = "euler_a"
        latents, noise = device_noise(runtime, (rows // 2, 4, lh, lw), schedulers.create(scheduler, steps).init_noise_sigma)
        expected = denoise(FakeUNetTwin(rows, lh, lw, tokens), cond, latents, schedulers.create(scheduler, steps), CFG,
                           noise=noise)
        enqueues, captures = unet.enqueues, denoiser.captures
        got = denoiser.denoise(cond, schedulers.create(scheduler, steps), CFG, SEED, latent_size=(lh, lw))
        assert denoiser.replayed_graph
        assert_same_bits(f"call {call}: rows {rows}, latent {lh}x{lw}, {tokens} tokens vs the CPU loop", got, expected)
        seen = call == 3  # the first shape again
        assert unet.enqueues - enqueues == (0 if seen else 2), "a new shape: warm-up and capture; a seen one replays"
        assert denoiser.captures - captures == (0 if seen else 1)
        rgb = decoder.decode(got)
        assert_same_bits(f"call {call}: decoded", rgb, to_uint8_rgb(cpu_vae.decode(got)))
        assert rgb.shape == (rows // 2, 8 * lh, 8 * lw, 3)
    assert len(denoiser.shapes) == 3
    with pytest.raises(AssertionError, match="outside"):  # the real Engine.set_shapes: a UserError naming its profiles
        denoiser.denoise(cfg_conditioning(2, TOKENS, 16 * h, 8 * w, 0), schedulers.create("euler", 2), CFG, SEED,
                         latent_size=(2 * h, w))
    assert len(denoiser.shapes) == 3, "a failed shape is not kept" 
    denoiser.release()
    decoder.release()
    unet.release()
    assert not ledger.unbalanced(), f"created/destroyed: {ledger.unbalanced()}"
    assert cuda.memory_info()[0] == free_before
