"""`python -m trt_sdxl.refit`: LoRAs into a refittable folder without a rebuild.

On the CPU: a `--no-engines --refittable` folder refit with a LoRA draws, bit for bit, what a build with the
LoRA merged draws (and `--clear` what the base draws); an 8-bit folder keeps its plan and changes exactly the
LoRA's weights and their scales; the engine-file path — refitted plans under new names, the manifest as the
one commit, the old files and their runtime caches gone, an interrupted refit leaving the folder as it was —
runs over a stand-in for TensorRT's refitter; every mistake is one line. With TensorRT on a GPU (marker
`gpu`): a refitted engine runs like an engine built with the LoRA, and a refittable build keeps its biases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import STYLE_SCALE
from tiny_loras import tiny_default_lora

from trt_sdxl import Generator, refit
from trt_sdxl.errors import UserError
from trt_sdxl.runtime.manifest import EnginesFolder

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a sneaker"


def run_refit(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trt_sdxl.refit", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def one_line_error(proc) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def image(folder, prompt=PROMPT, **kw):
    with Generator.load(folder, device="cpu", **kw) as g:
        return g.generate(prompt, steps=4, seed=11)[0]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_refit_cli_equals_a_build_with_the_lora_and_clear_goes_back(refittable_folder, style_folder, lora_dir,
                                                                    tmp_path):
    folder = tmp_path / "engines"
    shutil.copytree(refittable_folder, folder)
    base = image(folder)
    style = lora_dir / "style.safetensors"
    proc = run_refit("--engines", str(folder), "--lora", f"{style}:{STYLE_SCALE}")
    assert proc.returncode == 0, proc.stderr
    assert "refit text_encoder (1 weights), text_encoder_2 (1 weights), unet (2 weights)" in proc.stderr, proc.stderr
    manifest = json.loads((folder / "manifest.json").read_text())
    recorded = [{"file": "model/loras/style.safetensors", "scale": STYLE_SCALE, "unet_scale": None}]
    assert {c: e.get("refit_loras") for c, e in manifest["engines"].items()} == \
        {"text_encoder": recorded, "text_encoder_2": recorded, "unet": recorded, "vae": None}
    assert (folder / "model" / "loras" / "style.safetensors").read_bytes() == style.read_bytes()
    refitted, merged = image(folder), image(style_folder)
    np.testing.assert_array_equal(refitted.rgb, merged.rgb)  # the refit binds what the build with the LoRA binds
    assert not np.array_equal(refitted.rgb, base.rgb)
    assert 'Lora hashes: "style: ' in refitted.infotext

    again = run_refit("--engines", str(folder), "--lora", f"{style}:{STYLE_SCALE}")
    assert again.returncode == 0 and "carry these LoRAs already; nothing changed" in again.stderr, again.stderr
    cleared = run_refit("--engines", str(folder), "--clear")
    assert cleared.returncode == 0, cleared.stderr
    np.testing.assert_array_equal(image(folder).rgb, base.rgb)


def test_refit_8bit_folder_keeps_its_plan(tmp_path, lora_dir):
    """An INT8 folder (calibration from a small table): the refit recomputes the LoRA's weights and their
    per-channel scales, the image moves, and --clear gives the base image back bit for bit."""
    from test_quant import calibrated

    from trt_sdxl import build, weights
    from trt_sdxl.components import DEFAULT_MODEL
    from trt_sdxl.quant.percentile import AmaxRule

    component = weights.open_component(DEFAULT_MODEL, "unet")
    table, _ = calibrated(component, prompts=2)
    table.set_choices("int8", AmaxRule(), {})
    table_path = tmp_path / "table.npz"
    table_path.write_bytes(table.to_bytes())
    folder = tmp_path / "int8"
    build.build(DEFAULT_MODEL, folder, precision="int8", engines=False, refittable=True, calibration=str(table_path))
    assert json.loads((folder / "manifest.json").read_text())["engines"]["unet"]["refit_weights"] > 100
    base = image(folder)
    said = []
    refit.refit(folder, [f"{lora_dir / 'style.safetensors'}:{STYLE_SCALE}"], log=said.append)
    assert any("the 8-bit unet was calibrated without style.safetensors" in m and "--calibrate-lora" in m
               for m in said), said
    with Generator.load(folder, device="cpu") as g:
        switch = g._loaded.switch
        assert switch.sources["unet"].plan().recipe == "int8"
        styled = g.generate(PROMPT, steps=4, seed=11)[0]
    assert not np.array_equal(styled.rgb, base.rgb)
    refit.refit(folder, [])
    np.testing.assert_array_equal(image(folder).rgb, base.rgb)

    # a table calibrated with the LoRA (build --calibrate-lora records it so): no warning
    from trt_sdxl.calibration.workflow import lora_records

    table.meta["calibration_loras"] = lora_records([lora_dir / "style.safetensors"])
    (folder / "calibration.npz").write_bytes(table.to_bytes())
    said = []
    refit.refit(folder, [f"{lora_dir / 'style.safetensors'}:{STYLE_SCALE}"], log=said.append)
    assert not any("calibrated without" in m for m in said), said


@pytest.mark.parametrize("flags", [["--calibrate-lora", "X"], ["--precision", "int8", "--calibrate-lora", "X"],
                                   ["--refittable", "--no-engines", "--calibrate-lora", "X"]])
def test_calibrate_lora_is_for_8bit_refittable_builds(flags, lora_dir, tmp_path):
    args = [a if a != "X" else str(lora_dir / "style.safetensors") for a in flags]
    proc = subprocess.run([sys.executable, "-m", "trt_sdxl.build", "--out", str(tmp_path / "e"), "--no-engines", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert "--calibrate-lora: for an 8-bit --refittable build" in one_line_error(proc)
    assert not (tmp_path / "e").exists()


class FakeRefitter:
    """Stands in for TensorRT's refitter over one engine file: records the weights it gets, checks them against
    the refit map's refittable names, and serializes to the old plan's bytes plus a digest of what it got."""

    def __init__(self, folder: EnginesFolder, component: str, fail_serialize: bool = False):
        from trt_sdxl.refit_map import refittable

        self.plan = folder.entry(component)["path"].read_bytes()
        self.names = set(refittable(folder.refit_map(component)))
        self.got: dict[str, np.ndarray] = {}
        self.fail_serialize = fail_serialize

    def refit(self, weights, more):
        assert set(weights) <= self.names, sorted(set(weights) - self.names)
        self.got.update(weights)

    def serialize(self) -> bytes:
        if self.fail_serialize:
            raise UserError("the refit failed (a stand-in's failure)")
        return self.plan + repr(sorted((n, a.tobytes().hex()[:16]) for n, a in self.got.items())).encode()


def engine_folder(refittable_folder, tmp_path) -> Path:
    """The refittable folder with plan files standing in for engines, and a runtime cache beside the UNet's."""
    folder = tmp_path / "engines"
    shutil.copytree(refittable_folder, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for c, e in manifest["engines"].items():
        e["file"] = f"{c}.fp16.test.sm89.plan"
        (folder / e["file"]).write_bytes(f"plan of {c}".encode())
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / ".runtime-cache").mkdir()
    (folder / ".runtime-cache" / "unet.fp16.test.sm89.plan.0123.cache").write_bytes(b"kernels")
    return folder


