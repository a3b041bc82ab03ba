"""`python -m trt_sdxl.serve --engines DIR`: an AUTOMATIC1111-compatible HTTP API over one Generator.

The clients people use for image generation — the `webuiapi` Python client, SillyTavern, Open WebUI,
scripts written against A1111 — speak A1111's `/sdapi/v1/*`; this server answers them with the
engines of one folder (`--cpu`: their networks through netexec, for tiny models and tests).

- `POST /sdapi/v1/txt2img` takes A1111's request fields. Those we implement are used (prompt,
  negative_prompt, seed (-1: random), steps, cfg_scale, width, height, sampler_name / sampler_index /
  scheduler, batch_size, n_iter, send_images, override_settings of the options below); A1111's other
  fields are accepted at their default values (hires fix off, no face restoration, no subseed, ...)
  and refused by name otherwise (HTTP 400); an unknown field or a value of the wrong type is HTTP 422.
  The answer is A1111's: `images` (base64 PNGs whose `parameters` chunk is the infotext),
  `parameters` (the request as run), `info` (a JSON string: seeds, infotexts, sizes, model, ...).
  Prompts use A1111's syntax: `(word:1.2)`, `[word]`, BREAK; prompts beyond 75 tokens are encoded
  in 75-token chunks where the engines take them (build --prompt-chunks), as A1111 does; and
  `<lora:name:0.8>` (or `<lora:name:te:unet>`) applies a LoRA file of `--lora-dir` to that request: the
  engines (built --refittable) are refit between requests when the set of LoRAs changes, from cached
  weights where the set was used before. `GET /sdapi/v1/loras` lists the folder as A1111 does.
- The other endpoints clients call: options (get/set), sd-models, samplers, schedulers, upscalers,
  latent-upscale-modes, sd-vae, loras, prompt-styles, embeddings, cmd-flags, progress (no preview
  image: `current_image` is null), interrupt, skip, and `/internal/ping`.
- One Generator per process; requests wait in a bounded queue (`--queue N`; full: HTTP 503) and run
  one at a time on one worker thread; `progress` reports the running job; `interrupt` stops it at the
  next denoising step (the images finished so far are answered), `skip` ends the current batch of an
  n_iter run. Every request is answered exactly once.
- It binds 127.0.0.1 unless `--host` says otherwise; `--api-auth user:pass[,user2:pass2]` asks for
  HTTP basic authentication on every route, as A1111's `--api-auth`; request bodies are limited to
  `--max-request-bytes`.

Errors are A1111's JSON: `{"error": ..., "detail": ..., "body": ..., "errors": ...}`; never a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import math
import queue
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .errors import UserError, run_cli
from .generator import SAMPLERS, Cancelled, Generator
from .log import Log, logger
from .png import encode_png
from .version import __version__

try:  # the server's own dependencies (pip install -e .[serve]); main() says so where they are missing
    from starlette.requests import Request as HTTPRequest  # module level: FastAPI resolves handler annotations here
except ImportError:  # pragma: no cover
    HTTPRequest = None

log = logger("trt_sdxl.serve")
DEFAULT_PORT = 7860  # A1111's
MAX_REQUEST_BYTES = 1 << 20

# A1111's sampler names (1.9+: the schedule type is a separate field) -> ours, for each schedule type
# name (lower case) that selects it; "automatic" is the sampler's own default schedule.
SAMPLER_NAMES = {
    "Euler": ("euler", ("automatic", "")),
    "Euler a": ("euler_a", ("automatic", "")),
    "DDIM": ("ddim", ("automatic", "")),
    "DPM++ 2M": ("dpmpp_2m_karras", ("karras",)),
}
LEGACY_SAMPLERS = {"DPM++ 2M Karras": "dpmpp_2m_karras", "k_euler": "euler", "k_euler_a": "euler_a",
                   "k_dpmpp_2m": "dpmpp_2m_karras"}
SCHEDULERS = [("automatic", "Automatic"), ("karras", "Karras")]
OUR_SAMPLER = {"euler": ("Euler", "Automatic"), "euler_a": ("Euler a", "Automatic"),
               "ddim": ("DDIM", "Automatic"), "dpmpp_2m_karras": ("DPM++ 2M", "Karras")}

# txt2img fields we use: name -> (default, accepted types)
USED = {
    "prompt": ("", (str,)), "negative_prompt": ("", (str,)), "seed": (-1, (int,)), "steps": (50, (int,)),
    "cfg_scale": (7.0, (int, float)), "width": (None, (int,)), "height": (None, (int,)),
    "sampler_name": (None, (str,)), "sampler_index": ("Euler", (str,)), "scheduler": (None, (str,)),
    "batch_size": (1, (int,)), "n_iter": (1, (int,)), "send_images": (True, (bool,)),
    "save_images": (False, (bool,)), "override_settings": (None, (dict,)),
    "override_settings_restore_afterwards": (True, (bool,)), "force_task_id": (None, (str,)),
    "styles": (None, (list,)), "infotext": (None, (str,)),
}
# A1111 fields of features we do not have: accepted at these values (their defaults, or what means
# "off"), refused with HTTP 400 otherwise.
INERT = {
    "subseed": (-1,), "subseed_strength": (0, 0.0), "seed_resize_from_h": (-1, 0), "seed_resize_from_w": (-1, 0),
    "restore_faces": (None, False), "tiling": (None, False), "do_not_save_samples": (False, True),
    "do_not_save_grid": (False, True), "eta": None,  # checked against the sampler below
    "denoising_strength": None,  # only read by hires fix
    "s_min_uncond": (None, 0, 0.0), "s_churn": (None, 0, 0.0), "s_tmax": None, "s_tmin": None, "s_noise": None,
    "refiner_checkpoint": (None, "", "None"), "refiner_switch_at": None, "disable_extra_networks": (False, True),
    "firstpass_image": (None, ""), "comments": None, "enable_hr": (False, None), "firstphase_width": (0, None),
    "firstphase_height": (0, None), "hr_scale": None, "hr_upscaler": None, "hr_second_pass_steps": None,
    "hr_resize_x": None, "hr_resize_y": None, "hr_checkpoint_name": None, "hr_sampler_name": None,
    "hr_scheduler": None, "hr_prompt": None, "hr_negative_prompt": None, "hr_cfg": None,
    "hr_distilled_cfg": None, "hr_additional_modules": None, "script_name": (None, ""), "script_args": ([], None),
    "alwayson_scripts": ({}, None), "distilled_cfg_scale": None,
}
# None above: any value is accepted, because it has no effect without the feature it belongs to.
# Fields some clients send that A1111 ignores (its request model drops unknown keys): SillyTavern passes
# its own `url` and `auth` through and adds SD.Next's `clip_skip` and Forge's `hr_additional_modules`.
CLIENT_EXTRAS = {"url", "auth", "clip_skip", "hr_additional_modules"}
OPTIONS_DEFAULTS = {
    "samples_format": "png", "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "eta_noise_seed_delta": 0,
    "sd_checkpoint_hash": "", "samples_save": False, "grid_save": False, "enable_pnginfo": True,
    "live_previews_enable": False, "show_progress_every_n_steps": 10, "sd_vae_checkpoint_cache": 0,
    "sd_checkpoints_limit": 1, "sd_model_refiner": "None", "token_merging_ratio": 0.0,
    "emphasis": "Original", "randn_source": "GPU", "sdxl_crop_top": 0, "sdxl_crop_left": 0,
}
# options a request may change (override_settings) or POST /options may set, and how
SETTABLE = {"sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "samples_format", "eta_noise_seed_delta",
            "samples_save", "grid_save", "live_previews_enable", "show_progress_every_n_steps", "emphasis",
            "randn_source", "sd_vae_checkpoint_cache", "sd_checkpoints_limit", "token_merging_ratio"}


class RequestError(Exception):
    """A request we answer with an HTTP error: `status`, and one line naming the field."""

    def __init__(self, status: int, message: str, error: str = "HTTPException"):
        super().__init__(message)
        self.status, self.message, self.error = status, message, error


def a1111_error(status: int, message: str, error: str = "HTTPException"):
    """A1111's error JSON (its API middleware's handle_exception)."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": error, "detail": message, "body": "", "errors": message}, status_code=status)


