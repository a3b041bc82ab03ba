"""GPU benchmark of the UNet engines per precision: ms per denoising step, and an inspector check.

The check reads each engine's layers back with TensorRT's engine inspector and fails the engine
that runs layers it should not: a stray Q/DQ, a Reformat, attention not fused.

For each precision (fp16, int8, fp8 by default) the UNet is defined as `python -m trt_sdxl.build`
defines it (CFG batch 2 x --batch), built for the GPU present with ProfilingVerbosity DETAILED,
loaded through trt_sdxl.runtime and timed: CUDA events around each `execute_async_v3`, --runs
enqueues after --warmup. The engine inspector's JSON then gives every engine layer's type, tactic
and tensor formats, and `classify_layers` (pure, unit-tested on the CPU) sorts them and names what
should not be there:

- a standalone Quantize or Dequantize layer (one TensorRT did not fuse into a convolution, GEMM or
  attention kernel: it costs a pass over the tensor, and an 8-bit engine full of them is slower
  than FP16);
- a Reformat layer inside the engine (a layout or type conversion between two layers; the
  reformats of the engine's own inputs and outputs are counted but allowed: every precision has
  them, since the I/O formats are the engine's contract);
- decomposed attention: a softmax or an attention matrix multiply run as its own layer, or fewer
  fused attention kernels than the network has attention sites.

8-bit networks need a calibration table: --calibration FILE (made by the build), or, without one,
a synthetic table of unit abs-max values. The speed does not depend on the scale values (the same
layers are quantized, the same kernels run), so the synthetic table times the same engine; its
images would be wrong, and this tool makes none.

Prints a table (ms/step mean ± std over the runs, speed-up vs FP16, layers per precision, fused
attention, findings) and writes tools/gpu_bench.json (with every engine layer's name, type and
precision). Exits 1 with one line per finding (build failures included) unless --no-fail, 2 on a
usage error. Needs a GPU, cuda-python and TensorRT (INT8 activations: NVIDIA TensorRT, not
TensorRT-RTX; FP8: SM 8.9 or newer).

    python tools/gpu_bench.py [--model DIR | --full-size] [--precisions fp16,int8,fp8] [--runs 50]
                              [--warmup 10] [--height H --width W] [--batch 1] [--calibration FILE]
                              [--no-fail] [--out tools/gpu_bench.json] [--save-inspector DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import numpy as np  # noqa: E402

from trt_sdxl.errors import UserError, run_cli  # noqa: E402
from trt_sdxl.log import logger  # noqa: E402

JSON_OUT = REPO / "tools" / "gpu_bench.json"
DEFAULT_PRECISIONS = ("fp16", "int8", "fp8")
SYNTHETIC_TABLE = "synthetic unit abs-max table (timing does not depend on the scale values)"
log = logger("gpu_bench")


# ---------------------------------------------------------------- the inspector's layers (pure)
#
# The JSON of `IEngineInspector.get_engine_information(LayerInformationFormat.JSON)` for an engine
# built with ProfilingVerbosity.DETAILED: {"Layers": [{...}, ...], "Bindings": [I/O tensor names]}.
# Each layer has "Name", "LayerType" (the kernel family: "CaskConvolution", "Reformat", "NoOp";
# with TensorRT 10's Myelin also "kgen", "gemm", "fusion", "signal", "wait"), often "ParameterType"
# (the network op: "Convolution", "Reformat", "Scale"), "Inputs"/"Outputs" (each with "Name",
# "Dimensions", "Format/Datatype": "Row major linear FP16 format", "Thirty-two wide channel
# vectorized row major Int8 format", or bare "Half", "Int8", "FP8" for Myelin kernels),
# "TacticName", "Metadata", and for a Reformat "Origin" ("REFORMAT", or "QDQ" for a Quantize or
# Dequantize TensorRT could only run as a reformat). Fused layers are named by their parts joined
# with " + " ("conv1.weight + conv1.input.quantize + conv1"); Myelin names its kernels "__myl_"
# plus the ops' abbreviations ("__myl_TraMaxSubExpSum_myl0_1" is a softmax's max/exp/sum) or
# after the source layer with "." turned into "_" and a "_myl<i>_<j>" suffix; its fused attention
# is "_gemm_mha_v2_myl0_59" (tactic "_gemm_mha_v2_0x..."), older and newer kernels say "fmha".

EIGHT_BIT = ("FP8", "INT8")
# Tensor types named in "Format/Datatype", checked in this order (BFloat16 before Float, UInt8 before Int8).
_DATATYPES = (("BF16", r"bfloat16|bf16"), ("FP8", r"fp8|float8|e4m3"), ("FP4", r"fp4|float4|e2m1"),
              ("FP16", r"fp16|half"), ("FP32", r"fp32|float"), ("UINT8", r"uint8"), ("INT8", r"int8"),
              ("INT32", r"int32"), ("INT64", r"int64"), ("BOOL", r"bool"))
_PART_SEPARATORS = re.compile(r" \+ | \|\| |[\x1e\x1f]")  # fused parts; TensorRT 8.6+/10 also use \x1e, \x1f
_MYELIN_SUFFIX = re.compile(r"(_myl\d+(_\d+)*|_0x[0-9a-f]+|_unroll\d+)+$", re.IGNORECASE)
# ours: `<path>.input.quantize`; ONNX's: QuantizeLinear_8
_QDQ_PART = re.compile(r"(^|_)(de)?quantize(linear)?(_\d+)?$")
_ATTENTION_BMM_PART = re.compile(r"(^|_)attention(_bmm[12])?$")  # ours: `<path>.attention[.bmm1|.bmm2]`
_SOFTMAX_PART = re.compile(r"(^|_)softmax$")
_FUSED_ATTENTION_TOKENS = {"mha", "fmha", "flash"}
# Myelin op abbreviations that only move, cast or scale data: a kernel of nothing else that turns
# float into 8-bit (or back) is a quantize (dequantize) on its own, whatever it is called.
_CONVERSION_OPS = {"cast", "cas", "mov", "move", "res", "resh", "tra", "tran", "sli", "slic",
                   "mul", "div", "rou", "round", "cli", "clip", "max", "min"}


def tensor_type(desc: dict) -> str:
    """'FP16', 'INT8', 'FP8', ... of one inspector tensor description, from its "Format/Datatype"."""
    text = str(desc.get("Format/Datatype", desc.get("Datatype", ""))).lower()
    return next((name for name, pattern in _DATATYPES if re.search(pattern, text)), "unknown")


def layer_precision(inputs: tuple[str, ...], outputs: tuple[str, ...]) -> str:
    """An engine layer's precision: the 8-bit type it reads if it reads one (a fused 8-bit
    convolution also reads its FP16 residual), else the type of its first input (TREx's rule),
    else of its first output; 'none' for a layer without tensors (Myelin's signal/wait)."""
    for low in ("FP4",) + EIGHT_BIT:
        if low in inputs:
            return low
    return inputs[0] if inputs else outputs[0] if outputs else "none"


def _normalized(name: str) -> str:
    """A network-layer name as Myelin writes it: lower case, '.' (and other separators) as '_',
    without Myelin's '_myl0_3' / '_0x...' suffixes, so names of either origin compare equal."""
    return re.sub(r"[^0-9a-z]+", "_", _MYELIN_SUFFIX.sub("", name.strip()).lower()).strip("_")


def source_parts(layer: dict) -> list[str]:
    """The network layers an engine layer was made from, normalized: the " + "-joined parts of its
    name and the entries of its Metadata ("[ONNX Layer: X]" brackets or separator-joined names)."""
    parts = _PART_SEPARATORS.split(str(layer.get("Name", "")))
    metadata = str(layer.get("Metadata", ""))
    parts += re.findall(r"\[(?:[^\]:]*: )?([^\]]+)\]", metadata) or _PART_SEPARATORS.split(metadata)
    return [p for p in (_normalized(part) for part in parts) if p]


def _tokens(text: str) -> list[str]:
    """Words of a kernel or layer name, split at separators and camel case, lower case."""
    return [t.lower() for t in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", text)]


def myelin_ops(layer: dict) -> list[str]:
    """The op abbreviations of a Myelin generated kernel ('__myl_TraMaxSubExpSum_myl0_1' ->
    tra, max, sub, exp, sum), from its name or tactic; [] for any other layer."""
    name, tactic = str(layer.get("Name", "")), str(layer.get("TacticName", ""))
    if str(layer.get("LayerType", "")).lower() != "kgen" and not name.startswith("__myl_"):
        return []
    for text in (name, tactic):
        if text.startswith("__myl_"):
            return [t for t in _tokens(_MYELIN_SUFFIX.sub("", text[len("__myl_"):])) if not t.isdigit()]
    return []


def _is_qdq_op(token: str) -> bool:
    return token.startswith(("qua", "deq", "dqu"))


@dataclass(frozen=True)
class EngineLayer:
    """One engine layer as the inspector reports it, with what it is for this check."""

    name: str
    layer_type: str  # LayerType, "/ParameterType" where TensorRT gives a different one
    kind: str  # conv, gemm, attention, attention_bmm, softmax, qdq, reformat, constant, noop, other
    precision: str
    inputs: tuple[str, ...]  # tensor types
    outputs: tuple[str, ...]
    formats: str  # "first input format -> first output format", for messages
    boundary: bool = False  # a Reformat reading or writing an engine input/output


def describe_layer(layer: dict, io_tensors: set[str]) -> EngineLayer:
    """Classify one inspector layer (see the comment above for the fields read)."""
    raw_type, param_type = str(layer.get("LayerType", "")), str(layer.get("ParameterType", ""))
    layer_type = raw_type if param_type in ("", raw_type) else f"{raw_type}/{param_type}"
    types = f"{raw_type} {param_type}".lower()
    ins, outs = layer.get("Inputs") or [], layer.get("Outputs") or []
    in_types, out_types = tuple(tensor_type(t) for t in ins), tuple(tensor_type(t) for t in outs)
    name = str(layer.get("Name", ""))
    formats = " -> ".join(str((t[0] if t else {}).get("Format/Datatype", "?")) for t in (ins, outs))
    parts, ops = source_parts(layer), myelin_ops(layer)
    name_tokens = set(_tokens(f"{name} {layer.get('TacticName', '')} {raw_type}"))
    eight_bit_sides = (any(t in EIGHT_BIT for t in in_types), any(t in EIGHT_BIT for t in out_types))
    qdq_named = bool(parts) and all(_QDQ_PART.search(p) for p in parts)  # made of our (or ONNX's) Q/DQ only
    qdq_ops = bool(ops) and all(_is_qdq_op(t) or t in _CONVERSION_OPS for t in ops) and (
        eight_bit_sides[0] != eight_bit_sides[1] or any(_is_qdq_op(t) for t in ops))
    boundary = False

    if "noop" in types or (not ins and not outs):
        kind = "noop"  # a no-op or Myelin's signal/wait between streams
    elif raw_type.lower() == "constant":
        kind = "constant"
    elif name_tokens & _FUSED_ATTENTION_TOKENS or "attention" in types:
        kind = "attention"  # our own layer names say "attention"; only TensorRT's words count here
    elif ("quantize" in types or (("reformat" in types) and str(layer.get("Origin", "")).upper() == "QDQ")
          or ("scale" in types and eight_bit_sides[0] != eight_bit_sides[1])):
        kind = "qdq"  # TREx's QDQ lint reads an 8-bit<->float Scale layer as an unfused Q or DQ
    elif "reformat" in types or name.startswith("Reformatting CopyNode"):
        copy_node = name.startswith("Reformatting CopyNode")  # named after the layer it feeds
        kind = "qdq" if qdq_named and not copy_node else "reformat"  # our Q/DQ, run as a reformat
        tensors = {str(t.get("Name", "")) for t in (*ins, *outs)}
        boundary = bool(tensors & io_tensors) or "Network Input" in name or "Network Output" in name
    elif "softmax" in types or any(_SOFTMAX_PART.search(p) for p in parts) or {"max", "exp"} <= set(ops):
        kind = "softmax"  # Myelin's own softmax kernel: max, subtract, exp, sum (divide)
    elif "conv" in types:
        kind = "conv"
    elif any(w in types for w in ("gemm", "matrixmultiply", "fullyconnected")) or raw_type.lower() == "fusion":
        kind = "attention_bmm" if any(_ATTENTION_BMM_PART.search(p) for p in parts) else "gemm"
    elif qdq_named or qdq_ops:
        kind = "qdq"  # a layer made of nothing but Q/DQ (and data movement)
    else:
        kind = "other"
    return EngineLayer(name, layer_type, kind, layer_precision(in_types, out_types), in_types, out_types,
                       formats, boundary)


def _finding(layer: EngineLayer) -> str | None:
    if layer.kind == "qdq":
        role = {(False, True): "Quantize", (True, False): "Dequantize"}.get(
            (any(t in EIGHT_BIT for t in layer.inputs), any(t in EIGHT_BIT for t in layer.outputs)), "Q/DQ")
        return f"standalone {role} layer {layer.name!r} ({layer.layer_type}, {layer.formats})"
    if layer.kind == "reformat" and not layer.boundary:
        return f"Reformat layer {layer.name!r} ({layer.formats})"
    if layer.kind == "softmax":
        return (f"decomposed attention: softmax {layer.name!r} ({layer.layer_type}) runs as its own layer, "
                "not inside a fused attention kernel")
    if layer.kind == "attention_bmm":
        return f"decomposed attention: {layer.name!r} is an attention matrix multiply run as its own " \
               f"{layer.layer_type} layer"
    return None


@dataclass
class EngineReport:
    """What `classify_layers` found in one engine."""

    layers: list[EngineLayer]
    findings: list[str] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for layer in self.layers if layer.kind == kind)

    @property
    def precision_counts(self) -> dict[str, int]:
        """Engine layers per precision (no-ops and constants left out)."""
        counted = Counter(layer.precision for layer in self.counted)
        return dict(sorted(counted.items(), key=lambda item: -item[1]))

    @property
    def counted(self) -> list[EngineLayer]:
        """The layers that run kernels: no-ops (and signal/wait) and constants left out."""
        return [layer for layer in self.layers if layer.kind not in ("noop", "constant")]

    def to_json(self) -> dict:
        return {"layers": len(self.counted),
                "precision_counts": self.precision_counts,
                "kind_counts": dict(Counter(layer.kind for layer in self.layers)),
                "fused_attention": self.count("attention"),
                "boundary_reformats": sum(1 for layer in self.layers if layer.kind == "reformat" and layer.boundary),
                "findings": self.findings,
                "layer_precisions": [[layer.name, layer.layer_type, layer.precision] for layer in self.counted]}


def classify_layers(info, io_tensors=(), attention_sites: int | None = None) -> EngineReport:
    """Sort an engine's layers (inspector JSON, as text or parsed) and list the findings: each
    standalone Q/DQ layer, each Reformat not at the engine's inputs/outputs (`io_tensors` and the
    JSON's "Bindings"), each softmax or attention matrix multiply outside a fused attention kernel,
    and, given the network's `attention_sites`, fewer fused attention layers than sites."""
    doc = json.loads(info) if isinstance(info, (str, bytes)) else info
    raw = doc.get("Layers") if isinstance(doc, dict) else None
    if not isinstance(raw, list):
        raise ValueError("engine information has no \"Layers\" list")
    if any(not isinstance(layer, dict) for layer in raw):
        raise ValueError("engine information lists layer names only: build the engine with "
                         "ProfilingVerbosity.DETAILED")
    io = set(io_tensors) | set(doc.get("Bindings") or [])
    report = EngineReport([describe_layer(layer, io) for layer in raw])
    report.findings = [f for f in (_finding(layer) for layer in report.layers) if f]
    fused = report.count("attention")
    if attention_sites and fused < attention_sites:
        report.findings.append(f"decomposed attention: {fused} fused attention layer(s) (TensorRT names with "
                               f"mha/fmha/flash) for the network's {attention_sites} attention sites")
    return report


def timing_summary(times_ms: list[float]) -> dict:
    """Mean, standard deviation (of the runs), median and minimum of per-step times in ms."""
    return {"ms_mean": statistics.fmean(times_ms), "ms_std": statistics.stdev(times_ms) if len(times_ms) > 1 else 0.0,
            "ms_median": statistics.median(times_ms), "ms_min": min(times_ms), "runs": len(times_ms)}


def add_speedups(results: dict[str, dict]) -> None:
    """`speedup_vs_fp16` = FP16 ms / this precision's ms, where both were timed."""
    base = results.get("fp16", {}).get("ms_mean")
    for r in results.values():
        r["speedup_vs_fp16"] = base / r["ms_mean"] if base and r.get("ms_mean") else None


# ---------------------------------------------------------------- on the GPU


def synthetic_table(component, batch: int, latent_h: int, latent_w: int):
    """A calibration table with abs-max 1 for every tapped input: which layers are 8-bit, and so the
    engine, do not depend on it."""
    from trt_sdxl.models import unet

    return unet.placement_table(component, batch, latent_h, latent_w)


def build_detailed(definition, eight_bit: bool):
    """The network built for the GPU present as the build builds it (optimization level 4 for an
    8-bit UNet), with profiling verbosity DETAILED for the inspector. Returns (plan, seconds)."""
    from trt_sdxl.engines import EIGHT_BIT_OPTIMIZATION_LEVEL, build_engine

    level = EIGHT_BIT_OPTIMIZATION_LEVEL if eight_bit else None
    return build_engine(definition, "native", log, optimization_level=level, detailed=True)


def time_enqueues(engine, stream, warmup: int, runs: int) -> list[float]:
    """ms of each of `runs` enqueues (CUDA events on the stream around each), after `warmup`."""
    from trt_sdxl.runtime import cuda

    for _ in range(warmup):
        engine.enqueue(stream)
    stream.synchronize()
    start, end = cuda.Event(), cuda.Event()
    times = []
    for _ in range(runs):
        start.record(stream)
        engine.enqueue(stream)
        end.record(stream)
        end.synchronize()
        times.append(cuda.Event.elapsed_ms(start, end))
    start.destroy()
    end.destroy()
    return times


def unet_feeds(specs: dict, height: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    from trt_sdxl.denoising import time_ids

    rng = np.random.default_rng(seed)
    feeds = {k: rng.standard_normal(shape).astype(dtype) for k, (shape, dtype) in specs.items()}
    feeds["timestep"] = np.full(specs["timestep"][0], 500.0, np.float32)
    feeds["time_ids"] = time_ids(height, width, specs["time_ids"][0][0])
    return feeds


def bench_precision(component, precision: str, calibration, args, device, stream, sizes) -> dict:
    """Define, build, time and inspect one precision's UNet engine."""
    from trt_sdxl import backend
    from trt_sdxl.models import unet
    from trt_sdxl.quant.percentile import AmaxRule
    from trt_sdxl.runtime.engine import Engine, EngineExecutor

    height, width, batch = sizes
    options = None
    if precision != "fp16" and not isinstance(calibration, (str, Path)):
        options = {"rule": AmaxRule(), "alphas": {}}  # the synthetic table has no tuned choices
    log(f"{precision}: defining the UNet (batch {batch}, {width}x{height})")
    from trt_sdxl.engines import fused_attention_check

    net = unet.define(component, precision, batch=batch, latent_height=height // 8, latent_width=width // 8,
                      calibration=None if precision == "fp16" else calibration, quant_options=options,
                      attention_check=fused_attention_check("native"))
    if net.definition.attention_fallbacks:
        log(f"{precision}: {len(net.definition.attention_fallbacks)} attention layers have no fused 8-bit kernel "
            "at their shapes here and keep FP16 BMMs")
    sites = sum(1 for m in net.macs if m.kind == "bmm") // 2
    log(f"{precision}: building for {device.name} (SM{device.sm}), profiling verbosity DETAILED")
    plan, seconds = build_detailed(net.definition, precision != "fp16")
    specs = net.inputs
    del net
    engine = Engine(plan, f"unet {precision}")
    executor = EngineExecutor(engine, stream)
    try:
        executor.run(unet_feeds(specs, height, width))  # inputs uploaded, addresses set: enqueues reuse them
        times = time_enqueues(engine, stream, args.warmup, args.runs)
        inspector = engine.engine.create_engine_inspector()
        inspector.execution_context = engine.context
        info = inspector.get_engine_information(backend.trt().LayerInformationFormat.JSON)
    finally:
        executor.free()
    if args.save_inspector:
        folder = Path(args.save_inspector)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"unet.{precision}.layers.json").write_text(info)
    report = classify_layers(info, io_tensors=[*engine.inputs, *engine.outputs], attention_sites=sites)
    result = {**timing_summary(times), "build_s": round(seconds, 1), "engine_bytes": int(plan.nbytes),
              "attention_sites": sites, **report.to_json()}
    log(f"{precision}: {result['ms_mean']:.2f} ms/step, {len(report.findings)} finding(s)")
    return result


def open_model(args):
    from trt_sdxl import weights
    from trt_sdxl.components import DEFAULT_MODEL

    if not args.full_size:
        return weights.open_component(args.model or DEFAULT_MODEL, "unet"), str(args.model or DEFAULT_MODEL)
    import bench_build

    folder = bench_build.RANDOM_MODEL / "unet"
    if not (folder / bench_build.WEIGHT_FILE["unet"]).exists():
        log(f"writing a random-weight SDXL base UNet to {folder} (once; needs torch and diffusers)")
        bench_build.write_random_component(bench_build.RANDOM_MODEL, "unet")
    return weights.open_component(folder, "unet"), f"{folder} (random weights, full size)"


def parse_precisions(text: str) -> list[str]:
    from trt_sdxl.quant.recipe import RECIPES

    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p != "fp16" and p not in RECIPES]
    if unknown or not names:
        raise UserError(f"--precisions {text}: expected a comma-separated list of fp16, {', '.join(RECIPES)}")
    return names


def table(results: dict[str, dict], skipped: dict[str, str]) -> list[str]:
    lines = [f"{'precision':<20} {'ms/step (mean ± std)':>22} {'speed-up':>9} {'layers':>7}  "
             f"{'layers per precision':<34} {'fused attn':>10} {'findings':>8}"]
    for precision, r in results.items():
        if "error" in r:
            lines.append(f"{precision:<20} build or run failed: {r['error']}")
            continue
        speedup = f"{r['speedup_vs_fp16']:.2f}x" if r.get("speedup_vs_fp16") else "-"
        counts = ", ".join(f"{k} {v}" for k, v in r["precision_counts"].items())
        lines.append(f"{precision:<20} {r['ms_mean']:>12.3f} ± {r['ms_std']:<7.3f} {speedup:>9} {r['layers']:>7}  "
                     f"{counts:<34} {r['fused_attention']:>4}/{r['attention_sites']:<5} {len(r['findings']):>8}")
    lines += [f"{precision:<20} skipped: {why}" for precision, why in skipped.items()]
    return lines


def work(args) -> int:
    from trt_sdxl import backend, support
    from trt_sdxl.runtime import cuda
    from trt_sdxl.unet_config import UNetConfig, check_image_size

    precisions = parse_precisions(args.precisions)
    if args.runs < 2 or args.warmup < 0 or args.batch < 1:
        raise UserError("--runs must be at least 2, --warmup at least 0, --batch at least 1")
    component, model = open_model(args)
    cfg = UNetConfig.parse(component.config)
    height, width = check_image_size(args.height, args.width, cfg.image_multiple, cfg.default_image_side)
    be = backend.get()
    device = cuda.Device.open()
    if be.is_rtx and f"SM{device.sm}" not in be.aot_targets:
        raise UserError(f"{be.name} {be.version} does not build for this GPU (SM{device.sm})")
    unet_batch = 2 * args.batch  # classifier-free guidance: uncond + cond in one call, as the build makes it
    calibration = args.calibration
    skipped: dict[str, str] = {}
    built: list[str] = []  # the recipes the recipe matrix builds for this backend and GPU
    for precision in precisions:
        try:
            recipe = support.resolve(precision, be.name, be.version, f"SM{device.sm}", device.name).recipe
        except UserError as e:
            skipped[precision] = str(e)
            continue
        if recipe != precision:
            log(f"{precision}: {be.name} builds {recipe} on this GPU (trt_sdxl.support)")
        built.append(recipe)
    precisions = list(dict.fromkeys(built)) + list(skipped)
    if calibration is None and any(p != "fp16" and p not in skipped for p in precisions):
        log("8-bit: " + SYNTHETIC_TABLE)
        calibration = synthetic_table(component, unet_batch, height // 8, width // 8)
    stream = cuda.Stream()
    results: dict[str, dict] = {}
    for precision in [p for p in precisions if p not in skipped]:
        try:
            results[precision] = bench_precision(component, precision, calibration, args, device, stream,
                                                 (height, width, unet_batch))
        except (RuntimeError, cuda.CudaError, UserError) as e:
            results[precision] = {"error": str(e)}
            log(f"{precision}: {e}")
    stream.destroy()
    add_speedups(results)

    findings = [f"{p}: {f}" for p, r in results.items() for f in r.get("findings", [])]
    findings += [f"{p}: build or run failed: {r['error']}" for p, r in results.items() if "error" in r]
    report = {"date": date.today().isoformat(), "machine": platform.node(),
              "gpu": f"{device.name} (SM{device.sm})", "backend": f"{be.name} {be.version}", "model": model,
              "image": [height, width], "unet_batch": unet_batch, "warmup": args.warmup,
              "calibration": str(args.calibration) if args.calibration else SYNTHETIC_TABLE,
              "precisions": results, "skipped": skipped, "findings": findings}
    device.close()
    print(f"UNet engines on {report['gpu']}, {report['backend']}; {width}x{height}, UNet batch {unet_batch} "
          f"(one denoising step with CFG); {args.runs} runs after {args.warmup} warm-up; model {model}")
    if any(p != "fp16" for p in results):
        print(f"8-bit calibration: {report['calibration']}")
    print("\n".join(table(results, skipped)))
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    for line in findings:
        print(f"gpu_bench: {'note' if args.no_fail else 'fail'}: {line}", file=sys.stderr)
    return 1 if findings and not args.no_fail else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="a UNet checkpoint: pipeline folder, unet/ folder or single file "
                                       "(default: the embedded tiny default, weights/tiny-sdxl)")
    which.add_argument("--full-size", action="store_true",
                       help="the full-size SDXL base UNet with random weights (tools/bench_build.py writes it once)")
    p.add_argument("--precisions", default=",".join(DEFAULT_PRECISIONS), help="comma-separated (default: %(default)s)")
    p.add_argument("--runs", type=int, default=50, help="timed enqueues per precision (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="enqueues before timing (default: %(default)s)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the UNet's sample size x 8)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the UNet's sample size x 8)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt; the UNet runs twice as many (CFG)")
    p.add_argument("--calibration", help="a calibration table (.npz) for the 8-bit engines (default: synthetic)")
    p.add_argument("--no-fail", action="store_true", help="report findings, exit 0")
    p.add_argument("--out", default=str(JSON_OUT), help="the JSON report (default: tools/gpu_bench.json)")
    p.add_argument("--save-inspector", metavar="DIR", help="also write each engine's inspector JSON here")
    args = p.parse_args()
    outcome = {}
    rc = run_cli("gpu_bench", lambda: outcome.update(code=work(args)), "nothing was written")
    return rc or outcome.get("code", 0)


if __name__ == "__main__":
    sys.exit(main())
