"""`python -m trt_sdxl.export triton`: the model repository it writes for the tiny default's engines
(each config.pbtxt read back by a protobuf-text reader of its own, against the manifest), every
bad argument as one line, nothing half-written; the `sdxl` model's request handling through a
stand-in for Triton's `triton_python_backend_utils`; and (slow) a real Triton server on 127.0.0.1
serving the CPU export, whose answers must be the CLI's PNGs bit for bit.

The server is the `tritonserver` that nvidia-pytriton bundles, run standalone as pytriton runs it
(pytriton/triton.py, pytriton/server/triton_server.py): the Python backend's stub for this Python
version copied into a backend folder, the stub's Python found through PATH (its embedded
interpreter ignores PYTHONPATH), the bundled libraries on LD_LIBRARY_PATH. pytriton 0.7.0 bundles
Triton 2.51 (r24.10), whose stub was built with pybind11 2.10, before python_backend moved to
pybind11 2.12 (commit 09c3537, 2024-11-01): under numpy 2 it reads every tensor with stride 0
(F32 [5.0, 1.5] arrives as [5.0, 5.0], a string input kills the stub). So under numpy 2 the stub's
Python is a venv made here that puts numpy 1.26.4 and ml_dtypes 0.5.4 (build/triton-numpy1) before
this environment's packages; the CLI reference runs in that same Python.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from trt_sdxl import backend, export
from trt_sdxl.components import COMPONENTS, DEFAULT_MODEL
from trt_sdxl.files import current_umask
from trt_sdxl.generator import Generator
from trt_sdxl.png import read_png_text
from trt_sdxl.runtime.manifest import EnginesFolder
from trt_sdxl.triton import serving

ROOT = Path(__file__).resolve().parent.parent
NUMPY1 = ROOT / "build" / "triton-numpy1"
NUMPY1_INSTALL = f"pip install --no-deps --target {NUMPY1.relative_to(ROOT)} numpy==1.26.4 ml_dtypes==0.5.4"
PROMPT = "a photo of a sneaker"


# ---------------------------------------------------------------- a reader of protobuf text format

TOKEN = re.compile(r'\s+|#[^\n]*|(?P<string>"(?:[^"\\]|\\.)*")|(?P<number>-?\d+(?:\.\d+)?)|(?P<word>[A-Za-z_]\w*)'
                   r'|(?P<mark>[{}\[\]:,;])')


def read_pbtxt(text: str) -> dict:
    """config.pbtxt as {field: [values]} (every field a list; messages are dicts, enums strings)."""
    tokens = []
    for m in TOKEN.finditer(text):
        kind = m.lastgroup
        if kind:
            tokens.append((kind, m.group(kind)))
    assert sum(len(m.group(0)) for m in TOKEN.finditer(text)) == len(text), "text the reader cannot tokenize"
    pos = 0

    def take(expected=None):
        nonlocal pos
        kind, value = tokens[pos]
        assert expected is None or value == expected, f"expected {expected!r} at token {pos}, got {value!r}"
        pos += 1
        return kind, value

    def value():
        kind, token = take()
        if token == "{":
            return message("}")
        if token == "[":
            items = []
            while tokens[pos][1] != "]":
                items.append(value())
                if tokens[pos][1] == ",":
                    take(",")
            take("]")
            return items
        if kind == "string":
            return json.loads(token)
        if kind == "number":
            return float(token) if "." in token else int(token)
        return {"true": True, "false": False}.get(token, token)

    def message(end):
        fields: dict = {}
        while pos < len(tokens) and tokens[pos][1] != end:
            _, name = take()
            if tokens[pos][1] == ":":
                take(":")
            got = value()
            fields.setdefault(name, []).extend(got if isinstance(got, list) else [got])
            if pos < len(tokens) and tokens[pos][1] in ",;":  # text format's optional field separators
                take()
        if end:
            take(end)
        return fields

    return message(None)


def test_the_reader_reads_what_it_should():
    got = read_pbtxt('# c\nname: "a\\"b"\ndims: [ -1, 3 ]\ng [ { kind: KIND_GPU, count: 1 } ]\nd { x: 2.5 }\n'
                     'o: true\n')
    assert got == {"name": ['a"b'], "dims": [-1, 3], "g": [{"kind": ["KIND_GPU"], "count": [1]}],
                   "d": [{"x": [2.5]}], "o": [True]}


# ---------------------------------------------------------------- engines folders


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Path:
    """The tiny default's four engines, as `python -m trt_sdxl.build --out DIR` writes them (SM89 ahead
    of time: no GPU needed)."""
    from trt_sdxl import build

    be = backend.get()
    if "SM89" not in be.aot_targets:
        pytest.skip(f"{be.name} {be.version} cannot build ahead of time")
    out = tmp_path_factory.mktemp("export") / "engines"
    build.build(DEFAULT_MODEL, out, target="SM89")
    return out


def edited_copy(engines: Path, folder: Path, edit=None) -> Path:
    """A copy of the engines folder whose manifest `edit(manifest)` changed."""
    shutil.copytree(engines, folder)
    if edit is not None:
        path = folder / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))
    return folder


def as_nvidia_tensorrt(manifest: dict) -> None:
    """Relabel the engines as NVIDIA TensorRT's (the export reads the label; Triton would read the plans)."""
    for entry in manifest["engines"].values():
        entry["backend"], entry["backend_version"] = "tensorrt", "10.13.0.35"
    manifest["backend"], manifest["backend_version"] = "tensorrt", "10.13.0.35"


