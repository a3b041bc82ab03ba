"""The library API: load an engines folder once, generate many times.

    from trt_sdxl import Generator
    g = Generator.load("engines")                  # TensorRT engines on the GPU
    g = Generator.load("engines", device="cpu")    # the same networks through netexec (numpy)
    for image in g.generate("a lighthouse at dusk", steps=30, cfg=5.0, seed=42):
        image.save(f"lighthouse-{image.seed}.png")

`device="cpu"` runs exactly the networks the folder's engines were built from — the same
precision, the same calibration table — defined again from the model copy the folder holds, so
an INT8 or FP8 build can be looked at on a machine without a GPU. `Generator.from_model(PATH)`
runs a checkpoint's FP16 networks on the CPU without building anything.

LoRAs without a rebuild, where the folder was built `--refittable`: `set_loras(["style.safetensors:0.8"])`
refits the loaded engines in memory (the CPU: the networks' weights) with exactly the weights a build with
those LoRAs would bind, and A1111's `<lora:name:0.8>` in a prompt adds a LoRA of the `lora_dir` folder for
that call (refit before it, when the set changes; recomputed weights are cached). `python -m trt_sdxl.refit`
writes the change into the folder's engine files instead.

`generate` keeps everything of a call in the call; the loaded networks are shared and run under
one lock (an engine's execution context, and TensorRT's network objects netexec reads, are not
for two threads at once), so one Generator may serve several threads, one network run at a time. `on_step(step, steps, milliseconds)` hears about each denoising step;
`cancel` (a threading.Event, or any callable returning True) stops a call at the next step with
`Cancelled`.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import lora, schedulers
from .version import __version__
from .components import COMPONENTS, DEFAULT_MODEL, ENCODERS, LORA_COMPONENTS
from .denoising import seeded_latents, seeded_step_noise
from .errors import UserError
from .executors import NETEXEC_MAX_UNET_BYTES
from .files import write_atomic
from .log import Log, silent
from .pipeline import ModelSettings, Pipeline, to_uint8_rgb
from .quant.recipe import RECIPES
from .runtime import manifest as manifest_module
from .shapes import ImageProfile, Range, choose
from .unet_config import UNetConfig, check_image_size

# our schedulers as A1111 (1.9+) names them in an infotext: (Sampler, Schedule type)
SAMPLERS = {"euler": ("Euler", "Automatic"), "euler_a": ("Euler a", "Automatic"),
            "dpmpp_2m_karras": ("DPM++ 2M", "Karras"), "ddim": ("DDIM", "Automatic")}
DEVICES = ("gpu", "cpu")
NO_GPU = ("a GPU is needed to run the TensorRT engines, and none is usable here: {reason}. To look at the "
          "engines' networks on the CPU instead, use device=\"cpu\" (`python -m trt_sdxl.generate --cpu ...`)")


class Cancelled(Exception):
    """A generate call was cancelled (its `cancel` was set) before it finished."""


@dataclass
class Image:
    """One generated image: `rgb` uint8 [H, W, 3], its own `seed`, and A1111's infotext."""

    rgb: np.ndarray
    seed: int
    infotext: str
    parameters: dict = field(default_factory=dict)

    def save(self, path) -> Path:
        """A PNG with the infotext as its `parameters` text chunk, written atomically."""
        from .png import encode_png

        path = Path(path)
        try:
            write_atomic(path, encode_png(self.rgb, {"parameters": self.infotext}))
        except OSError as e:
            raise UserError(f"{path}: cannot write it ({e.strerror})") from None
        return path


