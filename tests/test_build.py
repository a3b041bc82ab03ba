"""`python -m trt_sdxl.build` as a user runs it, ahead-of-time builds with a real TensorRT builder,
and the embedded tiny default model those builds start from."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_loras import tiny_default_lora

from trt_sdxl import backend, build
from trt_sdxl.engines import build_engine
from trt_sdxl.errors import UserError
from trt_sdxl.components import COMPONENTS, DEFAULT_MODEL
from trt_sdxl.files import write_atomic
from trt_sdxl.models import clip, unet, vae

REPO = Path(build.__file__).resolve().parent.parent
TAG = backend.get().tag


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trt_sdxl.build", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `trt_sdxl.build: error:` line of a run that failed as a user error should."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("trt_sdxl.build: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---------------------------------------------------------------- the default build


@pytest.fixture(scope="module")
def default_build(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`python -m trt_sdxl.build --out DIR` run once: (DIR, the finished process). Tests read it, never change it."""
    out = tmp_path_factory.mktemp("default_build") / "engines"
    return out, run_cli("--out", str(out))


def test_default_build_writes_four_engines_manifest_and_report(default_build):
    out, proc = default_build
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "build_report.json").read_text())
    be = backend.get()
    engines = manifest["engines"]
    assert sorted(engines) == sorted(COMPONENTS)
    names = {c: e["file"] for c, e in engines.items()}
    assert names == {"text_encoder": f"text_encoder.fp16.{TAG}.sm89.plan",
                     "text_encoder_2": f"text_encoder_2.fp16.{TAG}.sm89.plan",
                     "unet": f"unet.fp16.{TAG}.sm89.plan",
                     "vae": f"vae.fp32.{TAG}.sm89.plan"}
    for component, entry in engines.items():
        assert (out / entry["file"]).stat().st_size > 100_000, component
        assert entry["component"] == component and entry["target"] == "SM89"
        assert entry["backend"] == be.name and entry["backend_version"] == be.version
        assert entry["batch"] == 1 and entry["cfg_batch"] == 2
        assert len(entry["checkpoint_fingerprint"]) == 64
        assert entry["checkpoint"] == str(DEFAULT_MODEL / component)
    assert [e["precision"] for e in engines.values()] == ["fp16", "fp16", "fp16", "fp32"]

    # the UNet takes the CFG batch (uncond + cond), the text encoders and the VAE one image per prompt
    u = engines["unet"]
    assert [i["name"] for i in u["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "text_embeds",
                                               "time_ids"]
    assert u["inputs"][0] == {"name": "sample", "shape": [2, 4, 8, 8], "dtype": "half"}
    assert u["inputs"][2]["shape"] == [2, 77, 64] and u["inputs"][3]["shape"] == [2, 32]
    assert u["outputs"] == [{"name": "noise_pred", "shape": [2, 4, 8, 8], "dtype": "half"}]
    assert (u["image_height"], u["image_width"]) == (64, 64)
    for component, folder in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        e = engines[component]
        assert e["inputs"] == [{"name": "input_ids", "shape": [1, 77], "dtype": "int32"}]
        assert e["outputs"][0] == {"name": "hidden_states", "shape": [1, 77, 32], "dtype": "half"}
        assert e["tokenizer"] == f"model/{folder}" and (out / e["tokenizer"] / "vocab.json").is_file()
    assert engines["text_encoder_2"]["outputs"][1] == {"name": "text_embeds", "shape": [1, 32], "dtype": "half"}
    assert len(engines["text_encoder"]["outputs"]) == 1
    v = engines["vae"]
    assert v["inputs"] == [{"name": "latent", "shape": [1, 4, 8, 8], "dtype": "float"}]
    assert v["outputs"] == [{"name": "image", "shape": [1, 3, 64, 64], "dtype": "float"}]

    for component in COMPONENTS:
        r = report[component]
        assert r["macs_total"] > 0 and r["macs_8bit"] == 0 and r["layers"] > 50, (component, r)
        assert r["layers_quantized"] == 0 and r["smoothing_muls"] == 0 and r["build_seconds"] > 0
    assert report["unet"]["layers"] > 1000 and report["vae"]["precision"] == "fp32"
    # progress: loading and definition per component, then building engine k of 4
    for component in COMPONENTS:
        for stage in (f"{component}: opening weights", f"{component}: defining the network",
                      f"{component}: building for SM89", f"wrote {out / names[component]}"):
            assert stage in proc.stderr, proc.stderr
    assert "[4/4] vae: building for SM89" in proc.stderr
    # no temporary files left behind; the model copy beside the engines
    assert sorted(p.name for p in out.iterdir()) == sorted([*names.values(), "manifest.json", "build_report.json",
                                                            "model"])
    assert not [p for p in out.rglob(".*")], "a temporary file or folder was left behind"


def test_components_subset_batch_and_vae_precision(tmp_path):
    out = tmp_path / "engines"
    proc = run_cli("--out", str(out), "--components", "unet,vae", "--batch", "2", "--vae-precision", "bf16")
    assert proc.returncode == 0, proc.stderr
    engines = json.loads((out / "manifest.json").read_text())["engines"]
    assert sorted(engines) == ["unet", "vae"]
    assert engines["vae"]["file"] == f"vae.bf16.{TAG}.sm89.plan" and engines["vae"]["precision"] == "bf16"
    assert engines["unet"]["inputs"][0]["shape"] == [4, 4, 8, 8]  # 2 images per prompt: CFG batch 4
    assert engines["vae"]["inputs"][0]["shape"] == [2, 4, 8, 8]
    assert engines["vae"]["outputs"][0]["shape"] == [2, 3, 64, 64]
    assert all(e["batch"] == 2 and e["cfg_batch"] == 4 for e in engines.values())
    assert "text_encoder" not in proc.stderr

    # a later build of another subset adds to the manifest and keeps what is there
    unet_plan = (out / engines["unet"]["file"]).read_bytes()
    proc = run_cli("--out", str(out), "--components", "text_encoder_2")
    assert proc.returncode == 0, proc.stderr
    merged = json.loads((out / "manifest.json").read_text())["engines"]
    assert sorted(merged) == ["text_encoder_2", "unet", "vae"]
    assert merged["unet"] == engines["unet"] and (out / engines["unet"]["file"]).read_bytes() == unet_plan
    assert merged["text_encoder_2"]["inputs"][0]["shape"] == [1, 77]
    assert "keeps unet from an earlier build (batch 2" in proc.stderr, proc.stderr


def test_fp16_vae_for_overflowing_weights_warns_in_one_line(tmp_path):
    proc = run_cli("--out", str(tmp_path / "o"), "--components", "vae", "--vae-precision", "fp16")
    assert proc.returncode == 0, proc.stderr
    warning = [ln for ln in proc.stderr.splitlines() if "known to overflow" in ln]
    assert len(warning) == 1 and warning[0].startswith("[trt_sdxl.build] vae: warning: --vae-precision fp16"), \
        proc.stderr
    assert (tmp_path / "o" / f"vae.fp16.{TAG}.sm89.plan").is_file()


@pytest.mark.parametrize("target", ["SM89", "SM120"])
def test_tiny_unet_aot_build(target):
    net = unet.define(DEFAULT_MODEL, batch=2, latent_height=16, latent_width=24)
    engine, seconds = build_engine(net.definition, target)
    assert engine.nbytes > 100_000, f"{target}: engine of {engine.nbytes} bytes"


@pytest.mark.parametrize("target", ["SM89", "SM120"])
def test_tiny_text_encoders_and_vae_aot_build(target):
    for net in (clip.define(DEFAULT_MODEL, encoder=1, batch=2), clip.define(DEFAULT_MODEL, encoder=2, batch=2),
                vae.define(DEFAULT_MODEL, batch=2, latent_height=16, latent_width=24)):
        engine, seconds = build_engine(net.definition, target)
        assert engine.nbytes > 100_000, f"{target}: engine of {engine.nbytes} bytes"


# ---------------------------------------------------------------- bad input


@pytest.fixture
def previous_build(tmp_path) -> Path:
    """An output folder holding an earlier build's files (stand-ins), which a failed build must not touch."""
    out = tmp_path / "o"
    out.mkdir()
    (out / f"unet.fp16.{TAG}.sm89.plan").write_bytes(b"earlier engine")
    (out / "manifest.json").write_text('{"engines": {"unet": {"file": "earlier"}}}\n')
    (out / "build_report.json").write_text("{}\n")
    return out


@pytest.fixture
def model_copy(tmp_path) -> Path:
    """A copy of the tiny default pipeline folder that a test may damage."""
    return Path(shutil.copytree(DEFAULT_MODEL, tmp_path / "model"))


def check_failed_cleanly(proc, needle: str, out: Path, before: dict[str, bytes]) -> None:
    line = one_error_line(proc)
    assert needle in line, line
    assert folder_bytes(out) == before, "a failed build changed the output folder"


@pytest.mark.parametrize("args,needle", [
    (["--precision", "fp8", "--target", "SM86"], "SM86 (Ampere (RTX 3090, A6000)) has no FP8 tensor cores"),
    (["--precision", "int8"], "INT8 activations are not supported by TensorRT for RTX"),
    (["--optimization-level", "7"], "--optimization-level 7: expected 0 to 5"),
    (["--precision", "int8", "--calibration-steps", "0"], "--calibration-steps 0: expected a positive integer"),
    (["--precision", "fp64"], "--precision fp64: expected one of auto, fp16, int8, fp8"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--height", "100", "--width", "128"], "--height 100: expected a positive multiple of 32"),
    (["--height", "136", "--width", "128"], "--height 136: expected a positive multiple of 32"),
    (["--height", "0"], "--height 0: expected a positive multiple of 32"),
    (["--width", "-64"], "--width -64: expected a positive multiple of 32"),
    (["--target", "native"], "--target native: no GPU found"),
    (["--batch", "0"], "--batch 0"),
    (["--batch", "4-2"], "--batch 4-2: expected a positive integer or a rising range like 1-4"),
    (["--prompt-chunks", "0"], "--prompt-chunks 0: expected a positive integer"),
    (["--resolutions", "100-200"], "--resolutions 100-200: expected a positive multiple of 32"),
    (["--resolutions", "1024x1000"], "--resolutions 1024x1000: height 1000: expected a positive multiple of 32"),
    (["--resolutions", "big"], "--resolutions big: expected a range of sides like 768-1344"),
    (["--resolutions", "64-128", "--height", "64"], "--height/--width and --resolutions: give one or the other"),
    (["--target", "SM90"], "TensorRT for RTX runs on RTX GPUs only — for this one install NVIDIA TensorRT"),
    (["--components", "unet,clip"], "--components unet,clip: 'clip' is not a component; expected a "
                                    "comma-separated list of text_encoder, text_encoder_2, unet, vae"),
    (["--components", ","], "--components ,: no component named"),
    (["--vae-precision", "int8"], "--vae-precision int8: expected one of fp32, bf16, fp16"),
    (["--vae-precision", "bf16", "--target", "SM75"], "--vae-precision bf16: SM75 has no bfloat16"),
])
def test_bad_flags_are_one_clear_line(previous_build, args, needle):
    before = folder_bytes(previous_build)
    check_failed_cleanly(run_cli("--out", str(previous_build), *args), needle, previous_build, before)


def test_unwritable_out_is_refused_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("")
    cases = [(tmp_path / "a-file", "is a file; expected a folder"),
             (tmp_path / "a-file" / "engines", f"{tmp_path / 'a-file'} is not a writable folder")]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if not os.access(locked, os.W_OK):  # not root: a folder without write permission
        cases.append((locked / "engines", f"--out {locked / 'engines'}: {locked} is not a writable folder"))
    try:
        for out, needle in cases:
            proc = run_cli("--out", str(out))
            assert needle in one_error_line(proc)
            assert "opening weights" not in proc.stderr  # refused before the work started
    finally:
        locked.chmod(0o700)


def damage_remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


@pytest.mark.parametrize("damage,args,needle", [
    # a pipeline folder without the component asked for (by default all four are)
    (lambda m: damage_remove(m / "text_encoder_2"), [], "has no text_encoder_2/ folder"),
    (lambda m: damage_remove(m / "vae"), ["--components", "unet,vae"], "has no vae/ folder"),
    (lambda m: damage_remove(m / "text_encoder" / "model.safetensors"), [], "no text_encoder weights found"),
    # tokenizer files missing or corrupt
    (lambda m: damage_remove(m / "tokenizer_2"), [], "has no tokenizer_2/ folder"),
    (lambda m: damage_remove(m / "tokenizer" / "vocab.json"), [], "tokenizer/vocab.json: missing"),
    (lambda m: damage_remove(m / "tokenizer_2" / "merges.txt"), ["--components", "text_encoder_2"],
     "tokenizer_2/merges.txt: missing"),
    (lambda m: (m / "tokenizer" / "vocab.json").write_text('{"a": 1, "b":'), [],
     "tokenizer/vocab.json: not valid JSON"),
    (lambda m: (m / "tokenizer_2" / "merges.txt").write_bytes(b"#version: 0.2\n\xff\xfe\x00junk\n"), [],
     "tokenizer_2/merges.txt: not UTF-8 text"),
    (lambda m: (m / "tokenizer" / "tokenizer_config.json").write_text("[1, 2"), [],
     "tokenizer/tokenizer_config.json: not valid JSON"),
    (lambda m: (m / "tokenizer" / "vocab.json").write_text(json.dumps(
        {**json.loads((m / "tokenizer" / "vocab.json").read_text()), "zzz</w>": 50000})), [],
     "tokenizer/vocab.json: token ids go up to 50000, but the text_encoder has 600 token embeddings"),
])
def test_bad_checkpoint_is_one_clear_line(previous_build, model_copy, damage, args, needle):
    damage(model_copy)
    before = folder_bytes(previous_build)
    proc = run_cli("--out", str(previous_build), "--model", str(model_copy), *args)
    check_failed_cleanly(proc, needle, previous_build, before)


def test_vae_only_build_needs_nothing_else(tmp_path, model_copy):
    for name in ("tokenizer", "tokenizer_2", "text_encoder_2", "unet"):
        damage_remove(model_copy / name)
    out = tmp_path / "o"
    proc = run_cli("--out", str(out), "--model", str(model_copy), "--components", "vae")
    assert proc.returncode == 0, proc.stderr
    entry = json.loads((out / "manifest.json").read_text())["engines"]["vae"]
    # without a UNet, the image size comes from the VAE config's sample_size (SDXL's is the image side)
    assert (entry["image_height"], entry["image_width"]) == (64, 64)
    assert entry["outputs"][0]["shape"] == [1, 3, 64, 64]


# ---------------------------------------------------------------- atomic writes


def test_write_atomic_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "unet.plan"
    target.write_bytes(b"old engine")

    def interrupted(fd):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the data was being flushed

    monkeypatch.setattr(build.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, b"new engine, half written")
    assert target.read_bytes() == b"old engine"
    assert [p.name for p in tmp_path.iterdir()] == ["unet.plan"], "temporary file left behind"


@pytest.mark.parametrize("fail_at", [1, 3])  # the first engine; the UNet, after both text encoders were built
def test_failed_build_leaves_previous_outputs_intact(tmp_path, monkeypatch, default_build, fail_at):
    assert default_build[1].returncode == 0, default_build[1].stderr
    out = Path(shutil.copytree(default_build[0], tmp_path / "engines"))
    before = folder_bytes(out)
    real_build_engine = build.build_engine
    calls = []

    def failing_build(definition, target, log, **options):
        calls.append(target)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return real_build_engine(definition, target, log)

    monkeypatch.setattr(build, "build_engine", failing_build)
    # a different batch, so an engine written before the failure would differ from the one on disk
    assert build.main(["--out", str(out), "--batch", "2"]) == 130
    assert len(calls) == fail_at
    assert folder_bytes(out) == before


# ---------------------------------------------------------------- the embedded default model


def load_train_tool():
    spec = importlib.util.spec_from_file_location("train_tiny_default", REPO / "tools" / "train_tiny_default.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # its dataclasses look their module up
    spec.loader.exec_module(tool)
    return tool


def test_committed_default_is_what_the_train_tool_makes():
    """The embedded default records the training it came from: the tool's own settings, its size
    budget, and a classifier that recognizes what it draws."""
    tool = load_train_tool()
    log = json.loads((DEFAULT_MODEL / "training_log.json").read_text())
    assert log["settings"] == dataclasses.asdict(tool.Settings())
    total = sum(p.stat().st_size for p in DEFAULT_MODEL.rglob("*") if p.is_file())
    assert total <= 12 * 2**20, f"the embedded model is {total / 2**20:.1f} MiB"
    generated, real = log["evaluation"]["generated"]["accuracy"], log["evaluation"]["real_test"]["accuracy"]
    assert generated >= 0.9 and real >= 0.85, (generated, real)
    assert (DEFAULT_MODEL / "calibration_prompts.txt").is_file()


@pytest.mark.slow
def test_train_tool_is_seeded_and_writes_a_pipeline_folder(tmp_path):
    """Two quick runs (a few steps of each stage) write the same tensors, into a folder diffusers
    loads and our pipeline draws from."""
    from safetensors.numpy import load_file

    if not (load_train_tool().DATA / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (Debian's dataset-fashion-mnist)")
    folders = []
    for name in ("a", "b"):
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "train_tiny_default.py"), "--quick", "--out",
                               str(tmp_path / name)], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        folders.append(tmp_path / name)
    for weights_file in sorted(folders[0].rglob("*.safetensors")):
        made, again = load_file(weights_file), load_file(folders[1] / weights_file.relative_to(folders[0]))
        assert sorted(made) == sorted(again) and all((made[k] == again[k]).all() for k in made), weights_file
    from trt_sdxl import Generator

    image = Generator.from_model(folders[0]).generate("a photo of a sneaker", steps=2, seed=0)[0]
    assert image.rgb.shape == (64, 64, 3)


def test_tiny_default_loads_in_diffusers_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is first imported
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(DEFAULT_MODEL, local_files_only=True)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    assert pipe.vae.config.force_upcast and pipe.vae_scale_factor == 8
    assert pipe.default_sample_size * pipe.vae_scale_factor == 64
    assert pipe.unet.config.cross_attention_dim == (pipe.text_encoder.config.hidden_size
                                                    + pipe.text_encoder_2.config.hidden_size)
    embeds, _, pooled, _ = pipe.encode_prompt("a photo of a sneaker", do_classifier_free_guidance=False)
    assert tuple(embeds.shape) == (1, 77, 64) and tuple(pooled.shape) == (1, 32)
    with torch.no_grad():
        image = pipe.vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))).sample
    assert tuple(image.shape) == (1, 3, 64, 64) and torch.isfinite(image).all()


