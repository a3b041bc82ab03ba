"""`python -m trt_sdxl.export triton --engines DIR --out REPO`: a Triton Inference Server model
repository serving an engines folder (written by `python -m trt_sdxl.build`).

    REPO/
      sdxl/                      backend "python": PROMPT, NEGATIVE_PROMPT, SEED, ... -> IMAGE, INFOTEXT
        config.pbtxt
        1/model.py               trt_sdxl/triton/model.py
        1/engines/               the engines folder: manifest, model copy, calibration table, and for
                                 --device gpu the engine files and their runtime cache
      text_encoder/ text_encoder_2/ unet/ vae/        (--device gpu, NVIDIA TensorRT engines only)
        config.pbtxt             platform "tensorrt_plan", the manifest's tensors
        1/model.plan             the engine file (a hard link to sdxl/1/engines/'s copy where the
                                 file system allows, so a big UNet is on disk once)

`sdxl` draws images through trt_sdxl.Generator, the same code `python -m trt_sdxl.generate` runs:
`--device gpu` (default) loads the engines with our cuda-python runtime (one denoising step
captured as a CUDA graph, the per-step work in our kernels); `--device cpu` runs the engines'
networks through netexec, so the repository serves on a machine without a GPU (tiny models).
The GPU loop is the Generator's rather than BLS calls to the tensorrt_plan models: through BLS
every step would be a round trip through Triton with host copies and the scheduler math in numpy,
without the CUDA graph, and it would serve only engines Triton's TensorRT backend can load.

The tensorrt_plan models give clients that run their own loop the raw engines. Triton's TensorRT
backend deserializes NVIDIA TensorRT plans of its own TensorRT version only, so engines built with
TensorRT for RTX get none (the log says so); `--device cpu` writes none either (they cannot load
without a GPU, and a Triton server stops when a model fails to load). Where they are served next
to `sdxl`, each engine is in GPU memory twice (once per model).

The repository is self-contained: every path in it is relative, so it can be moved or copied.
The `sdxl` model needs trt_sdxl installed in Triton's Python environment, or the source folder
recorded at export (trt_sdxl/triton/model.py). Nothing is half-written: the repository is
assembled in a hidden folder next to --out and renamed into place. Every mistake ends in one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .components import COMPONENTS
from .errors import UserError, run_cli
from .files import current_umask
from .generator import DEVICES
from .log import Log, logger
from .runtime.manifest import EnginesFolder
from .runtime.runtime_cache import FOLDER as RUNTIME_CACHE_FOLDER
from .triton.serving import INPUTS, OUTPUTS

PROG = "trt_sdxl.export"
log = logger(PROG)
SDXL_MODEL = "sdxl"
ENGINES = "1/engines"  # the engines folder's copy, relative to the sdxl model's folder (in version 1)
MODEL_SOURCE = Path(__file__).resolve().parent / "triton" / "model.py"
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding the trt_sdxl package
MAX_QUEUE_DELAY_US = 1000
# TensorRT DataType name (as the manifest records it, lower-cased; trt_sdxl.dtypes) -> Triton's type
TRITON_TYPES = {"FLOAT": "TYPE_FP32", "HALF": "TYPE_FP16", "BF16": "TYPE_BF16", "INT8": "TYPE_INT8",
                "UINT8": "TYPE_UINT8", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64", "BOOL": "TYPE_BOOL"}

PLAN_COMMENT = """\
# The trt_sdxl engine {file}, exported by `python -m trt_sdxl.export triton`.
# It loads in a Triton whose TensorRT is {backend} {version}, on {target}.
# max_batch_size 0 and no dynamic_batching: the engine's first axis is part of its shape (images
# per prompt; for the UNet twice that, classifier-free guidance's negative and positive halves in
# one call), fixed at build time or a range with `build --batch LO-HI`. Triton has no batch axis
# of its own to stack requests along, so a client sends whole batches.
# KIND_GPU, count 1: one instance (one execution context) per GPU.
"""
SDXL_COMMENT = """\
# Text to image with trt_sdxl.Generator over the engines in ./{engines} ({where}),
# exported by `python -m trt_sdxl.export triton`. Inputs are generate's arguments, shape [1] each;
# all but PROMPT optional. IMAGE is uint8 [B, H, W, 3], INFOTEXT A1111's text per image.
# max_batch_size 0: a request's tensors are its own; IMAGE's first axis is the request's BATCH.
# dynamic_batching: requests are independent, so batching them is correct; but with max_batch_size
# 0 Triton hands the model one request per execute (seen on Triton 2.51), and one Generator call
# draws one prompt's images anyway: it is a queue in front of the instance, not a larger UNet
# batch, so the delay is short. Throughput grows with more servers (one per GPU).
# {group}
# trt_sdxl comes from Triton's Python environment, else from trt_sdxl_path (see 1/model.py).
"""
GROUP_COMMENT = {
    "gpu": "KIND_GPU on GPU 0, count 1: the Generator opens CUDA device 0 and runs one network at a time; "
           "run one Triton server per GPU.",
    "cpu": "KIND_CPU, count 1: one Generator (netexec runs one network at a time).",
}


class Symbol(str):
    """A protobuf enum value (TYPE_FP16, KIND_GPU): written bare in text format, not quoted."""


def pbtxt(message: dict, indent: int = 0) -> str:
    """A message in protobuf text format (what config.pbtxt holds): dicts are messages, lists
    repeated fields."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key} {{\n{pbtxt(value, indent + 1)}{pad}}}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            items = ",\n".join(f"{pad}  {{\n{pbtxt(item, indent + 2)}{pad}  }}" for item in value)
            lines.append(f"{pad}{key} [\n{items}\n{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "".join(line + "\n" for line in lines)


def _scalar(value) -> str:
    if isinstance(value, Symbol):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)  # JSON's string escapes are valid text-format escapes


