"""Our tuned 8-bit recipes against NVIDIA's (ModelOpt's) and plain max calibration, in image space on
the trained default and its outlier twin: the relative claims of tools/quality_report.py that its
full run confirms (BENCHMARKS.md), on a smaller sample (the model's own calibration prompts at 8 steps instead of 20; 10 images x 2 seeds
at 8 steps instead of 200 x 3 at 10). The absolute figures are the report's (BENCHMARKS.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

pytest.importorskip("torch")

import quality_report as Q  # noqa: E402
from outlier_twin import make_outlier_twin  # noqa: E402

from trt_sdxl import weights  # noqa: E402
from trt_sdxl.calibration import workflow  # noqa: E402
from trt_sdxl.components import DEFAULT_MODEL  # noqa: E402

STEPS = 8
NOISE_DB = 0.5  # seed-set spread of a method's mean PSNR on this sample is ~0.1-0.4 dB


def table_for(model: Path, folder: Path) -> Path:
    """Calibrated on the model's own prompts (calibration_prompts.txt, as the build does), tuned."""
    folder.mkdir(parents=True, exist_ok=True)
    component = weights.open_component(model, "unet")
    side = 8 * int(component.config["sample_size"])
    path, table = folder / "calibration.npz", None
    for recipe in ("int8", "int8_level3", "nvidia_modelopt", "fp8", "nvidia_modelopt_fp8"):
        table = workflow.calibrate_and_tune(model, component, recipe, height=side, width=side, steps=STEPS,
                                            tune_steps=STEPS, calibration=str(path) if table is not None else None)
        table.save(path)
    return path


def mean_psnr(model: Path, table: Path, methods: list[str]) -> dict[str, float]:
    prompts, _ = Q.evaluation_prompts(10)
    images = {m: Q.method_images(model, table, m, prompts, 2, STEPS, 2.0) for m in ["FP16", *methods]}
    return {m: float(np.mean([Q.psnr(images[m][s], images["FP16"][s]).mean() for s in range(2)])) for m in methods}


@pytest.fixture(scope="module")
def scores(tmp_path_factory) -> dict[str, dict[str, float]]:
    root = tmp_path_factory.mktemp("quality")
    twin = make_outlier_twin(DEFAULT_MODEL, root / "twin")
    methods = [m for m in Q.METHODS if m != "FP16"]
    out = {}
    for name, model in (("default", DEFAULT_MODEL), ("twin", twin)):
        out[name] = mean_psnr(model, table_for(model, root / name), methods)
        print(f"\n{name}: " + ", ".join(f"{m} {v:.2f} dB" for m, v in out[name].items()))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model", ["default", "twin"])
def test_int8_ours_beats_nvidias_recipe_by_2_db(scores, model):
    """The report: +2.8 dB on both models (the issue's target: +2 dB on the outlier twin)."""
    ours, nvidia = scores[model]["INT8 ours"], scores[model]["INT8 nvidia_modelopt"]
    assert ours >= nvidia + 2.0, f"{model} INT8: ours {ours:.2f} dB, nvidia_modelopt {nvidia:.2f} dB"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["default", "twin"])
def test_fp8_ours_is_at_least_nvidias_recipe(scores, model):
    ours, nvidia = scores[model]["FP8 ours"], scores[model]["FP8 nvidia_modelopt"]
    assert ours >= nvidia - NOISE_DB, f"{model} FP8: ours {ours:.2f} dB, nvidia_modelopt_fp8 {nvidia:.2f} dB"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["default", "twin"])
def test_level_2_5_layers_keep_more_quality_than_level_3(scores, model):
    """Why `int8` is NVIDIA's level-2.5 set (the report: 1.75 / 3.1 dB better than level 3)."""
    ours, level3 = scores[model]["INT8 ours"], scores[model]["INT8 ours, level 3"]
    assert ours >= level3 + NOISE_DB, f"{model}: level 2.5 {ours:.2f} dB, level 3 {level3:.2f} dB"


@pytest.mark.slow
def test_smoothquant_recovers_the_outlier_twin(scores):
    """Plain max INT8 collapses on the twin's outlier channels; the tuned recipe does not."""
    ours, plain = scores["twin"]["INT8 ours"], scores["twin"]["INT8 plain max"]
    assert ours >= plain + 8.0, f"outlier twin INT8: ours {ours:.2f} dB, plain max {plain:.2f} dB"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["default", "twin"])
def test_tuned_is_never_worse_than_plain_max(scores, model):
    for fmt in ("INT8", "FP8"):
        ours, plain = scores[model][f"{fmt} ours"], scores[model][f"{fmt} plain max"]
        assert ours >= plain - NOISE_DB, f"{model} {fmt}: ours {ours:.2f} dB, plain max {plain:.2f} dB"