# ---------------------------------------------------------------- 8-bit builds


FEW_PROMPTS = ["a red apple on a wooden table", "a blue car in the rain", "a mountain lake at dawn",
               "a cat asleep on a sofa", "a city street at night", "a bowl of tomato soup",
               "a forest in autumn", "a lighthouse at sunset"]


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory):
    """An INT8 folder of the tiny default, calibrated on 8 prompts x 3 steps (2 of them held aside):
    without engines, as TensorRT for RTX has no INT8 activations (the recipe matrix)."""
    root = tmp_path_factory.mktemp("int8")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(FEW_PROMPTS) + "\n")
    out = root / "engines"
    proc = run_cli("--out", str(out), "--precision", "int8", "--calibration-prompts", str(prompts),
                   "--calibration-steps", "3", "--no-engines")
    return out, proc


@pytest.mark.slow
def test_int8_build_calibrates_tunes_and_reports(int8_build):
    out, proc = int8_build
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engines"]["unet"]["file"] is None and manifest["engines"]["unet"]["precision"] == "int8"
    assert not list(out.glob("*.plan"))  # --no-engines: the folder without engine files
    assert (out / "calibration.npz").exists()
    report = json.loads((out / "build_report.json").read_text())["unet"]
    assert report["macs_8bit"] / report["macs_total"] > 0.3  # NVIDIA's level 2.5 (79% on full-size SDXL)
    assert report["layers_quantized"] > 50
    assert report["fusion_lint"]["findings"] == 0 and "dq-consumer" in report["fusion_lint"]["rules"]
    q = report["quantization"]
    assert q["recipe"] == "int8" and q["calibration"]["prompts"] == 6 and q["calibration"]["steps"] == 3
    assert set(q["amax_rule"]) == {"conv", "linear", "attention"}  # a rule per layer kind
    assert all(r["method"] in ("max", "leading_min", "quantile", "modelopt") for r in q["amax_rule"].values())
    assert q["smoothing"] in ("searched", "none", "alpha 0.8") and not q["fixed_parameters"]
    # every tuning candidate's image-space score is kept, and the choice is the best of them
    scores = [c["psnr"] for c in q["tuning_candidates"]]
    assert len(scores) >= 6 and q["tuning_psnr"] == max(scores)
    for stage in ("calibration: 6 prompts x 3 steps", "calibration: prompt 6/6", "tune int8: chose"):
        assert stage in proc.stderr, proc.stderr


