"""calibrate -> tune -> CalibrationTable: the quantization workflow `python -m trt_sdxl.build` runs.

Executors come from a factory: TensorRT engines built for and run on the GPU present (the
runtime's EngineExecutor), else netexec on the CPU — fine for tiny models, hours for a
full-size one, so a full-size model without a GPU is refused with a pointer to
`--calibration FILE`.

The factory also says whether a network is expensive to make (`expensive`), and that picks how
tuning judges its candidates. Netexec defines a network in a second, so the candidates are
judged in image space, one network each (tune.tune: about ten UNets). A GPU builds an engine
per network, minutes for a full-size UNet, so there tuning scores every candidate per layer on
the rows calibration sampled (tune.tune_layers) and builds at most three UNets: the calibration
network, whose noise_pred is the FP16 UNet's and so also gives the FP16 reference of the
held-aside images; the chosen recipe's, built for the build's target and options and scored on
the held-aside images; and, only when the calibration came from a file, a plain FP16 UNet for the
reference. The build then writes the chosen engine (and the text encoders and VAE tuning used)
as built, where the target runs here (BuildEngines). The cost of the choice is what a factory
knows best, which is why it declares it; a test factory declares either over netexec.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .. import schedulers
from ..engines import EIGHT_BIT_OPTIMIZATION_LEVEL, TimingCache
from ..errors import UserError
from ..executors import NETEXEC_MAX_UNET_BYTES
from ..log import Log, silent
from ..pipeline import Pipeline
from ..quant.percentile import AmaxRule
from ..quant.plan import QuantPlan, fixed_choices
from ..quant.recipe import RECIPES, check_recipe
from ..quant.table import CalibrationTable
from .calibrate import StatsCollector, calibrate_into, calibration_meta
from .prompts import load_prompts, model_prompts
from .tune import SEEDS_PER_PROMPT, HeldAside, image_space_candidates, tune, tune_layers

CALIBRATION_BATCH = 8  # prompts per calibration call (CFG batch 16): netexec's per-layer cost is shared
TUNE_STEPS = 10  # denoising steps of the tuning runs (quantized and FP16 alike)


def heldout_count(prompts: int) -> int:
    """Prompts held aside from calibration for the trajectory-level tuning: an eighth, 2 to 8
    (the 72 built-in prompts: 64 calibrate, 8 tune)."""
    return max(2, min(8, prompts // 8))


@dataclass
class BuildEngines:
    """What the build will write — target, images per prompt, builder optimization level, VAE
    precision — with the run's timing cache, and the engines a GPU calibration built for exactly
    that (`keep`), which the build takes instead of building them again (`take`)."""

    target: str
    images: int = 1
    optimization_level: int | None = None  # --optimization-level
    vae_precision: str = "fp32"
    timing_cache: TimingCache = field(default_factory=TimingCache)
    # the engines have dynamic shapes (trt_sdxl.shapes profiles): calibration's networks are static, at the
    # opt shape, so none of its engines is the one the build writes, and none is kept
    dynamic: bool = False
    kept: dict[tuple, tuple[object, float]] = field(default_factory=dict)  # key -> (plan, build seconds)

    def level(self, component: str, precision: str) -> int | None:
        """The builder optimization level of an engine: --optimization-level, else 4 for an 8-bit UNet
        (as NVIDIA builds them) and TensorRT's default for the rest."""
        if self.optimization_level is None and component == "unet" and precision in RECIPES:
            return EIGHT_BIT_OPTIMIZATION_LEVEL
        return self.optimization_level

    @staticmethod
    def key(component: str, precision: str, batch: int, latent: tuple[int, int] | None, target: str,
            level: int | None, table: CalibrationTable | None = None) -> tuple:
        """What makes two builds one engine: the network (component, precision, engine batch, latent
        size, and for an 8-bit UNet the table's choices for its recipe) and the builder's target and
        level. One model per run, so the weights are the same."""
        choices = None
        if table is not None and precision in RECIPES:
            tuned = table.meta["tuned"][precision]
            choices = json.dumps({"rule": tuned["rule"], "alphas": tuned["alphas"]}, sort_keys=True)
        return component, precision, batch, tuple(latent) if latent else None, target, level, choices

    def key_of(self, kind: str, defined, images: int, latent: tuple[int, int], target: str) -> tuple:
        """The key of an engine of `defined`, a NetworkFactory's `kind` network for `images` images at
        `latent`, built for `target` at this build's level: as the build looks its engine up."""
        quant = defined.definition.quant
        return self.key(kind, defined.precision, 2 * images if kind == "unet" else images,
                        latent if kind in ("unet", "vae") else None, target, self.level(kind, defined.precision),
                        quant.table if quant is not None else None)

    def keep(self, key: tuple, plan, seconds: float) -> None:
        self.kept[key] = (plan, seconds)

    def take(self, key: tuple):
        """(plan, build seconds) of the engine built for `key`, handed over (not kept twice); None."""
        return self.kept.pop(key, None)