def run_export(capsys, argv) -> tuple[int, list[str]]:
    code = export.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()


def sdxl_config(repo: Path) -> dict:
    return read_pbtxt((repo / "sdxl" / "config.pbtxt").read_text())


def parameters(config: dict) -> dict:
    return {p["key"][0]: p["value"][0]["string_value"][0] for p in config["parameters"]}


TRITON = {"half": "TYPE_FP16", "float": "TYPE_FP32", "int32": "TYPE_INT32"}  # what the tiny engines use


def test_gpu_repository_has_a_tensorrt_plan_model_per_engine(engines, tmp_path, capsys):
    folder = edited_copy(engines, tmp_path / "engines", as_nvidia_tensorrt)
    repo = tmp_path / "repo"
    code, err = run_export(capsys, ["triton", "--engines", folder, "--out", repo])
    assert code == 0, err
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(p.name for p in repo.iterdir()) == sorted([*COMPONENTS, "sdxl"])
    for component in COMPONENTS:
        entry = manifest["engines"][component]
        config = read_pbtxt((repo / component / "config.pbtxt").read_text())
        assert config["name"] == [component] and config["platform"] == ["tensorrt_plan"]
        assert config["max_batch_size"] == [0] and "dynamic_batching" not in config
        assert config["instance_group"] == [{"kind": ["KIND_GPU"], "count": [1]}]
        for key, specs in (("input", entry["inputs"]), ("output", entry["outputs"])):
            got = [(t["name"][0], t["data_type"][0], t["dims"]) for t in config[key]]
            want = [(s["name"], TRITON[s["dtype"]], s["shape"]) for s in specs]
            assert got == want, f"{component} {key}s: {got} != the manifest's {want}"
        plan = repo / component / "1" / "model.plan"
        assert plan.read_bytes() == (folder / entry["file"]).read_bytes()
        copy = repo / "sdxl" / "1" / "engines" / entry["file"]
        assert os.path.samefile(plan, copy), f"{copy} is not a hard link to {plan}"
    config = sdxl_config(repo)
    assert config["backend"] == ["python"] and config["max_batch_size"] == [0]
    assert config["instance_group"] == [{"kind": ["KIND_GPU"], "count": [1], "gpus": [0]}]
    assert config["dynamic_batching"] == [{"max_queue_delay_microseconds": [export.MAX_QUEUE_DELAY_US]}]
    assert parameters(config)["device"] == "gpu"


