"""Benchmark: open, define and AOT-build a full-size SDXL UNet; print a table, write bench_build.json.

Without --model it writes (once, cached under build/bench/) an SDXL base 1.0 UNet with random
fp16 weights in the real diffusers layout — key names and shapes from diffusers' own
UNet2DConditionModel built from our packaged config on the `meta` device — so the figures
need no download. Each measurement runs in a fresh child process so its peak RSS is its own.

    python tools/bench_build.py [--model PATH] [--target SM89] [--skip-build]
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


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_random_unet(folder: Path, variant: str = "sdxl_base_1.0", seed: int = 0) -> Path:
    """A diffusers `unet/` folder with random fp16 weights; streamed tensor by tensor (low memory)."""
    import torch
    from diffusers import UNet2DConditionModel

    from trt_sdxl import configs

    config = configs.load(variant, "unet")
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "diffusion_pytorch_model.safetensors.tmp"
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
    tmp.replace(folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def measure(model: str, target: str, build: bool, height: int, width: int) -> dict:
    """Runs in the child process: the stages of one UNet build, timed, with peak RSS after each."""
    from trt_sdxl import backend, weights
    from trt_sdxl.build import build_engine
    from trt_sdxl.models import unet

    result: dict = {}
    t0 = time.perf_counter()
    component = weights.open_component(model, "unet")
    result["open_s"] = time.perf_counter() - t0
    result["weight_bytes"] = component.weight_bytes
    result["rss_after_open"] = peak_rss_bytes()
    t0 = time.perf_counter()
    net = unet.define(component, precision="fp16", batch=1, latent_height=height // 8, latent_width=width // 8)
    result["define_s"] = time.perf_counter() - t0
    result["layers"] = net.network.num_layers
    result["rss_after_define"] = peak_rss_bytes()
    if build:
        engine, seconds = build_engine(net.definition, target)
        result["build_s"] = seconds
        result["engine_bytes"] = engine.nbytes
        result["rss_after_build"] = peak_rss_bytes()
    be = backend.get()
    result["backend"] = f"{be.name} {be.version}"
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a real SDXL checkpoint (pipeline folder, unet/ folder or single file)")
    p.add_argument("--target", default="SM89")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--skip-build", action="store_true", help="only open and define")
    p.add_argument("--out", default=str(REPO / "tools" / "bench_build.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        print(json.dumps(measure(args.model, args.target, not args.skip_build, args.height, args.width)))
        return 0

    model = args.model
    if model is None:
        folder = REPO / "build" / "bench" / "sdxl-base-random" / "unet"
        if not (folder / "diffusion_pytorch_model.safetensors").exists():
            print(f"writing a random-weight SDXL base UNet to {folder} (once)", file=sys.stderr)
            write_random_unet(folder)
        model = str(folder)
    cmd = [sys.executable, __file__, "--child", "--model", model, "--target", args.target,
           "--height", str(args.height), "--width", str(args.width)] + (["--skip-build"] if args.skip_build else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        return proc.returncode
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    gib = 2**30
    rows = [
        ("weights", f"{r['weight_bytes'] / gib:.2f} GiB", ""),
        ("open", f"{r['open_s']:.2f} s", f"peak RSS {r['rss_after_open'] / gib:.2f} GiB"),
        ("define", f"{r['define_s']:.2f} s", f"peak RSS {r['rss_after_define'] / gib:.2f} GiB "
                                             f"({r['rss_after_define'] / r['weight_bytes']:.2f}x weights), "
                                             f"{r['layers']} layers"),
    ]
    if "build_s" in r:
        rows.append(("AOT build", f"{r['build_s']:.1f} s",
                     f"{args.target}, peak RSS {r['rss_after_build'] / gib:.2f} GiB, "
                     f"engine {r['engine_bytes'] / gib:.2f} GiB"))
    print(f"SDXL UNet fp16 {args.width}x{args.height}, {r['backend']}, {platform.processor() or platform.machine()}")
    print(f"{'stage':<10} {'time':>10}  notes")
    for stage, t, notes in rows:
        print(f"{stage:<10} {t:>10}  {notes}")
    r.update({"date": date.today().isoformat(), "machine": platform.node(), "target": args.target,
              "model": model, "height": args.height, "width": args.width})
    Path(args.out).write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