def fake_refitters(made: dict, fail: str | None = None):
    @contextmanager
    def refitters(folder, components):
        made.update({c: FakeRefitter(folder, c, fail_serialize=c == fail) for c in components})
        yield {c: (r.refit, r.serialize) for c, r in made.items()}

    return refitters


def test_engine_files_are_replaced_atomically(refittable_folder, lora_dir, tmp_path):
    folder = engine_folder(refittable_folder, tmp_path)
    before = folder_bytes(folder)
    style = lora_dir / "style.safetensors"
    with pytest.raises(UserError, match="a stand-in's failure"):
        refit.refit(folder, [f"{style}:0.5"], refitters=fake_refitters({}, fail="unet"))
    assert folder_bytes(folder) == before  # an interrupted refit leaves the folder as it was

    made = {}
    manifest = refit.refit(folder, [f"{style}:0.5"], refitters=fake_refitters(made))
    engines = manifest["engines"]
    for c in ("text_encoder", "text_encoder_2", "unet"):
        name = engines[c]["file"]
        assert name.startswith(f"{c}.fp16.test.sm89.lora-") and name.endswith(".plan")
        assert (folder / name).read_bytes() == made[c].serialize()
        assert not (folder / f"{c}.fp16.test.sm89.plan").exists()
    assert engines["vae"]["file"] == "vae.fp16.test.sm89.plan" and (folder / "vae.fp16.test.sm89.plan").exists()
    assert not list((folder / ".runtime-cache").glob("unet.fp16.test.sm89.plan.*"))  # the old engine's cache
    assert set(made["unet"].got) == {f"down_blocks.1.attentions.0.transformer_blocks.0.attn1.{p}.weight"
                                     for p in ("to_q", "to_v")}
    assert json.loads((folder / "manifest.json").read_text()) == manifest

    made = {}
    cleared = refit.refit(folder, [], refitters=fake_refitters(made))
    assert cleared["engines"]["unet"]["file"] == "unet.fp16.test.sm89.plan"  # no LoRA: the plain name again
    assert set(made["unet"].got) == {f"down_blocks.1.attentions.0.transformer_blocks.0.attn1.{p}.weight"
                                     for p in ("to_q", "to_v")}  # the LoRA's weights, back to the base
    assert not list((folder / "model" / "loras").glob("*.safetensors"))  # no engine carries it: gone


