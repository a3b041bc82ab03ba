"""tools/outlier_twin.py: the outlier twin of the trained default computes what the default computes
(FP32, to rounding) while its transformer linears see SDXL-like outlier channels."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

pytest.importorskip("diffusers")

import outlier_twin  # noqa: E402

from trt_sdxl.components import DEFAULT_MODEL  # noqa: E402


def test_twin_is_the_same_function_with_outlier_channels(tmp_path):
    twin = outlier_twin.make_outlier_twin(DEFAULT_MODEL, tmp_path / "twin")
    report = outlier_twin.check(DEFAULT_MODEL, twin, factor=50.0, channels=4, seed=0, latent_side=8)
    print(f"\noutlier twin: fp32 rescale rel L2 {report['relative_l2_fp32_twin']:.2e}, as saved "
          f"{report['relative_l2_saved_twin']:.2e}; outlier ratio {report['outlier_ratio_source']} -> "
          f"{report['outlier_ratio_twin']}")
    assert report["relative_l2_fp32_twin"] < 1e-5, report
    assert report["relative_l2_saved_twin"] < 1e-3, report  # fp16 storage rounds the rescaled tensors
    assert report["outlier_ratio_twin"]["max"] > 5 * report["outlier_ratio_source"]["max"], report
    assert report["outlier_ratio_twin"]["max"] >= 30, report
    for component in ("text_encoder", "text_encoder_2", "vae", "tokenizer", "scheduler"):
        assert (twin / component).is_dir(), component
