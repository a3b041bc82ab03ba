"""tools/roofline.py: the analytic SDXL UNet it times is the network we define (MACs, shares, 8-bit
layers from the recipe table), its per-op FLOPs/bytes/exps match hand calculations, and its
fused/unfused 8-bit estimates are ordered as the model says they must be."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from trt_sdxl.quant import recipe as R

REPO = Path(__file__).resolve().parent.parent


def load_tool():
    spec = importlib.util.spec_from_file_location("roofline", REPO / "tools" / "roofline.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # its dataclasses look their module up
    spec.loader.exec_module(tool)
    return tool


roofline = load_tool()

# The full-size MAC split tools/quant_report.py measured from the defined network's MacRecords
# (recipe.py docstring, BENCHMARKS.md), in percent.
MEASURED_SHARES = {"feed-forward": 41.7, "resnet convs": 19.2, "attention q/k/v": 14.7,
                   "attention BMMs + softmax": 11.6, "to_out": 6.9, "samplers": 3.8, "proj_in/out": 1.1,
                   "conv_shortcut": 1.0, "conv_in/out, embeddings": 0.01}
# 8-bit shares of the MACs the recipe docstring states for the full-size UNet, in percent.
DOCUMENTED_8BIT = {"int8": 79.4, "int8_level3": 88.4}

B, SIDE = 2, 128  # CFG batch, 1024 px latent


@pytest.fixture(scope="module")
def unet():
    return roofline.sdxl_ops(1024)


@pytest.fixture(scope="module")
def results(unet):
    return roofline.roofline(unet)


def op(unet, name):
    found = [o for o in unet.ops if o.name == name]
    assert len(found) == 1, (name, len(found))
    return found[0]


def test_macs_are_the_defined_networks(unet):
    """Total MACs equal the quant report's sum over the network's MacRecords (same config, same shapes),
    and every layer group's share is within 0.5 points of the measured split."""
    report = json.loads((REPO / "tools" / "quant_report.json").read_text())
    totals = {r["macs_total"] for r in report["full_size_mac_share"].values()}
    assert totals == {sum(o.macs for o in unet.ops)}, totals
    shares = roofline.mac_shares(unet)
    for group, expected in MEASURED_SHARES.items():
        got = 100 * shares[group]
        print(f"{group}: {got:.2f}% (measured {expected}%)")
        assert abs(got - expected) < 0.5, (group, got, expected)
    assert abs(sum(shares.values()) - 1.0) < 1e-12


def test_8bit_layers_come_from_the_recipe_table(unet, monkeypatch):
    for name, expected in DOCUMENTED_8BIT.items():
        got = 100 * roofline.eight_bit_share(unet, name)
        assert abs(got - expected) < 0.05, (name, got, expected)
    gpu = roofline.GPU_BY_NAME["RTX 4090"]
    for name in roofline.REPORTED[1:]:
        precisions = {t.op: t.precision for t in roofline.op_times(unet, gpu, name, fused=True)}
        for o in unet.ops:
            if o.kind in ("conv", "linear"):
                want = R.RECIPES[name]["format"] if R.is_quantized(name, o.name) else "fp16"
            elif o.kind == "attention":
                want = R.RECIPES[name]["format"] if R.RECIPES[name]["attention_bmm"] else "fp16"
            else:
                continue
            assert precisions[o.name] == want, (name, o.name, precisions[o.name])
    # a recipe edited in the table moves the roofline: feed-forward alone in INT8
    monkeypatch.setitem(R.RECIPES, "ff_only", {"format": "int8", "layers": (r"\.ff\.net\.(0\.proj|2)$",),
                                               "attention_bmm": False, "weights": "channel"})
    ff_share = roofline.eight_bit_share(unet, "ff_only")
    assert abs(100 * ff_share - MEASURED_SHARES["feed-forward"]) < 0.5, ff_share
    groups = roofline.by_group(roofline.op_times(unet, gpu, "ff_only", fused=True))
    fp16 = roofline.by_group(roofline.op_times(unet, gpu, "fp16", fused=True))
    assert groups["feed-forward"] < 0.5 * fp16["feed-forward"], (groups["feed-forward"], fp16["feed-forward"])
    assert groups["resnet convs"] == fp16["resnet convs"]


