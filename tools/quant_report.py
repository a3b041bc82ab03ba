"""The 8-bit share of the full-size SDXL UNet's MACs per quantization recipe.

SDXL base UNet (its real tensor names and shapes, zeros for values: bench_build.shape_only_component;
1024x1024, CFG batch 2): each recipe's network is defined from a synthetic calibration table
(the share depends on which layers are quantized, not on the scales) and its MAC records summed.
Image quality is measured on trained models by tools/quality_report.py (random-weight models
rank quantization methods wrongly, so this tool no longer compares methods on them).

    python tools/quant_report.py

Prints the table and writes tools/quant_report.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from trt_sdxl.models import unet  # noqa: E402
from trt_sdxl.quant.percentile import AmaxRule  # noqa: E402
from trt_sdxl.quant.recipe import RECIPES  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def mac_shares(component) -> dict:
    """8-bit share of the full-size UNet's MACs per recipe, from the quantized network definitions."""
    table = unet.placement_table(component)  # which layers are 8-bit does not depend on the scales
    out = {}
    for recipe in RECIPES:
        start = time.perf_counter()
        net = unet.define(component, recipe, batch=2, latent_height=128, latent_width=128, calibration=table,
                          quant_options={"rule": AmaxRule(), "alphas": {}})
        macs = net.macs
        total = sum(m.macs for m in macs)
        eight = sum(m.macs for m in macs if m.quantized)
        by_kind = {k: sum(m.macs for m in macs if m.kind == k) / total for k in ("conv", "linear", "bmm")}
        out[recipe] = {"macs_total": total, "macs_8bit": eight, "share": eight / total,
                       "layers_quantized": sum(1 for m in macs if m.quantized), "mac_fraction_by_kind": by_kind}
        log(f"{recipe}: 8-bit share {eight / total:.4f} ({time.perf_counter() - start:.0f} s)")
        del net
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "tools" / "quant_report.json"))
    args = p.parse_args()
    import bench_build

    component = bench_build.shape_only_component("unet")
    report = {"date": date.today().isoformat(), "machine": platform.node(), "full_size_mac_share": mac_shares(component)}
    print("8-bit share of SDXL base UNet MACs (1024x1024, CFG batch 2)")
    print(f"{'recipe':<22} {'share':>8} {'layers':>8}")
    for recipe, r in report["full_size_mac_share"].items():
        print(f"{recipe:<22} {r['share']:>8.2%} {r['layers_quantized']:>8}")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
