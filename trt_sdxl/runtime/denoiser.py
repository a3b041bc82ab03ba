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
be made again alone. `denoise` keeps everything of one call in a `_Run` of its own: the denoiser
holds only the engine, the kernels and the stream, and one lock for the engine's one context.

The UNet engine's batch may be the whole CFG batch 2B or a divisor of it (an engine built for batch
1 runs twice per step: uncond, then cond); each slice has its own I/O buffers, since TensorRT wants
tensor addresses aligned beyond what row offsets give.
"""

from __future__ import annotations

import threading
import warnings
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
    the last call did."""

    def __init__(self, unet: Engine, library: KernelLibrary, stream: Stream, use_graph: bool = True):
        self.unet, self.library, self.stream = unet, library, stream
        self.use_graph = use_graph
        self.replayed_graph: bool | None = None
        self.sample_spec = unet.inputs["sample"]
        self.suffix = kernels.dtype_suffix(self.sample_spec[1])
        if kernels.dtype_suffix(unet.outputs["noise_pred"][1]) != self.suffix:
            raise UserError(f"{unet.name}: sample and noise_pred have different data types; rebuild the engine")
        self.lock = threading.Lock()  # one execution context: one denoising run at a time

    def denoise(self, cond: Conditioning, scheduler, cfg: float, seed: int,
                on_step: Callable[[int, float], None] | None = None,
                keep_on_device: bool = False) -> np.ndarray | DeviceLatents:
        """Run every step of `scheduler`; `on_step(step_index, milliseconds)` after each one (raising
        from it stops the run; every buffer is released either way). The final latents as numpy, or
        with `keep_on_device` in a device buffer that is the caller's to free."""
        rows = cond.context.shape[0]  # 2B
        per_engine = self.sample_spec[0][0]
        if rows % per_engine:
            raise UserError(f"{self.unet.name} takes batch {per_engine}, which does not divide the CFG batch {rows} "
                            f"(2 x --batch): rebuild the UNet for batch {rows} or a divisor of it")
        with self.lock:
            run = _Run(self, cond, scheduler, cfg, seed)
            try:
                return run.execute(on_step, keep_on_device)
            finally:
                self.replayed_graph = run.graph is not None
                run.release()


