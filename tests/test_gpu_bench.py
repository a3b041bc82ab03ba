"""tools/gpu_bench.py: the engine-inspector classifier on the CPU, and (marker `gpu`, where a GPU and
NVIDIA TensorRT are present) the tool itself on the embedded default model.

The inspector JSON below is shaped like TensorRT's DETAILED output: field names, format strings,
fused-layer and Myelin kernel names follow real dumps (the QAT engine in NVIDIA/TensorRT's TREx
test inputs, tools/experimental/trt-engine-explorer/tests/inputs/mobilenet.qat.onnx.engine.graph.json;
TensorRT 10 Myelin layers quoted in NVIDIA/TensorRT#4397, #3665), with our own layer names.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import gpu_bench  # noqa: E402

INT8_C32 = "Thirty-two wide channel vectorized row major Int8 format"
FP16_NHWC8 = "Channel major FP16 format where channel % 8 == 0"
FP16_LINEAR = "Row major linear FP16 format"
ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
ATTN_MYELIN = ATTN.replace(".", "_")  # Myelin writes network-layer names with '.' as '_'


def tensor(name, fmt, dims=(2, 64, 16, 16)):
    return {"Name": name, "Location": "Device", "Dimensions": list(dims), "Format/Datatype": fmt}


def layer(name, layer_type, inputs, outputs, **fields):
    return {"Name": name, "LayerType": layer_type, "Inputs": inputs, "Outputs": outputs, **fields}


def engine(*layers, bindings=("sample", "noise_pred")):
    return {"Layers": list(layers), "Bindings": list(bindings)}


def fused_int8_conv(path="down_blocks.1.resnets.0.conv1", src="t0", dst="t1"):
    """A convolution with its weight and input Q/DQ folded in, as TensorRT fuses them."""
    return layer(f"{path}.weight + {path}.weight.quantize + {path}.input.quantize + {path}.input.dequantize + "
                 f"{path}", "CaskConvolution", [tensor(src, INT8_C32), tensor(f"{path}.residual", FP16_NHWC8)],
                 [tensor(dst, FP16_NHWC8)], ParameterType="Convolution", Kernel=[3, 3], OutMaps=64, Groups=1,
                 Weights={"Type": "Int8", "Count": 36864}, Bias={"Type": "Float", "Count": 64},
                 TacticName="sm80_xmma_fprop_implicit_gemm_interleaved_i8f16_i8i32_f32_nhwckrsc_nhwc_tilesize128x64x64",
                 TacticValue="0x235fad4a7171cb36", StreamId=0, Metadata="")


def kinds(report):
    return [(layer.name, layer.kind) for layer in report.layers]


@pytest.mark.parametrize("fmt,expected", [
    (INT8_C32, "INT8"), ("Row major linear FP32", "FP32"), (FP16_NHWC8, "FP16"), (FP16_LINEAR, "FP16"),
    ("Channel major INT8 format where channel % 16 == 0", "INT8"), ("Row major linear FP8 format", "FP8"),
    ("Row major linear BFloat16 format", "BF16"), ("Row major linear UInt8 format", "UINT8"),
    ("Row major linear Int32", "INT32"), ("Row major linear BOOL", "BOOL"),
    ("Half", "FP16"), ("Float", "FP32"), ("Int8", "INT8"), ("FP8", "FP8"), ("BFloat16", "BF16"),
])
def test_tensor_types_from_tensorrt_format_strings(fmt, expected):
    assert gpu_bench.tensor_type({"Format/Datatype": fmt}) == expected


def test_fused_int8_convolution_passes():
    info = engine(
        layer("Reformatting CopyNode for Input Tensor 0 to conv_in", "Reformat",
              [tensor("sample", FP16_LINEAR, (2, 4, 16, 16))], [tensor("r0", FP16_NHWC8, (2, 4, 16, 16))],
              ParameterType="Reformat", Origin="REFORMAT", TacticValue="0x00000000000003e8"),
        layer("conv_in", "CaskConvolution", [tensor("r0", FP16_NHWC8, (2, 4, 16, 16))], [tensor("t0", INT8_C32)],
              ParameterType="Convolution", TacticName="sm80_xmma_fprop_implicit_gemm_f16f16_f16f16_f16_nhwckrsc_nhwc"),
        fused_int8_conv(),
        layer("copied_squeeze_after_conv_out", "NoOp", [tensor("t1", FP16_NHWC8)], [tensor("noise_pred", FP16_NHWC8)]),
    )
    report = gpu_bench.classify_layers(json.dumps(info))
    assert report.findings == [], report.findings
    assert kinds(report)[2][1] == "conv" and report.layers[2].precision == "INT8"
    assert report.precision_counts == {"FP16": 2, "INT8": 1}  # the NoOp is not counted
    assert report.to_json()["boundary_reformats"] == 1


@pytest.mark.parametrize("standalone,role", [
    # TensorRT ran the Q/DQ as a reformat (LayerType Reformat, Origin QDQ), as in TREx's QAT engine
    (layer(f"{ATTN}.to_q.input.dequantize", "Reformat", [tensor("q8", INT8_C32)], [tensor("q16", FP16_LINEAR)],
           ParameterType="Reformat", Origin="QDQ", TacticValue="0x00000000000003e8"), "Dequantize"),
    # older TensorRT: an 8-bit <-> float Scale layer (TREx's QDQ lint)
    (layer(f"{ATTN}.to_q.input.quantize", "Scale", [tensor("x16", FP16_LINEAR)], [tensor("x8", INT8_C32)],
           ParameterType="Scale", Mode="UNIFORM"), "Quantize"),
    # a Myelin kernel named after our quantize alone
    (layer(f"{ATTN_MYELIN}_to_k_input_quantize_myl0_7", "kgen", [tensor("k16", "Half", (2, 16, 64))],
           [tensor("k8", "Int8", (2, 16, 64))], TacticName="__myl_Mul_0x9d5c2e", StreamId=0), "Quantize"),
    # a Myelin kernel that only scales and casts 8-bit back to float (a dequantize, by what it does)
    (layer("__myl_CastMul_myl0_12", "kgen", [tensor("v8", "Int8", (2, 77, 64))], [tensor("v16", "Half", (2, 77, 64))],
           TacticName="__myl_CastMul_0x4be1f0a2", StreamId=0), "Dequantize"),
])
def test_standalone_quantize_or_dequantize_is_caught(standalone, role):
    report = gpu_bench.classify_layers(engine(fused_int8_conv(), standalone))
    assert len(report.findings) == 1, report.findings
    assert report.findings[0].startswith(f"standalone {role} layer {standalone['Name']!r}")
    assert report.layers[0].kind == "conv"  # the fused one, whose name also has quantize in it, is not


def test_reformat_inside_the_engine_is_caught():
    inner = layer("Reformatting CopyNode for Input Tensor 0 to up_blocks.0.resnets.0.conv1", "Reformat",
                  [tensor("t1", FP16_LINEAR)], [tensor("r1", FP16_NHWC8)], ParameterType="Reformat",
                  Origin="REFORMAT", TacticValue="0x00000000000003e8")
    at_output = layer("Reformatting CopyNode for Output Tensor 0 to conv_out", "Reformat",
                      [tensor("r2", FP16_NHWC8)], [tensor("noise_pred", FP16_LINEAR)], ParameterType="Reformat",
                      Origin="REFORMAT")
    report = gpu_bench.classify_layers(engine(fused_int8_conv(), inner, at_output))
    assert report.findings == [f"Reformat layer {inner['Name']!r} ({FP16_LINEAR} -> {FP16_NHWC8})"]
    assert report.to_json()["boundary_reformats"] == 1


def test_unfused_attention_is_caught():
    """Attention as Myelin runs it when it cannot fuse: GEMM, a max/sub/exp/sum kernel, a divide, GEMM
    (the sequence of a real TensorRT 10 dump), here with our layer names."""
    qk, probs, out = (2, 2, 16, 16), (2, 2, 16, 16), (2, 2, 16, 32)
    info = engine(
        layer(f"{ATTN_MYELIN}_attention_bmm1_myl0_0", "gemm",
              [tensor("q", "Half", out), tensor("k", "Half", out)], [tensor("s", "Half", qk)],
              TacticName="sm80_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize32x32x64_stage6_warpsize2x2x1_tensor16x8x16"),
        layer("__myl_TraMaxSubExpSum_myl0_1", "kgen", [tensor("s", "Half", qk)], [tensor("e", "Float", qk)],
              TacticName="__myl_TraMaxSubExpSum_0xcbcb71f14cb4526fd18f61134658c571"),
        layer("__myl_DivMul_myl0_2", "kgen", [tensor("e", "Float", qk)], [tensor("p", "Half", probs)],
              TacticName="__myl_DivMul_0x80125aec9f1e9979e47ef2b407811651"),
        layer(f"{ATTN_MYELIN}_attention_bmm2_myl0_3", "gemm",
              [tensor("p", "Half", probs), tensor("v", "Half", out)], [tensor("o", "Half", out)],
              TacticName="sm80_xmma_gemm_f16f16_f16f32_f32_nn_n_tilesize32x32x64_stage6_warpsize2x2x1_tensor16x8x16"),
    )
    report = gpu_bench.classify_layers(info, attention_sites=1)
    assert [k for _, k in kinds(report)] == ["attention_bmm", "softmax", "other", "attention_bmm"]
    assert len(report.findings) == 4, report.findings
    assert all(f.startswith("decomposed attention:") for f in report.findings)
    assert "0 fused attention layer(s)" in report.findings[-1] and "1 attention sites" in report.findings[-1]


def test_attention_layer_split_into_gemms_is_caught():
    """TensorRT's attention layer (named `<path>.attention`) decomposed: its GEMMs carry its name."""
    gemm = layer(f"{ATTN_MYELIN}_attention_myl0_5", "gemm", [tensor("q", "Half"), tensor("k", "Half")],
                 [tensor("s", "Half")], TacticName="sm90_xmma_gemm_f16f16_f16f32_f32_tn_n")
    report = gpu_bench.classify_layers(engine(gemm), attention_sites=1)
    assert report.layers[0].kind == "attention_bmm"
    assert len(report.findings) == 2, report.findings


