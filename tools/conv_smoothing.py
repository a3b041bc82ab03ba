"""Measurement: does SmoothQuant help the UNet's convolutions? (INT8, tiny models, netexec)

A convolution's input comes out of SiLU or a skip concatenation, so its 1/s can never be
folded: smoothing a conv always costs an explicit multiply. This measures whether it buys
anything: trajectory error vs FP32 of the INT8 UNet with conv smoothing at alpha 0.25/0.5/0.75
against none, under plain max calibration and the percentile rule, on the tiny default UNet
and the outlier model (linear layers unsmoothed, so only the convs differ).

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
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import tiny_models  # noqa: E402
from trt_sdxl import weights  # noqa: E402
from trt_sdxl.executors import NetexecExecutor  # noqa: E402
from trt_sdxl.models import unet  # noqa: E402
from trt_sdxl.calibration import calibrate, tune  # noqa: E402
from trt_sdxl.quant.percentile import AmaxRule  # noqa: E402
from trt_sdxl.calibration.prompts import CALIBRATION_PROMPTS  # noqa: E402
from trt_sdxl.calibration.workflow import netexec_factory, text_conditioning  # noqa: E402

TINY = REPO / "weights" / "tiny-sdxl"
LATENT, STEPS = 8, 8
ALPHAS = (None, 0.25, 0.5, 0.75)
RULES = (AmaxRule("max"), AmaxRule("reference", 1.0, "max"))


def measure(folder: Path, encode) -> dict:
    component = weights.open_component(folder, "unet")
    run = dict(scheduler="euler", steps=STEPS, cfg=5.0, latent_shape=(4, LATENT, LATENT))

    def define(precision="fp16", **kw):
        return NetexecExecutor(unet.define(component, precision, batch=2, latent_height=LATENT,
                                           latent_width=LATENT, **kw))

    prompts = list(CALIBRATION_PROMPTS)
    table = calibrate.run_calibration(define(calibration_taps=True), encode, prompts[:10], steps=STEPS,
                                      latent_shape=run["latent_shape"], log=lambda m: None)
    test, seeds = prompts[-4:], [1000 + i for i in range(4)]
    conds = [encode([p]) for p in test]
    fp32 = define("fp32")
    refs = [tune.trajectory(fp32, c, seed=s, **run) for c, s in zip(conds, seeds)]
    return {rule.describe(): {str(alpha): tune.trajectory_error(
        define("int8", calibration=table, quant_options={"rule": rule, "alphas": {}, "conv_alpha": alpha}),
        refs, conds, seeds, **run) for alpha in ALPHAS} for rule in RULES}


def main() -> int:
    make = netexec_factory(TINY, 1, LATENT, LATENT)
    encode = text_conditioning(TINY, make, 8 * LATENT, 8 * LATENT)
    results = {"date": date.today().isoformat(), "steps": STEPS, "latent": LATENT}
    with tempfile.TemporaryDirectory() as tmp:
        for label, folder in (("tiny default", TINY / "unet"),
                              ("outlier model", tiny_models.save_outlier_unet(Path(tmp) / "unet"))):
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