def test_sdxl_model_config(engines, tmp_path, capsys):
    repo = tmp_path / "repo"
    code, err = run_export(capsys, ["triton", "--engines", engines, "--out", repo, "--device", "cpu"])
    assert code == 0, err
    config = sdxl_config(repo)
    assert [(t["name"][0], t["data_type"][0], t["dims"], t.get("optional", [False])[0]) for t in config["input"]] == [
        ("PROMPT", "TYPE_STRING", [1], False), ("NEGATIVE_PROMPT", "TYPE_STRING", [1], True),
        ("SEED", "TYPE_INT64", [1], True), ("STEPS", "TYPE_INT32", [1], True), ("CFG", "TYPE_FP32", [1], True),
        ("SCHEDULER", "TYPE_STRING", [1], True), ("WIDTH", "TYPE_INT32", [1], True),
        ("HEIGHT", "TYPE_INT32", [1], True), ("BATCH", "TYPE_INT32", [1], True),
        ("LONG_PROMPTS", "TYPE_BOOL", [1], True), ("WEIGHTING", "TYPE_BOOL", [1], True)]
    assert [(t["name"][0], t["data_type"][0], t["dims"]) for t in config["output"]] == [
        ("IMAGE", "TYPE_UINT8", [-1, -1, -1, 3]), ("INFOTEXT", "TYPE_STRING", [-1])]
    assert config["instance_group"] == [{"kind": ["KIND_CPU"], "count": [1]}]
    params = parameters(config)
    assert params["device"] == "cpu" and Path(params["trt_sdxl_path"]) == ROOT
    copy = EnginesFolder(repo / "sdxl" / params["engines"])
    assert copy.manifest == EnginesFolder(engines).manifest
    assert (repo / "sdxl" / "1" / "model.py").read_text() == export.MODEL_SOURCE.read_text()
    assert not list(copy.folder.glob("*.plan")), "the CPU export copied engine files it does not run"
    assert sorted(p.name for p in repo.iterdir()) == ["sdxl"]


def test_tensorrt_rtx_engines_get_no_plan_models(engines, tmp_path, capsys):
    repo = tmp_path / "repo"
    code, err = run_export(capsys, ["triton", "--engines", engines, "--out", repo])
    assert code == 0, err
    assert sorted(p.name for p in repo.iterdir()) == ["sdxl"]
    assert any("no tensorrt_plan models" in line and "tensorrt_rtx" in line for line in err), err
    for entry in EnginesFolder(engines).engines.values():
        assert (repo / "sdxl" / "1" / "engines" / entry["file"]).read_bytes() == (engines / entry["file"]).read_bytes()


