"""`python -m trt_sdxl.generate`: the CPU path end to end (PNG pixels and parameters), and every bad
input ending in one line on stderr with exit status 2 (no traceback).

GPU-only checks are reached without a GPU by faking the driver's answer (`cuda.probe`); the
engines-built-for-another-GPU check is the manifest function itself, given a compute capability.
"""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from test_pipeline import SIZE, save_tiny_sdxl

from trt_sdxl import backend, generate, generator, schedulers, weights
from trt_sdxl.errors import UserError
from trt_sdxl.executors import NetexecExecutor
from trt_sdxl.models import clip, unet, vae
from trt_sdxl.denoising import seeded_latents, seeded_step_noise
from trt_sdxl.pipeline import ModelSettings, Pipeline, to_uint8_rgb
from trt_sdxl.png import read_png_text
from trt_sdxl.runtime import cuda, manifest
from trt_sdxl.tokenizer import open_tokenizer


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("generate") / "tiny-sdxl")


def read_png_rgb(data: bytes) -> np.ndarray:
    """uint8 [H, W, 3] of an 8-bit RGB PNG whose rows all use filter 0 (as trt_sdxl.png writes)."""
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h = size
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert not rows[:, 0].any(), "a row uses a PNG filter other than 0"
    return rows[:, 1:].reshape(h, w, 3)


def run_cli(capsys, argv) -> tuple[int, list[str]]:
    code = generate.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()


def test_cpu_generates_the_pipelines_images(tiny_sdxl, tmp_path, capsys):
    """Batch 2, negative prompt, dpmpp_2m_karras: each PNG holds the image Pipeline computes from the
    same seed, and A1111's parameters."""
    out = tmp_path / "cat.png"
    code, err = run_cli(capsys, ["a cat on a sofa", "--cpu", "--model", tiny_sdxl, "--steps", 3, "--cfg", 6.5,
                                 "--seed", 11, "--scheduler", "dpmpp_2m_karras", "--negative", "blurry",
                                 "--height", SIZE, "--width", SIZE, "--batch", 2, "--out", out])
    assert code == 0, err
    assert any("ms/step" in line for line in err)
    paths = [tmp_path / "cat-0.png", tmp_path / "cat-1.png"]
    images = [read_png_rgb(p.read_bytes()) for p in paths]

    latent = SIZE // 8
    pipe = Pipeline(NetexecExecutor(clip.define(tiny_sdxl, 1, batch=2)),
                    NetexecExecutor(clip.define(tiny_sdxl, 2, batch=2)),
                    NetexecExecutor(unet.define(tiny_sdxl, batch=4, latent_height=latent, latent_width=latent)),
                    NetexecExecutor(vae.define(tiny_sdxl, batch=2, latent_height=latent, latent_width=latent)),
                    open_tokenizer(tiny_sdxl, 1), open_tokenizer(tiny_sdxl, 2))
    scheduler = schedulers.create("dpmpp_2m_karras", 3, ModelSettings.read(tiny_sdxl).scheduler_config)
    shape = (2, 4, latent, latent)
    cond = pipe.encode_prompt(["a cat on a sofa"] * 2, ["blurry"] * 2, SIZE, SIZE)
    latents = pipe.denoise(cond, seeded_latents(11, shape, scheduler.init_noise_sigma), scheduler, 6.5,
                           noise=seeded_step_noise(11, shape))
    expected = to_uint8_rgb(pipe.decode(latents))
    for k, (path, image) in enumerate(zip(paths, images)):
        assert np.array_equal(image, expected[k]), f"{path.name}: pixels differ from Pipeline's image {k}"
        text = read_png_text(path.read_bytes())["parameters"]
        lines = text.split("\n")
        assert lines[:2] == ["a cat on a sofa", "Negative prompt: blurry"]
        fields = dict(f.split(": ", 1) for f in lines[2].split(", "))
        assert fields["Steps"] == "3" and fields["Sampler"] == "DPM++ 2M" and fields["Schedule type"] == "Karras" and fields["CFG scale"] == "6.5"
        assert fields["Seed"] == str(11 + k) and fields["Size"] == f"{SIZE}x{SIZE}" and fields["Model"] == "tiny-sdxl"  # image k: seed + k (A1111)
        assert fields["Batch size"] == "2" and fields["Batch pos"] == str(k)
        assert fields["Model hash"] == weights.open_component(tiny_sdxl, "unet").fingerprint()[:10]
    assert not np.array_equal(images[0], images[1]), "both images of the batch are the same"