def triton_tensors(entry: dict, key: str) -> list[dict]:
    """The manifest's `inputs` or `outputs` of an engine as Triton tensor configs (dims: -1 dynamic)."""
    tensors = []
    for spec in entry.get(key) or []:
        data_type = TRITON_TYPES.get(str(spec.get("dtype")).upper())
        if data_type is None:
            raise UserError(f"{entry['path']}: tensor {spec.get('name')!r} is {spec.get('dtype')}, which Triton has no "
                            f"data type for (it takes {', '.join(t.lower() for t in TRITON_TYPES)})")
        tensors.append({"name": spec["name"], "data_type": Symbol(data_type), "dims": [int(d) for d in spec["shape"]]})
    if not tensors:
        raise UserError(f"{entry['path']}: the manifest lists no {key} for this engine; rebuild it")
    return tensors


def plan_model_config(component: str, entry: dict) -> str:
    target = str(entry.get("target", "native")).upper()
    comment = PLAN_COMMENT.format(file=entry["file"], backend=entry.get("backend"), version=entry.get("backend_version"),
                                  target=f"an {target} GPU" if target.startswith("SM") else "the GPU it was built on")
    return comment + pbtxt({
        "name": component,
        "platform": "tensorrt_plan",
        "max_batch_size": 0,
        "input": triton_tensors(entry, "inputs"),
        "output": triton_tensors(entry, "outputs"),
        "instance_group": [{"kind": Symbol("KIND_GPU"), "count": 1}],
    })


def sdxl_model_config(device: str) -> str:
    where = "TensorRT on the GPU" if device == "gpu" else "their networks through netexec on the CPU"
    group = {"kind": Symbol("KIND_GPU"), "count": 1, "gpus": [0]} if device == "gpu" else \
        {"kind": Symbol("KIND_CPU"), "count": 1}
    parameters = {"device": device, "engines": ENGINES, "trt_sdxl_path": str(SOURCE_ROOT)}
    return SDXL_COMMENT.format(engines=ENGINES, where=where, group=GROUP_COMMENT[device]) + pbtxt({
        "name": SDXL_MODEL,
        "backend": "python",
        "max_batch_size": 0,
        "input": [{"name": f.name, "data_type": Symbol(f.data_type), "dims": [1], **({} if f.required else {"optional": True})}
                  for f in INPUTS],
        "output": [{"name": name, "data_type": Symbol(data_type), "dims": dims} for name, data_type, dims in OUTPUTS],
        "instance_group": [group],
        "dynamic_batching": {"max_queue_delay_microseconds": MAX_QUEUE_DELAY_US},
        "parameters": [{"key": key, "value": {"string_value": value}} for key, value in parameters.items()],
    })


