"""Benchmark: the host side of a LoRA refit on full-size SDXL, against the definition a rebuild starts with.
Prints a table, writes bench_refit.json.

Model: bench_build.py's random-weight SDXL base 1.0 in the real layout (written once under build/bench/), or
--model. LoRA: a kohya file of rank --rank (default 32) on every attention projection (to_q, to_k, to_v, to_out.0)
and feed-forward layer (ff.net.0.proj, ff.net.2) of the UNet's 70 transformer blocks and on q/k/v/out_proj of
both text encoders: the modules common SDXL LoRAs train.

Each step runs as its user would run it, in a child process of its own (its peak RSS is its own):

1. `python -m trt_sdxl.build --refittable --no-engines --components text_encoder,text_encoder_2,unet`: the
   networks defined, their refit maps written — the part of a rebuild before the engine builds, which
   bench_build.py times (the UNet's AOT build: BENCHMARKS.md).
2. `python -m trt_sdxl.refit --engines DIR --lora FILE:0.8` on that folder of networks: every weight the LoRA
   touches recomputed from the checkpoint, bit for bit what a build with the LoRA binds. On a GPU the same
   command then hands these arrays to TensorRT's refitter, whose time this machine cannot measure.
3. The same, `--clear`: the touched weights back to the base.

    python tools/bench_refit.py [--model PATH] [--rank 32]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
_spec = importlib.util.spec_from_file_location("bench_build", REPO / "tools" / "bench_build.py")
bench_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_build)

COMPONENTS = ("text_encoder", "text_encoder_2", "unet")
UNET_MODULES = re.compile(r"transformer_blocks\.\d+\.(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))\.weight$")
TEXT_MODULES = re.compile(r"self_attn\.(q|k|v|out)_proj\.weight$")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
WORK = REPO / "build" / "bench" / "refit"


def write_lora(model: Path, path: Path, rank: int, seed: int = 0) -> dict:
    """The benchmark's LoRA (module docstring) for `model`'s shapes; returns its module counts."""
    from safetensors.numpy import save_file

    from trt_sdxl import weights

    rng = np.random.default_rng(seed)
    tensors, counts = {}, {}
    for component in COMPONENTS:
        opened = weights.open_component(model, component)
        pattern = UNET_MODULES if component == "unet" else TEXT_MODULES
        keys = [k for k in opened.keys() if pattern.search(k)]
        counts[component] = len(keys)
        for key in keys:
            out_f, in_f = opened.shape(key)
            name = KOHYA_PREFIX[component] + key[:-len(".weight")].replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = (rng.standard_normal((rank, in_f)) / np.sqrt(in_f)).astype(np.float16)
            tensors[f"{name}.lora_up.weight"] = (0.01 * rng.standard_normal((out_f, rank))).astype(np.float16)
            tensors[f"{name}.alpha"] = np.array(rank, np.float16)
    save_file(tensors, str(path))
    return counts


def child(step: str, argv: list[str]) -> dict:
    """Run one step in this (child) process: its wall time and this process's peak RSS."""
    started = time.perf_counter()
    if step == "define":
        from trt_sdxl.build import main
    else:
        from trt_sdxl.refit import main
    code = main(argv)
    return {"exit": code, "seconds": time.perf_counter() - started, "peak_rss": bench_build.peak_rss_bytes()}


def run_step(step: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", step, "--", *argv], stdout=subprocess.PIPE, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if proc.returncode or result["exit"]:
        raise SystemExit(f"{step} failed: {' '.join(argv)}")
    return result


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[4:])))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="an SDXL pipeline folder (default: the random-weight SDXL base of bench_build.py)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--out", default=str(REPO / "tools" / "bench_refit.json"))
    args = p.parse_args()

    model = Path(args.model) if args.model else bench_build.RANDOM_MODEL
    if not args.model:
        for component in COMPONENTS:
            if not (model / component / bench_build.WEIGHT_FILE[component]).exists():
                print(f"writing random-weight SDXL base {component} to {model / component} (once)", file=sys.stderr)
                bench_build.write_random_component(model, component)
    WORK.mkdir(parents=True, exist_ok=True)
    lora_file = WORK / f"lora-rank{args.rank}.safetensors"
    counts = write_lora(model, lora_file, args.rank)
    folder = WORK / "engines"
    print(f"LoRA: rank {args.rank}, {sum(counts.values())} modules ({counts}), "
          f"{lora_file.stat().st_size / 2**20:.0f} MiB", file=sys.stderr)
    steps = {
        "define (build --refittable --no-engines)": run_step("define", [
            "--model", str(model), "--out", str(folder), "--refittable", "--no-engines",
            "--components", ",".join(COMPONENTS)]),
        "refit --lora (host side)": run_step("refit", ["--engines", str(folder), "--lora", f"{lora_file}:0.8"]),
        "refit --clear (host side)": run_step("refit", ["--engines", str(folder), "--clear"]),
    }
    manifest = json.loads((folder / "manifest.json").read_text())
    result = {"date": date.today().isoformat(), "machine": platform.node(),
              "processor": platform.processor() or platform.machine(), "model": str(model), "rank": args.rank,
              "lora_bytes": lora_file.stat().st_size, "lora_modules": counts,
              "refit_weights": {c: manifest["engines"][c].get("refit_weights") for c in COMPONENTS},
              "steps": steps}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    gib = 2**30
    print(f"SDXL base (random weights, real layout), LoRA rank {args.rank} on {sum(counts.values())} modules "
          f"({lora_file.stat().st_size / 2**20:.0f} MiB); {result['processor']}, {result['date']}")
    print(f"{'step':<44} {'wall':>8} {'peak RSS':>10}")
    for name, r in steps.items():
        print(f"{name:<44} {r['seconds']:>6.1f} s {r['peak_rss'] / gib:>6.2f} GiB")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
