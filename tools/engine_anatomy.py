"""What an engine file is made of: kernel source text, fused-kernel names, fake-quant kernels.

TensorRT for RTX compiles its kernels on the user's GPU (just in time), so its engines carry
CUDA C source for each generated kernel; a kernel whose name holds a Round between Min/Max
clamps and casts back (`__myl_...MulMinMaxRounCastCastMul...`) quantizes and dequantizes in
floating point — 8-bit arithmetic simulated, not run. Reads plan files without deserializing
them (no GPU needed), prints a table and writes tools/engine_anatomy.json.

    python tools/engine_anatomy.py ENGINE.plan [ENGINE.plan ...]
    python tools/engine_anatomy.py --default-model   # builds the default's UNet as fp16, int8, fp8_gemm first

`--default-model` builds the embedded default's UNet (64 px, CFG batch 2) for SM89 with the
builder directly — INT8 too, which the build refuses on TensorRT for RTX — max-calibrated from
the statistics of `--calibration FILE` (an 8-bit build's calibration.npz; without it, unit
scales). The scale values matter: they are compiled into the generated kernels, so layers with
distinct scales get kernels of their own, and a unit table gives a smaller engine.

    python -m trt_sdxl.build --precision fp8 --out engines-fp8
    python tools/engine_anatomy.py --default-model --calibration engines-fp8/calibration.npz
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import zlib
from collections import Counter
from pathlib import Path

JSON_OUT = Path(__file__).resolve().parent / "engine_anatomy.json"
SOURCE_MARKS = (b"#undef __HAS_FP8", b"#ifdef __HAS_FP8")  # how generated kernels' CUDA source begins
KERNEL = re.compile(rb"__myl_([A-Za-z]+)_0x[0-9a-f]+")
FAKE_QUANT = re.compile(rb"MinMaxRoun")


def anatomy(path: Path) -> dict:
    data = Path(path).read_bytes()
    text_runs = [m.group() for m in re.finditer(rb"[\x20-\x7e\n\t]{32,}", data)]
    sources = [r for r in text_runs if r.startswith(SOURCE_MARKS)]
    kernels = Counter(m.group(1).decode() for m in KERNEL.finditer(data))
    fake = sorted(k for k in kernels if FAKE_QUANT.search(k.encode()))
    return {
        "file": str(path),
        "mib": round(len(data) / 2**20, 2),
        "mib_compressed": round(len(zlib.compress(data, 6)) / 2**20, 2),
        "kernel_sources": len(sources),
        "kernel_source_mib": round(sum(map(len, sources)) / 2**20, 2),
        "text_mib": round(sum(map(len, text_runs)) / 2**20, 2),
        "fused_kernel_kinds": len(kernels),
        "fake_quant_kernels": fake,
    }


def build_default_unets(folder: Path, calibration: str | None = None,
                        recipes=("fp16", "int8", "fp8_gemm")) -> list[str]:
    """The default model's UNet engines, one per recipe, written to `folder`; their paths."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from trt_sdxl import weights
    from trt_sdxl.components import DEFAULT_MODEL
    from trt_sdxl.engines import build_engine
    from trt_sdxl.models import unet
    from trt_sdxl.quant.percentile import AmaxRule
    from trt_sdxl.quant.table import CalibrationTable

    component = weights.open_component(DEFAULT_MODEL, "unet")
    shape = dict(batch=2, latent_height=8, latent_width=8)
    table = CalibrationTable.load(calibration, component.fingerprint()) if calibration else \
        unet.placement_table(component)
    out = []
    for recipe in recipes:
        quant = {} if recipe == "fp16" else {"calibration": table, "quant_options": {"rule": AmaxRule(), "alphas": {}}}
        net = unet.define(component, recipe, **shape, **quant)
        engine, _ = build_engine(net.definition, "SM89")
        path = folder / f"unet.{recipe}.plan"
        path.write_bytes(bytes(engine))
        out.append(str(path))
        print(f"built {path} ({path.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("plans", nargs="*")
    p.add_argument("--default-model", action="store_true", help="build the default's UNet engines first")
    p.add_argument("--calibration", default=None, metavar="FILE", help="with --default-model: the table whose "
                   "statistics give the scales (default: unit scales)")
    p.add_argument("--json", default=str(JSON_OUT))
    args = p.parse_args(argv)
    if args.default_model:
        import tempfile

        args.plans += build_default_unets(Path(tempfile.mkdtemp(prefix="engine_anatomy.")), args.calibration)
    if not args.plans:
        p.error("name engine files, or --default-model")
    missing = [f for f in args.plans if not Path(f).is_file()]
    if missing:
        print(f"engine_anatomy: error: {missing[0]}: no such engine file", file=sys.stderr)
        return 2
    rows = [anatomy(Path(f)) for f in args.plans]
    print("| engine | MiB | zlib MiB | kernel sources | their MiB | fake-quant kernels |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {Path(r['file']).name} | {r['mib']:.1f} | {r['mib_compressed']:.1f} | {r['kernel_sources']} | "
              f"{r['kernel_source_mib']:.1f} | {len(r['fake_quant_kernels'])} |")
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
