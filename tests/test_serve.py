"""The AUTOMATIC1111-compatible server against real clients: `webuiapi` (PyPI) and plain HTTP in the
order SillyTavern calls, on a live server on 127.0.0.1 over the tiny default's engines folder run by
netexec (`--cpu`). Images come back as PNGs `sd-parsers` reads, equal to the library's for the same
seed; errors are A1111's JSON; a bounded load test loses nothing."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from trt_sdxl import Generator  # noqa: E402
from trt_sdxl.components import DEFAULT_MODEL  # noqa: E402
from trt_sdxl.errors import UserError  # noqa: E402
from trt_sdxl.serve import parse_auth  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("serve_load", REPO / "tools" / "serve_load.py")
serve_load = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = serve_load
spec.loader.exec_module(serve_load)

PROMPT = "a photo of a sneaker"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The tiny default's engines folder (AOT for SM89), with prompts up to 2 x 75 tokens."""
    out = tmp_path_factory.mktemp("serve") / "engines"
    proc = subprocess.run([sys.executable, "-m", "trt_sdxl.build", "--out", str(out), "--prompt-chunks", "2"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def generator(engines):
    g = Generator.load(engines, device="cpu")
    yield g
    g.close()


@pytest.fixture(scope="module")
def server(generator):
    live = serve_load.LiveServer(generator, queue_size=4)
    yield live
    live.stop()


def post(server, path, body=None, **kwargs):
    return requests.post(f"{server.url}{path}", json=body, timeout=120, **kwargs)


def get(server, path, **kwargs):
    return requests.get(f"{server.url}{path}", timeout=60, **kwargs)


def test_webuiapi_txt2img_options_samplers_progress(server, generator):
    import webuiapi
    from sd_parsers import ParserManager

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    result = api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=42, steps=6, cfg_scale=5.0,
                         sampler_name="Euler a", width=64, height=64)
    (expected,) = generator.generate(PROMPT, "blurry", steps=6, cfg=5.0, seed=42, scheduler="euler_a",
                                     weighting=True, long_prompts=True)
    np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), expected.rgb)
    assert result.info["all_seeds"] == [42] and result.info["sampler_name"] == "Euler a"
    assert result.info["infotexts"] == [expected.infotext] and result.parameters["seed"] == 42
    parsed = ParserManager().parse(result.image)  # the PNG's parameters chunk, as A1111 writes it
    assert parsed is not None and parsed.full_prompt == PROMPT and parsed.full_negative_prompt == "blurry"
    assert int(parsed.samplers[0].parameters["steps"]) == 6 and int(parsed.samplers[0].parameters["seed"]) == 42
    assert parsed.samplers[0].name == "Euler a"

    options = api.get_options()
    assert options["sd_model_checkpoint"].startswith(generator.model_name) and options["samples_format"] == "png"
    api.set_options({"sd_model_checkpoint": options["sd_model_checkpoint"], "CLIP_stop_at_last_layers": 2})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    assert {s["name"] for s in api.get_samplers()} >= {"Euler", "Euler a", "DPM++ 2M", "DDIM"}
    assert api.get_progress()["state"]["sampling_steps"] == 0  # idle

    # progress while a job runs, from another client; n_iter x batch_size seeds as A1111 numbers them
    answer = {}
    worker = threading.Thread(target=lambda: answer.update(r=api.txt2img(
        prompt=PROMPT, seed=7, steps=40, batch_size=2, n_iter=2, sampler_name="DPM++ 2M", scheduler="Karras",
        width=64, height=64)))
    worker.start()
    seen = []
    while worker.is_alive():
        p = api.get_progress()
        if p["state"]["sampling_steps"]:
            seen.append(p)
        time.sleep(0.1)
    worker.join()
    assert seen and all(p["state"]["sampling_steps"] == 40 for p in seen)
    assert any(0 < p["progress"] < 1 for p in seen) and seen[-1]["current_image"] is None
    assert answer["r"].info["all_seeds"] == [7, 8, 9, 10] and len(answer["r"].images) == 4
    assert "Schedule type" in answer["r"].info["extra_generation_params"]