@dataclass
class _Loaded:
    """What a Generator holds: the pipeline, the UNet loop, and the facts of its networks."""

    pipeline: Pipeline
    denoise: Callable  # (cond, scheduler, cfg, seed, latent_shape, on_step(i, ms)) -> latents
    settings: ModelSettings
    model_name: str
    model_hash: str
    height: int
    width: int
    where: str
    close: Callable[[], None]
    latent_channels: int = 4
    to_rgb: Callable | None = None  # final latents -> uint8 RGB [B, H, W, 3]; None: the pipeline's VAE, then numpy
    # check(batch, height, width, chunks): UserError naming the allowed ranges unless the networks serve it
    check: Callable | None = None
    max_chunks: int | None = None  # prompts up to this many 75-token chunks (None: any)
    switch: object = None  # trt_sdxl.lora_switch.LoRASwitch over the refittable networks; None: none is
    standing: dict = field(default_factory=dict)  # component -> LoRA specs the networks carry between calls


NOT_REFITTABLE = "the engines were not built refittable: rebuild with --refittable, or merge LoRAs at build time with " \
                 "--lora"


class Generator:
    """SDXL text to image over a loaded set of networks; see the module docstring."""

    def __init__(self, loaded: _Loaded, log: Log = silent, lora_folder: lora.LoRAFolder | None = None):
        self._loaded = loaded
        self.log = log
        self._lock = threading.Lock()
        self.lora_folder = lora_folder  # where `<lora:name>` prompt tags find their files

    # ------------------------------------------------------------ loading

    @classmethod
    def load(cls, engines_dir, device: str = "gpu", log: Log = silent, lora_dir=None, model=None) -> Generator:
        """The engines folder `engines_dir` (written by `python -m trt_sdxl.build`), on the GPU with
        TensorRT, or on the CPU through netexec (`device="cpu"`). `lora_dir`: where `<lora:name>` prompt tags
        find their files. `model`: the checkpoint the engines were built from, where a refit needs its weights
        and the folder has no copy of them (a full-size model; default: the path the build recorded)."""
        if device not in DEVICES:
            raise UserError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
        folder = engines_dir if isinstance(engines_dir, manifest_module.EnginesFolder) else \
            manifest_module.EnginesFolder(engines_dir)
        lora_folder = None if lora_dir is None else lora.LoRAFolder(lora_dir)  # a wrong folder fails before loading
        loaded = _load_gpu(folder, log, model) if device == "gpu" else _load_cpu(folder, log, model)
        return cls(loaded, log, lora_folder)

    @classmethod
    def from_model(cls, model=DEFAULT_MODEL, height: int | None = None, width: int | None = None, batch: int = 1,
                   log: Log = silent) -> Generator:
        """A checkpoint's FP16 networks (VAE in FP32) run by netexec on the CPU: no engines needed."""
        return cls(_load_model_cpu(Path(model), height, width, batch, log), log)

    @property
    def height(self) -> int:
        return self._loaded.height

    @property
    def width(self) -> int:
        return self._loaded.width

    @property
    def model_name(self) -> str:
        return self._loaded.model_name

    @property
    def model_hash(self) -> str:
        """The UNet checkpoint's fingerprint, short (A1111's `Model hash`)."""
        return self._loaded.model_hash

    @property
    def max_chunks(self) -> int | None:
        """The longest prompt the networks take, in 75-token chunks (None: any)."""
        return self._loaded.max_chunks

    @property
    def where(self) -> str:
        """What runs the networks, e.g. 'CPU (netexec, numpy)' or the GPU and TensorRT version."""
        return self._loaded.where

    @property
    def loras(self) -> dict[str, list]:
        """component -> the LoRAs its network carries between calls: (file, scale, UNet scale or None)."""
        return {c: list(specs) for c, specs in self._loaded.standing.items()}

    def set_loras(self, loras) -> dict[str, int]:
        """Make the networks carry exactly `loras` (`FILE[:SCALE]` strings, (file, scale) or (file, text encoders'
        scale, UNet scale); [] for none) from now on: the engines are refit in memory, the folder's files stay
        as they are. Returns component -> weights refit (none where nothing changed)."""
        loras = [lora.spec_tuple(spec) for spec in loras]
        with self._lock:
            loaded = self._loaded
            if loaded.switch is None:
                if loras:
                    raise UserError(f"set_loras: {NOT_REFITTABLE}")
                return {}
            sent = loaded.switch.set({c: loras for c in LORA_COMPONENTS})
            loaded.standing = {c: loras for c in LORA_COMPONENTS}
            return sent

    def check_prompt_loras(self, prompt: str) -> list:
        """The (file, text encoders' scale, UNet scale) of each `<lora:...>` tag of `prompt`; a UserError, before any
        work, for a tag without a LoRA folder, a name the folder lacks, or networks that cannot be refit."""
        return self._prompt_loras(prompt)[2]

    def _prompt_loras(self, prompt: str) -> tuple[str, list, list]:
        """(the prompt without its LoRA tags, the tags, their (file, te scale, UNet scale)): check_prompt_loras."""
        text, tags = lora.prompt_loras(prompt)
        if not tags:
            return text, [], []
        if self.lora_folder is None:
            raise UserError(f"prompt tag {tags[0].tag}: no LoRA folder to find it in (--lora-dir DIR; "
                            "Generator.load(..., lora_dir=DIR))")
        found = self.lora_folder.resolve(tags)
        if self._loaded.switch is None:
            raise UserError(f"prompt tag {tags[0].tag}: {NOT_REFITTABLE}")
        return text, tags, found

    def _carry(self, extra: list) -> None:
        """Before a call (under the lock): the networks carry the standing LoRAs plus `extra` (a prompt's tags)."""
        loaded = self._loaded
        if loaded.switch is None:
            return
        loaded.switch.set({c: list(loaded.standing.get(c, [])) + extra for c in LORA_COMPONENTS})

    def close(self) -> None:
        self._loaded.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ generating

    def check(self, batch: int = 1, height: int | None = None, width: int | None = None, chunks: int = 1) -> None:
        """UserError (naming the ranges the networks take) unless they serve this request shape."""
        loaded = self._loaded
        if loaded.check is not None:
            loaded.check(batch, height or loaded.height, width or loaded.width, chunks)

    def generate(self, prompt: str, negative_prompt: str | None = None, *, steps: int = 30, cfg: float = 5.0,
                 seed: int | None = None, scheduler: str = "euler", batch: int = 1, height: int | None = None,
                 width: int | None = None, on_step: Callable[[int, int, float], None] | None = None,
                 cancel=None, long_prompts: bool = False, weighting: bool = False) -> list[Image]:
        """`batch` images of `prompt`; image i uses seed + i (a random seed when None) and records it.
        `height`/`width`: any size the networks' profiles serve (default: their opt size).
        `long_prompts`: prompts beyond 75 tokens in 75-token chunks (else truncated, as diffusers does);
        `weighting`: A1111's `(word:1.2)`, `(word)`, `[word]` syntax (trt_sdxl.weighting)."""
        check_request(steps, cfg, scheduler, batch, seed)
        loaded = self._loaded
        if not isinstance(prompt, str):
            raise UserError(f"prompt: expected a string, got {type(prompt).__name__}")
        text, tags, extra = self._prompt_loras(prompt)
        height, width = height or loaded.height, width or loaded.width
        self.check(batch, height, width)
        seed = secrets.randbits(32) if seed is None else int(seed)
        stop = _stop_check(cancel)
        sched = schedulers.create(scheduler, steps, loaded.settings.scheduler_config)
        self.log(f"{loaded.where}: {width}x{height}, batch {batch}, {steps} steps of {scheduler}, "
                 f"CFG {cfg:g}, seed {seed}")
        started = time.perf_counter()
        negatives = None if negative_prompt is None else [negative_prompt] * batch
        latent_shape = (batch, loaded.latent_channels, height // 8, width // 8)
        times: list[float] = []

        def step_done(index: int, ms: float) -> None:
            times.append(ms)
            if on_step is not None:
                on_step(index, steps, ms)
            if stop() and index + 1 < steps:
                raise Cancelled(f"cancelled after step {index + 1} of {steps}")

        with self._lock:
            if stop():
                raise Cancelled("cancelled before the first step")
            self._carry(extra)
            t = time.perf_counter()
            cond = loaded.pipeline.encode_prompt([text] * batch, negatives, height, width, log=self.log,
                                                 long_prompts=long_prompts, weighting=weighting,
                                                 max_chunks=loaded.max_chunks)
            self.check(batch, height, width, cond.context.shape[1] // 77)
            text_s = time.perf_counter() - t
            t = time.perf_counter()
            latents = loaded.denoise(cond, sched, cfg, seed, latent_shape, step_done)
            denoise_s = time.perf_counter() - t
            t = time.perf_counter()
            rgb = loaded.to_rgb(latents) if loaded.to_rgb else to_uint8_rgb(loaded.pipeline.decode(latents))
            vae_s = time.perf_counter() - t
        self.log(f"text encoders {1000 * text_s:.0f} ms; denoising {denoise_s:.2f} s "
                 f"({np.mean(times):.1f} ms/step, fastest {min(times):.1f}); VAE {1000 * vae_s:.0f} ms; "
                 f"total {time.perf_counter() - started:.2f} s")
        standing = {Path(spec[0]): None for specs in loaded.standing.values() for spec in specs}  # ordered, once each
        carried = [(path.stem, path) for path in standing] + [(t.name, path) for t, (path, _, _) in zip(tags, extra)]
        # as A1111 records the LoRAs a prompt names: each one's name and hash
        lora_hashes = ", ".join(f"{name}: {lora.short_hash(path)}" for name, path in carried)
        images = []
        for i in range(batch):
            fields = {"prompt": prompt, "negative_prompt": negative_prompt or "", "steps": steps,
                      "sampler": SAMPLERS[scheduler][0], "schedule_type": SAMPLERS[scheduler][1],
                      "cfg_scale": cfg, "seed": seed + i,
                      "width": width, "height": height, "model_hash": loaded.model_hash,
                      "model": loaded.model_name, "batch_size": batch, "batch_pos": i}
            if lora_hashes:
                fields["lora_hashes"] = lora_hashes
            images.append(Image(rgb[i], seed + i, infotext(fields), fields))
        return images


def _stop_check(cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if hasattr(cancel, "is_set"):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise UserError("cancel: expected a threading.Event or a callable returning True to stop")


def check_request(steps, cfg, scheduler: str, batch, seed) -> None:
    """The checks of a generate request that need no model: one UserError naming the argument."""
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"--steps {steps}: expected at least 1")
    if not isinstance(cfg, (int, float)) or not cfg >= 0:  # also catches nan
        raise UserError(f"--cfg {cfg}: expected a guidance scale >= 0")
    if scheduler not in schedulers.NAMES:
        raise UserError(f"--scheduler {scheduler}: expected one of {', '.join(schedulers.NAMES)}")
    if not isinstance(batch, int) or batch < 1:
        raise UserError(f"--batch {batch}: expected at least 1")
    if seed is not None and not 0 <= seed < 2**64 - 2**16:
        raise UserError(f"--seed {seed}: expected an integer from 0 to 2^64 - 2^16 (image i of a batch uses seed + i)")


def infotext(fields: dict) -> str:
    """A1111's `parameters` text: prompt, `Negative prompt:` line, then `key: value` pairs."""
    lines = [fields["prompt"]]
    if fields.get("negative_prompt"):
        lines.append(f"Negative prompt: {fields['negative_prompt']}")
    pairs = [("Steps", fields["steps"]), ("Sampler", fields["sampler"]),
             ("Schedule type", fields.get("schedule_type", "Automatic")), ("CFG scale", f"{fields['cfg_scale']:g}"),
             ("Seed", fields["seed"]), ("Size", f"{fields['width']}x{fields['height']}"),
             ("Model hash", fields["model_hash"]), ("Model", fields["model"])]
    if fields.get("batch_size", 1) > 1:  # A1111 records these for batches only
        pairs += [("Batch size", fields["batch_size"]), ("Batch pos", fields["batch_pos"])]
    if fields.get("lora_hashes"):
        pairs.append(("Lora hashes", f'"{fields["lora_hashes"]}"'))
    pairs.append(("Version", f"trt_sdxl {__version__}"))
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs))
    return "\n".join(lines)


