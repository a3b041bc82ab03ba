"""The recipe matrix: what each backend builds for each GPU and precision, refusals with their way
out, `auto`, and the README's copy of the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from trt_sdxl import support
from trt_sdxl.errors import UserError
from trt_sdxl.quant.recipe import RECIPES

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_cell_is_a_recipe_or_a_refusal_with_an_alternative():
    for (backend, arch, precision), cell in support.MATRIX.items():
        if cell.refusal:
            assert cell.recipe is None
            assert "use --precision" in cell.refusal or "pip install -e .[trt]" in cell.refusal, cell.refusal
        else:
            assert cell.recipe == "fp16" or cell.recipe in RECIPES, (backend, arch, precision)


def test_rtx_int8_is_refused_naming_fp8_and_tensorrt():
    with pytest.raises(UserError) as e:
        support.resolve("int8", "tensorrt_rtx", "1.7.1.116", "SM89")
    message = str(e.value)
    assert "INT8 activations are not supported by TensorRT for RTX" in message
    assert "--precision fp8 (GEMMs only)" in message and "pip install -e .[trt]" in message
    assert "--no-engines" in message


def test_rtx_fp8_builds_the_gemm_only_recipe():
    r = support.resolve("fp8", "tensorrt_rtx", "1.7.1.116", "SM120")
    assert r.recipe == "fp8_gemm" and not RECIPES["fp8_gemm"]["attention_bmm"]
    assert "GEMMs only" in r.note


@pytest.mark.parametrize("arch", ["SM90", "SM100", "SM80"])
def test_rtx_refuses_gpus_it_cannot_run_naming_tensorrt(arch):
    with pytest.raises(UserError, match=r"does not run on .*pip install -e \.\[trt\]"):
        support.resolve("fp16", "tensorrt_rtx", "1.7.1.116", arch)


def test_fp8_needs_fp8_tensor_cores():
    with pytest.raises(UserError, match="SM86 .* has no FP8 tensor cores.*use --precision int8"):
        support.resolve("fp8", "tensorrt", "10.13.0.35", "SM86")
    assert support.resolve("int8", "tensorrt", "11.4.0.106", "SM86").recipe == "int8"


def test_auto_picks_by_gpu():
    trt = ("tensorrt", "10.13.0.35")
    assert support.resolve("auto", *trt, "SM89", "NVIDIA GeForce RTX 4090").recipe == "int8"
    assert support.resolve("auto", *trt, "SM89", "NVIDIA L40S").recipe == "fp8"
    assert support.resolve("auto", *trt, "SM89").recipe == "int8"  # ahead of time: the name is unknown
    assert support.resolve("auto", *trt, "SM90", "NVIDIA H100 80GB HBM3").recipe == "fp8"
    assert support.resolve("auto", *trt, "SM86").recipe == "int8"
    assert support.resolve("auto", "tensorrt_rtx", "1.7.1.116", "SM89", "NVIDIA GeForce RTX 4090").recipe == "fp16"
    assert support.resolve("auto", "tensorrt_rtx", "1.7.1.116", "SM89", "NVIDIA RTX 6000 Ada Generation"
                           ).recipe == "fp8_gemm"
    assert support.resolve("auto", "tensorrt_rtx", "1.7.1.116", "SM86").recipe == "fp16"
    for (backend, arch, _), cell in support.MATRIX.items():  # auto never lands on a refusal
        if not support.MATRIX[(backend, arch, "fp16")].refusal:
            assert not support.MATRIX[(backend, arch, support._auto(backend, arch, None))].refusal


def test_without_engines_every_precision_is_defined_as_asked():
    r = support.resolve("int8", "tensorrt_rtx", "1.7.1.116", "SM89", engines=False)
    assert r.recipe == "int8"


def test_tensorrt_11_row():
    assert support.backend_row("tensorrt", "11.4.0.106") == "tensorrt 11.x"
    assert support.backend_row("tensorrt", "10.13.0.35") == "tensorrt 10.x"
    assert support.backend_row("tensorrt_rtx", "1.7.1.116") == "tensorrt_rtx"


def test_readme_shows_the_matrix_of_the_code():
    text = README.read_text()
    assert support.markdown_table() in text, "README's recipe matrix differs from trt_sdxl.support.markdown_table()"


def test_comparison_recipes_follow_their_format():
    assert support.resolve("int8_level3", "tensorrt", "10.13.0.35", "SM89").recipe == "int8_level3"
    assert support.resolve("fp8_gemm", "tensorrt_rtx", "1.7.1.116", "SM89").recipe == "fp8_gemm"
    with pytest.raises(UserError, match="INT8 activations are not supported"):
        support.resolve("int8_level3", "tensorrt_rtx", "1.7.1.116", "SM89")
    with pytest.raises(UserError, match="has no FP8 tensor cores"):
        support.resolve("fp8_gemm", "tensorrt", "10.13.0.35", "SM86")
