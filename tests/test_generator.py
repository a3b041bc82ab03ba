"""trt_sdxl.Generator, the library API, on the CPU: load once and generate many times, progress and
cancellation, A1111's batch seeds, and a self-contained engines folder that still works after it is
moved and its checkpoint deleted."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from trt_sdxl import Cancelled, Generator, backend, build, generate
from trt_sdxl.components import DEFAULT_MODEL
from trt_sdxl.errors import UserError
from trt_sdxl.png import read_png_text

STEPS = 4


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny-sdxl"
    shutil.copytree(DEFAULT_MODEL, folder)
    return folder


@pytest.fixture(scope="module")
def direct(model_copy) -> Generator:
    return Generator.from_model(model_copy)


def test_load_once_generate_many(direct):
    """Two calls on one Generator: each image is a pure function of its arguments."""
    first = direct.generate("a red sneaker", steps=STEPS, seed=3)[0]
    other = direct.generate("a blue coat", steps=STEPS, seed=4, scheduler="euler_a")[0]
    again = direct.generate("a red sneaker", steps=STEPS, seed=3)[0]
    assert first.rgb.shape == (direct.height, direct.width, 3) and first.rgb.dtype == np.uint8
    assert np.array_equal(first.rgb, again.rgb)
    assert not np.array_equal(first.rgb, other.rgb)
    assert first.seed == 3 and "Seed: 3" in first.infotext and "Steps: 4" in first.infotext


def test_concurrent_calls_equal_sequential_ones(direct):
    """Reentrant: two threads generating at once get what each would get alone."""
    alone = {seed: direct.generate("a bag", steps=STEPS, seed=seed)[0].rgb for seed in (10, 11)}
    together: dict[int, np.ndarray] = {}

    def run(seed):
        together[seed] = direct.generate("a bag", steps=STEPS, seed=seed)[0].rgb

    threads = [threading.Thread(target=run, args=(seed,)) for seed in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(alone[s], together[s]) for s in alone)


def test_progress_callback_and_cancellation(direct):
    heard = []
    direct.generate("a dress", steps=STEPS, seed=1, on_step=lambda i, n, ms: heard.append((i, n, ms >= 0)))
    assert heard == [(i, STEPS, True) for i in range(STEPS)]

    stop = threading.Event()
    seen = []

    def on_step(i, n, ms):
        seen.append(i)
        if i == 1:
            stop.set()

    with pytest.raises(Cancelled, match="after step 2 of 4"):
        direct.generate("a dress", steps=STEPS, seed=1, on_step=on_step, cancel=stop)
    assert seen == [0, 1]


def test_batch_image_i_is_seed_plus_i_alone(direct, tmp_path):
    """As A1111: image i of a batch is the image of seed + i made alone, and its PNG says so."""
    batch = direct.generate("an ankle boot", steps=STEPS, seed=20, batch=2, scheduler="euler_a")
    alone = direct.generate("an ankle boot", steps=STEPS, seed=21, scheduler="euler_a")[0]
    assert [image.seed for image in batch] == [20, 21]
    assert np.array_equal(batch[1].rgb, alone.rgb)
    assert not np.array_equal(batch[0].rgb, batch[1].rgb)
    path = batch[1].save(tmp_path / "b.png")
    assert "Seed: 21" in read_png_text(path.read_bytes())["parameters"]


def test_bad_requests_name_the_argument(direct):
    with pytest.raises(UserError, match="--steps 0: expected at least 1"):
        direct.generate("x", steps=0)
    with pytest.raises(UserError, match="--scheduler heun"):
        direct.generate("x", scheduler="heun")
    with pytest.raises(UserError, match=r"batch 1, \d+x8192 px, 75 prompt tokens \(1 chunk\) is outside the profiles of "
                                        r"the CPU networks \(batch 1-8 \(or a multiple of one\), 32-4096 x 32-4096 px"):
        direct.generate("x", height=8192)
    with pytest.raises(UserError, match="multiples of 32"):
        direct.generate("x", height=100)
    with pytest.raises(UserError, match="device 'tpu'"):
        Generator.load("engines", device="tpu")


# ---------------------------------------------------------------- a self-contained engines folder


@pytest.fixture(scope="module")
def built(model_copy, tmp_path_factory) -> Path:
    be = backend.get()
    if "SM89" not in be.aot_targets:
        pytest.skip(f"{be.name} {be.version} cannot build ahead of time")
    out = tmp_path_factory.mktemp("built") / "engines"
    build.build(model_copy, out, target="SM89")
    return out


def test_manifest_holds_relative_paths_only(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["model"] == "model" and manifest["model_weights"] is True
    for entry in manifest["engines"].values():
        assert not Path(entry["file"]).is_absolute() and (built / entry["file"]).is_file()
    for copied in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                   "tokenizer_2/merges.txt", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                   "vae/config.json", "text_encoder/config.json"):
        assert (built / "model" / copied).is_file(), copied


def test_moved_folder_runs_on_the_cpu_without_its_checkpoint(built, model_copy, direct, tmp_path, capsys):
    """Build, move the folder, delete the checkpoint, generate with --cpu: the image is the one the
    checkpoint's own FP16 networks give."""
    expected = direct.generate("a pullover", steps=STEPS, seed=9)[0]
    moved = tmp_path / "elsewhere" / "engines"
    shutil.copytree(built, moved)
    gone = tmp_path / "gone"
    shutil.copytree(model_copy, gone)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["engines"]["unet"]["checkpoint"] = str(gone / "unet")  # what it was built from, now deleted
    (moved / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(gone)
    out = tmp_path / "p.png"
    code = generate.main(["a pullover", "--cpu", "--engines", str(moved), "--steps", str(STEPS), "--seed", "9",
                          "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    image = Generator.load(moved, device="cpu").generate("a pullover", steps=STEPS, seed=9)[0]
    assert np.array_equal(image.rgb, expected.rgb)
    assert read_png_text(out.read_bytes())["parameters"] == image.infotext


def test_the_readme_example_runs(built, tmp_path, monkeypatch, capsys):
    """The README's library example, verbatim, against a built folder named `engines`."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"## Library API.*?```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "engines").symlink_to(built)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Seed: 42" in out and "Seed: 43" in out
    assert (tmp_path / "sneaker-42.png").is_file() and (tmp_path / "sneaker-43.png").is_file()


def test_set_loras_and_prompt_tags(refittable_folder, style_folder, lora_dir):
    """set_loras carries LoRAs from call to call; a `<lora:...>` tag adds one for its call only (the networks go
    back to the standing set for the next); both draw what a build with the LoRA merged draws; a folder built
    without --refittable refuses, naming the way out."""
    style = lora_dir / "style.safetensors"
    with Generator.load(style_folder, device="cpu", lora_dir=lora_dir) as fixed:
        merged = fixed.generate("a photo of a sneaker", steps=STEPS, seed=2)[0]
        with pytest.raises(UserError, match="not built refittable: rebuild with --refittable"):
            fixed.set_loras([(style, 0.8)])
        with pytest.raises(UserError, match="prompt tag <lora:style:0.8>: the engines were not built refittable"):
            fixed.generate("a photo of a sneaker <lora:style:0.8>", steps=STEPS, seed=2)
        assert fixed.set_loras([]) == {}
    with Generator.load(refittable_folder, device="cpu", lora_dir=lora_dir) as g:
        base = g.generate("a photo of a sneaker", steps=STEPS, seed=2)[0]
        tagged = g.generate("a photo of a sneaker <lora:style:0.8>", steps=STEPS, seed=2)[0]
        np.testing.assert_array_equal(tagged.rgb, merged.rgb)
        assert tagged.parameters["lora_hashes"].startswith("style: ")
        np.testing.assert_array_equal(g.generate("a photo of a sneaker", steps=STEPS, seed=2)[0].rgb, base.rgb)
        assert g.set_loras([f"{style}:0.8"]) == {"text_encoder": 1, "text_encoder_2": 1, "unet": 2}
        assert g.loras["unet"] == [(style, 0.8, None)]
        standing = g.generate("a photo of a sneaker", steps=STEPS, seed=2)[0]
        np.testing.assert_array_equal(standing.rgb, merged.rgb)
        assert 'Lora hashes: "style: ' in standing.infotext
        twice = g.generate("a photo of a sneaker <lora:style:0.8>", steps=STEPS, seed=2)[0]  # standing + tag
        assert not np.array_equal(twice.rgb, merged.rgb)
        with pytest.raises(UserError, match="no LoRA named 'nope'"):
            g.generate("<lora:nope>", steps=STEPS)