def _pipeline(run: dict, unet, tokenizers, settings: ModelSettings) -> Pipeline:
    """The pipeline over the text encoder and VAE executors of `run`, the UNet executor `unet` (None
    where the GPU loop drives the engine itself), the tokenizers and the model folder's settings."""
    return Pipeline(run["text_encoder"], run["text_encoder_2"], unet, run["vae"], *tokenizers,
                    scaling_factor=settings.scaling_factor,
                    force_zeros_for_empty_prompt=settings.force_zeros_for_empty_prompt)


# ---------------------------------------------------------------- the CPU (netexec)


def _cpu_denoise(pipeline: Pipeline):
    def denoise(cond, scheduler, cfg, seed, latent_shape, on_step):
        last = time.perf_counter()

        def timed(i, t, outputs):
            nonlocal last
            now = time.perf_counter()
            on_step(i, 1000 * (now - last))
            last = now

        latents = seeded_latents(seed, latent_shape, scheduler.init_noise_sigma)
        return pipeline.denoise(cond, latents, scheduler, cfg, noise=seeded_step_noise(seed, latent_shape),
                                on_step=timed)

    return denoise


def _cpu_networks(model: Path, specs: dict, log: Log, lora_set=None):
    """NetexecExecutors of the four networks `specs` describes: component -> (precision, engine batch,
    latent h, latent w, calibration table or None, image profiles or None); `lora_set`: the LoRAs the
    engines were built with, merged again (trt_sdxl.lora)."""
    from . import lora, weights
    from .executors import NetexecExecutor
    from .models import clip, unet, vae

    started = time.perf_counter()
    run = {}
    for component in COMPONENTS:
        precision, batch, latent_h, latent_w, table, profiles = specs[component]
        source = lora.merged(weights.open_component(model, component), lora_set) if lora_set else model
        if component in ENCODERS:
            run[component] = NetexecExecutor(clip.define(source, ENCODERS[component], batch=batch, precision=precision,
                                                         profiles=profiles))
        elif component == "unet":
            run[component] = NetexecExecutor(unet.define(source, precision=precision, batch=batch,
                                                         latent_height=latent_h, latent_width=latent_w,
                                                         calibration=table, profiles=profiles))
        else:
            run[component] = NetexecExecutor(vae.define(source, precision=precision, batch=batch,
                                                        latent_height=latent_h, latent_width=latent_w,
                                                        profiles=profiles))
    log(f"networks defined from {model} ({time.perf_counter() - started:.1f} s)")
    return run


