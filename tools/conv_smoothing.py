"""Measurement: does SmoothQuant help the UNet's convolutions? (INT8, tiny models, netexec)

A convolution's input comes out of SiLU or a skip concatenation, so its 1/s can never be
folded: smoothing a conv always costs an explicit multiply. This measures whether it buys
anything: trajectory error vs FP32 of the INT8 UNet with conv smoothing at alpha 0.25/0.5/0.75
against none, under plain max calibration and a percentile rule, on the trained default and its
outlier twin (tools/outlier_twin.py; linear layers unsmoothed, so only the convs differ).

    python tools/conv_smoothing.py

Prints a table and writes tools/conv_smoothing.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import numpy as np  # noqa: E402
from outlier_twin import make_outlier_twin  # noqa: E402

from trt_sdxl import denoising, schedulers, weights  # noqa: E402
from trt_sdxl.executors import NetexecExecutor  # noqa: E402
from trt_sdxl.models import unet  # noqa: E402
from trt_sdxl.calibration import calibrate  # noqa: E402
from trt_sdxl.quant.percentile import AmaxRule  # noqa: E402
from trt_sdxl.calibration.prompts import CALIBRATION_PROMPTS  # noqa: E402
from trt_sdxl.calibration.workflow import netexec_factory, text_conditioning  # noqa: E402

TINY = REPO / "weights" / "tiny-sdxl"
LATENT, STEPS = 8, 8
ALPHAS = (None, 0.25, 0.5, 0.75)
RULES = (AmaxRule("max"), AmaxRule("leading_min", 1.0, "max"))


def measure(folder: Path, encode) -> dict:
    component = weights.open_component(folder, "unet")
    test = list(CALIBRATION_PROMPTS)[-4:]

    def define(precision="fp16", batch=2, **kw):
        return NetexecExecutor(unet.define(component, precision, batch=batch, latent_height=LATENT,
                                           latent_width=LATENT, **kw))

    def final_latents(executor, prompts, seed):
        return denoising.trajectory(executor, encode(prompts), schedulers.create("euler", STEPS), 5.0, seed,
                                    (len(prompts), 4, LATENT, LATENT))

    table = calibrate.run_calibration(define(calibration_taps=True, batch=16), encode,
                                      list(CALIBRATION_PROMPTS)[:16], steps=STEPS,
                                      latent_shape=(4, LATENT, LATENT), batch=8)
    ref = final_latents(define("fp32"), test, 1000)

    def error(executor):
        return float(np.linalg.norm(final_latents(executor, test, 1000) - ref) / np.linalg.norm(ref))

    return {rule.describe(): {str(alpha): error(
        define("int8", calibration=table, quant_options={"rule": rule, "alphas": {}, "conv_alpha": alpha}))
        for alpha in ALPHAS} for rule in RULES}


def main() -> int:
    make = netexec_factory(TINY, 1, LATENT, LATENT)
    encode = text_conditioning(TINY, make, 8 * LATENT, 8 * LATENT)
    results = {"date": date.today().isoformat(), "steps": STEPS, "latent": LATENT}
    with tempfile.TemporaryDirectory() as tmp:
        for label, folder in (("tiny default", TINY / "unet"),
                              ("outlier model", make_outlier_twin(TINY, Path(tmp) / "twin") / "unet")):
            results[label] = measure(folder, encode)
    print(f"INT8 trajectory error vs FP32 with conv smoothing ({STEPS} euler steps, CFG 5, {LATENT}x{LATENT} latents)")
    print(f"{'model':<14} {'amax rule':<32} " + " ".join(f"{'a=' + str(a) if a else 'none':>8}" for a in ALPHAS))
    for label in ("tiny default", "outlier model"):
        for rule, row in results[label].items():
            print(f"{label:<14} {rule:<32} " + " ".join(f"{row[str(a)]:>8.4f}" for a in ALPHAS))
    out = REPO / "tools" / "conv_smoothing.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