class NetworkFactory:
    """make(kind, images=batch, for_build=False, **define_options) -> executor of that network for
    `images` images (the UNet takes their CFG batch), where `run(defined, kind, images, for_build)`
    makes the executor: the calibration network, the FP16 UNet, each tuning candidate, the text
    encoders, the VAE. `for_build`: the network the build will write (the chosen 8-bit UNet).
    `expensive`: whether making a network costs minutes (an engine build), which has tuning score its
    candidates per layer instead of building one network each."""

    def __init__(self, model, batch: int, latent_h: int, latent_w: int, run, expensive: bool,
                 vae_precision: str = "fp32", attention_check=None):
        self.model, self.batch, self.latent = model, batch, (latent_h, latent_w)
        self.run, self.expensive = run, expensive
        self.vae_precision = vae_precision
        self.attention_check = attention_check  # for the network the build writes, as the build defines it
        # opened components to define from instead of `model` (the build's, with its LoRAs merged)
        self.checkpoints: dict = {}

    def source(self, kind: str):
        return self.checkpoints.get(kind, self.model)

    def __call__(self, kind: str, images: int | None = None, for_build: bool = False, **options):
        from ..models import clip, unet, vae

        images = images or self.batch
        latent_h, latent_w = self.latent
        if kind == "unet":
            if for_build and self.attention_check is not None:
                options = {**options, "attention_check": self.attention_check}
            defined = unet.define(self.source(kind), batch=2 * images, latent_height=latent_h,
                                  latent_width=latent_w, **options)
        elif kind.startswith("text_encoder"):
            defined = clip.define(self.source(kind), encoder=2 if kind.endswith("_2") else 1, batch=images)
        elif kind == "vae":
            defined = vae.define(self.source(kind), precision=self.vae_precision, batch=images,
                                 latent_height=latent_h, latent_width=latent_w)
        else:
            raise ValueError(kind)
        return self.run(defined, kind, images, for_build)


def netexec_factory(model, batch: int, latent_h: int, latent_w: int):
    """Executors run by netexec on the CPU."""
    from ..executors import NetexecExecutor

    return NetworkFactory(model, batch, latent_h, latent_w, lambda defined, *_: NetexecExecutor(defined),
                          expensive=False)