def _check_cpu_size(model: Path, what: str) -> object:
    from . import weights

    unet_weights = weights.open_component(model, "unet")
    if unet_weights.weight_bytes > NETEXEC_MAX_UNET_BYTES:
        raise UserError(f"--cpu: {what} has a {unet_weights.weight_bytes / 2**30:.1f} GiB UNet; netexec (numpy) "
                        "would take hours on it. Use --cpu with a tiny model (weights/tiny-sdxl) and run full-size "
                        "models on a GPU")
    return unet_weights


def _load_model_cpu(model: Path, height, width, batch: int, log: Log) -> _Loaded:
    unet_weights = _check_cpu_size(model, str(model))
    cfg = UNetConfig.parse(unet_weights.config)
    height, width = check_image_size(height, width, cfg.image_multiple, cfg.default_image_side)
    tokenizers = open_tokenizers(model)
    settings = ModelSettings.read(model)
    # netexec evaluates any shape: one profile as wide as a CPU preview needs, opt at the size asked for
    m = cfg.image_multiple
    profile = ImageProfile(Range(1, batch, max(batch, CPU_MAX_BATCH)), Range(m, height, max(height, CPU_MAX_SIDE)),
                           Range(m, width, max(width, CPU_MAX_SIDE)), Range(1, 1, CPU_MAX_CHUNKS), "any")
    specs = {c: (p, 0, 0, 0, None, [profile]) for c, p in (("text_encoder", "fp16"), ("text_encoder_2", "fp16"),
                                                            ("unet", "fp16"), ("vae", "fp32"))}
    run = _cpu_networks(model, specs, log)
    pipeline = _pipeline(run, run["unet"], tokenizers, settings)
    name = model.name if model.is_dir() else model.stem
    return _Loaded(pipeline, _cpu_denoise(pipeline), settings, name, unet_weights.fingerprint()[:10], height, width,
                   "CPU (netexec, numpy)", lambda: [e.free() for e in run.values()], cfg.in_channels,
                   check=_profile_check([profile], m, "the CPU networks"), max_chunks=CPU_MAX_CHUNKS)


