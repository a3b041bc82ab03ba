"""Benchmark: open, define and AOT-build full-size SDXL engines; print a table, write bench_build.json.

Components: the UNet (fp16, batch 1, 1024x1024), both text encoders (fp16, batch 1, 77 tokens)
and the VAE decoder (fp32, batch 1, 1024x1024). Without --model it writes (once, cached under
build/bench/sdxl-base-random/) an SDXL base 1.0 pipeline folder with random fp16 weights in the
real layout: key names and shapes from diffusers' own UNet2DConditionModel and AutoencoderKL and
transformers' CLIPTextModel / CLIPTextModelWithProjection, built from our packaged configs on the
`meta` device, so the figures need no download. Each measurement runs in a fresh child process,
so its peak RSS is its own.

--components picks what to measure (default: all four); the JSON keeps the figures of the
components not measured this time from the previous run, so it stays complete. `--resolutions SPEC`
(and `--batch 1-4`, `--prompt-chunks N`) measures engines with dynamic shapes, one optimization
profile (trt_sdxl.shapes), kept in the JSON as `unet@SPEC,batch` beside the static ones.

    python tools/bench_build.py [--model PATH] [--components unet,vae] [--target SM89] [--skip-build]
    python tools/bench_build.py --components unet --resolutions sdxl-buckets --batch 1-4
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import struct
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
PRECISION = {"unet": "fp16", "text_encoder": "fp16", "text_encoder_2": "fp16", "vae": "fp32"}
WEIGHT_FILE = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
               "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}
RANDOM_MODEL = REPO / "build" / "bench" / "sdxl-base-random"


def peak_rss_bytes() -> int:
    """This process's peak RSS. Linux's VmHWM, not getrusage's ru_maxrss: that one carries the
    parent's peak over fork and exec, and the parent may have imported torch to write weights."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- random weights, real layout


def layout(component: str, variant: str = "sdxl_base_1.0") -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(packaged config, {tensor name: shape}) of `component`, the names and shapes from the
    diffusers/transformers model class built on the meta device (no memory, no download)."""
    import torch

    from trt_sdxl import configs

    config = configs.load(variant, component)
    plain = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_config(plain)
        elif component == "vae":
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_config(plain)
        else:
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
            model = cls(CLIPTextConfig.from_dict(plain))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if component == "text_encoder" and not any(k.startswith("text_model.") for k in shapes):
        # transformers >= 5 names CLIPTextModel's tensors without the `text_model.` prefix the
        # published SDXL text_encoder (saved by transformers 4.x) has; write the published names.
        shapes = {"text_model." + k: v for k, v in shapes.items()}
    return config, shapes


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> Path:
    """A safetensors file of random fp16 tensors (norm gains near 1, matrices ~ N(0, 1/fan_in)),
    streamed tensor by tensor so memory stays at one tensor; written to a temporary name, then renamed."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    rng = np.random.default_rng(seed)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for i, (name, shape) in enumerate(shapes.items()):
            if name.endswith(".weight") and len(shape) == 1:  # norm gains near 1
                array = 1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
            else:
                fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
                array = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)
            f.write(array.astype(np.float16).tobytes())
            if i % 200 == 0:
                print(f"  writing random weights: {i}/{len(shapes)} tensors", file=sys.stderr, flush=True)
    tmp.replace(path)
    return path


def write_random_component(root: Path, component: str) -> Path:
    """`root/<component>/` with config.json and random fp16 weights in the real layout."""
    folder = root / component
    config, shapes = layout(component)
    write_random_safetensors(folder / WEIGHT_FILE[component], shapes, seed=COMPONENTS.index(component))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def shape_only_component(component: str = "unet", variant: str = "sdxl_base_1.0"):
    """The full-size `component` as an opened Component whose tensors are zeros of the real names,
    shapes and dtype (fp16), allocated lazily (untouched pages cost no memory): for defining and
    checking full-size networks (which layers, which Q/DQ, the MACs) without a weight file."""
    from trt_sdxl import weights

    config, shapes = layout(component, variant)

    class ShapeOnly(weights.Component):
        def __init__(self):
            super().__init__(component, config, f"<full-size {variant} {component}, shapes only>", [], {})
            self._shapes = dict(shapes)

        def __contains__(self, key):
            return key in self._shapes

        def __len__(self):
            return len(self._shapes)

        def keys(self):
            return list(self._shapes)

        def shape(self, key):
            if key not in self._shapes:
                raise weights.UserError(f"{self.source}: no tensor {key!r}")
            return self._shapes[key]

        def dtype(self, key):
            return "float16"

        @property
        def weight_bytes(self):
            return 2 * sum(int(np.prod(s)) for s in self._shapes.values())

        def get(self, key, dtype=np.float16, shape=None):
            have = self.shape(key)
            if shape is not None and tuple(shape) != have:
                raise weights.UserError(f"{self.source}: tensor {key!r} has shape {have}, expected {tuple(shape)}")
            self.consumed.add(key)
            return np.zeros(have, np.float16 if dtype is None else dtype)

        def check_all_consumed(self):
            left = [k for k in self._shapes if k not in self.consumed]
            if left:
                raise weights.UserError(f"{self.source}: {len(left)} tensors unused, e.g. {left[0]}")

        def fingerprint(self):
            return "0" * 64

    return ShapeOnly()


# ---------------------------------------------------------------- one measurement (child process)


