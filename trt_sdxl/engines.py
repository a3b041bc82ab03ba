"""Engines from defined networks: the target GPU, the builder config, serialization, engine file
names and the tensor specs a manifest records.

`build_engine(definition, target)` turns a defined network into serialized engine bytes for a
compute capability ('SM89', ahead of time) or for the GPU present ('native'), reporting the
builder's phases; Ctrl-C during the build cancels it (TensorRT's progress monitor is asked to
stop) and surfaces as KeyboardInterrupt, not as a failed build.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import threading
import time
from contextlib import contextmanager

from . import backend
from .errors import UserError
from .log import Log, silent

EIGHT_BIT_OPTIMIZATION_LEVEL = 4  # NVIDIA builds its 8-bit SDXL engines at level 4 (ModelOpt's example)
FP8_MIN_SM = 89  # FP8 tensor cores: Ada, Hopper, Blackwell
BF16_MIN_SM = 80  # bfloat16 arithmetic starts with Ampere (SM 8.0)


def engine_filename(component: str, precision: str, target: str) -> str:
    """`unet.fp16.trtrtx1.7.1.sm89.plan`: component, precision, backend and version, target."""
    return f"{component}.{precision}.{backend.get().tag}.{target.lower()}.plan"


def tensor_specs(network, which: str) -> list[dict]:
    """[{name, shape, dtype}] of a network's inputs or outputs, as the manifest records them."""
    count = network.num_inputs if which == "inputs" else network.num_outputs
    get = network.get_input if which == "inputs" else network.get_output
    return [{"name": t.name, "shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1].lower()}
            for t in (get(i) for i in range(count))]


# ---------------------------------------------------------------- target


def present_gpu() -> tuple[str, str] | None:
    """('SM89', 'NVIDIA GeForce RTX 4090') of the first GPU, from nvidia-smi; None without a GPU."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=compute_cap,name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out or "," not in out[0]:
        return None
    cap, name = (f.strip() for f in out[0].split(",", 1))
    return "SM" + cap.replace(".", ""), name


def present_gpu_target() -> str | None:
    """'SM89'-style name of the first GPU; None without a GPU."""
    found = present_gpu()
    return found[0] if found else None


def choose_target(requested: str | None) -> str:
    """The build target: `requested` ('SM89', 'native') checked, else the GPU present, else SM89."""
    be = backend.get()
    if requested:
        requested = requested.upper() if requested.lower() != "native" else "native"
        if requested == "native":
            if present_gpu_target() is None:
                raise UserError("--target native: no GPU found on this machine to build for; name a target "
                                f"such as SM89 or SM120 (this {be.name} can build for: "
                                f"{', '.join(be.aot_targets) or 'only the GPU present'})")
            return requested
        if not requested.startswith("SM"):
            raise UserError(f"--target {requested}: expected e.g. SM89, SM120 or native")
        be.check_target(requested)
        return requested
    gpu = present_gpu_target()
    if gpu:
        return gpu if gpu in be.aot_targets else "native"
    if "SM89" in be.aot_targets:
        return "SM89"
    raise UserError(f"no GPU found and {be.name} {be.version} cannot build ahead of time; pass --target or "
                    "run on a machine with the target GPU")


def check_target_takes(target: str, vae_precision: str, precision: str = "fp16") -> None:
    """bfloat16 engines need an SM 8.0+ target (the builder's own error for SM75 is a compiler message);
    FP8 needs SM 8.9+ (Ada, Hopper, Blackwell tensor cores)."""
    if precision == "fp8" and target.startswith("SM") and int(target[2:]) < FP8_MIN_SM:
        raise UserError(f"--precision fp8: {target} has no FP8 tensor cores (they need SM{FP8_MIN_SM} or newer); "
                        "use --precision int8 for this GPU")
    if vae_precision == "bf16" and target.startswith("SM") and int(target[2:]) < BF16_MIN_SM:
        raise UserError(f"--vae-precision bf16: {target} has no bfloat16 (it needs SM{BF16_MIN_SM} or newer); "
                        "use --vae-precision fp32")


# ---------------------------------------------------------------- building


class BuildMonitor:
    """TensorRT's IProgressMonitor: logs the builder's top-level phases, and stops the build once
    Ctrl-C was pressed. While the builder runs, SIGINT only sets a flag (a KeyboardInterrupt raised
    inside a TensorRT callback would be swallowed, and the build would look failed); the monitor
    then asks the builder to stop, and build_engine raises KeyboardInterrupt when it returns."""

    def __init__(self, log: Log):
        self.log = log
        self.interrupted = False

    def attach(self, config) -> None:
        trt = backend.trt()
        if not hasattr(trt, "IProgressMonitor") or not hasattr(config, "progress_monitor"):
            return
        outer = self

        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name, parent_phase, num_steps):
                if parent_phase is None and not outer.interrupted:
                    outer.log(f"  build phase: {phase_name}")

            def step_complete(self, phase_name, step):
                return not outer.interrupted  # False asks the builder to stop

            def phase_finish(self, phase_name):
                pass

        config.progress_monitor = Monitor()

    @contextmanager
    def catching_ctrl_c(self):
        """SIGINT sets `interrupted` instead of raising, for the duration (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def note(signum, frame):
            self.interrupted = True

        previous = signal.signal(signal.SIGINT, note)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class TimingCache:
    """One builder timing cache for every engine build of a run, on NVIDIA TensorRT: a layer whose
    tactics one build timed is not timed again by the next (the calibration network and the FP16 and
    8-bit UNets share most layers, and SDXL repeats its blocks). The cache is created by the first
    build's config and attached to each later one (ITimingCache: "it can be shared across builder
    instances"). Kept in memory for the run only. TensorRT for RTX times no tactics when it builds,
    and there a timing cache would force a GPU query during CPU-only builds: not attached
    (Backend.has_timing_cache)."""

    def __init__(self):
        self.cache = None

    def attach(self, config) -> bool:
        """Attach the cache to a builder config (creating it from the first); False where the backend
        has none."""
        if not backend.get().has_timing_cache:
            return False
        if self.cache is None:
            self.cache = config.create_timing_cache(b"")
        return bool(config.set_timing_cache(self.cache, False))


def check_can_build_refittable(target: str) -> None:
    """TensorRT for RTX (1.7) compiles a refittable engine's kernels with the GPU's driver while it builds:
    ahead of time on a machine without a GPU the builder fails deep inside (Myelin's CUDA check). Said
    before any work starts, with the ways on."""
    be = backend.get()
    if be.is_rtx and present_gpu() is None:
        raise UserError(f"--refittable: {be.name} {be.version} builds refittable engines only on a machine with a GPU "
                        f"(it compiles their kernels there; ahead of time for {target} without one it cannot); build "
                        "them on the GPU, merge the LoRA at build time instead (--lora), or use --no-engines for the "
                        "CPU preview")


def mark_refittable(definition, config, names) -> None:
    """Make weights `names` of the network refittable and the others build-time constants (REFIT_INDIVIDUAL, not
    kREFIT: the builder keeps folding biases and norms, and TensorRT 11.3 documents that kREFIT can drop a GEMM
    bias, which the GPU test tests/test_refit.py checks for); every name must be one the definition gave
    TensorRT (set_weights_name)."""
    trt = backend.trt()
    config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
    refused = [n for n in names if not definition.network.mark_weights_refittable(n)]
    if refused:
        raise UserError(f"{backend.get().name} {backend.get().version} cannot make {len(refused)} weights refittable "
                        f"(e.g. {refused[0]}); build without --refittable and merge LoRAs at build time (--lora)")


def build_engine(definition, target: str, log: Log = silent, optimization_level: int | None = None,
                 detailed: bool = False, timing_cache: TimingCache | None = None, profiles: list | None = None,
                 refittable: list[str] | None = None):
    """Serialize the network for `target`; returns the engine (TensorRT host memory, which supports
    the buffer protocol: written to disk or deserialized without a copy) and the seconds it took.
    `optimization_level`: the builder's (0-5; None: TensorRT's default, 3). `detailed`: profiling
    verbosity DETAILED, so the engine inspector reports each layer's formats and tactic (it adds
    layer details to the engine's NVTX ranges, not work to its kernels). `timing_cache`: the run's
    TimingCache (NVIDIA TensorRT), shared by its builds. `profiles`: the optimization profiles of a
    network with dynamic shapes, [{input: (min, opt, max)}] (`DefinedNetwork.profiles`), in order: the
    engine's profile k is the k-th. `refittable`: the weights a refit may change (trt_sdxl.refit_map), marked
    refittable (`mark_refittable`); None builds an engine that cannot be refit.

    Where the backend has it (TensorRT-RTX), REQUIRE_USER_ALLOCATION is set on every engine: its
    enqueue then never allocates memory at run time, which CUDA stream capture cannot record. It costs
    our engines nothing: the runtime gives every input and output an address of its own, sized for the
    largest shape of the profile, and lets the execution context allocate its scratch memory once (for
    the profile's largest shapes), when it is created, and a build of a network needing run-time allocation (data-dependent shapes) fails instead of
    making an engine that cannot be captured."""
    be = backend.get()
    config = definition.builder.create_builder_config()
    be.set_target(config, target)
    if be.has_require_user_allocation:
        config.set_flag(be.module.BuilderFlag.REQUIRE_USER_ALLOCATION)
    if optimization_level is not None:
        config.builder_optimization_level = optimization_level
    if detailed:
        config.profiling_verbosity = be.module.ProfilingVerbosity.DETAILED
    if timing_cache is not None:
        timing_cache.attach(config)
    if refittable is not None:
        mark_refittable(definition, config, refittable)
    for profile in profiles or ():
        shapes = definition.builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            shapes.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(shapes)
    monitor = BuildMonitor(log)
    monitor.attach(config)
    start = time.perf_counter()
    with monitor.catching_ctrl_c():
        serialized = definition.builder.build_serialized_network(definition.network, config)
    seconds = time.perf_counter() - start
    if monitor.interrupted:
        raise KeyboardInterrupt
    if serialized is None:
        raise UserError(f"{be.name} {be.version} could not build the network for {target} "
                        "(the builder's messages above say why)")
    return serialized, seconds


# ---------------------------------------------------------------- fused 8-bit attention


class _QuietLogger:
    """A TensorRT logger that drops messages: a probe's failure is an answer, not an error."""

    def __new__(cls):
        trt = backend.trt()

        class Quiet(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                pass

        return Quiet()


@contextmanager
def _stderr_silenced():
    """The builder's compiler prints its own failure to fd 2; a probe's is expected."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@functools.lru_cache(maxsize=None)
def fused_attention_builds(fmt: str, q_shape: tuple, k_shape: tuple, target: str) -> bool:
    """Whether the backend builds a non-decomposable attention with `fmt` (int8/fp8) Q/DQ inputs of
    these [B, N, S, D] shapes for `target`: i.e. has a fused 8-bit kernel for them. A one-layer
    network, built once per shape (about a second). Backends without the attention layer fuse the
    matmul-softmax-matmul pattern themselves and cannot be asked: True."""
    import numpy as np

    be = backend.get()
    if not be.has_attention_layer:
        return True
    trt = be.module
    builder = trt.Builder(_QuietLogger())
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    keep = []

    def const(value, dtype):
        array = np.array(value, dtype)
        keep.append(array)
        return network.add_constant((), trt.Weights(array)).get_output(0)

    eight_bit = trt.int8 if fmt == "int8" else trt.fp8
    inputs = []
    for name, dims in (("q", q_shape), ("k", k_shape), ("v", k_shape)):
        x = network.add_input(name, trt.float16, tuple(dims))
        scale = const(0.01, np.float32)
        q = network.add_quantize(x, scale, eight_bit)
        inputs.append(network.add_dequantize(q.get_output(0), scale, trt.float16).get_output(0))
    att = network.add_attention(*inputs, trt.AttentionNormalizationOp.SOFTMAX, False)
    att.decomposable = False
    att.normalization_quantize_scale = const(1.0 / (448.0 if fmt == "fp8" else 127.0), np.float16)
    att.normalization_quantize_to_type = eight_bit
    network.mark_output(att.get_output(0))
    config = builder.create_builder_config()
    be.set_target(config, target)
    with _stderr_silenced():
        return builder.build_serialized_network(network, config) is not None


def fused_attention_check(target: str):
    """attention_check for unet.define: asks the builder, per distinct shape, for `target`."""
    return lambda fmt, q_shape, k_shape: fused_attention_builds(fmt, tuple(q_shape), tuple(k_shape), target)