def test_an_empty_out_folder_becomes_the_repository(engines, tmp_path, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    code, err = run_export(capsys, ["triton", "--engines", engines, "--out", repo, "--device", "cpu"])
    assert code == 0, err
    assert (repo / "sdxl" / "config.pbtxt").is_file()
    assert oct(repo.stat().st_mode & 0o777) == oct(0o777 & ~current_umask()), "not a plain folder's mode"


def no_weights(manifest):
    manifest["model_weights"] = False


def fp8_input(manifest):
    as_nvidia_tensorrt(manifest)
    manifest["engines"]["unet"]["inputs"][0]["dtype"] = "fp8"


@pytest.mark.parametrize("case,argv,message", [
    ("missing", ["--engines", "{tmp}/nowhere"], "engines folder {tmp}/nowhere not found"),
    ("no manifest", ["--engines", "{tmp}/empty"], "{tmp}/empty/manifest.json not found"),
    ("out not empty", ["--out", "{tmp}/full"], "--out {tmp}/full: exists and is not empty"),
    ("out is a file", ["--out", "{tmp}/file.txt"], "--out {tmp}/file.txt: is a file"),
    ("out's folder missing", ["--out", "{tmp}/missing/repo"], "folder {tmp}/missing does not exist"),
    ("out inside engines", ["--out", "{engines}/repo"], "is inside the engines folder"),
    ("engine file missing", ["--engines", "{tmp}/noplan"], "the unet engine listed in the manifest is missing"),
    ("cpu without weights", ["--engines", "{tmp}/noweights", "--device", "cpu"], "weights were not copied"),
    ("a type Triton lacks", ["--engines", "{tmp}/fp8"], "is fp8, which Triton has no data type for"),
])
def test_mistakes_are_one_line_and_write_nothing(engines, tmp_path, capsys, case, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("")
    if case == "engine file missing":
        (edited_copy(engines, tmp_path / "noplan") / EnginesFolder(engines).engines["unet"]["file"]).unlink()
    if case == "cpu without weights":
        edited_copy(engines, tmp_path / "noweights", no_weights)
    if case == "a type Triton lacks":
        edited_copy(engines, tmp_path / "fp8", fp8_input)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = {"--engines": str(engines), "--out": str(tmp_path / "repo")}
    args.update(dict(zip(argv[::2], argv[1::2])))
    argv = [part.format(tmp=tmp_path, engines=engines) for kv in args.items() for part in kv]
    code, err = run_export(capsys, ["triton", *argv])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("trt_sdxl.export: error: ") and message.format(tmp=tmp_path) in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "the failed export left something behind"
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (engines / "repo").exists()


def test_an_engine_file_missing_is_fine_for_the_cpu(engines, tmp_path, capsys):
    folder = edited_copy(engines, tmp_path / "noplan")
    (folder / EnginesFolder(engines).engines["unet"]["file"]).unlink()
    code, err = run_export(capsys, ["triton", "--engines", folder, "--out", tmp_path / "repo", "--device", "cpu"])
    assert code == 0, err


@pytest.mark.parametrize("failure,code,message", [
    (OSError(28, "No space left on device"), 2,
     r"trt_sdxl\.export: error: --out {out}: cannot write the repository \(No space left on device\); "
     "nothing was written"),
    (KeyboardInterrupt(), 130, r"trt_sdxl\.export: interrupted; nothing was written"),
])
def test_a_failed_write_leaves_nothing(engines, tmp_path, capsys, monkeypatch, failure, code, message):
    """The repository is assembled in a hidden folder next to --out: a failure half-way (here: the
    fourth file copied, in the engines folder's copy, after the configs and the model source) leaves
    neither."""
    copyfile, calls = shutil.copyfile, []

    def fail_on_the_fourth(*args, **kwargs):
        calls.append(args)
        if len(calls) == 4:
            raise failure
        return copyfile(*args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", fail_on_the_fourth)
    out = tmp_path / "repo"
    got, err = run_export(capsys, ["triton", "--engines", engines, "--out", out, "--device", "cpu"])
    assert got == code and re.fullmatch(message.format(out=re.escape(str(out))), err[-1]), err
    assert len(calls) == 4 and list(tmp_path.iterdir()) == [], "the failed export left something behind"


# ---------------------------------------------------------------- the sdxl model's requests


class StandIn:
    """The parts of Triton's `triton_python_backend_utils` the sdxl model uses."""

    class Tensor:
        def __init__(self, name: str, array: np.ndarray):
            self.tensor_name, self.array = name, array

        def as_numpy(self) -> np.ndarray:
            return self.array

    class TritonError:
        CANCELLED = "CANCELLED"

        def __init__(self, message: str, code=None):
            self.message, self.code = message, code

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.outputs = {t.tensor_name: t.array for t in output_tensors}
            self.error = error

    class Logger:
        lines: list[str] = []

        @classmethod
        def log_info(cls, message: str) -> None:
            cls.lines.append(message)

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.tensors.get(name)


class Request:
    DTYPES = {"TYPE_STRING": np.object_, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_FP32": np.float32,
              "TYPE_BOOL": np.bool_}

    def __init__(self, cancelled: bool = False, **values):
        fields = {f.name: f for f in serving.INPUTS}
        self.tensors = {name: StandIn.Tensor(name, np.array([v], self.DTYPES[fields[name].data_type]))
                        for name, v in values.items()}
        self.cancelled = cancelled

    def is_cancelled(self) -> bool:
        return self.cancelled


@pytest.fixture(scope="module")
def cpu_repo(engines, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo") / "repo"
    export.export_triton(engines, repo, "cpu")
    return repo


@pytest.fixture(scope="module")
def sdxl_model(cpu_repo):
    engines = cpu_repo / "sdxl" / parameters(sdxl_config(cpu_repo))["engines"]
    model = serving.SDXLModel.load(engines, "cpu", "0", StandIn)
    yield model
    model.close()


def infotext_fields(text: str) -> dict[str, str]:
    """The `key: value` pairs of A1111's parameters text (its last line)."""
    return dict(pair.split(": ", 1) for pair in text.split("\n")[-1].split(", "))


def test_a_request_draws_the_generators_image(engines, sdxl_model):
    """Every input set, CFG 7.3 as FP32: the image and infotext generate(cfg=7.3) gives."""
    response, = sdxl_model.execute([Request(PROMPT=b"an ankle boot", NEGATIVE_PROMPT=b"blurry", SEED=7, STEPS=3,
                                            CFG=7.3, SCHEDULER=b"dpmpp_2m_karras", WIDTH=64, HEIGHT=64, BATCH=1,
                                            LONG_PROMPTS=True, WEIGHTING=True)])
    assert response.error is None, response.error.message
    with Generator.load(engines, device="cpu") as g:
        image, = g.generate("an ankle boot", "blurry", steps=3, cfg=7.3, seed=7, scheduler="dpmpp_2m_karras",
                            long_prompts=True, weighting=True)
    assert response.outputs["IMAGE"].dtype == np.uint8 and response.outputs["IMAGE"].shape == (1, 64, 64, 3)
    assert np.array_equal(response.outputs["IMAGE"][0], image.rgb), \
        f"max difference {np.abs(response.outputs['IMAGE'][0].astype(int) - image.rgb).max()}"
    assert list(response.outputs["INFOTEXT"]) == [image.infotext.encode()]
    assert infotext_fields(image.infotext)["CFG scale"] == "7.3"


def test_absent_inputs_get_generates_defaults(sdxl_model):
    response, = sdxl_model.execute([Request(PROMPT=b"a bag", STEPS=2)])
    assert response.error is None, response.error.message
    text = response.outputs["INFOTEXT"][0].decode()
    fields = infotext_fields(text)
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"], fields["Size"]) == ("2", "Euler", "5", "64x64")
    assert "Negative prompt" not in text
    seed = int(fields["Seed"])
    again, = sdxl_model.execute([Request(PROMPT=b"a bag", STEPS=2, SEED=seed)])
    assert np.array_equal(again.outputs["IMAGE"], response.outputs["IMAGE"]), "the recorded seed does not redraw it"


@pytest.mark.parametrize("values,message", [
    ({"STEPS": 0}, "--steps 0: expected at least 1"),
    ({"SCHEDULER": b"heun"}, "--scheduler heun: expected one of euler"),
    ({"HEIGHT": 128}, "64x128 px, 75 prompt tokens (1 chunk) is outside the profiles of the unet engine"),
    ({"PROMPT": b"\xff\xfe"}, "PROMPT: not UTF-8 text"),
])
def test_a_bad_request_is_its_own_error(sdxl_model, values, message):
    """One error line for the bad request; the good one next to it is answered."""
    bad, good = sdxl_model.execute([Request(**{"PROMPT": b"a bag", **values}), Request(PROMPT=b"a bag", STEPS=1)])
    assert bad.error is not None and message in bad.error.message and bad.error.code is None, bad.error
    assert good.error is None and good.outputs["IMAGE"].shape == (1, 64, 64, 3)


def test_a_cancelled_request_is_answered_cancelled(sdxl_model):
    response, = sdxl_model.execute([Request(PROMPT=b"a bag", STEPS=2, cancelled=True)])
    assert response.error.code == StandIn.TritonError.CANCELLED and "cancelled" in response.error.message


def test_a_gpu_instance_on_another_gpu_is_refused(cpu_repo):
    from trt_sdxl.errors import UserError

    with pytest.raises(UserError, match="placed on GPU 1, but trt_sdxl.Generator runs on CUDA device 0"):
        serving.SDXLModel.load(cpu_repo / "sdxl" / "1" / "engines", "gpu", "1", StandIn)


# ---------------------------------------------------------------- a real Triton server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stub_python(tmp_path_factory) -> Path:
    """The Python the Triton stub runs (and the CLI reference with it): this environment, with
    numpy 1 first under numpy 2 (module docstring)."""
    numpy_major = int(np.__version__.split(".")[0])
    if numpy_major >= 2 and not (NUMPY1 / "numpy").is_dir():
        pytest.skip(f"Triton 2.51's Python stub cannot read numpy 2 arrays; install numpy 1 beside: {NUMPY1_INSTALL}")
    env = tmp_path_factory.mktemp("stub") / "python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    site_packages = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    lines = ([str(NUMPY1)] if numpy_major >= 2 else []) + \
        [f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})"]
    (site_packages / "trt_sdxl_test_env.pth").write_text("\n".join(lines) + "\n")
    return env / "bin" / "python"


@pytest.fixture(scope="module")
def triton_dist() -> Path:
    """nvidia-pytriton's tritonserver folder: bin/tritonserver, backends/, python_backend_stubs/."""
    spec = importlib.util.find_spec("pytriton")  # found, not imported: its __init__ needs tritonclient[grpc]
    if spec is None:
        pytest.skip("nvidia-pytriton (the tritonserver binary) is not installed")
    return Path(spec.origin).parent / "tritonserver"


def server_command(dist: Path, repo: Path, backends: Path, *options: str) -> list[str]:
    """tritonserver on 127.0.0.1 only: a free HTTP port, gRPC and metrics off."""
    return [str(dist / "bin" / "tritonserver"), "--model-repository", str(repo), "--backend-directory", str(backends),
            "--http-address", "127.0.0.1", "--http-port", str(free_port()), "--allow-grpc", "false",
            "--allow-metrics", "false", "--exit-timeout-secs", "10", *options]


@pytest.fixture(scope="module")
def triton(cpu_repo, stub_python, triton_dist, tmp_path_factory):
    """tritonserver serving the CPU export; yields its address once `sdxl` is ready, and stops the
    server (its process group) after."""
    http = pytest.importorskip("tritonclient.http")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton_dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        pytest.skip(f"nvidia-pytriton has no Python backend stub for Python {version}")
    work = tmp_path_factory.mktemp("triton")
    backends = work / "backends"
    shutil.copytree(triton_dist / "backends", backends)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    libraries = [str(triton_dist.parent.parent / "nvidia_pytriton.libs")]  # the stub's copy lost its RPATH's $ORIGIN
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):  # the stub links libpython: this Python's own
        libraries.insert(0, sysconfig.get_config_var("LIBDIR"))
    env = {**os.environ, "PATH": f"{stub_python.parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "LD_LIBRARY_PATH": os.pathsep.join(libraries + [os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)}
    command = server_command(triton_dist, cpu_repo, backends)
    address = f"127.0.0.1:{command[command.index('--http-port') + 1]}"
    log_path = work / "tritonserver.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        with http.InferenceServerClient(address) as client:  # closed: an open connection delays the shutdown
            while True:
                if server.poll() is not None:
                    pytest.fail(f"tritonserver exited ({server.returncode}):\n{log_path.read_text()[-4000:]}")
                try:
                    if client.is_model_ready("sdxl"):
                        break
                except Exception:  # not listening yet
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"sdxl not ready after 180 s:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.5)
        yield address
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


@pytest.mark.slow
def test_triton_accepts_the_tensorrt_plan_configs(engines, triton_dist, tmp_path, capsys):
    """Triton's own parser on the GPU export's plan models: each gets as far as looking for the
    TensorRT backend (which pytriton's server lacks); a config it cannot read fails before that."""
    folder = edited_copy(engines, tmp_path / "engines", as_nvidia_tensorrt)
    code, err = run_export(capsys, ["triton", "--engines", folder, "--out", tmp_path / "repo"])
    assert code == 0, err
    loads = [option for c in COMPONENTS for option in ("--load-model", c)]
    done = subprocess.run(server_command(triton_dist, tmp_path / "repo", triton_dist / "backends",
                                         "--model-control-mode", "explicit", *loads),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    log = done.stdout + done.stderr
    assert "text-format" not in log and "failed to read text proto" not in log, log[-4000:]
    for component in COMPONENTS:
        assert (f"failed to load '{component}' version 1: Invalid argument: unable to find backend library for "
                "backend 'tensorrt'") in log, log[-4000:]


@pytest.fixture(scope="module")
def cli_images(engines, stub_python, tmp_path_factory) -> dict:
    """seed -> (rgb, parameters text) of `python -m trt_sdxl.generate --cpu` (8 Euler steps, CFG 5)."""
    from PIL import Image

    out = tmp_path_factory.mktemp("cli")
    images = {}
    for seed in (42, 43):
        png = out / f"{seed}.png"
        subprocess.run([str(stub_python), "-m", "trt_sdxl.generate", "--cpu", "--engines", str(engines), PROMPT,
                        "--seed", str(seed), "--steps", "8", "--cfg", "5", "--out", str(png)],
                       check=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True)
        with Image.open(png) as image:
            images[seed] = (np.asarray(image.convert("RGB")), read_png_text(png.read_bytes())["parameters"])
    return images


def infer(url: str, seed: int, steps: int = 8):
    """One request of its own client: IMAGE and the INFOTEXT strings."""
    from tritonclient.http import InferenceServerClient, InferInput

    inputs = []
    for name, value, datatype, dtype in (("PROMPT", PROMPT, "BYTES", np.object_), ("SEED", seed, "INT64", np.int64),
                                         ("STEPS", steps, "INT32", np.int32), ("CFG", 5.0, "FP32", np.float32)):
        tensor = InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value], dtype))
        inputs.append(tensor)
    with InferenceServerClient(url, network_timeout=300) as client:
        result = client.infer("sdxl", inputs)
    return result.as_numpy("IMAGE"), [t.decode() for t in result.as_numpy("INFOTEXT")]


@pytest.mark.slow
def test_triton_answers_with_the_clis_image(triton, cli_images):
    image, infotext = infer(triton, 42)
    rgb, parameters_text = cli_images[42]
    assert image.dtype == np.uint8 and image.shape == (1, *rgb.shape)
    assert np.array_equal(image[0], rgb), f"max difference {np.abs(image[0].astype(int) - rgb).max()}"
    assert infotext == [parameters_text]


@pytest.mark.slow
def test_two_concurrent_clients_are_both_answered(triton, cli_images):
    start = threading.Barrier(2)
    answers: dict = {}

    def client(seed):
        start.wait()
        answers[seed] = infer(triton, seed)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in (42, 43)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(answers) == [42, 43], f"answered: {sorted(answers)}"
    for seed, (image, infotext) in answers.items():
        assert np.array_equal(image[0], cli_images[seed][0]), f"seed {seed}: not the CLI's image"
        assert infotext == [cli_images[seed][1]]


@pytest.mark.slow
def test_a_bad_request_is_one_error_and_the_server_stays_up(triton):
    from tritonclient.utils import InferenceServerException

    from tritonclient.http import InferenceServerClient

    with pytest.raises(InferenceServerException, match="--steps 0: expected at least 1"):
        infer(triton, 42, steps=0)
    with InferenceServerClient(triton) as client:
        assert client.is_model_ready("sdxl")


@pytest.mark.slow
def test_triton_reads_the_config_as_written(triton):
    from tritonclient.http import InferenceServerClient

    with InferenceServerClient(triton) as client:
        config = client.get_model_config("sdxl")
    assert config["backend"] == "python" and config["max_batch_size"] == 0
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == export.MAX_QUEUE_DELAY_US
    assert [(g["kind"], g["count"]) for g in config["instance_group"]] == [("KIND_CPU", 1)]
    assert [(t["name"], t["data_type"], t["optional"]) for t in config["input"]] == \
        [(f.name, f.data_type, not f.required) for f in serving.INPUTS]
