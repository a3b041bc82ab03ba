"""tools/engine_anatomy.py on a real TensorRT-for-RTX engine of the default model, and on a bad path."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import engine_anatomy  # noqa: E402

from trt_sdxl import backend  # noqa: E402
from trt_sdxl.components import DEFAULT_MODEL  # noqa: E402


def test_counts_kernel_sources_of_a_real_engine(tmp_path):
    import pytest

    from trt_sdxl.engines import build_engine
    from trt_sdxl.models import vae

    if not backend.get().is_rtx:
        pytest.skip("the kernel-source layout read here is TensorRT for RTX's")
    net = vae.define(DEFAULT_MODEL, precision="fp32", batch=1, latent_height=8, latent_width=8)
    engine, _ = build_engine(net.definition, "SM89")
    plan = tmp_path / "vae.plan"
    plan.write_bytes(bytes(engine))
    row = engine_anatomy.anatomy(plan)
    assert row["kernel_sources"] > 0 and 0 < row["kernel_source_mib"] <= row["text_mib"] <= row["mib"]
    assert row["fake_quant_kernels"] == []  # a high-precision network quantizes nothing


def test_fake_quant_kernel_names_are_found(tmp_path):
    plan = tmp_path / "x.plan"
    plan.write_bytes(b"\0" * 64 + b"__myl_SiluCastMulMinMaxRounCastCastMul_0xabc123" + b"\0" +
                     b"__myl_AddReshAdd_0xdef456" + b"\0" + b"#undef __HAS_FP8\n" + b"x" * 100 + b"\0")
    row = engine_anatomy.anatomy(plan)
    assert row["fake_quant_kernels"] == ["SiluCastMulMinMaxRounCastCastMul"] and row["kernel_sources"] == 1
    assert row["fused_kernel_kinds"] == 2


def test_missing_file_is_one_line(tmp_path, capsys):
    assert engine_anatomy.main([str(tmp_path / "nope.plan"), "--json", str(tmp_path / "a.json")]) == 2
    assert "no such engine file" in capsys.readouterr().err