# ---------------------------------------------------------------- requests


@dataclass
class Request:
    """A txt2img request, checked: what the Generator is called with, and A1111's fields as run."""

    prompt: str
    negative: str
    seed: int
    steps: int
    cfg: float
    width: int
    height: int
    scheduler: str
    batch: int
    n_iter: int
    send_images: bool
    fields: dict


def parse_txt2img(body, generator: Generator, options: dict) -> Request:
    """A1111's txt2img JSON -> Request; RequestError (422 unknown field / wrong type, 400 a value we do not
    run) naming the field."""
    if not isinstance(body, dict):
        raise RequestError(422, "the request body must be a JSON object of txt2img fields", "ValidationError")
    body = {k: v for k, v in body.items() if k not in CLIENT_EXTRAS}
    unknown = sorted(set(body) - set(USED) - set(INERT))
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r}: not a txt2img field of A1111's API"
                           + (f" (also: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""), "ValidationError")
    fields = {name: default for name, (default, _) in USED.items()}
    for name, value in body.items():
        if name in USED:
            types = USED[name][1]
            ok = value is None or (isinstance(value, types) and not (isinstance(value, bool) and bool not in types))
            if not ok:
                expected = " or ".join(t.__name__ for t in types)
                raise RequestError(422, f"{name}: expected {expected}, got {type(value).__name__} {value!r}",
                                   "ValidationError")
            fields[name] = USED[name][0] if value is None else value
        else:
            accepted = INERT[name]
            if accepted is not None and value not in accepted:
                raise RequestError(400, f"{name}={value!r}: not supported by trt_sdxl (accepted: "
                                   f"{', '.join(repr(a) for a in accepted)})")
            fields[name] = value
    if fields["styles"]:
        raise RequestError(400, f"styles={fields['styles']!r}: this server has no prompt styles (GET "
                           "/sdapi/v1/prompt-styles lists none)")
    overrides = fields["override_settings"] or {}
    check_options(overrides, generator, "override_settings", current=options)
    try:
        generator.check_prompt_loras(fields["prompt"])
    except UserError as e:
        raise RequestError(400, f"prompt: {e}") from None
    scheduler = sampler_of(fields["sampler_name"] or fields["sampler_index"], fields["scheduler"])
    eta = fields.get("eta")  # A1111: DDIM's eta, or the ancestral samplers' noise multiplier
    fixed_eta = {"ddim": 0.0, "euler_a": 1.0}.get(scheduler)
    if eta is not None and fixed_eta is not None and eta != fixed_eta:
        raise RequestError(400, f"eta={eta!r}: {OUR_SAMPLER[scheduler][0]} runs with eta {fixed_eta:g} here")
    for name, low in (("steps", 1), ("batch_size", 1), ("n_iter", 1)):
        if fields[name] < low:
            raise RequestError(422, f"{name}={fields[name]}: expected at least {low}", "ValidationError")
    if not math.isfinite(fields["cfg_scale"]) or fields["cfg_scale"] < 0:
        raise RequestError(422, f"cfg_scale={fields['cfg_scale']}: expected a number >= 0", "ValidationError")
    seed = fields["seed"]
    if seed is None or seed < 0:
        seed = secrets.randbits(32)
    if seed >= 2**64 - 2**16:
        raise RequestError(422, f"seed={seed}: expected -1 or an integer below 2^64 - 2^16", "ValidationError")
    width, height = fields["width"] or generator.width, fields["height"] or generator.height
    try:
        generator.check(fields["batch_size"], height, width)
    except UserError as e:
        raise RequestError(400, f"width {width}, height {height}, batch_size {fields['batch_size']}: {e}") from None
    ran = {"seed": seed, "width": width, "height": height, "sampler_name": OUR_SAMPLER[scheduler][0],
           "scheduler": OUR_SAMPLER[scheduler][1]}
    fields.update({k: v for k, v in ran.items() if k != "seed"})  # A1111 echoes the seed asked for (-1)
    return Request(fields["prompt"], fields["negative_prompt"], ran["seed"], fields["steps"], float(fields["cfg_scale"]),
                   width, height, scheduler, fields["batch_size"], fields["n_iter"], fields["send_images"], fields)


def sampler_of(name: str, schedule: str | None) -> str:
    """Our scheduler for A1111's sampler name and schedule type (None/"Automatic": the sampler's own)."""
    if name in LEGACY_SAMPLERS and not schedule:
        return LEGACY_SAMPLERS[name]
    kind = (schedule or "automatic").lower()
    found = SAMPLER_NAMES.get(name)
    if found is None and name in LEGACY_SAMPLERS:
        found = (LEGACY_SAMPLERS[name], ("automatic", "", "karras"))
    if found is None:
        raise RequestError(400, f"sampler_name {name!r}: not supported; expected one of "
                           f"{', '.join(SAMPLER_NAMES)} (GET /sdapi/v1/samplers)")
    ours, schedules = found
    if kind not in schedules:
        raise RequestError(400, f"scheduler {schedule!r} with sampler {name!r}: not supported; {name} runs with "
                           f"scheduler {' or '.join(s.title() for s in schedules if s) or 'Automatic'}")
    return ours


def check_options(values, generator: Generator, where: str, current: dict | None = None) -> None:
    """The options a client may set: one model (the one loaded), one VAE; the rest are recorded. An option
    sent back unchanged is fine whatever it is (Open WebUI posts the whole options dict back)."""
    if not isinstance(values, dict):
        raise RequestError(422, f"{where}: expected a JSON object of options", "ValidationError")
    for key, value in values.items():
        if current is not None and key in current and current[key] == value:
            continue
        if key not in SETTABLE:
            raise RequestError(400, f"{where}: option {key!r} cannot be set on this server (settable: "
                               f"{', '.join(sorted(SETTABLE))})")
        if key == "sd_model_checkpoint" and value not in model_titles(generator):
            raise RequestError(400, f"{where}: sd_model_checkpoint {value!r}: this server serves one model, "
                               f"{model_titles(generator)[0]!r} (GET /sdapi/v1/sd-models)")
        if key == "sd_vae" and value not in ("Automatic", "None", None):
            raise RequestError(400, f"{where}: sd_vae {value!r}: the engines hold their VAE; expected 'Automatic'")
        if key == "samples_format" and value != "png":
            raise RequestError(400, f"{where}: samples_format {value!r}: this server answers PNGs (their parameters "
                               "chunk carries the infotext)")
        if key == "CLIP_stop_at_last_layers" and value not in (1, 2):
            raise RequestError(400, f"{where}: CLIP_stop_at_last_layers {value!r}: SDXL reads the penultimate "
                               "layer; expected 1 or 2 (both mean that for SDXL)")


def model_titles(generator: Generator) -> list[str]:
    """A1111's checkpoint title 'name [hash]', and the bare name, of the one model."""
    name, short = generator.model_name, generator.model_hash
    return [f"{name} [{short}]", name, f"{name}.safetensors", f"{name}.safetensors [{short}]"]


# ---------------------------------------------------------------- jobs


@dataclass
class Job:
    request: Request
    task_id: str
    future: object = None  # asyncio.Future of the handler awaiting the answer
    loop: object = None
    images: list = field(default_factory=list)
    iteration: int = 0
    step: int = 0
    step_ms: list = field(default_factory=list)
    started: float | None = None
    interrupted: bool = False
    skipped: bool = False
    stop: threading.Event = field(default_factory=threading.Event)  # interrupt: the whole job
    skip: threading.Event = field(default_factory=threading.Event)  # skip: the current n_iter batch
    timestamp: str = field(default_factory=lambda: datetime.now().strftime("%Y%m%d%H%M%S"))


class Worker:
    """One thread running queued jobs on the Generator, one at a time; `submit` refuses (queue.Full)
    when `size` jobs already wait. Each job is answered exactly once, through its future."""

    def __init__(self, generator: Generator, size: int, log: Log = log):
        self.generator, self.log = generator, log
        self.jobs: queue.Queue = queue.Queue(maxsize=size)
        self.current: Job | None = None
        self.answered = 0
        self.thread = threading.Thread(target=self._run, name="trt_sdxl.serve worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put_nowait(job)

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.current = job
            try:
                result, error = self._execute(job), None
            except UserError as e:
                result, error = None, RequestError(400, str(e))
            except Exception as e:  # noqa: BLE001 - answered as A1111 answers it, logged in one line
                self.log(f"job {job.task_id}: {type(e).__name__}: {e}")
                result, error = None, RequestError(500, f"{type(e).__name__}: {e}", type(e).__name__)
            finally:
                self.current = None
            self.answered += 1
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)

    def _execute(self, job: Job) -> list:
        r = job.request
        job.started = time.perf_counter()
        for iteration in range(r.n_iter):
            job.iteration, job.step = iteration, 0
            if job.stop.is_set():
                break
            job.skip.clear()

            def on_step(index: int, steps: int, ms: float) -> None:
                job.step = index + 1
                job.step_ms.append(ms)

            try:
                images = self.generator.generate(
                    r.prompt, r.negative or None, steps=r.steps, cfg=r.cfg, seed=r.seed + iteration * r.batch,
                    scheduler=r.scheduler, batch=r.batch, height=r.height, width=r.width, on_step=on_step,
                    cancel=lambda: job.stop.is_set() or job.skip.is_set(), weighting=True,
                    long_prompts=(self.generator.max_chunks or 2) > 1)
            except Cancelled:
                job.interrupted = job.stop.is_set()
                job.skipped = not job.interrupted
                continue
            job.images.extend(images)
        return job.images


def _settle(future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# ---------------------------------------------------------------- the answer


def txt2img_answer(request: Request, images: list, generator: Generator, job: Job) -> dict:
    """A1111's TextToImageResponse: images (base64 PNG), parameters (the request as run), info (JSON)."""
    r = request
    seeds = [image.seed for image in images] or [r.seed]
    info = {
        "prompt": r.prompt, "all_prompts": [r.prompt] * len(images), "negative_prompt": r.negative,
        "all_negative_prompts": [r.negative] * len(images), "seed": r.seed, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * len(images), "subseed_strength": 0,
        "width": r.width, "height": r.height, "sampler_name": r.fields["sampler_name"], "cfg_scale": r.cfg,
        "steps": r.steps, "batch_size": r.batch, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": generator.model_name, "sd_model_hash": generator.model_hash, "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None,
        "extra_generation_params": {"Schedule type": r.fields["scheduler"]}, "index_of_first_image": 0,
        "infotexts": [image.infotext for image in images], "styles": [], "job_timestamp": job.timestamp,
        "clip_skip": 1, "is_using_inpainting_conditioning": False, "version": f"trt_sdxl {__version__}",
        "interrupted": job.interrupted, "skipped": job.skipped,
    }
    pngs = [base64.b64encode(encode_png(image.rgb, {"parameters": image.infotext})).decode("ascii")
            for image in images] if r.send_images else []
    return {"images": pngs, "parameters": r.fields, "info": json.dumps(info)}


# ---------------------------------------------------------------- the app


def create_app(generator: Generator, queue_size: int = 8, api_auth: str | None = None,
               max_request_bytes: int = MAX_REQUEST_BYTES, log: Log = log):
    """The FastAPI app over `generator`; `app.state.worker` runs its jobs (stop it with `.stop()`)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from contextlib import asynccontextmanager

    users = parse_auth(api_auth)
    worker = Worker(generator, queue_size, log)

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    app = FastAPI(title="trt_sdxl (AUTOMATIC1111-compatible API)", version=__version__, lifespan=lifespan)
    app.state.worker = worker
    options = dict(OPTIONS_DEFAULTS, sd_model_checkpoint=model_titles(generator)[0],
                   sd_checkpoint_hash=generator.model_hash)
    lock = threading.Lock()

    @app.middleware("http")
    async def guard(request: HTTPRequest, call_next):
        if users and not authorized(request.headers.get("authorization"), users):
            from fastapi.responses import JSONResponse

            return JSONResponse({"detail": "Incorrect username or password"}, status_code=401,
                                headers={"WWW-Authenticate": "Basic"})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_request_bytes):
            return a1111_error(413, f"request body of {length} bytes: at most {max_request_bytes} are accepted")
        try:
            return await call_next(request)
        except RequestError as e:  # raised below the handlers
            return a1111_error(e.status, e.message, e.error)

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return a1111_error(e.status, e.message, e.error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return a1111_error(422, f"{where}: {first.get('msg', 'invalid request')}", "ValidationError")

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return a1111_error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def any_error(request, e: Exception):
        log(f"{request.url.path}: {type(e).__name__}: {e}")
        return a1111_error(500, f"{type(e).__name__}: {e}", type(e).__name__)

    async def json_body(request: HTTPRequest, limit: int = max_request_bytes):
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise RequestError(413, f"request body over {limit} bytes")
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(422, f"the request body is not JSON ({e})", "ValidationError") from None

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: HTTPRequest):
        body = await json_body(request)
        with lock:
            parsed = parse_txt2img(body, generator, options)
        loop = asyncio.get_running_loop()
        job = Job(parsed, parsed.fields.get("force_task_id") or secrets.token_hex(8), loop.create_future(), loop)
        try:
            worker.submit(job)
        except queue.Full:
            raise RequestError(503, f"the queue is full ({worker.jobs.maxsize} requests wait): try again later",
                               "QueueFull") from None
        images = await job.future
        return txt2img_answer(parsed, images, generator, job)

    @app.get("/sdapi/v1/options")
    def get_options():
        with lock:
            return dict(options)

    @app.post("/sdapi/v1/options")
    async def set_options(request: HTTPRequest):
        body = await json_body(request)
        with lock:
            check_options(body, generator, "options", options)
            options.update(body)
        return None

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        title = model_titles(generator)[0]
        return [{"title": title, "model_name": generator.model_name, "hash": generator.model_hash,
                 "sha256": None, "filename": generator.model_name, "config": None}]

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return [{"name": name, "aliases": [ours], "options": {"scheduler": schedules[0]} if schedules[0] else {}}
                for name, (ours, schedules) in SAMPLER_NAMES.items()]

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return [{"name": name, "label": label, "aliases": None, "default_rho": None, "need_inner_model": False}
                for name, label in SCHEDULERS]

    @app.get("/sdapi/v1/upscalers")
    def upscalers():
        return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes():
        return []

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae():
        return []

    @app.get("/sdapi/v1/loras")
    def loras():
        folder = generator.lora_folder
        return [] if folder is None else [dict(e) for e in folder.entries]

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras():
        if generator.lora_folder is not None:
            generator.lora_folder.refresh()
        return None

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        return None

    @app.get("/sdapi/v1/prompt-styles")
    def prompt_styles():
        return []

    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        return {"loaded": {}, "skipped": {}}

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags():
        return {"api": True, "nowebui": True, "listen": False, "api_auth": None, "ckpt_dir": None}

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        job = worker.current
        state = {"skipped": False, "interrupted": False, "job": "", "job_count": worker.waiting, "job_timestamp": "0",
                 "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
                    "current_task": None}
        r = job.request
        done = (job.iteration + job.step / r.steps) / r.n_iter
        per_step = sum(job.step_ms[-5:]) / max(1, len(job.step_ms[-5:])) / 1000 if job.step_ms else 0.0
        left = per_step * (r.n_iter * r.steps - job.iteration * r.steps - job.step)
        state.update({"skipped": job.skip.is_set(), "interrupted": job.stop.is_set(), "job": f"Batch {job.iteration + 1} "
                      f"out of {r.n_iter}", "job_count": r.n_iter + worker.waiting, "job_timestamp": job.timestamp,
                      "job_no": job.iteration, "sampling_step": job.step, "sampling_steps": r.steps})
        return {"progress": round(done, 4), "eta_relative": round(left, 2), "state": state, "current_image": None,
                "textinfo": None, "current_task": job.task_id}

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        job = worker.current
        if job is not None:
            job.stop.set()
        return {}  # A1111's answer

    @app.post("/sdapi/v1/skip")
    def skip():
        job = worker.current
        if job is not None:
            job.skip.set()
        return None

    @app.get("/internal/ping")
    def ping():
        return {}

    return app


def parse_auth(value: str | None) -> dict[str, str]:
    """`user:pass[,user2:pass2]` (A1111's --api-auth) -> {user: password}."""
    if not value:
        return {}
    users = {}
    for pair in value.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user or not password:
            raise UserError(f"--api-auth {value}: expected user:password[,user2:password2]")
        users[user] = password
    return users


def authorized(header: str | None, users: dict[str, str]) -> bool:
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    expected = users.get(user)
    return expected is not None and secrets.compare_digest(expected.encode(), password.encode())


# ---------------------------------------------------------------- the command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trt_sdxl.serve", description=__doc__.split("\n")[0])
    p.add_argument("--engines", default="engines", help="engines folder (default ./engines)")
    p.add_argument("--cpu", action="store_true", help="run the engines' networks with netexec on the CPU (tiny models)")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="LoRA files for <lora:name:weight> prompt tags (engines built --refittable; A1111's --lora-dir)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}, as A1111)")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS",
                   help="HTTP basic authentication for every route, user:pass[,user2:pass2] (as A1111's --api-auth)")
    p.add_argument("--queue", type=int, default=8, metavar="N",
                   help="requests that may wait while one runs (default 8); more are answered 503")
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES, metavar="N",
                   help=f"largest request body accepted (default {MAX_REQUEST_BYTES})")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def work():
        try:
            import fastapi  # noqa: F401
            import uvicorn
        except ImportError:
            raise UserError("the server needs FastAPI and uvicorn: pip install -e .[serve]") from None
        if args.queue < 1 or args.max_request_bytes < 1024:
            raise UserError("--queue: expected at least 1; --max-request-bytes: at least 1024")
        parse_auth(args.api_auth)
        if not 0 < args.port < 65536:
            raise UserError(f"--port {args.port}: expected 1-65535")
        generator = Generator.load(args.engines, device="cpu" if args.cpu else "gpu", log=log, lora_dir=args.lora_dir)
        app = create_app(generator, args.queue, args.api_auth, args.max_request_bytes)
        log(f"serving {Path(args.engines)} ({generator.where}) on http://{args.host}:{args.port}/sdapi/v1 "
            f"(queue {args.queue}" + (", basic auth" if args.api_auth else "") + ")")
        try:
            uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        finally:
            generator.close()

    return run_cli("trt_sdxl.serve", work, "server stopped")


if __name__ == "__main__":
    sys.exit(main())