def test_cpu_refuses_a_full_size_model(tiny_sdxl, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generator, "NETEXEC_MAX_UNET_BYTES", 1000)  # the tiny UNet now counts as full size
    code, err = run_cli(capsys, ["x", "--cpu", "--model", tiny_sdxl, "--out", tmp_path / "a.png"])
    assert code == 2 and len(err) == 1 and "would take hours" in err[0], err


@pytest.mark.parametrize("args,message", [
    (["--steps", 0], "--steps 0: expected at least 1"),
    (["--cfg", -1], "--cfg -1.0: expected a guidance scale >= 0"),
    (["--scheduler", "heun"], "--scheduler heun: expected one of euler, euler_a, dpmpp_2m_karras, ddim"),
    (["--height", 100], "--height 100: expected a positive multiple of 8"),
    (["--width", 0], "--width 0: expected a positive multiple of 8"),
    (["--batch", 0], "--batch 0: expected at least 1"),
    (["--seed", -3], "--seed -3: expected an integer from 0"),
    (["--out", "{tmp}/missing/a.png"], "folder {tmp}/missing does not exist"),
    (["--out", "{tmp}"], "is a folder; expected a .png file path"),
    (["--out", "{tmp}/a.jpg"], "expected a file name ending in .png"),
    (["--out", "{tmp}/file.txt/a.png"], "folder {tmp}/file.txt does not exist"),
])
@pytest.mark.parametrize("cpu", [False, True])
def test_bad_arguments_are_one_line(tmp_path, capsys, args, message, cpu):
    (tmp_path / "file.txt").write_text("")
    args = [str(a).format(tmp=tmp_path) for a in args]
    argv = ["a prompt", *args] + (["--cpu"] if cpu else []) + ([] if "--out" in args else ["--out", tmp_path / "a.png"])
    code, err = run_cli(capsys, argv)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("trt_sdxl.generate: error: ") and message.format(tmp=tmp_path) in err[0], err


def test_without_a_gpu_says_so_and_how_to_check_on_the_cpu(tmp_path, capsys):
    if cuda.probe()[0]:
        pytest.skip("a GPU is present")
    code, err = run_cli(capsys, ["a prompt", "--engines", tmp_path, "--out", tmp_path / "a.png"])
    assert code == 2 and len(err) == 1, err
    assert "a GPU is needed" in err[0] and "--cpu" in err[0] and "tests/test_pipeline.py" in err[0]


# ---------------------------------------------------------------- engines folders


def fake_engines(folder, checkpoint, backend_name=None, backend_version=None, target="SM89", latent=16,
                 skip=()) -> dict:
    """An engines folder as trt_sdxl.build writes it (batch 1: the UNet's engine takes 2), with
    placeholder engine files."""
    be = backend.get()
    folder.mkdir(parents=True, exist_ok=True)
    (checkpoint / "unet").mkdir(parents=True, exist_ok=True)
    (checkpoint / "model_index.json").write_text("{}")
    engines = {}
    for component in manifest.COMPONENTS:
        if component in skip:
            continue
        precision = "fp32" if component == "vae" else "fp16"
        name = f"{component}.{precision}.{be.tag}.{target.lower()}.plan"
        (folder / name).write_bytes(b"not an engine")
        entry = {"file": name, "component": component, "precision": precision,
                 "backend": backend_name or be.name, "backend_version": backend_version or be.version,
                 "target": target, "batch": 1, "cfg_batch": 2}
        if component.startswith("text_encoder"):
            entry["tokenizer"] = str(checkpoint / component.replace("text_encoder", "tokenizer"))
            entry["inputs"] = [{"name": "input_ids", "shape": [1, 77], "dtype": "int32"}]
        else:
            entry.update({"image_height": 8 * latent, "image_width": 8 * latent})
            entry["inputs"] = [{"name": "sample", "shape": [2, 4, latent, latent], "dtype": "half"}
                               if component == "unet" else {"name": "latent", "shape": [1, 4, latent, latent],
                                                            "dtype": "float"}]
        entry.update({"outputs": [], "checkpoint": str(checkpoint / component), "checkpoint_fingerprint": "0123456789"})
        engines[component] = entry
    data = {"backend": backend_name or be.name, "backend_version": backend_version or be.version, "engines": engines}
    (folder / "manifest.json").write_text(json.dumps(data))
    return data