def measure(model: str, component: str, target: str, build: bool, height: int, width: int,
            resolutions: str | None = None, batch: str = "1", chunks: str = "1") -> dict:
    """The stages of one component's build, timed, with peak RSS after each."""
    from trt_sdxl import backend, shapes, weights
    from trt_sdxl.build import define_component
    from trt_sdxl.engines import build_engine

    profiles = shapes.image_profiles([resolutions] if resolutions else None, batch, chunks, 64, 1024,
                                     None if resolutions else height, None if resolutions else width)
    result: dict = {"precision": PRECISION[component], "batch": batch,
                    "profiles": [p.to_json() for p in profiles]}
    t0 = time.perf_counter()
    checkpoint = weights.open_component(model, component)
    result["open_s"] = time.perf_counter() - t0
    result["weight_bytes"] = checkpoint.weight_bytes
    result["rss_after_open"] = peak_rss_bytes()
    t0 = time.perf_counter()
    net = define_component(component, checkpoint, PRECISION[component], 1, height // 8, width // 8,
                           profiles=profiles)
    result["define_s"] = time.perf_counter() - t0
    result["layers"] = net.network.num_layers
    result["rss_after_define"] = peak_rss_bytes()
    if build:
        engine, seconds = build_engine(net.definition, target, profiles=net.profiles if net.dynamic else None)
        result["build_s"] = seconds
        result["engine_bytes"] = engine.nbytes
        result["rss_after_build"] = peak_rss_bytes()
    be = backend.get()
    result["backend"] = f"{be.name} {be.version}"
    return result


# ---------------------------------------------------------------- the table


def previous_results(path: Path) -> dict:
    """Per-component results of the last run; the single-UNet format of earlier versions is read as the unet's."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if "build_s" in data or "define_s" in data:
        return {"unet": {"precision": "fp16", "batch": 1, **data}}
    return data.get("components", {})


def table(results: dict, target: str) -> list[str]:
    gib = 2**30
    lines = [f"{'component':<36} {'weights':>10} {'open':>7} {'define':>8} {'RSS':>9} {'layers':>6} "
             f"{'AOT build':>10} {'RSS':>9} {'engine':>10}  measured"]
    for key in sorted(results, key=lambda k: (COMPONENTS.index(k.split("@")[0]), k)):
        r, component = results[key], key
        build = (f"{r['build_s']:>8.1f} s {r['rss_after_build'] / gib:>5.2f} GiB {r['engine_bytes'] / gib:>6.2f} GiB"
                 if "build_s" in r else f"{'-':>10} {'-':>9} {'-':>10}")
        lines.append(f"{component + ' ' + r['precision']:<36} {r['weight_bytes'] / gib:>6.2f} GiB {r['open_s']:>5.2f} s "
                     f"{r['define_s']:>6.2f} s {r['rss_after_define'] / gib:>5.2f} GiB {r['layers']:>6} "
                     f"{build}  {r.get('date', '')} {r.get('target', target)}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a real SDXL checkpoint (pipeline folder or single file; a component folder "
                                   "for that component alone)")
    p.add_argument("--components", default=",".join(COMPONENTS),
                   help=f"comma-separated, of {','.join(COMPONENTS)} (default: all)")
    p.add_argument("--target", default="SM89")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--skip-build", action="store_true", help="only open and define")
    p.add_argument("--resolutions", default=None, help="a dynamic-shape profile (trt_sdxl.shapes), e.g. sdxl-buckets")
    p.add_argument("--batch", default="1", help="images per prompt, N or LO-HI (with --resolutions)")
    p.add_argument("--prompt-chunks", default="1", help="prompts up to N x 75 tokens (with --resolutions)")
    p.add_argument("--out", default=str(REPO / "tools" / "bench_build.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)  # the component to measure, in a child process
    args = p.parse_args()

    if args.child:
        result = measure(args.model, args.child, args.target, not args.skip_build, args.height, args.width,
                         args.resolutions, args.batch, args.prompt_chunks)
        print(json.dumps(result))
        return 0

    components = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        p.error(f"--components {args.components}: expected names from {', '.join(COMPONENTS)}")
    out = Path(args.out)
    results = previous_results(out)
    for component in components:
        model = args.model
        if model is None:
            if not (RANDOM_MODEL / component / WEIGHT_FILE[component]).exists():
                print(f"writing random-weight SDXL base {component} to {RANDOM_MODEL / component} (once)",
                      file=sys.stderr)
                write_random_component(RANDOM_MODEL, component)
            model = str(RANDOM_MODEL / component)
        print(f"measuring {component} ({PRECISION[component]})", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--child", component, "--model", model, "--target", args.target,
               "--height", str(args.height), "--width", str(args.width), "--batch", args.batch,
               "--prompt-chunks", args.prompt_chunks] + (["--skip-build"] if args.skip_build else []) \
            + (["--resolutions", args.resolutions] if args.resolutions else [])
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update({"date": date.today().isoformat(), "machine": platform.node(), "target": args.target,
                  "model": model})
        if component in ("unet", "vae") and not args.resolutions:
            r.update({"height": args.height, "width": args.width})
        dynamic = args.resolutions or args.batch != "1" or args.prompt_chunks != "1"
        key = f"{component}@{args.resolutions or f'{args.width}x{args.height}'},batch {args.batch}" + (
            f",{args.prompt_chunks} chunks" if args.prompt_chunks != "1" else "") if dynamic else component
        results[key] = r
    backends = sorted({r["backend"] for r in results.values()})
    print(f"SDXL engines, {', '.join(backends)}, {platform.processor() or platform.machine()}; "
          f"UNet and VAE at {args.width}x{args.height}, batch 1 (rows with @: dynamic-shape profiles)")
    print("\n".join(table(results, args.target)))
    out.write_text(json.dumps({"components": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