def _load_cpu(folder, log: Log, model_weights=None) -> _Loaded:
    """The networks an engines folder's engines were built from, defined again and run by netexec."""
    from .quant.table import CalibrationTable

    entries = {c: folder.entry(c, need_file=False) for c in COMPONENTS}
    height, width = folder.image_size(entries)
    model = folder.model_folder(require_weights=True)
    unet_weights = _check_cpu_size(model, str(folder.folder))
    table = None
    if entries["unet"]["precision"] in RECIPES:
        table = CalibrationTable.load(folder.calibration_path())
    specs = {}
    for c, entry in entries.items():
        lh, lw = (height // 8, width // 8) if c in ("unet", "vae") else (0, 0)
        batch = int(entry.get("cfg_batch" if c == "unet" else "batch", 1))
        profiles = folder.profiles(entry) if entry.get("profiles") else None
        specs[c] = (entry["precision"], batch, lh, lw, table if c == "unet" else None, profiles)
    run = _cpu_networks(model, specs, log, folder.lora_set())
    tokenizers = open_tokenizers(model)
    settings = ModelSettings.read(model)
    pipeline = _pipeline(run, run["unet"], tokenizers, settings)
    where = f"CPU (netexec, numpy; the networks of {folder.folder}: unet {entries['unet']['precision']})"
    multiple = UNetConfig.parse(unet_weights.config).image_multiple

    def apply(component: str, weights: dict, more) -> None:
        from .refit_map import NetworkWeights

        NetworkWeights(run[component].network, weights).set(weights)

    from .lora_switch import folder_switch

    switch, standing = folder_switch(folder, entries, model_weights, apply, log, carried=False)
    return _Loaded(pipeline, _cpu_denoise(pipeline), settings, folder.model_name(), folder.model_hash(), height,
                   width, where, lambda: [e.free() for e in run.values()], run["unet"].inputs["sample"][0][1],
                   check=_folder_check(folder, entries, multiple), max_chunks=_max_chunks(folder, entries),
                   switch=switch, standing=standing)


# ---------------------------------------------------------------- the GPU (TensorRT)


def _load_gpu(folder, log: Log, model_weights=None) -> _Loaded:
    from . import backend
    from .runtime import cuda
    from .runtime.decoder import ImageDecoder
    from .runtime.denoiser import GraphDenoiser
    from .runtime.engine import Engine, EngineExecutor, EngineRefitter

    count, reason = cuda.probe()
    if not count:
        raise UserError(NO_GPU.format(reason=reason))
    entries = {c: folder.entry(c) for c in COMPONENTS}
    height, width = folder.image_size(entries)
    be = backend.get()
    for entry in entries.values():
        folder.check_backend(entry, be.name, be.version)
    model = folder.model_folder(require_weights=False)
    tokenizers = open_tokenizers(model)
    settings = ModelSettings.read(model)
    device = cuda.Device.open()
    for entry in entries.values():
        folder.check_target(entry, device.compute_capability, device.name)
    started = time.perf_counter()
    stream = cuda.Stream()
    library = cuda.KernelLibrary(device)
    run = {c: EngineExecutor(Engine.load(entries[c]["path"]), stream) for c in ENCODERS}
    denoiser = GraphDenoiser(Engine.load(entries["unet"]["path"]), library, stream)
    decoder = ImageDecoder(Engine.load(entries["vae"]["path"]), library, stream, settings.scaling_factor)
    log(f"engines loaded from {folder.folder} ({time.perf_counter() - started:.1f} s)")
    pipeline = _pipeline({**run, "vae": None}, None, tokenizers, settings)  # the VAE runs in `decoder`
    engines = {**{c: executor.engine for c, executor in run.items()}, "unet": denoiser.unet}
    refitters = {}

    def apply(component: str, weights: dict, more) -> None:
        if component not in refitters:
            refitters[component] = EngineRefitter(engines[component])
        refitters[component].refit(weights, stream, more)
        if component == "unet":
            denoiser.release()  # graphs captured before the refit: captured again at the next call

    from .lora_switch import folder_switch

    switch, standing = folder_switch(folder, entries, model_weights, apply, log)

    def denoise(cond, scheduler, cfg, seed, latent_shape, on_step):  # the latents stay on the GPU for the VAE
        return denoiser.denoise(cond, scheduler, cfg, seed, on_step=on_step, keep_on_device=True,
                                latent_size=tuple(latent_shape[2:]))

    def close():
        refitters.clear()  # a refitter holds its engine
        for executor in run.values():
            executor.free()
        decoder.release()
        for engine in (*(executor.engine for executor in run.values()), denoiser.unet, decoder.vae):
            engine.release()  # each saves its TensorRT-RTX runtime cache first
        library.unload()
        stream.destroy()
        device.close()

    return _Loaded(pipeline, denoise, settings, folder.model_name(), folder.model_hash(), height, width,
                   f"GPU {device.name} (SM{device.sm}), {be.name} {be.version}", close,
                   denoiser.sample_spec[0][1], decoder.decode,
                   check=_folder_check(folder, entries, _image_multiple(model)), max_chunks=_max_chunks(folder, entries),
                   switch=switch, standing=standing)


# ---------------------------------------------------------------- shared checks


CPU_MAX_BATCH, CPU_MAX_SIDE, CPU_MAX_CHUNKS = 8, 4096, 8  # Generator.from_model's profile (netexec takes any)


def _profile_check(profiles: list[ImageProfile], multiple: int, where: str) -> Callable:
    def check(batch: int, height: int, width: int, chunks: int) -> None:
        choose(profiles, batch, height, width, chunks, multiple, where=where)

    return check


def _folder_check(folder, entries: dict, multiple: int) -> Callable:
    def check(batch: int, height: int, width: int, chunks: int) -> None:
        folder.check_request(entries, batch, height, width, chunks, multiple)

    return check


def _max_chunks(folder, entries: dict) -> int:
    """The longest prompt (in 75-token chunks) every text encoder and the UNet take."""
    return min(max(p.chunks.hi for p in folder.profiles(entries[c])) for c in ("text_encoder", "text_encoder_2", "unet"))


def _image_multiple(model: Path) -> int:
    from .files import load_json

    config = load_json(Path(model) / "unet" / "config.json", missing={})
    try:
        return UNetConfig.parse(config).image_multiple if config else 8
    except UserError:
        return 8


def open_tokenizers(model: Path):
    """Both tokenizers of a pipeline folder."""
    from .tokenizer import open_tokenizer

    if not Path(model).is_dir():
        raise UserError(f"{model} is not a folder, so it holds no tokenizers: pass --model with a diffusers SDXL "
                        "folder that has tokenizer/ and tokenizer_2/")
    return open_tokenizer(model, 1), open_tokenizer(model, 2)