def test_base_weights_come_from_the_checkpoint_the_build_read(refittable_folder, lora_dir, tmp_path):
    """A folder without a copy of the weights (a full-size model's) reads them from the checkpoint the build
    recorded, or from --model; a checkpoint that is not the build's is refused by its fingerprint."""
    from trt_sdxl.components import DEFAULT_MODEL

    folder = tmp_path / "engines"
    shutil.copytree(refittable_folder, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["model_weights"] = False
    (folder / "manifest.json").write_text(json.dumps(manifest))
    style = f"{lora_dir / 'style.safetensors'}:{STYLE_SCALE}"
    assert refit.refit(folder, [style])["engines"]["unet"]["refit_loras"]
    other = tmp_path / "other"
    shutil.copytree(DEFAULT_MODEL, other)
    config = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**config, "_note": "a fine-tune"}))
    line = one_line_error(run_refit("--engines", str(folder), "--clear", "--model", str(other)))
    assert "its unet is not the one the engines of" in line and "the fingerprints differ" in line


def test_refit_mistakes_are_one_line(refittable_folder, style_folder, lora_dir, tmp_path):
    style = lora_dir / "style.safetensors"
    line = one_line_error(run_refit("--engines", str(style_folder), "--lora", str(style)))
    assert "were not built refittable; rebuild with `python -m trt_sdxl.build" in line and "--refittable" in line
    line = one_line_error(run_refit("--engines", str(refittable_folder), "--lora", str(tmp_path / "none.safetensors")))
    assert "no such file" in line
    unet_only = tmp_path / "unet_only"
    shutil.copytree(refittable_folder, unet_only)
    manifest = json.loads((unet_only / "manifest.json").read_text())
    manifest["engines"]["text_encoder"]["refittable"] = False
    (unet_only / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_error(run_refit("--engines", str(unet_only), "--lora", str(style)))
    assert "the LoRAs change the text_encoder, whose engine" in line and "is not refittable" in line
    before = folder_bytes(engine_folder(refittable_folder, tmp_path / "with_files"))
    line = one_line_error(run_refit("--engines", str(tmp_path / "with_files" / "engines"), "--lora", str(style)))
    assert "refitting engine files needs the GPU they run on" in line
    assert folder_bytes(tmp_path / "with_files" / "engines") == before
    usage = run_refit("--engines", str(refittable_folder))
    assert usage.returncode == 2 and "give --lora FILE[:SCALE] (repeatable), or --clear" in usage.stderr


def test_refittable_engines_need_a_gpu_with_tensorrt_for_rtx(tmp_path):
    """TensorRT for RTX 1.7 fails to build a refittable engine ahead of time without a GPU (its compiler needs the
    driver): said in one line before any work, nothing written."""
    from trt_sdxl import backend
    from trt_sdxl.engines import present_gpu

    if not backend.get().is_rtx or present_gpu() is not None:
        pytest.skip("a GPU is here, or NVIDIA TensorRT: the build can make refittable engines")
    out = tmp_path / "engines"
    proc = subprocess.run([sys.executable, "-m", "trt_sdxl.build", "--out", str(out), "--refittable"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    line = one_line_error(proc)
    assert "builds refittable engines only on a machine with a GPU" in line and "--no-engines" in line
    assert not out.exists()


# ---------------------------------------------------------------- with TensorRT on a GPU


def _tensorrt_on_gpu():
    from trt_sdxl.runtime import cuda

    try:
        import tensorrt  # noqa: F401  (NVIDIA TensorRT: engines built here run here)
    except ImportError:
        tensorrt = None
    count, reason = cuda.probe()
    if not count or tensorrt is None:
        pytest.skip(f"needs an NVIDIA GPU and NVIDIA TensorRT ({reason or 'tensorrt is not installed'})")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_gpu_refit_runs_like_a_build_with_the_lora(precision, lora_dir, tmp_path):
    """Refittable engines built for this GPU: before any refit they draw what plain engines draw (TensorRT 11.3
    documents that kREFIT can drop a GEMM bias; we build REFIT_INDIVIDUAL, and this checks it); refit with the
    LoRA, they draw what netexec draws from the same folder's networks, and an FP16 one what a build with the LoRA
    merged draws; the refit's time is printed (pytest -s)."""
    _tensorrt_on_gpu()
    from trt_sdxl import build
    from trt_sdxl.components import DEFAULT_MODEL

    style = f"{lora_dir / 'style.safetensors'}:{STYLE_SCALE}"
    plain, refittable, merged = (tmp_path / n for n in ("plain", "refittable", "merged"))
    build.build(DEFAULT_MODEL, plain, precision=precision, target="native")
    build.build(DEFAULT_MODEL, refittable, precision=precision, target="native", refittable=True,
                calibration=str(plain / "calibration.npz") if precision != "fp16" else None)

    def draw(folder, device="gpu"):
        with Generator.load(folder, device=device) as g:
            return g.generate(PROMPT, steps=8, seed=5)[0].rgb.astype(np.float64)

    def psnr(a, b):
        return 10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-12))

    assert psnr(draw(refittable), draw(plain)) > 40, "a refittable engine draws otherwise than a plain one"
    started = time.perf_counter()
    refit.refit(refittable, [style])
    seconds = time.perf_counter() - started
    after = draw(refittable)
    with Generator.load(refittable) as g:
        started = time.perf_counter()
        g.set_loras([])
        in_memory = time.perf_counter() - started
    figures = {"GPU vs netexec": psnr(after, draw(refittable, "cpu"))}
    if precision == "fp16":
        build.build(DEFAULT_MODEL, merged, target="native", loras=[style])
        figures["refit vs build with the LoRA"] = psnr(after, draw(merged))
    print(f"\n{precision}: refit CLI (3 engines, files written) {seconds:.2f} s; in memory, back to the base "
          f"{in_memory:.3f} s; PSNR " + ", ".join(f"{k} {v:.1f} dB" for k, v in figures.items()))
    assert figures["GPU vs netexec"] > (40 if precision == "fp16" else 30)
    assert figures.get("refit vs build with the LoRA", 100) > 40
    assert psnr(after, draw(plain)) < 40  # the LoRA is in