@pytest.mark.slow
def test_fp8_build_reuses_the_calibration_table(int8_build, tmp_path):
    out, proc = int8_build
    assert proc.returncode == 0, proc.stderr
    fp8 = tmp_path / "fp8"
    proc = run_cli("--out", str(fp8), "--precision", "fp8", "--components", "unet", "--calibration",
                   str(out / "calibration.npz"))
    assert proc.returncode == 0, proc.stderr
    assert "calibration: 6 prompts" not in proc.stderr  # no new calibration run, only fp8 tuning
    # TensorRT for RTX: FP8 GEMMs only, so --precision fp8 builds the GEMM-only recipe, at level 4
    assert "--precision fp8: builds fp8_gemm for SM89" in proc.stderr and "tune fp8_gemm: chose" in proc.stderr
    assert "(optimization level 4)" in proc.stderr
    report = json.loads((fp8 / "build_report.json").read_text())["unet"]
    assert report["quantization"]["recipe"] == "fp8_gemm" and report["optimization_level"] == 4
    assert report["fusion_lint"]["findings"] == 0
    assert (fp8 / f"unet.fp8_gemm.{TAG}.sm89.plan").exists()
    # the fp8 table now holds both recipes' choices: a second fp8 build tunes nothing
    again = run_cli("--out", str(tmp_path / "fp8b"), "--precision", "fp8", "--components", "unet",
                    "--calibration", str(fp8 / "calibration.npz"), "--target", "SM120")
    assert again.returncode == 0, again.stderr
    assert "tune fp8" not in again.stderr and (tmp_path / "fp8b" / f"unet.fp8_gemm.{TAG}.sm120.plan").exists()