class _Run:
    """One call of GraphDenoiser.denoise: its buffers, its graph and the values its kernels read."""

    def __init__(self, owner: GraphDenoiser, cond: Conditioning, scheduler, cfg: float, seed: int):
        self.unet, self.library, self.stream = owner.unet, owner.library, owner.stream
        self.use_graph, self.sample_spec, self.suffix = owner.use_graph, owner.sample_spec, owner.suffix
        rows = cond.context.shape[0]
        per_engine = self.sample_spec[0][0]
        self.images = rows // 2
        self.latent_shape = (self.images, *self.sample_spec[0][1:])
        self.n = int(np.prod(self.latent_shape))
        self.per_image = self.n // self.images
        self.seed, self.cfg, self.scheduler = seed, cfg, scheduler
        self.plan = denoising_steps(scheduler)
        self.noisy = any(step.adds_noise for step in self.plan)
        self.buffers: list[DeviceBuffer | HostBuffer] = []
        self.graph: Graph | None = None
        self.events: list[Event] = []
        try:
            self.start, self.end = self._event(), self._event()
            self.x, self.prev, self.eps = (self._alloc(4 * self.n) for _ in range(3))
            self.noise = self._alloc(4 * self.n) if self.noisy else None
            self.sample = self._alloc(rows // per_engine * nbytes(self.sample_spec))
            self.noise_pred = self._alloc(rows // per_engine * nbytes(self.unet.outputs["noise_pred"]))
            self.timestep = HostBuffer(*self.unet.inputs["timestep"])
            self.buffers.append(self.timestep)
            self.slices = [self._slice(cond, k * per_engine, per_engine, rows // per_engine)
                           for k in range(rows // per_engine)]
        except BaseException:
            self.release()
            raise

    def execute(self, on_step, keep_on_device: bool) -> np.ndarray | DeviceLatents:
        for i in range(self.images):  # image i: Philox stream 0 of seed + i
            self.library.launch("gaussian_noise_f32", self.per_image, self.stream, int(self.x) + 4 * i * self.per_image,
                                self.seed + i, 0, self.scheduler.init_noise_sigma, self.per_image)
        for s in self.slices:  # TensorRT wants one enqueue before a capture (lazy allocations, JIT)
            self._enqueue_unet(s)
        self.stream.synchronize()
        save_cache = getattr(self.unet, "save_runtime_cache", None)  # an engine with a runtime cache: it is warm now
        if save_cache is not None:
            save_cache()
        # asked only now: what TensorRT answers can depend on what the first enqueue set up
        capture = self.use_graph and self.unet.capturable(self.stream)
        self.graph, nodes = self._capture(self.plan[0]) if capture else (None, {})
        for step in self.plan:
            self.timestep.array[...] = step.timestep  # the previous replay has finished reading it
            self.start.record(self.stream)
            if self.graph is not None:
                for key, node in nodes.items():
                    self.graph.set_kernel_arguments(node, *self._launch_args(key, step))
                self.graph.launch(self.stream)
            else:
                self._enqueue_step(step)
            self.end.record(self.stream)
            self.end.synchronize()
            if on_step is not None:
                on_step(step.index, Event.elapsed_ms(self.start, self.end))
        if keep_on_device:
            self.buffers.remove(self.x)  # now the caller's: release() leaves it
            return DeviceLatents(self.x, self.latent_shape)
        latents = np.empty(self.latent_shape, np.float32)
        self.x.download(latents, self.stream)
        self.stream.synchronize()
        return latents

    def release(self) -> None:
        self.stream.synchronize()  # nothing enqueued may still use what is freed below
        if self.graph is not None:
            self.graph.destroy()
        for event in self.events:
            event.destroy()
        for buffer in self.buffers:
            buffer.free()

    # ------------------------------------------------------------ one step

    def _event(self) -> Event:
        event = Event()
        self.events.append(event)
        return event

    def _alloc(self, size: int) -> DeviceBuffer:
        buffer = DeviceBuffer(size)
        self.buffers.append(buffer)
        return buffer

    def _slice(self, cond: Conditioning, first: int, count: int, slices: int) -> dict:
        """The UNet I/O buffers of CFG rows first..first+count-1, conditioning uploaded once."""
        io = {"timestep": self._alloc(self.timestep.nbytes)}
        if slices == 1:  # the engine takes the whole CFG batch: it reads and writes the shared buffers
            io["sample"], io["noise_pred"] = self.sample, self.noise_pred
        else:
            io["sample"] = self._alloc(nbytes(self.sample_spec))
            io["noise_pred"] = self._alloc(nbytes(self.unet.outputs["noise_pred"]))
        for name, field in CONDITIONING.items():
            shape, dtype = self.unet.inputs[name]
            host = np.ascontiguousarray(getattr(cond, field)[first:first + count].astype(dtype))
            if host.shape != shape:
                raise UserError(f"{self.unet.name}: {name} is {host.shape}, the engine takes {shape}")
            io[name] = self._alloc(host.nbytes)
            io[name].upload(host, self.stream)
        return io

    def _enqueue_unet(self, io: dict) -> None:
        for name in ("sample", "timestep", *CONDITIONING, "noise_pred"):
            self.unet.set_address(name, io[name])
        self.unet.enqueue(self.stream)

    def _launch_args(self, key, step: DenoisingStep) -> tuple:
        """(kernel, elements, arguments) of the step-dependent kernels; ("noise", i) is image i's."""
        n = self.n
        if key == "scale":
            return self.library[f"scale_cast_{self.suffix}"], n, self.sample, self.x, step.input_scale, n, 2
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
        sample_bytes, pred_bytes = nbytes(self.sample_spec), nbytes(self.unet.outputs["noise_pred"])
        self._launch("scale", step, nodes)
        for k, io in enumerate(self.slices):
            io["timestep"].upload(self.timestep, self.stream)
            if len(self.slices) > 1:
                io["sample"].copy_from(self.sample, sample_bytes, self.stream, src_offset=k * sample_bytes)
            self._enqueue_unet(io)
            if len(self.slices) > 1:
                self.noise_pred.copy_from(io["noise_pred"], pred_bytes, self.stream, dst_offset=k * pred_bytes)
        self.library.launch(f"cfg_combine_{self.suffix}", self.n, self.stream, self.eps, self.noise_pred, self.cfg,
                            self.n)
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
