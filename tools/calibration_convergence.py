"""How many prompts and denoising steps a calibration table needs: amax convergence on a trained model.

The reference is a calibration of the model (default: the trained default, weights/tiny-sdxl) with
all 64 built-in calibration prompts at 20 Euler steps. Then, for every quantized layer input and
each amax rule the tuning chooses from:

- prompts: the amax from the first n prompts' statistics (n = 4, 8, 16, 32) against all 64;
- steps: calibrations of the first 32 prompts at 5 and 10 steps against 32 prompts at 20 steps
  (the rules see the per-step values of a shorter schedule; max is over every step either way);

as the median and the worst relative deviation over the layers. A deviation well under the 8-bit
step (1/127 = 0.8% of the range for INT8) changes almost no rounding. Each calibration's wall time
is reported too (it is most of an 8-bit build).

    python tools/calibration_convergence.py [--model DIR]

Prints the tables and writes tools/calibration_convergence.json.
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
sys.path[:0] = [str(REPO)]

import numpy as np  # noqa: E402

from trt_sdxl import weights  # noqa: E402
from trt_sdxl.calibration import calibrate  # noqa: E402
from trt_sdxl.calibration.prompts import CALIBRATION_PROMPTS  # noqa: E402
from trt_sdxl.calibration.workflow import CALIBRATION_BATCH, netexec_factory, text_conditioning  # noqa: E402
from trt_sdxl.log import logger  # noqa: E402
from trt_sdxl.quant.percentile import AmaxRule, layer_amax  # noqa: E402
from trt_sdxl.quant.recipe import is_quantized  # noqa: E402

RULES = {"max": AmaxRule("max"), "leading_min(1, mean)": AmaxRule("leading_min", 1.0, "mean"),
         "modelopt(min-mean)": AmaxRule("modelopt", 1.0, "min-mean", 2)}
PROMPT_COUNTS = (4, 8, 16, 32)
STEP_COUNTS = (5, 10)
log = logger("calibration_convergence")


def calibrated(model: Path, prompts: list[str], steps: int) -> tuple[object, float]:
    component = weights.open_component(model, "unet")
    latent = int(component.config.get("sample_size", 8))
    make = netexec_factory(model, 1, latent, latent)
    encode = text_conditioning(model, make, 8 * latent, 8 * latent)
    executor = make("unet", images=CALIBRATION_BATCH, calibration_taps=True)
    start = time.perf_counter()
    table = calibrate.run_calibration(executor, encode, prompts, steps=steps, latent_shape=(4, latent, latent),
                                      batch=CALIBRATION_BATCH, log=log)
    return table, time.perf_counter() - start


def deviations(table, reference, n: int | None = None) -> dict:
    """Per rule: median and max over quantized inputs of |amax / amax_ref - 1|."""
    paths = [p for p in reference.tensor_amax if is_quantized("int8", p)]
    out = {}
    for name, rule in RULES.items():
        dev = []
        for p in paths:
            mine = table.tensor_amax[p] if n is None else table.tensor_amax[p][:n]
            dev.append(abs(layer_amax(mine, rule) / layer_amax(reference.tensor_amax[p], rule) - 1))
        out[name] = {"median": float(np.median(dev)), "max": float(np.max(dev))}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(REPO / "weights" / "tiny-sdxl"))
    p.add_argument("--out", default=str(REPO / "tools" / "calibration_convergence.json"))
    args = p.parse_args()
    model = Path(args.model)
    prompts = list(CALIBRATION_PROMPTS)[:64]
    full, full_s = calibrated(model, prompts, 20)
    report = {"date": date.today().isoformat(), "machine": platform.node(), "model": str(model),
              "reference": {"prompts": 64, "steps": 20, "seconds": round(full_s, 1)}, "prompts": {}, "steps": {}}
    for n in PROMPT_COUNTS:
        report["prompts"][str(n)] = deviations(full, full, n)
    half, half_s = calibrated(model, prompts[:32], 20)
    report["steps"]["20"] = {"seconds": round(half_s, 1)}
    for steps in STEP_COUNTS:
        short, seconds = calibrated(model, prompts[:32], steps)
        report["steps"][str(steps)] = {**deviations(short, half), "seconds": round(seconds, 1)}
    print(f"\namax deviation from 64 prompts x 20 steps ({model.name}; median / worst over INT8 layer inputs)")
    print(f"{'prompts':>8} " + " ".join(f"{name:>26}" for name in RULES))
    for n, row in report["prompts"].items():
        print(f"{n:>8} " + " ".join(f"{row[r]['median']:>11.2%} / {row[r]['max']:>10.2%}" for r in RULES))
    print(f"\namax deviation of 32 prompts at fewer steps from 32 prompts x 20 steps")
    print(f"{'steps':>8} " + " ".join(f"{name:>26}" for name in RULES) + f" {'seconds':>8}")
    for steps in STEP_COUNTS:
        row = report["steps"][str(steps)]
        print(f"{steps:>8} " + " ".join(f"{row[r]['median']:>11.2%} / {row[r]['max']:>10.2%}" for r in RULES)
              + f" {row['seconds']:>8.1f}")
    print(f"\ncalibration wall time: 64 x 20 {full_s:.0f} s, 32 x 20 {half_s:.0f} s")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