def test_fused_attention_passes():
    """The fused kernel of a real TensorRT 10 dump (NVIDIA/TensorRT#4397): q, k^T, mask, v in, one out."""
    mha = layer("_gemm_mha_v2_myl0_59", "kgen",
                [tensor("__mye55951", "Half", (4, 40, 64)), tensor("__mye55951", "Half", (4, 64, 40)),
                 tensor("__mye55389_7", "Half", (1, 1, 40, 40)), tensor("__mye55951", "Half", (4, 40, 64))],
                [tensor("__mye55065", "Half", (4, 40, 64))],
                TacticName="_gemm_mha_v2_0x957a2fe283f77dcf35c142c1390a3e6a", StreamId=0,
                Metadata=f"{ATTN}.attention")
    fp8 = layer(f"{ATTN_MYELIN}_attention_myl0_9", "kgen", [tensor("q8", "FP8", (2, 2, 16, 32))],
                [tensor("o", "Half", (2, 2, 16, 32))], TacticName="sm90_fmha_v2_flash_attention_e4m3_fp32_64_32")
    report = gpu_bench.classify_layers(engine(mha, fp8), attention_sites=2)
    assert report.findings == [], report.findings
    assert [layer.kind for layer in report.layers] == ["attention", "attention"]
    assert [layer.precision for layer in report.layers] == ["FP16", "FP8"]