def gpu_factory(model, batch: int, latent_h: int, latent_w: int, log: Log = silent,
                engines: BuildEngines | None = None):
    """Executors that are TensorRT engines built for, and run on, the GPU present, in memory (the plan
    is TensorRT's host memory, deserialized without a copy), sharing one timing cache. With `engines`
    (what the build writes) and a build target that runs here, every network is built for that target
    at the build's optimization level, and the chosen UNet and the text encoders and VAE are kept for
    the build; the other UNets (calibration, FP16 reference) are not engines it writes."""
    from ..engines import build_engine, fused_attention_check, present_gpu_target
    from ..runtime import cuda
    from ..runtime.engine import Engine, EngineExecutor

    cuda.Device.open()
    here = engines is not None and engines.target in ("native", present_gpu_target())
    target = engines.target if here else "native"
    cache = engines.timing_cache if engines is not None else TimingCache()

    def run(defined, kind, images, for_build):
        precision = defined.precision
        level = engines.level(kind, precision) if engines is not None else None
        what = "the chosen " + precision if for_build else precision
        log(f"calibration: building the {kind} network ({what}) for this GPU")
        plan, seconds = build_engine(defined.definition, target, log, optimization_level=level, timing_cache=cache)
        log(f"calibration: built the {kind} network ({plan.nbytes / 2**20:.1f} MiB, {seconds:.1f} s)")
        if here and not engines.dynamic and (for_build or kind != "unet"):
            engines.keep(engines.key_of(kind, defined, images, (latent_h, latent_w), target), plan, seconds)
        return EngineExecutor(Engine(plan, kind))

    return NetworkFactory(model, batch, latent_h, latent_w, run, expensive=True,
                          vae_precision=engines.vae_precision if engines is not None else "fp32",
                          attention_check=fused_attention_check(target) if here else None)


def check_can_calibrate(model, unet_component, recipe: str, calibration: str | None) -> None:
    """Before any network is defined: an 8-bit build that must calibrate needs a pipeline folder (its
    tokenizers) and, for a UNet too large for netexec, a GPU."""
    from ..runtime import cuda

    if calibration:
        return  # a table is given: whether it needs tuning is known once it is read
    if not Path(model).is_dir():
        raise UserError(f"--precision {recipe}: calibrating runs prompts through the text encoders, which needs the "
                        f"tokenizers of a diffusers pipeline folder; {model} is not one. Pass --calibration FILE "
                        f"(a table tuned for {recipe}) or a pipeline folder as --model")
    if unet_component.weight_bytes > NETEXEC_MAX_UNET_BYTES and cuda.probe()[0] == 0:
        raise UserError(
            f"--precision {recipe}: calibrating this {unet_component.weight_bytes / 2**30:.1f} GiB UNet needs a GPU "
            "(with netexec on the CPU it would take hours); calibrate on a machine with a GPU and TensorRT, then "
            "pass the table (OUT/calibration.npz) with --calibration FILE")


def default_factory(model, unet_component, recipe: str, batch: int, latent_h: int, latent_w: int,
                    log: Log = silent, engines: BuildEngines | None = None):
    """The GPU when one is usable (at the build's batch, so that its text encoders and VAE are the
    build's), else netexec (check_can_calibrate has refused full-size UNets then)."""
    from ..runtime import cuda

    if cuda.probe()[0] > 0:
        return gpu_factory(model, engines.images if engines is not None else batch, latent_h, latent_w, log,
                           engines)
    return netexec_factory(model, batch, latent_h, latent_w)


def text_conditioning(model, make, height: int, width: int):
    """encode([prompt]) -> Conditioning, through our tokenizers and text encoder networks."""
    from ..tokenizer import open_tokenizer

    pipe = Pipeline(make("text_encoder"), make("text_encoder_2"), None, None,
                    open_tokenizer(model, encoder=1), open_tokenizer(model, encoder=2))
    return lambda prompts: pipe.encode_prompt(prompts, None, height, width)


def lora_records(specs) -> list[dict]:
    """How a table's meta records the LoRAs it was calibrated with: file name, scales, A1111's short hash."""
    from .. import lora

    records = []
    for spec in specs or ():
        path, te, unet = lora.spec_tuple(spec)
        records.append({"file": path.name, "scale": te, "unet_scale": unet, "hash": lora.short_hash(path)})
    return records


def describe_loras(records) -> str:
    return ", ".join(f"{r['file']}:{r['scale']:g}" for r in records or []) or "no LoRA"


def with_lora(model, own: dict, spec) -> dict:
    """The UNet and text encoders (the build's own where it has them) with the LoRA `spec` merged."""
    from .. import lora, weights

    lora_set = lora.LoRASet.load([spec])
    return {c: lora.merged(own.get(c) or weights.open_component(model, c), lora_set)
            for c in ("unet", "text_encoder", "text_encoder_2")}


