"""What an engine file is made of: kernel source text, fused-kernel names, fake-quant kernels.

TensorRT for RTX compiles its kernels on the user's GPU (just in time), so its engines carry
CUDA C source for each generated kernel; a kernel whose name holds a Round between Min/Max
clamps and casts back (`__myl_...MulMinMaxRounCastCastMul...`) quantizes and dequantizes in
floating point — 8-bit arithmetic simulated, not run. Reads plan files without deserializing
them (no GPU needed), prints a table and writes tools/engine_anatomy.json.

    python tools/engine_anatomy.py ENGINE.plan [ENGINE.plan ...]
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("plans", nargs="+")
    p.add_argument("--json", default=str(JSON_OUT))
    args = p.parse_args(argv)
    missing = [f for f in args.plans if not Path(f).is_file()]
    if missing:
        print(f"engine_anatomy: error: {missing[0]}: no such engine file", file=sys.stderr)
        return 2
    rows = [anatomy(Path(f)) for f in args.plans]
    print(f"| engine | MiB | zlib MiB | kernel sources | their MiB | fake-quant kernels |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {Path(r['file']).name} | {r['mib']:.1f} | {r['mib_compressed']:.1f} | {r['kernel_sources']} | "
              f"{r['kernel_source_mib']:.1f} | {len(r['fake_quant_kernels'])} |")
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
