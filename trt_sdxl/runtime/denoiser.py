"""The UNet loop on the GPU: one denoising step captured as a CUDA graph and replayed per step.

A step is: timestep (pinned host -> device copy), scale_cast (latents -> both CFG halves of the
UNet input), the UNet engine, cfg_combine, gaussian_noise (stochastic schedulers), scheduler_step.
What changes from step to step is the timestep, which the captured copy re-reads from pinned host
memory at every replay, and the scalars of three kernels (input scale, noise stream, step
coefficients), which are set on the graph's kernel nodes before each replay
(cuGraphExecKernelNodeSetParams). The plan is `pipeline.denoising_steps`, the one the CPU loop runs
with the kernels' numpy twins. Whether TensorRT can capture the engine is asked after the warm-up
enqueue (TensorRT allocates and compiles lazily at the first one); where it cannot, or where CUDA
refuses the capture, the same step is enqueued without a graph.

The final latents come back as numpy, or stay on the GPU (`keep_on_device`: a `DeviceLatents` for
trt_sdxl.runtime.decoder, so they never make the trip to the host and back).

Image i of a batch draws its noise from seed + i (trt_sdxl.denoising), so one image of a batch can
be made again alone. Each request shape (CFG rows, latent size, prompt tokens) has its own buffers
and graph, captured at its first call and replayed by the next ones (`_Shape`, cached); one lock
serializes calls on the engine's one context, which `Engine.set_shapes` sets to the call's shapes.

The UNet engine's batch may be the whole CFG batch 2B or a divisor of it (an engine built for batch
1 runs twice per step: uncond, then cond); each slice has its own I/O buffers, since TensorRT wants
tensor addresses aligned beyond what row offsets give. An engine with a dynamic batch takes the
whole CFG batch in one enqueue where its profile holds it.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..errors import UserError
from ..denoising import Conditioning, DenoisingStep, denoising_steps
from .cuda import CudaError, DeviceBuffer, Event, Graph, HostBuffer, KernelLibrary, Stream
from .engine import Engine, nbytes

CONDITIONING = {"encoder_hidden_states": "context", "text_embeds": "text_embeds", "time_ids": "time_ids"}


@dataclass
class DeviceLatents:
    """Final latents [B, C, h, w] float32 left on the GPU; whoever takes them frees `buffer`."""

    buffer: DeviceBuffer
    shape: tuple[int, ...]

    def free(self) -> None:
        self.buffer.free()


class GraphDenoiser:
    """Denoises on the GPU with a UNet engine; `denoise(...)` returns the final latents. `use_graph`:
    capture the step into a CUDA graph where TensorRT and CUDA allow it; `replayed_graph` says whether
    the last call did.

    One graph per request shape (CFG rows, latent size, tokens, whether the scheduler adds noise),
    captured on the first call of that shape and replayed by every later one: a `_Shape` holds the
    shape's I/O buffers and its graph, whose addresses they are; the last `max_shapes` shapes are kept
    (`release` frees them all). What changes between calls of one shape — the conditioning, the seed,
    the guidance scale — is uploaded into those buffers or set on the graph's kernel nodes."""

    def __init__(self, unet: Engine, library: KernelLibrary, stream: Stream, use_graph: bool = True,
                 max_shapes: int = 4):
        self.unet, self.library, self.stream = unet, library, stream
        self.use_graph = use_graph
        self.max_shapes = max_shapes
        self.replayed_graph: bool | None = None
        self.captures = 0  # graphs captured so far (a shape seen again replays its own)
        self.sample_spec = unet.inputs["sample"]
        self.suffix = kernels.dtype_suffix(self.sample_spec[1])
        if kernels.dtype_suffix(unet.outputs["noise_pred"][1]) != self.suffix:
            raise UserError(f"{unet.name}: sample and noise_pred have different data types; rebuild the engine")
        self.lock = threading.Lock()  # one execution context: one denoising run at a time
        self.shapes: OrderedDict[tuple, _Shape] = OrderedDict()
        largest = unet.max_shapes(stream)
        self.max_rows = largest["sample"][0]  # rows one enqueue takes at most

    def latent_size(self) -> tuple[int, int]:
        """The engine's latent size where it is fixed (a static engine), else its first profile's opt."""
        shape = self.sample_spec[0]
        if -1 not in shape[2:]:
            return tuple(shape[2:])
        return tuple(self.unet.profiles[0]["sample"][1][2:])

    def denoise(self, cond: Conditioning, scheduler, cfg: float, seed: int,
                on_step: Callable[[int, float], None] | None = None,
                keep_on_device: bool = False, latent_size: tuple[int, int] | None = None) -> np.ndarray | DeviceLatents:
        """Run every step of `scheduler` on latents of `latent_size` (h, w; default: the engine's);
        `on_step(step_index, milliseconds)` after each one (raising from it stops the run). The final
        latents as numpy, or with `keep_on_device` in a device buffer that is the caller's to free."""
        rows, tokens = cond.context.shape[:2]  # 2B
        h, w = latent_size or self.latent_size()
        per_engine = self.sample_spec[0][0] if self.sample_spec[0][0] > 0 else self._rows_per_enqueue(rows)
        if rows % per_engine:
            raise UserError(f"{self.unet.name} takes batch {per_engine}, which does not divide the CFG batch {rows} "
                            f"(2 x --batch): rebuild the UNet for batch {rows} or a divisor of it")
        plan = denoising_steps(scheduler)
        key = (rows, per_engine, h, w, tokens, any(step.adds_noise for step in plan))
        with self.lock:
            state = self.shapes.pop(key, None)
            if state is None:
                state = _Shape(self, key)
                while len(self.shapes) >= self.max_shapes:
                    self.shapes.popitem(last=False)[1].release()
            self.shapes[key] = state  # the most recently used last
            try:
                return state.execute(cond, plan, scheduler.init_noise_sigma, cfg, seed, on_step, keep_on_device)
            except BaseException:
                self.shapes.pop(key, None)
                state.release()
                raise
            finally:
                self.replayed_graph = state.graph is not None

    def _rows_per_enqueue(self, rows: int) -> int:
        """A dynamic batch: all CFG rows in one enqueue where a profile holds them, else the largest slice a
        profile holds that divides them (rows are independent of each other)."""
        ranges = [(p["sample"][0][0], p["sample"][2][0]) for p in self.unet.profiles]
        if any(lo <= rows <= hi for lo, hi in ranges):
            return rows
        fits = [r for lo, hi in ranges for r in range(lo, hi + 1) if rows % r == 0]
        return max(fits) if fits else min(rows, self.max_rows)  # none: the divisibility error below says so

    def release(self) -> None:
        """Free every shape's buffers and graph."""
        with self.lock:
            while self.shapes:
                self.shapes.popitem()[1].release()