@pytest.fixture
def gpu_answers(monkeypatch):
    """The driver reports one GPU: generate gets past its GPU check to the engines folder."""
    monkeypatch.setattr(cuda, "probe", lambda: (1, ""))


def test_missing_engines_folder(tmp_path, capsys, gpu_answers):
    code, err = run_cli(capsys, ["x", "--engines", tmp_path / "nowhere", "--out", tmp_path / "a.png"])
    assert code == 2 and len(err) == 1, err
    assert f"engines folder {tmp_path / 'nowhere'} not found" in err[0]
    assert f"python -m trt_sdxl.build --out {tmp_path / 'nowhere'}" in err[0]


def test_folder_without_manifest(tmp_path, capsys, gpu_answers):
    code, err = run_cli(capsys, ["x", "--engines", tmp_path, "--out", tmp_path / "a.png"])
    assert code == 2 and len(err) == 1 and f"{tmp_path / 'manifest.json'} not found" in err[0], err


def test_missing_engine(tmp_path, capsys, gpu_answers):
    engines = tmp_path / "engines"
    fake_engines(engines, tmp_path / "model", skip=("vae",))
    code, err = run_cli(capsys, ["x", "--engines", engines, "--out", tmp_path / "a.png"])
    assert code == 2 and len(err) == 1, err
    assert "has no vae engine (it lists: text_encoder, text_encoder_2, unet)" in err[0]
    assert f"python -m trt_sdxl.build --model {tmp_path / 'model'} --out {engines}" in err[0]
    fake_engines(engines, tmp_path / "model")
    unet_file = engines / json.loads((engines / "manifest.json").read_text())["engines"]["unet"]["file"]
    unet_file.unlink()
    code, err = run_cli(capsys, ["x", "--engines", engines, "--out", tmp_path / "a.png"])
    assert code == 2 and len(err) == 1 and f"{unet_file}: the unet engine listed in the manifest is missing" in err[0]


def test_engines_for_another_tensorrt(tmp_path, capsys, gpu_answers):
    engines = tmp_path / "engines"
    fake_engines(engines, tmp_path / "model", backend_name="tensorrt", backend_version="10.0.1.6")
    code, err = run_cli(capsys, ["x", "--engines", engines, "--out", tmp_path / "a.png"])
    be = backend.get()
    assert code == 2 and len(err) == 1, err
    assert f"was built with tensorrt 10.0.1.6, but {be.name} {be.version} is installed" in err[0]
    assert (f"rebuild with `python -m trt_sdxl.build --model {tmp_path / 'model'} --out {engines} --precision fp16 "
            "--vae-precision fp32 --batch 1 --height 128 --width 128`") in err[0]


@pytest.mark.parametrize("size", [(256, 128), (128, 64)])
def test_resolution_outside_the_engine(tmp_path, capsys, gpu_answers, size):
    engines = tmp_path / "engines"
    fake_engines(engines, tmp_path / "model", latent=16)
    h, w = size
    code, err = run_cli(capsys, ["x", "--engines", engines, "--height", h, "--width", w, "--out", tmp_path / "a.png"])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"trt_sdxl.generate: error: batch 1, {w}x{h} px, 75 prompt tokens (1 chunk) is outside "
                             "the profiles of the unet engine (batch 1 (or a multiple), 128 x 128 px"), err[0]
    assert f"--batch 1 --height {h} --width {w}`" in err[0]  # the rebuild command asks for the requested size


def test_engines_for_another_gpu(tmp_path):
    fake_engines(tmp_path / "engines", tmp_path / "model", target="SM89")
    engines = manifest.EnginesFolder(tmp_path / "engines")
    entry = engines.entry("unet")
    engines.check_target(entry, (8, 9), "NVIDIA L40S")  # the GPU it was built for
    with pytest.raises(UserError) as e:
        engines.check_target(entry, (9, 0), "NVIDIA H100 80GB HBM3")
    assert "was built for SM89, but this GPU (NVIDIA H100 80GB HBM3) is SM90" in str(e.value)
    assert "rebuild on this machine with `python -m trt_sdxl.build" in str(e.value)
    native = dict(entry, target="native")  # TensorRT itself judges engines built on the GPU present
    engines.check_target(native, (9, 0), "NVIDIA H100 80GB HBM3")