def test_calibration_table_of_another_model_is_one_clear_line(int8_build, tmp_path):
    out, proc = int8_build
    assert proc.returncode == 0, proc.stderr
    other = tmp_path / "other"
    shutil.copytree(REPO / "weights" / "tiny-sdxl", other)
    cfg = json.loads((other / "unet" / "config.json").read_text())
    cfg["_trt_sdxl_test"] = "another model"  # a different config is a different checkpoint
    (other / "unet" / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("--out", str(tmp_path / "o"), "--model", str(other), "--precision", "int8", "--calibration",
                   str(out / "calibration.npz"), "--no-engines")
    assert "made for another UNet checkpoint" in one_error_line(proc)


def test_too_few_calibration_prompts_is_one_clear_line(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one prompt\ntwo prompts\n")
    proc = run_cli("--out", str(tmp_path / "o"), "--precision", "int8", "--calibration-prompts", str(prompts),
                   "--no-engines")
    assert "2 prompts; calibration needs at least 8" in one_error_line(proc)
    assert not (tmp_path / "o").exists()



@pytest.mark.slow
def test_failed_8bit_build_keeps_the_existing_calibration_table(int8_build, tmp_path, monkeypatch):
    """Tuning FP8 on the INT8 table adds to it; a build that fails after tuning leaves the table
    on disk (and everything else) as it was."""
    out, proc = int8_build
    assert proc.returncode == 0, proc.stderr
    folder = Path(shutil.copytree(out, tmp_path / "engines"))
    before = folder_bytes(folder)

    def failing_build(definition, target, log, **options):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "build_engine", failing_build)
    code = build.main(["--out", str(folder), "--precision", "fp8", "--components", "unet",
                       "--calibration", str(folder / "calibration.npz")])
    assert code == 130
    assert folder_bytes(folder) == before


def test_ctrl_c_during_the_engine_build_is_interrupted_not_failed(tmp_path):
    """SIGINT while TensorRT builds: exit 130 with "interrupted", and the output folder untouched."""
    import signal
    import time

    out = tmp_path / "engines"
    proc = subprocess.Popen([sys.executable, "-m", "trt_sdxl.build", "--out", str(out)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "building for" in line:  # the builder has started on the first engine
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    code = proc.wait(timeout=300)
    err = "".join(seen) + rest
    assert code == 130, err
    assert "trt_sdxl.build: interrupted" in err and "Traceback" not in err, err
    assert not out.exists() or not any(p.suffix == ".plan" for p in out.iterdir()), err


@pytest.mark.slow
def test_cpu_preview_runs_the_int8_networks_of_the_folder(int8_build):
    """device="cpu" on an INT8 engines folder runs the INT8 UNet network defined from the folder's own
    calibration table (Q/DQ layers and all), not the FP16 one."""
    from trt_sdxl import Generator
    from trt_sdxl.quant.table import CalibrationTable

    out, proc = int8_build
    assert proc.returncode == 0, proc.stderr
    preview = Generator.load(out, device="cpu")
    unet_net = preview._loaded.pipeline.unet.defined
    trt = backend.trt()
    kinds = [unet_net.network.get_layer(i).type for i in range(unet_net.network.num_layers)]
    assert unet_net.precision == "int8" and kinds.count(trt.LayerType.QUANTIZE) > 50
    assert unet_net.definition.quant.table.meta == CalibrationTable.load(out / "calibration.npz").meta
    image = preview.generate("a lighthouse at sunset", steps=3, seed=1)[0]
    fp16 = Generator.from_model(DEFAULT_MODEL).generate("a lighthouse at sunset", steps=3, seed=1)[0]
    assert image.rgb.shape == fp16.rgb.shape and not np.array_equal(image.rgb, fp16.rgb)
    assert "unet int8" in preview.where


@pytest.mark.slow
def test_interrupted_tuning_keeps_the_finished_calibration(tmp_path, monkeypatch):
    """Ctrl-C while tuning: the finished calibration stays (OUT/.calibration-stats.npz); the next
    build resumes from it instead of calibrating again, and removes it when it succeeds."""
    from trt_sdxl.calibration import workflow

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(FEW_PROMPTS) + "\n")
    out = tmp_path / "engines"
    args = ["--out", str(out), "--precision", "int8", "--calibration-prompts", str(prompts),
            "--calibration-steps", "3", "--components", "unet", "--no-engines"]
    real_tune = workflow.tune

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "tune", interrupted)
    assert build.main(args) == 130
    assert (out / ".calibration-stats.npz").is_file() and not (out / "calibration.npz").exists()
    monkeypatch.setattr(workflow, "tune", real_tune)
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from the finished calibration" in proc.stderr and "calibration: prompt 6/6" not in proc.stderr
    assert (out / "calibration.npz").is_file() and not (out / ".calibration-stats.npz").exists()


# ---------------------------------------------------------------- engines with dynamic shapes

PROFILE_FLAGS = ["--resolutions", "sdxl-buckets", "--resolutions", "512-768", "--batch", "1-4", "--prompt-chunks", "3"]


@pytest.fixture(scope="module")
def bucket_build(tmp_path_factory):
    """The tiny default's four engines for SM89 with two profiles: every SDXL bucket (a box of 640-1536 px
    sides) and 512-768 px, batch 1-4, prompts up to 3 x 75 tokens."""
    out = tmp_path_factory.mktemp("buckets") / "engines"
    return out, run_cli("--out", str(out), *PROFILE_FLAGS)


@pytest.mark.parametrize("target", ["SM89", "SM120"])
def test_multi_profile_engines_build_ahead_of_time(bucket_build, tmp_path, target):
    if target == "SM89":
        out, proc = bucket_build
    else:
        out = tmp_path / "engines"
        proc = run_cli("--out", str(out), "--target", target, *PROFILE_FLAGS)
    assert proc.returncode == 0, proc.stderr
    assert ("shapes: 2 profiles: batch 1-4 (or a multiple of one), 640-1536 x 640-1536 px (width x height; "
            "sdxl-buckets)") in proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    unet_entry = manifest["engines"]["unet"]
    assert [p["resolutions"] for p in unet_entry["profiles"]] == ["sdxl-buckets", "512-768"]
    assert {t["name"]: t["shape"] for t in unet_entry["inputs"]}["sample"] == [-1, 4, -1, -1]
    buckets, small = unet_entry["input_profiles"]
    assert buckets["sample"] == {"min": [2, 4, 80, 80], "opt": [2, 4, 128, 128], "max": [8, 4, 192, 192]}
    assert buckets["encoder_hidden_states"]["max"][1] == 3 * 77 and small["sample"]["max"] == [8, 4, 96, 96]
    for component in COMPONENTS:
        entry = manifest["engines"][component]
        assert (out / entry["file"]).stat().st_size > 100_000 and entry["target"] == target
        assert len(entry["input_profiles"]) == 2, component
    text = {t["name"]: t["shape"] for t in manifest["engines"]["text_encoder"]["inputs"]}
    assert text["input_ids"] == [-1, 77]  # images x prompt chunks rows
    assert manifest["engines"]["text_encoder"]["input_profiles"][0]["input_ids"]["max"] == [12, 77]


@pytest.mark.slow
def test_one_folder_serves_every_bucket_and_batch_1_to_4_on_the_cpu(bucket_build):
    from trt_sdxl import Generator
    from trt_sdxl.shapes import SDXL_BUCKETS

    out, proc = bucket_build
    assert proc.returncode == 0, proc.stderr
    with Generator.load(out, device="cpu") as g:
        assert (g.width, g.height) == (1024, 1024)  # the opt size
        for w, h in SDXL_BUCKETS:
            (image,) = g.generate("a photo of a sneaker", steps=1, seed=3, width=w, height=h)
            assert image.rgb.shape == (h, w, 3) and f"Size: {w}x{h}" in image.infotext
        images = g.generate("a photo of a bag", steps=1, seed=3, batch=4, width=512, height=512)
        assert [i.seed for i in images] == [3, 4, 5, 6] and all(i.rgb.shape == (512, 512, 3) for i in images)
        long_prompt = ", ".join(["a (white:1.2) sneaker with black laces on a grey floor"] * 6)  # 2 chunks
        (image,) = g.generate(long_prompt, "blurry", steps=1, seed=3, width=512, height=768, long_prompts=True,
                              weighting=True)
        assert image.rgb.shape == (768, 512, 3)
        with pytest.raises(UserError, match=r"batch 1, 2048x1024 px.* is outside the profiles of the unet engine "
                                            r"\(batch 1-4 \(or a multiple of one\), 640-1536 x 640-1536 px"):
            g.generate("a sneaker", steps=1, width=2048, height=1024)
        with pytest.raises(UserError, match="engines were built for 3 chunk"):
            g.generate(", ".join(["a sneaker on the floor"] * 60), steps=1, width=512, height=512, long_prompts=True)


@pytest.mark.slow
def test_8bit_engine_with_dynamic_shapes_builds_from_the_opt_shape(int8_build, tmp_path):
    """FP8 (fp8_gemm on TensorRT for RTX) UNet with a profile: calibrated at the opt shape, Q/DQ for every shape."""
    out, proc = int8_build
    assert proc.returncode == 0, proc.stderr
    fp8 = tmp_path / "fp8"
    proc = run_cli("--out", str(fp8), "--precision", "fp8", "--components", "unet", "--calibration",
                   str(out / "calibration.npz"), "--resolutions", "64-128", "--batch", "1-2")
    assert proc.returncode == 0, proc.stderr
    entry = json.loads((fp8 / "manifest.json").read_text())["engines"]["unet"]
    assert entry["input_profiles"][0]["sample"] == {"min": [2, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [4, 4, 16, 16]}
    assert (fp8 / entry["file"]).is_file()
    report = json.loads((fp8 / "build_report.json").read_text())["unet"]
    assert report["fusion_lint"]["findings"] == 0 and report["quantization"]["recipe"] == "fp8_gemm"


# ---------------------------------------------------------------- LoRAs merged at build


def test_lora_merged_at_build_and_again_on_the_cpu(default_build, tmp_path):
    """`--lora FILE:0.8`: the engines' weights carry the LoRA (their fingerprint says so), the folder keeps
    a copy and the manifest the scale, `generate --cpu` merges it again (its image differs from the base's
    and equals the library's on the same folder), and a LoRA on a component the build leaves out is refused."""
    from trt_sdxl import Generator

    base, proc = default_build
    assert proc.returncode == 0, proc.stderr
    lora_file = tiny_default_lora(tmp_path / "style.safetensors")
    out = tmp_path / "engines"
    proc = run_cli("--out", str(out), "--lora", f"{lora_file}:0.8")
    assert proc.returncode == 0, proc.stderr
    assert "unet: 618 tensors" in proc.stderr and proc.stderr.count("; LoRA merged") == 3, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["loras"] == [{"file": "model/loras/style.safetensors", "scale": 0.8,
                                  "components": ["text_encoder", "text_encoder_2", "unet"]}]
    assert (out / "model" / "loras" / "style.safetensors").read_bytes() == lora_file.read_bytes()
    base_manifest = json.loads((base / "manifest.json").read_text())
    for component in ("text_encoder", "text_encoder_2", "unet"):
        assert manifest["engines"][component]["checkpoint_fingerprint"] != \
            base_manifest["engines"][component]["checkpoint_fingerprint"], component
    assert manifest["engines"]["vae"]["checkpoint_fingerprint"] == base_manifest["engines"]["vae"]["checkpoint_fingerprint"]
    with Generator.load(out, device="cpu") as g, Generator.load(base, device="cpu") as plain:
        (styled,) = g.generate("a photo of a sneaker", steps=4, seed=5)
        (unstyled,) = plain.generate("a photo of a sneaker", steps=4, seed=5)
    assert not np.array_equal(styled.rgb, unstyled.rgb)
    png = tmp_path / "cli.png"
    cli = subprocess.run([sys.executable, "-m", "trt_sdxl.generate", "--cpu", "--engines", str(out), "a photo of a sneaker",
                          "--steps", "4", "--seed", "5", "--out", str(png)], capture_output=True, text=True, cwd=REPO)
    assert cli.returncode == 0, cli.stderr
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), styled.rgb)
    refused = run_cli("--out", str(tmp_path / "unet-only"), "--components", "unet", "--lora", str(lora_file))
    assert "--lora: the LoRAs modify text_encoder, text_encoder_2, which this build does not build" in \
        one_error_line(refused)