def cached_calibration(path: Path | None, fingerprint: str, prompts: list[str], steps: int, scheduler: str,
                       cfg: float, seed: int, latent: tuple, log: Log,
                       loras: list | None = None) -> CalibrationTable | None:
    """The finished calibration an interrupted build left at `path`, if it was made for exactly this."""
    if path is None or not Path(path).is_file():
        return None
    try:
        table = CalibrationTable.load(path, fingerprint)
    except UserError:
        return None
    meta = table.meta
    wanted = {"steps": steps, "scheduler": scheduler, "cfg": cfg, "seed": seed, "latent_shape": list(latent),
              "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
              "calibration_loras": loras or None}
    if any(meta.get(k) != v for k, v in wanted.items()):
        return None
    log(f"calibration: resuming from the finished calibration in {path} ({meta['prompts']} prompts x {steps} steps)")
    return table


def image_decoder(model, make):
    """decode(latents) -> images [B, 3, H, W] in [-1, 1], through the model's VAE network."""
    from ..pipeline import ModelSettings

    pipe = Pipeline(None, None, None, make("vae"), None, None,
                    scaling_factor=ModelSettings.read(model).scaling_factor)
    return pipe.decode


def calibrate_and_tune(model, unet_component, recipe: str, *, height: int, width: int,
                       calibration: str | None = None, prompts_file: str | None = None, steps: int = 20,
                       scheduler: str = "euler", cfg: float = 5.0, seed: int = 0, factory=None,
                       batch: int = CALIBRATION_BATCH, tune_steps: int = TUNE_STEPS,
                       stats_cache: Path | None = None, engines: BuildEngines | None = None,
                       log: Log = silent, checkpoints: dict | None = None,
                       calibration_loras: list | None = None) -> CalibrationTable:
    """The table for `recipe`: read from `calibration` (tuned now if it lacks `recipe`), or measured
    (`batch` prompts per UNet call). A recipe with fixed parameters (NVIDIA's) takes them as they
    are; the others are tuned on the held-aside prompts with `tune_steps`-step runs: in image space
    where the factory's networks are cheap, per layer where they are expensive (module docstring).
    The caller writes the table (the build, together with the engines, so a failed build keeps the
    old one).

    `stats_cache`: where the finished calibration is kept before tuning starts, and taken from when
    it matches (same checkpoint, prompts, steps, scheduler, size), so a build interrupted after
    calibrating resumes without calibrating again. `engines`: what the build will write; a GPU
    factory keeps what it built for it there (BuildEngines.take).

    `calibration_loras` (LoRA specs, `build --calibrate-lora`): the prompts run again with each of these LoRAs
    merged (UNet and text encoders), and their statistics join the base's as if they were more prompts, so
    the activation scales cover what a refit with them (which keeps the build's scales) will see; the tuning
    stays on the base model."""
    fingerprint = unet_component.fingerprint()
    table = CalibrationTable.load(calibration, fingerprint) if calibration else None
    recorded = lora_records(calibration_loras)
    if table is not None and calibration_loras and table.meta.get("calibration_loras") != recorded:
        raise UserError(f"--calibrate-lora: {calibration} was calibrated with "
                        f"{describe_loras(table.meta.get('calibration_loras'))}, not with {describe_loras(recorded)}; "
                        "drop --calibration to calibrate with these LoRAs")
    if table is not None and recipe in table.meta.get("tuned", {}):
        log(f"calibration: using {calibration} ({table.meta['prompts']} prompts, {table.meta['steps']} steps)")
        return table
    check_can_calibrate(model, unet_component, recipe, None)
    # A reused table is tuned at the size its statistics were measured at, whatever this build's size.
    latent = tuple(table.meta["latent_shape"]) if table is not None else (4, height // 8, width // 8)
    if factory is None:
        factory = default_factory(model, unet_component, recipe, 1, latent[1], latent[2], log, engines)
    if checkpoints:  # the build's opened components (LoRAs merged): calibrate what the build writes
        factory.checkpoints = dict(checkpoints)
    per_layer = getattr(factory, "expensive", False)
    tuned = check_recipe(recipe).get("fixed") is None
    encode = text_conditioning(model, factory, 8 * latent[1], 8 * latent[2])
    reference = None  # the held-aside images' FP16 trajectories, where the calibration network ran them
    if table is None:
        prompts_file = prompts_file or model_prompts(model)
        if prompts_file is not None:
            log(f"calibration: prompts from {prompts_file}")
        prompts = load_prompts(prompts_file)
        held = heldout_count(len(prompts))
        calib, heldout = prompts[:-held], prompts[-held:]
        table = cached_calibration(stats_cache, fingerprint, calib, steps, scheduler, cfg, seed, latent, log,
                                   recorded)
    if table is None:
        batch = max(1, min(batch, len(calib)))
        runs = [None] + list(calibration_loras or [])
        log(f"calibration: {len(calib)} prompts x {steps} steps ({scheduler}, CFG {cfg}), {batch} prompts per "
            f"call, {held} held aside for tuning"
            + (f"; again with each of {len(runs) - 1} LoRAs merged" if len(runs) > 1 else ""))
        meta = calibration_meta(calib, scheduler=scheduler, steps=steps, cfg=cfg, seed=seed, latent_shape=latent,
                                unet_fingerprint=fingerprint)
        meta["heldout"] = heldout
        if recorded:
            meta["calibration_loras"] = recorded
        collector = StatsCollector(len(calib) * len(runs), steps)
        own = dict(getattr(factory, "checkpoints", {}))  # a factory made elsewhere may define from `model` alone
        for r, spec in enumerate(runs):
            run_encode, what = encode, ""
            if spec is not None:  # the UNet and text encoders with this LoRA merged
                factory.checkpoints = with_lora(model, own, spec)
                run_encode, what = text_conditioning(model, factory, 8 * latent[1], 8 * latent[2]), \
                    f" with {recorded[r - 1]['file']}"
            executor = factory("unet", images=batch, calibration_taps=True)
            try:
                calibrate_into(collector, executor, run_encode, calib, offset=r * len(calib), scheduler=scheduler,
                               steps=steps, cfg=cfg, seed=seed, latent_shape=latent, batch=batch, log=log, what=what)
                if r == 0 and per_layer and tuned:
                    # the calibration network's noise_pred is the FP16 UNet's: it runs the FP16 references too
                    reference = fp16_reference(executor, encode, CalibrationTable(meta), heldout,
                                               min(tune_steps, steps), seed, latent, log)
            finally:
                executor.free()
                if spec is not None:
                    factory.checkpoints = own
        table = collector.table(meta)
        if stats_cache is not None:
            table.save(stats_cache)  # the finished calibration survives an interrupted tuning
    fixed = fixed_choices(recipe, QuantPlan(recipe, table, unet_component, rule=AmaxRule(), alphas={}).groups())
    if fixed is not None:
        log(f"{recipe}: NVIDIA's fixed parameters, not tuned (amax {fixed['rule'].describe()})")
        table.set_choices(recipe, fixed["rule"], fixed["alphas"], {"fixed": True})
        return table
    heldout = tuning_prompts(table.meta)
    images = len(heldout) * SEEDS_PER_PROMPT
    tune_steps = min(tune_steps, table.meta["steps"])
    if per_layer:
        tune_per_layer(model, unet_component, recipe, table, factory, encode, heldout, reference,
                       images_per_call=min(batch, images), build_images=engines.images if engines else 1,
                       tune_steps=tune_steps, seed=seed, latent=latent, log=log)
        return table
    log(f"tuning {recipe}: SmoothQuant alpha per layer group, then the amax rule per layer kind, judged on "
        f"{len(heldout)} held-aside prompts x {SEEDS_PER_PROMPT} seeds ({tune_steps} steps) against FP16 images")
    fp16 = factory("unet", images=images)
    decode = image_decoder(model, factory)
    try:
        tune(table, recipe, unet_component,
             lambda options: factory("unet", images=images, precision=recipe, calibration=table,
                                     quant_options=options),
             fp16, encode, decode, heldout, scheduler=table.meta["scheduler"], steps=tune_steps,
             cfg=table.meta["cfg"], seed=seed, latent_shape=latent, log=log)
    finally:
        fp16.free()
    return table


def tuning_prompts(meta: dict) -> list[str]:
    """The held-aside prompts of a table's calibration (its meta; the built-in ones' for an older table)."""
    builtin = load_prompts(None)
    return meta.get("heldout") or builtin[-heldout_count(len(builtin)):]


def fp16_reference(executor, encode, table: CalibrationTable, heldout: list[str], steps: int, seed: int,
                   latent: tuple, log: Log) -> HeldAside:
    """The held-aside prompts x seeds run through an FP16 UNet executor: their latents (decoded later)."""
    held = HeldAside.of(encode, heldout, SEEDS_PER_PROMPT, seed, latent)
    log(f"tuning: FP16 reference of {held.latent_shape[0]} held-aside images ({steps} steps)")
    held.reference_latents = held.run(executor, schedulers.create(table.meta["scheduler"], steps), table.meta["cfg"])
    return held


def unet_shapes(unet_component, latent: tuple) -> tuple[dict[str, int], dict[str, int]]:
    """MACs per UNet call of every conv, linear and attention BMM, by name, and each attention's head
    dimension: read off the FP16 network, defined at CFG batch 2 to count them (nothing is built)."""
    from ..models import unet

    net = unet.define(unet_component, batch=2, latent_height=latent[1], latent_width=latent[2])
    attentions = {m.name[:-len(".bmm1")] for m in net.macs if m.name.endswith(".bmm1")}
    heads = {}
    for i in range(net.network.num_layers):  # an attention's first layer (the backend's attention input, or
        layer = net.network.get_layer(i)     # the first BMM where unfused) reads q [B, N, S, D] first
        att = next((a for a in attentions if layer.name.startswith((a + "_", a + "."))), None)
        if att is not None and att not in heads:
            heads[att] = int(layer.get_input(0).shape[-1])
    return {m.name: m.macs for m in net.macs}, heads


def tune_per_layer(model, unet_component, recipe: str, table: CalibrationTable, factory, encode,
                   heldout: list[str], reference: HeldAside | None, *, images_per_call: int, build_images: int,
                   tune_steps: int, seed: int, latent: tuple, log: Log) -> None:
    """Tuning where every network is an engine build: the candidates scored per layer (tune_layers),
    then the chosen recipe's UNet built once — at the build's batch, for the build — and its held-aside
    images scored against the FP16 references for the report. Without the calibration network's
    references (the calibration came from a file) a plain FP16 UNet runs them: one more build."""
    log(f"tuning {recipe}: SmoothQuant alpha per layer group and the amax rule per layer kind, scored per layer "
        f"on the calibration rows; then the chosen network on {len(heldout)} held-aside prompts x "
        f"{SEEDS_PER_PROMPT} seeds ({tune_steps} steps) against FP16 images")
    report = tune_layers(table, recipe, unet_component, *unet_shapes(unet_component, latent), log)
    sched = lambda: schedulers.create(table.meta["scheduler"], tune_steps)  # noqa: E731 (fresh per run)
    if reference is None:
        fp16 = factory("unet", images=images_per_call)
        try:
            reference = fp16_reference(fp16, encode, table, heldout, tune_steps, seed, latent, log)
        finally:
            fp16.free()
    chosen = factory("unet", images=build_images, for_build=True, precision=recipe, calibration=table)
    try:
        latents = reference.run(chosen, sched(), table.meta["cfg"])
    finally:
        chosen.free()
    decode = image_decoder(model, factory)
    reference.reference_images = decode(reference.reference_latents)
    scores = reference.score(latents, decode(latents))
    report.update({"psnr": scores["psnr"], "psnr_min": scores["psnr_min"], "trajectory_error": scores["latent_error"],
                   "heldout_prompts": len(heldout), "seeds_per_prompt": SEEDS_PER_PROMPT, "steps": tune_steps})
    log(f"tune {recipe}: chose {report['smoothing']} smoothing, amax {report['chosen_rule']} (per layer); its "
        f"held-aside images: PSNR {scores['psnr']:.2f} dB vs FP16 (worst image {scores['psnr_min']:.2f}), "
        f"latent error {scores['latent_error']:.4f}")


# ---------------------------------------------------------------- the plan, before anything runs


@dataclass
class CalibrationPlan:
    """What calibrate_and_tune will make and run, counted as it runs it (`--dry-run`): the UNet
    networks in order, (what, precision); the other networks; the UNet calls (what, calls, CFG batch,
    precision); VAE decodes; and the components whose engine the build takes as calibration built it."""

    tuning: str  # "per layer", "image space", "fixed parameters", "tuned in the table"
    unet_networks: list[tuple[str, str]] = field(default_factory=list)
    other_networks: list[str] = field(default_factory=list)
    unet_calls: list[tuple[str, int, int, str]] = field(default_factory=list)
    vae_decodes: int = 0
    kept: tuple[str, ...] = ()


def plan_calibration(recipe: str, *, expensive: bool, prompts: list[str] | None = None, table_meta: dict | None = None,
                     steps: int = 20, batch: int = CALIBRATION_BATCH, tune_steps: int = TUNE_STEPS,
                     build_images: int = 1, keep: bool = False) -> CalibrationPlan:
    """The plan of calibrate_and_tune for `recipe`: calibrating `prompts` over `steps` (or tuning the table
    of `table_meta`), on a factory that is `expensive` (a GPU) or not; `build_images`: the build's batch;
    `keep`: whether the build takes what a GPU calibration built (its target runs here)."""
    if table_meta is not None and recipe in table_meta.get("tuned", {}):
        return CalibrationPlan("tuned in the table")
    tuned = check_recipe(recipe).get("fixed") is None
    plan = CalibrationPlan("per layer" if expensive else "image space",
                           other_networks=["text_encoder", "text_encoder_2"])
    taps_reference = False
    if table_meta is None:
        held = heldout_count(len(prompts))
        calib = len(prompts) - held
        per_call = max(1, min(batch, calib))
        taps_reference = expensive and tuned
        plan.unet_networks.append(("calibration taps" + (", FP16 reference" if taps_reference else ""), "fp16"))
        plan.unet_calls.append(("calibration", math.ceil(calib / per_call) * steps, 2 * per_call, "fp16"))
        heldout, cal_steps = held, steps
    else:
        heldout, cal_steps = len(tuning_prompts(table_meta)), table_meta["steps"]
    if not tuned:
        plan.tuning = "fixed parameters"
        return plan
    images = heldout * SEEDS_PER_PROMPT
    tune_steps = min(tune_steps, cal_steps)
    if expensive:
        if taps_reference:
            plan.unet_calls.append(("FP16 reference", math.ceil(images / per_call) * tune_steps, 2 * per_call, "fp16"))
        else:
            per_call = min(batch, images)
            plan.unet_networks.append(("FP16 reference", "fp16"))
            plan.unet_calls.append(("FP16 reference", math.ceil(images / per_call) * tune_steps, 2 * per_call, "fp16"))
        plan.unet_networks.append((f"chosen {recipe}" + (", written by the build" if keep else ""), recipe))
        plan.unet_calls.append((f"chosen {recipe}", math.ceil(images / build_images) * tune_steps, 2 * build_images,
                                recipe))
        plan.vae_decodes = 2 * images
        plan.kept = ("text_encoder", "text_encoder_2", "unet", "vae") if keep else ()
    else:
        candidates = image_space_candidates(recipe)  # at most: a candidate met twice runs once
        plan.unet_networks.append(("FP16 reference", "fp16"))
        plan.unet_networks += [(f"candidate {recipe}", recipe)] * candidates
        plan.unet_calls.append(("FP16 reference", tune_steps, 2 * images, "fp16"))
        plan.unet_calls.append((f"up to {candidates} candidates", candidates * tune_steps, 2 * images, recipe))
        plan.vae_decodes = images * (1 + candidates)
    plan.other_networks.append("vae")
    return plan