def test_pointwise_kernels_with_exp_are_not_softmax():
    """Myelin's fused norms and activations (a real LayerNorm kernel name; GroupNorm + SiLU) stay 'other'."""
    norm = layer("__myl_AddCastMeanSubMulMeanAddSqrtDivMulCastMulAdd_myl0_68", "kgen", [tensor("a", "Half")],
                 [tensor("b", "Half")],
                 TacticName="__myl_AddCastMeanSubMulMeanAddSqrtDivMulCastMulAdd_0xf2543c36ff9f104bbb1655b0183afb47")
    silu = layer("__myl_MeanSubMulMeanAddSqrtDivMulAddNegExpAddDivMul_myl0_4", "kgen", [tensor("c", "Half")],
                 [tensor("d", "Half")])
    report = gpu_bench.classify_layers(engine(norm, silu))
    assert [layer.kind for layer in report.layers] == ["other", "other"] and report.findings == []


def test_engine_built_without_detailed_verbosity_is_refused():
    with pytest.raises(ValueError, match="DETAILED"):
        gpu_bench.classify_layers({"Layers": ["conv_in", "down_blocks.0.resnets.0.conv1"], "Bindings": []})


def test_timing_summary_and_speedups():
    summary = gpu_bench.timing_summary([1.0, 2.0, 3.0])
    assert (summary["ms_mean"], summary["ms_std"], summary["ms_median"], summary["ms_min"]) == (2.0, 1.0, 2.0, 1.0)
    results = {"fp16": {"ms_mean": 10.0}, "int8": {"ms_mean": 4.0}, "fp8": {"error": "no build"}}
    gpu_bench.add_speedups(results)
    assert results["fp16"]["speedup_vs_fp16"] == 1.0 and results["int8"]["speedup_vs_fp16"] == 2.5
    assert results["fp8"]["speedup_vs_fp16"] is None