class _Shape:
    """One request shape of a GraphDenoiser: its buffers, its graph (captured at its first call) and
    the values of the call running now, which its kernels read."""

    def __init__(self, owner: GraphDenoiser, key: tuple):
        self.owner = owner
        self.unet, self.library, self.stream = owner.unet, owner.library, owner.stream
        self.use_graph, self.suffix = owner.use_graph, owner.suffix
        rows, per_engine, h, w, tokens, self.noisy = key
        channels, dtype = self.unet.inputs["sample"][0][1], self.unet.inputs["sample"][1]
        self.rows, self.per_engine, self.tokens = rows, per_engine, tokens
        self.images = rows // 2
        self.latent_shape = (self.images, channels, h, w)
        self.n = int(np.prod(self.latent_shape))
        self.per_image = self.n // self.images
        self.engine_shapes = {"sample": (per_engine, channels, h, w), "timestep": (per_engine,),
                              "encoder_hidden_states": (per_engine, tokens, self.unet.inputs["encoder_hidden_states"][0][2]),
                              "text_embeds": (per_engine, self.unet.inputs["text_embeds"][0][1]),
                              "time_ids": (per_engine, self.unet.inputs["time_ids"][0][1])}
        self.sample_bytes = nbytes((self.engine_shapes["sample"], dtype))
        self.pred_bytes = nbytes((self.engine_shapes["sample"], self.unet.outputs["noise_pred"][1]))
        self.seed, self.cfg = 0, 1.0
        self.buffers: list[DeviceBuffer | HostBuffer] = []
        self.graph: Graph | None = None
        self.nodes: dict = {}
        self.captured = False  # a capture was tried (a refused one is not tried again)
        self.events: list[Event] = []
        try:
            self.start, self.end = self._event(), self._event()
            self.x, self.prev, self.eps = (self._alloc(4 * self.n) for _ in range(3))
            self.noise = self._alloc(4 * self.n) if self.noisy else None
            self.sample = self._alloc(rows // per_engine * self.sample_bytes)
            self.noise_pred = self._alloc(rows // per_engine * self.pred_bytes)
            self.timestep = HostBuffer((per_engine,), self.unet.inputs["timestep"][1])
            self.buffers.append(self.timestep)
            self.slices = [self._slice(rows // per_engine) for _ in range(rows // per_engine)]
        except BaseException:
            self.release()
            raise

    def execute(self, cond: Conditioning, plan, init_noise_sigma: float, cfg: float, seed: int, on_step,
                keep_on_device: bool) -> np.ndarray | DeviceLatents:
        self.seed, self.cfg = seed, cfg
        self.unet.set_shapes(self.engine_shapes, self.stream)  # the engine's context may have run another shape
        for k, io in enumerate(self.slices):
            self._upload_conditioning(io, cond, k * self.per_engine)
        for i in range(self.images):  # image i: Philox stream 0 of seed + i
            self.library.launch("gaussian_noise_f32", self.per_image, self.stream, int(self.x) + 4 * i * self.per_image,
                                seed + i, 0, init_noise_sigma, self.per_image)
        if not self.captured:
            for s in self.slices:  # TensorRT wants one enqueue before a capture (lazy allocations, JIT)
                self._enqueue_unet(s)
            self.stream.synchronize()
            save_cache = getattr(self.unet, "save_runtime_cache", None)  # an engine with a runtime cache: warm now
            if save_cache is not None:
                save_cache()
            # asked only now: what TensorRT answers can depend on what the first enqueue set up
            if self.use_graph and self.unet.capturable(self.stream):
                self.graph, self.nodes = self._capture(plan[0])
                self.owner.captures += self.graph is not None
            self.captured = True
        for step in plan:
            self.timestep.array[...] = step.timestep  # the previous replay has finished reading it
            self.start.record(self.stream)
            if self.graph is not None:
                for key, node in self.nodes.items():
                    self.graph.set_kernel_arguments(node, *self._launch_args(key, step))
                self.graph.launch(self.stream)
            else:
                self._enqueue_step(step)
            self.end.record(self.stream)
            self.end.synchronize()
            if on_step is not None:
                on_step(step.index, Event.elapsed_ms(self.start, self.end))
        if keep_on_device:
            latents = DeviceBuffer(4 * self.n)  # the caller's: this shape keeps its own buffers for the next call
            latents.copy_from(self.x, 4 * self.n, self.stream)
            self.stream.synchronize()
            return DeviceLatents(latents, self.latent_shape)
        latents = np.empty(self.latent_shape, np.float32)
        self.x.download(latents, self.stream)
        self.stream.synchronize()
        return latents

    def release(self) -> None:
        self.stream.synchronize()  # nothing enqueued may still use what is freed below
        if self.graph is not None:
            self.graph.destroy()
            self.graph = None
        for event in self.events:
            event.destroy()
        for buffer in self.buffers:
            buffer.free()
        self.events, self.buffers = [], []

    # ------------------------------------------------------------ one step

    def _event(self) -> Event:
        event = Event()
        self.events.append(event)
        return event

    def _alloc(self, size: int) -> DeviceBuffer:
        buffer = DeviceBuffer(size)
        self.buffers.append(buffer)
        return buffer

    def _slice(self, slices: int) -> dict:
        """The UNet I/O buffers of one slice of CFG rows (a slice is the whole CFG batch where the engine
        takes it: then it reads and writes the shared sample and noise_pred)."""
        io = {"timestep": self._alloc(self.timestep.nbytes)}
        if slices == 1:
            io["sample"], io["noise_pred"] = self.sample, self.noise_pred
        else:
            io["sample"] = self._alloc(self.sample_bytes)
            io["noise_pred"] = self._alloc(self.pred_bytes)
        for name in CONDITIONING:
            io[name] = self._alloc(nbytes((self.engine_shapes[name], self.unet.inputs[name][1])))
        return io

    def _upload_conditioning(self, io: dict, cond: Conditioning, first: int) -> None:
        for name, field in CONDITIONING.items():
            dtype = self.unet.inputs[name][1]
            host = np.ascontiguousarray(getattr(cond, field)[first:first + self.per_engine].astype(dtype))
            if host.shape != self.engine_shapes[name]:
                raise UserError(f"{self.unet.name}: {name} is {host.shape}, the engine is set for "
                                f"{self.engine_shapes[name]}")
            io[name].upload(host, self.stream)

    def _enqueue_unet(self, io: dict) -> None:
        for name in ("sample", "timestep", *CONDITIONING, "noise_pred"):
            self.unet.set_address(name, io[name])
        self.unet.enqueue(self.stream)

    def _launch_args(self, key, step: DenoisingStep) -> tuple:
        """(kernel, elements, arguments) of the step-dependent kernels; ("noise", i) is image i's."""
        n = self.n
        if key == "scale":
            return self.library[f"scale_cast_{self.suffix}"], n, self.sample, self.x, step.input_scale, n, 2
        if key == "cfg":
            return self.library[f"cfg_combine_{self.suffix}"], n, self.eps, self.noise_pred, self.cfg, n
        if isinstance(key, tuple):  # ("noise", i): Philox stream step + 1 of seed + i
            i, m = key[1], self.per_image
            return (self.library["gaussian_noise_f32"], m, int(self.noise) + 4 * i * m, self.seed + i,
                    step.index + 1, 1.0, m)
        c = step.coefficients
        return (self.library["scheduler_step_f32"], n, self.x, self.prev, self.eps, self.noise or 0,
                c.a, c.b, c.c, c.d, c.e, c.f, n)

    def _launch(self, key, step: DenoisingStep, nodes: dict | None) -> None:
        kernel, n, *args = self._launch_args(key, step)
        self.library.launch(kernel.entry.name, n, self.stream, *args)
        if nodes is not None:
            nodes[key] = self.stream.captured_node()

    def _enqueue_step(self, step: DenoisingStep, nodes: dict | None = None) -> None:
        """Enqueue one step; with `nodes`, record the step-dependent kernel nodes (during capture)."""
        sample_bytes, pred_bytes = self.sample_bytes, self.pred_bytes
        self._launch("scale", step, nodes)
        for k, io in enumerate(self.slices):
            io["timestep"].upload(self.timestep, self.stream)
            if len(self.slices) > 1:
                io["sample"].copy_from(self.sample, sample_bytes, self.stream, src_offset=k * sample_bytes)
            self._enqueue_unet(io)
            if len(self.slices) > 1:
                self.noise_pred.copy_from(io["noise_pred"], pred_bytes, self.stream, dst_offset=k * pred_bytes)
        self._launch("cfg", step, nodes)
        if self.noisy:
            for i in range(self.images):
                self._launch(("noise", i), step, nodes)
        self._launch("step", step, nodes)

    def _capture(self, step: DenoisingStep) -> tuple[Graph | None, dict]:
        nodes: dict = {}
        try:
            with self.stream.capture() as captured:
                self._enqueue_step(step, nodes)
        except CudaError as e:
            warnings.warn(f"CUDA graph capture of the denoising step failed ({e}); running the steps without a graph")
            return None, {}
        return captured.graph, nodes