def test_one_layer_by_hand(unet):
    """down_blocks.1 (64x64 latent = 4096 tokens, 640 channels, 10 heads): attn1 to_q and attention."""
    tokens, c, heads = (SIDE // 2) ** 2, 640, 10
    block = "down_blocks.1.attentions.0.transformer_blocks.0"
    to_q = op(unet, f"{block}.attn1.to_q")
    assert to_q.flops == 2 * B * tokens * c * c == 6_710_886_400
    attention = op(unet, f"{block}.attn1.attention")
    assert attention.flops == 2 * 2 * B * heads * tokens * tokens * (c // heads)  # QK^T and PV
    assert attention.exps == B * heads * tokens * tokens == 335_544_320
    cross = op(unet, f"{block}.attn2.attention")
    assert cross.exps == B * heads * tokens * 77
    conv1 = op(unet, "down_blocks.0.resnets.0.conv1")
    assert conv1.flops == 2 * B * 320 * SIDE * SIDE * 320 * 9

    gpu = roofline.GPU_BY_NAME["RTX 4090"]
    fp16 = {t.op: t for t in roofline.op_times(unet, gpu, "fp16", fused=True)}[to_q.name]
    activation = B * tokens * c
    assert fp16.bytes == 2 * activation + 2 * c * c + 2 * activation  # fp16 input, weights, output
    assert fp16.compute_s == pytest.approx(to_q.flops / 165.2e12)
    assert fp16.seconds == max(fp16.compute_s, fp16.memory_s, fp16.exp_s) == fp16.compute_s
    int8 = {t.op: t for t in roofline.op_times(unet, gpu, "int8", fused=True)}[to_q.name]
    assert int8.bytes == activation + c * c + 2 * activation  # 8-bit input and weights, fp16 output
    assert int8.compute_s == pytest.approx(to_q.flops / 660.6e12)
    norm1 = {t.op: t for t in roofline.op_times(unet, gpu, "int8", fused=True)}[f"{block}.norm1"]
    assert norm1.bytes == 2 * activation + activation  # fp16 read, only the shared 8-bit q/k/v input written


def test_quantize_passes_one_per_tensor_and_scale(unet):
    """INT8 level 2.5, unfused: per transformer block one pass each for the q/k/v input, the attn2 q input,
    the text (attn2 k/v), ff.net.0 and ff.net.2; two per resnet (conv1, conv2); one per sampler."""
    gpu = roofline.GPU_BY_NAME["RTX 4090"]
    blocks = 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2  # down 1-2, mid, up 0-1
    resnets, samplers = 3 * 2 + 2 + 3 * 3, 2 + 2
    passes = [t for t in roofline.op_times(unet, gpu, "int8", fused=False) if t.group == "quantize passes"]
    assert len(passes) == 5 * blocks + 2 * resnets + samplers == 388, len(passes)
    # fused, only the text input has no producing kernel to fold its quantize into
    fused = [t for t in roofline.op_times(unet, gpu, "int8", fused=True) if t.group == "quantize passes"]
    assert len(fused) == blocks and all(t.op.endswith(".attn2.kv.quantize") for t in fused), len(fused)
    assert all(t.bytes == 3 * B * 77 * 2048 for t in fused)


def test_fused_8bit_never_slower_than_fp16_and_unfused_slower(results):
    for gpu, rows in results.items():
        fp16 = rows["fp16"]["ms_fused"]
        for name, r in rows.items():
            if name == "fp16":
                continue
            print(f"{gpu} {name}: fp16 {fp16:.1f} ms, fused {r['ms_fused']:.1f}, unfused {r['ms_unfused']:.1f}")
            assert r["ms_fused"] < fp16, (gpu, name, r["ms_fused"], fp16)
            assert r["ms_unfused"] > r["ms_fused"], (gpu, name, r["ms_unfused"], r["ms_fused"])
            assert r["speedup_fused"] == pytest.approx(fp16 / r["ms_fused"])


def test_published_peaks_are_consistent():
    """GeForce cards run FP16 with FP32 accumulate at half the FP16-accumulate rate; pro and data-center
    cards do not; the SFU exp rate of H100 SXM is FlashAttention-3's 3.9 T/s; every GPU cites sources."""
    g = roofline.GPU_BY_NAME
    for name in ("RTX 4090", "RTX 5090"):
        assert g[name].fp16_acc32 == pytest.approx(g[name].fp16_acc16 / 2, rel=1e-3)
        assert g[name].int8 == pytest.approx(4 * g[name].fp16_acc32, rel=1e-3)
    for name in ("RTX 6000 Ada", "L40S", "H100 SXM", "H200 SXM"):
        assert g[name].fp16_acc32 == g[name].fp16_acc16
        # 2% : the L40S datasheet quotes FP16 362.05 but FP8 733 (2 x 366.5) TFLOPS
        assert g[name].fp8_acc32 == pytest.approx(2 * g[name].fp16_acc32, rel=0.02)
    assert g["H100 SXM"].exp_per_s == pytest.approx(3.9e12, rel=0.02)
    # 4096 dense FP16 FLOP per SM per clock on Hopper, 1024 on Ada (FP16 accumulate)
    assert g["H100 SXM"].fp16_acc32 * 1e12 == pytest.approx(132 * 4096 * g["H100 SXM"].clock_mhz * 1e6, rel=1e-3)
    assert g["RTX 4090"].fp16_acc16 * 1e12 == pytest.approx(128 * 1024 * g["RTX 4090"].clock_mhz * 1e6, rel=1e-3)
    for gpu in roofline.GPUS:
        assert gpu.sources and all(s in roofline.SOURCES for s in gpu.sources), gpu.name


def test_cli_prints_the_table_and_writes_the_json(tmp_path, capsys):
    out = tmp_path / "roofline.json"
    assert roofline.main(["--json", str(out), "--gpu", "L40S"]) == 0
    printed = capsys.readouterr().out
    assert "| RTX 4090 | nvidia_modelopt | 79.4% |" in printed and "| L40S: ms per group (fused) |" in printed
    data = json.loads(out.read_text())
    assert set(data["results"]) == {g.name for g in roofline.GPUS}
    for rows in data["results"].values():
        assert list(rows) == list(roofline.REPORTED)
    assert data["results"]["RTX 4090"]["nvidia_modelopt"]["share_8bit"] == pytest.approx(0.7936, abs=1e-4)
    assert data["nvidia_measured"]["RTX 4090"]["nvidia_modelopt"] == 1.20
    assert all(s["url"].startswith("https://") for s in data["sources"].values())
    assert data["totals"]["macs"] == sum(o.macs for o in roofline.sdxl_ops(1024).ops)