def test_unreadable_manifest(tmp_path, capsys, gpu_answers):
    (tmp_path / "manifest.json").write_text("{ not json")
    code, err = run_cli(capsys, ["x", "--engines", tmp_path, "--out", tmp_path / "a.png"])
    assert code == 2 and len(err) == 1 and "manifest.json: unreadable" in err[0], err


def test_rebuild_command_names_the_pipeline_folder(tmp_path):
    folder = tmp_path / "sdxl base"
    fake_engines(tmp_path / "e", folder)
    engines = manifest.EnginesFolder(tmp_path / "e")
    assert manifest.model_folder(engines.entry("unet")) == folder
    assert engines.rebuild_command(height=1024, batch=3) == (
        f"python -m trt_sdxl.build --model '{folder}' --out {tmp_path / 'e'} --precision fp16 --vae-precision fp32 "
        "--batch 3 --height 1024 --width 128")


@pytest.fixture(scope="module")
def built(tiny_sdxl, tmp_path_factory):
    """The tiny pipeline's four engines, built ahead of time for SM89 by trt_sdxl.build (no GPU needed)."""
    from trt_sdxl import build

    be = backend.get()
    if "SM89" not in be.aot_targets:
        pytest.skip(f"{be.name} {be.version} cannot build ahead of time")
    out = tmp_path_factory.mktemp("built") / "engines"
    build.build(tiny_sdxl, out, height=SIZE, width=SIZE, target="SM89")
    return out


def test_a_real_manifest_passes_the_checks(built, tmp_path, capsys, gpu_answers, monkeypatch):
    """What trt_sdxl.build writes is what generate reads: with the size asked wrongly, the size error;
    with it right, every check passes and the run reaches the GPU itself."""
    code, err = run_cli(capsys, ["x", "--engines", built, "--height", 2 * SIZE, "--out", tmp_path / "a.png"])
    assert code == 2 and len(err) == 1 and f"the unet engine (batch 1 (or a multiple), {SIZE} x {SIZE} px" in err[0], err

    def reached(*args, **kwargs):
        raise UserError("reached the GPU")

    monkeypatch.setattr(cuda.Device, "open", reached)
    code, err = run_cli(capsys, ["x", "--engines", built, "--out", tmp_path / "a.png"])
    assert code == 2 and err == ["trt_sdxl.generate: error: reached the GPU"], err


def test_a_long_prompt_warns_once_through_the_log(tiny_sdxl, tmp_path, capsys):
    long_prompt = " ".join(["sneaker"] * 100)
    code, err = run_cli(capsys, [long_prompt, "--cpu", "--model", tiny_sdxl, "--steps", 1, "--negative", long_prompt,
                                 "--height", SIZE, "--width", SIZE, "--out", tmp_path / "long.png"])
    assert code == 0, err
    warnings = [line for line in err if "truncated" in line]
    assert len(warnings) == 1 and warnings[0].startswith("[trt_sdxl.generate] warning: prompts longer than 75"), err


def test_lora_flags_refit_for_the_run(refittable_folder, style_folder, lora_dir, tmp_path, capsys):
    """`--lora-dir` with a `<lora:...>` tag, and `--lora FILE:SCALE`, draw what the build with the LoRA merged
    draws; a tag without --lora-dir is one line, before anything loads."""
    from PIL import Image

    from trt_sdxl import Generator

    with Generator.load(style_folder, device="cpu") as g:
        merged = g.generate("a photo of a sneaker", steps=4, seed=8)[0].rgb
    for extra in (["a photo of a sneaker <lora:style:0.8>", "--lora-dir", lora_dir],
                  ["a photo of a sneaker", "--lora", f"{lora_dir / 'style.safetensors'}:0.8"]):
        out = tmp_path / "lora.png"
        code, _ = run_cli(capsys, ["--cpu", "--engines", refittable_folder, "--steps", 4, "--seed", 8, "--out", out,
                                   *extra])
        assert code == 0
        np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), merged)
    code, err = run_cli(capsys, ["--cpu", "--engines", refittable_folder, "a <lora:style:1>", "--out", tmp_path / "x.png"])
    assert code == 2 and err == ["trt_sdxl.generate: error: prompt tag <lora:style:1>: give --lora-dir DIR, the folder "
                                 "its LoRA file is in"]