def check_out(out: Path, engines: Path) -> None:
    """--out must be new or an empty folder, in a writable folder outside the engines folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; expected a new folder for the model repository")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out}: exists and is not empty; pass a new or empty folder (an export never "
                        "overwrites a repository)")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: folder {parent} is not writable")
    if engines.is_dir() and out.resolve().is_relative_to(engines.resolve()):
        raise UserError(f"--out {out}: is inside the engines folder {engines}; pass a folder outside it")


def export_triton(engines, out, device: str = "gpu", log: Log = log) -> list[str]:
    """Write the model repository `out` for the engines folder `engines`; returns its model names."""
    engines, out = Path(engines), Path(out)
    if device not in DEVICES:
        raise UserError(f"--device {device}: expected one of {', '.join(DEVICES)}")
    check_out(out, engines)
    folder = EnginesFolder(engines)
    entries = {c: folder.entry(c, need_file=device == "gpu") for c in COMPONENTS}
    folder.image_size(entries)  # the UNet's and the VAE's sizes agree: what Generator.load checks first
    folder.model_folder(require_weights=device == "cpu")
    configs = {SDXL_MODEL: sdxl_model_config(device)}
    backends = {(e.get("backend"), e.get("backend_version")) for e in entries.values()}
    if device == "gpu" and all(name == "tensorrt" for name, _ in backends):
        configs.update({c: plan_model_config(c, entries[c]) for c in COMPONENTS})
    elif device == "gpu":
        built = ", ".join(sorted(f"{name} {version}" for name, version in backends))
        log(f"no tensorrt_plan models: the engines were built with {built}, and Triton's TensorRT backend loads "
            "NVIDIA TensorRT plans only (build with TRT_SDXL_BACKEND=tensorrt for them); sdxl runs the engines itself")

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.absolute().parent))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's folder is private; the repository is not
        write_repository(staging, folder, entries, configs, device)
        os.replace(staging, out)  # an empty --out is replaced, as rename(2) does with an empty folder
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise UserError(f"--out {out}: cannot write the repository ({e.strerror or e}); nothing was written") \
                from None
        raise
    log(f"wrote {out}: models {', '.join(configs)}; serve it with `tritonserver --model-repository {out}`")
    return list(configs)


def write_repository(root: Path, folder: EnginesFolder, entries: dict, configs: dict[str, str], device: str) -> None:
    """The models of `configs` under `root`; `sdxl/1/engines/` is the engines folder's copy, less
    (cpu) what only the engines' runtime reads: the engine files and their runtime cache."""
    for name, config in configs.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(config, encoding="utf-8")
    shutil.copyfile(MODEL_SOURCE, root / SDXL_MODEL / "1" / "model.py")
    plans = {Path(entry["file"]): component for component, entry in entries.items() if entry.get("file")}
    copy = root / SDXL_MODEL / ENGINES
    copy.mkdir()
    for source in sorted(folder.folder.rglob("*")):
        relative = source.relative_to(folder.folder)
        target = copy / relative
        if device == "cpu" and (relative in plans or relative.parts[0] == RUNTIME_CACHE_FOLDER):
            continue
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif plans.get(relative) in configs:  # a tensorrt_plan model's engine: on disk once where links work
            plan = root / plans[relative] / "1" / "model.plan"
            shutil.copy2(source, plan)  # copy2 keeps the time the runtime cache's key reads
            try:
                os.link(plan, target)
            except OSError:
                shutil.copy2(plan, target)
        else:
            shutil.copy2(source, target)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trt_sdxl.export", description="Export an engines folder for a "
                                                                                "serving system.")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    triton = formats.add_parser("triton", help="a Triton Inference Server model repository",
                                description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    triton.add_argument("--engines", default="engines", help="engines folder (default ./engines)")
    triton.add_argument("--out", required=True, help="the model repository to write: a new or empty folder")
    triton.add_argument("--device", choices=DEVICES, default="gpu",
                        help="what the sdxl model runs on: gpu (TensorRT; default) or cpu (netexec, no GPU needed: "
                             "tiny models)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def work():
        export_triton(args.engines, args.out, args.device)
        print(args.out)

    return run_cli(PROG, work, "nothing was written")


if __name__ == "__main__":
    sys.exit(main())