# ---------------------------------------------------------------- on a GPU with NVIDIA TensorRT


def nvidia_tensorrt_reason() -> str:
    """'' where the `tensorrt` package (with a builder, not the stubs) imports, else why not."""
    try:
        module = importlib.import_module("tensorrt")
    except ImportError as e:
        return f"NVIDIA TensorRT is not installed ({e})"
    return "" if hasattr(module, "Builder") else "only TensorRT stubs are installed"


@pytest.mark.gpu
def test_tool_on_the_default_model(tmp_path):
    """FP16 and INT8 engines of the embedded default: built, timed, inspected; no finding in either."""
    from trt_sdxl.runtime import cuda

    count, reason = cuda.probe()
    if not count:
        pytest.skip(reason)
    reason = nvidia_tensorrt_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "gpu_bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_bench.py"), "--precisions", "fp16,int8",
                           "--runs", "10", "--warmup", "3", "--out", str(out),
                           "--save-inspector", str(tmp_path / "inspector")],
                          env={**os.environ, "TRT_SDXL_BACKEND": "tensorrt"}, capture_output=True, text=True,
                          timeout=1200)
    print(proc.stdout, proc.stderr[-4000:], sep="\n")
    assert out.exists(), f"no report written (exit {proc.returncode})"
    report = json.loads(out.read_text())
    for precision in ("fp16", "int8"):
        r = report["precisions"][precision]
        assert "error" not in r, f"{precision}: {r.get('error')}"
        assert r["ms_mean"] > 0, f"{precision}: {r['ms_mean']} ms per step"
        assert r["findings"] == [], f"{precision}: " + "; ".join(r["findings"])
    assert report["precisions"]["int8"]["precision_counts"].get("INT8", 0) > 0, \
        f"no INT8 layer in the int8 engine: {report['precisions']['int8']['precision_counts']}"
    assert proc.returncode == 0, proc.stderr[-2000:]