def test_sillytavern_style_endpoint_sequence(server):
    """The calls SillyTavern's A1111 source makes: ping, models, samplers, schedulers, upscalers, VAEs,
    options, txt2img, progress, interrupt."""
    assert get(server, "/internal/ping").status_code == 200
    models = get(server, "/sdapi/v1/sd-models").json()
    assert len(models) == 1 and {"title", "model_name", "hash", "filename"} <= set(models[0])
    for path in ("/sdapi/v1/samplers", "/sdapi/v1/schedulers", "/sdapi/v1/upscalers", "/sdapi/v1/latent-upscale-modes",
                 "/sdapi/v1/sd-vae", "/sdapi/v1/loras", "/sdapi/v1/prompt-styles"):
        r = get(server, path)
        assert r.status_code == 200 and isinstance(r.json(), list), path
    assert {"name", "label"} <= set(get(server, "/sdapi/v1/schedulers").json()[0])
    options = get(server, "/sdapi/v1/options").json()
    assert post(server, "/sdapi/v1/options", {"sd_model_checkpoint": models[0]["title"]}).status_code == 200
    assert post(server, "/sdapi/v1/options", {"sd_model_checkpoint": "another.safetensors"}).status_code == 400
    body = {"prompt": "an (ankle boot:1.2), studio photo", "negative_prompt": "", "seed": -1, "steps": 4,
            "cfg_scale": 5, "width": 64, "height": 64, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "batch_size": 1, "n_iter": 1, "restore_faces": False, "enable_hr": False, "denoising_strength": 0.7,
            "hr_scale": 2, "hr_upscaler": "Latent", "override_settings": {"CLIP_stop_at_last_layers": 1},
            "override_settings_restore_afterwards": True, "save_images": True, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False, "url": "http://127.0.0.1", "auth": "",
            "clip_skip": 1}  # SillyTavern's body, its own url/auth fields included
    r = post(server, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    answer = r.json()
    info = json.loads(answer["info"])
    assert 0 <= info["seed"] < 2**32 and info["all_seeds"] == [info["seed"]]  # -1: a random seed, recorded
    png = base64.b64decode(answer["images"][0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"parameters" in png and options["samples_format"] == "png"
    assert answer["parameters"]["seed"] == -1  # A1111 echoes the request; info has the seed it ran
    # Open WebUI sets the model by posting the whole options dict back, changed in one key
    assert post(server, "/sdapi/v1/options", dict(options, sd_model_checkpoint=models[0]["title"])).status_code == 200
    assert post(server, "/sdapi/v1/options", dict(options, show_progress_every_n_steps=5)).status_code == 200
    assert post(server, "/sdapi/v1/options", dict(options, samples_format="jpg")).status_code == 400
    assert post(server, "/sdapi/v1/options", dict(options, enable_pnginfo=False)).status_code == 400
    # override_settings holding an option unchanged, one a request may not set included, is accepted as /options is
    unchanged = dict(body, seed=1, steps=2, override_settings={"enable_pnginfo": True, "samples_format": "png"})
    assert post(server, "/sdapi/v1/txt2img", unchanged).status_code == 200

    # interrupt: the running job stops at its next step and is answered (no image finished)
    result = {}
    long_job = threading.Thread(target=lambda: result.update(r=post(server, "/sdapi/v1/txt2img", {
        "prompt": "a bag", "steps": 500, "width": 64, "height": 64})))
    long_job.start()
    deadline = time.time() + 60
    while not get(server, "/sdapi/v1/progress").json()["state"]["sampling_step"]:
        assert time.time() < deadline and long_job.is_alive(), f"the job did not start: {result}"
        time.sleep(0.05)
    started = time.time()
    assert post(server, "/sdapi/v1/interrupt").status_code == 200
    long_job.join(timeout=60)
    assert not long_job.is_alive() and time.time() - started < 30
    assert result["r"].status_code == 200 and json.loads(result["r"].json()["info"])["interrupted"] is True
    assert result["r"].json()["images"] == []


@pytest.mark.parametrize("body,status,needle", [
    ({"prompt": "x", "steps": 2, "hires": True}, 422, "unknown field 'hires'"),
    ({"prompt": "x", "steps": "many"}, 422, "steps: expected int, got str"),
    ({"prompt": "x", "steps": 2, "enable_hr": True}, 400, "enable_hr=True: not supported by trt_sdxl (accepted: False, None)"),
    ({"prompt": "x", "steps": 2, "restore_faces": True}, 400, "restore_faces=True: not supported by trt_sdxl"),
    ({"prompt": "x", "steps": 2, "sampler_name": "LMS"}, 400, "sampler_name 'LMS': not supported"),
    ({"prompt": "x", "steps": 2, "sampler_name": "Euler", "scheduler": "Karras"}, 400, "scheduler 'Karras' with"),
    ({"prompt": "x", "steps": 2, "width": 2048, "height": 64}, 400, "is outside the profiles of the unet engine"),
    ({"prompt": "x", "steps": 2, "width": 100}, 400, "multiples of 32"),
    ({"prompt": "x", "steps": 0}, 422, "steps=0: expected at least 1"),
    ({"prompt": "x", "steps": 2, "override_settings": {"sd_model_checkpoint": "other"}}, 400, "serves one model"),
    ({"prompt": "x", "steps": 2, "styles": ["cinematic"]}, 400, "no prompt styles"),
    ({"prompt": "x <lora:style:0.8>", "steps": 2}, 400, "prompt: prompt tag <lora:style:0.8>: no LoRA folder"),
    ({"prompt": "x", "steps": 2, "override_settings": {"enable_pnginfo": False}}, 400, "'enable_pnginfo' cannot be set"),
    ([1, 2], 422, "must be a JSON object"),
])
def test_bad_requests_get_a1111_json_errors(server, body, status, needle):
    r = post(server, "/sdapi/v1/txt2img", body)
    assert r.status_code == status, r.text
    error = r.json()
    assert set(error) == {"error", "detail", "body", "errors"} and needle in error["errors"], error
    assert "Traceback" not in r.text


def test_not_json_too_large_and_auth(server, generator):
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", data=b"{not json", timeout=30,
                      headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not JSON" in r.json()["errors"]
    r = post(server, "/sdapi/v1/txt2img", {"prompt": "x" * (2 << 20)})
    assert r.status_code == 413 and "at most" in r.json()["errors"]
    locked = serve_load.LiveServer(generator, queue_size=2, api_auth="alice:s3cret")
    try:
        r = requests.get(f"{locked.url}/sdapi/v1/options", timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic"
        assert requests.get(f"{locked.url}/sdapi/v1/options", auth=("alice", "wrong"), timeout=30).status_code == 401
        assert requests.get(f"{locked.url}/sdapi/v1/options", auth=("alice", "s3cret"), timeout=30).status_code == 200
    finally:
        locked.stop()
    with pytest.raises(UserError, match="--api-auth alice: expected user:password"):
        parse_auth("alice")


def test_bounded_load_test_loses_nothing(generator):
    """50 requests from 8 concurrent clients with 4 places in the queue: every request is answered or
    rejected with 503, none lost or answered twice; the run stops by itself."""
    live = serve_load.LiveServer(generator, queue_size=4)
    try:
        result = serve_load.load_test(live.url, requests=50, clients=8, steps=2, timeout_s=300)
        worker = live.app.state.worker
        assert worker.answered == result["answered"]  # every job the worker ran was answered, once
    finally:
        live.stop()
    print(f"\nload test: {result}")
    assert result["lost"] == 0 and result["answered_twice"] == 0, result
    assert result["answered"] + result["rejected"] == 50 and result["answered"] >= 5 and result["rejected"] >= 1


def test_lora_tags_refit_between_requests(refittable_folder, lora_dir, tmp_path):
    """`--lora-dir`: GET /loras lists the folder as A1111 does; `<lora:style:0.8>` (or its alias) draws what
    set_loras draws, a request without a tag what the base draws (the server refits between them), the infotext
    names the LoRA's hash, a name the folder lacks is a 400, and refresh-loras sees a new file."""
    from tiny_loras import tiny_default_lora

    folder = tmp_path / "loras"
    shutil.copytree(lora_dir, folder)
    with Generator.load(refittable_folder, device="cpu") as reference:
        base = reference.generate(PROMPT, steps=4, seed=3, weighting=True)[0]
        reference.set_loras([(folder / "style.safetensors", 0.8)])
        styled = reference.generate(PROMPT, steps=4, seed=3, weighting=True)[0]
    generator = Generator.load(refittable_folder, device="cpu", lora_dir=folder)
    live = serve_load.LiveServer(generator, queue_size=4)
    try:
        listed = get(live, "/sdapi/v1/loras").json()
        assert [(e["name"], e["alias"], Path(e["path"]).name) for e in listed] == \
            [("style", "house_style", "style.safetensors")]
        for prompt, expected in ((f"{PROMPT} <lora:style:0.8>", styled), (PROMPT, base),
                                 (f"<lora:house_style:0.8>{PROMPT}", styled)):
            r = post(live, "/sdapi/v1/txt2img", {"prompt": prompt, "seed": 3, "steps": 4, "sampler_name": "Euler",
                                                 "cfg_scale": 5})
            assert r.status_code == 200, r.text
            png = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
            np.testing.assert_array_equal(np.asarray(png.convert("RGB")), expected.rgb)
            infotext = json.loads(r.json()["info"])["infotexts"][0]
            assert infotext.startswith(prompt) and ('Lora hashes: "' in infotext) == (expected is styled), infotext
        r = post(live, "/sdapi/v1/txt2img", {"prompt": "x <lora:nothing:1>", "steps": 2})
        assert r.status_code == 400 and "no LoRA named 'nothing'" in r.json()["detail"]
        tiny_default_lora(folder / "newer.safetensors", seed=5)
        assert post(live, "/sdapi/v1/refresh-loras").status_code == 200
        assert [e["name"] for e in get(live, "/sdapi/v1/loras").json()] == ["newer", "style"]
    finally:
        live.stop()
        generator.close()


def test_serve_cli_errors_are_one_line(engines):
    for args, needle in ((["--api-auth", "bob"], "--api-auth bob: expected user:password"),
                         (["--port", "0"], "--port 0: expected 1-65535"),
                         (["--engines", "/nonexistent"], "engines folder /nonexistent not found")):
        proc = subprocess.run([sys.executable, "-m", "trt_sdxl.serve", "--cpu", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
