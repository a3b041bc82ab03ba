"""`python -m trt_sdxl.build`: checkpoint -> TensorRT engine files + manifest.json + build_report.json.

With no arguments it builds the embedded tiny default model (`weights/tiny-sdxl`) into
`./engines`. Engines are written to a temporary file and renamed, so an interrupted or
failed build never leaves a half-written engine (or manifest) under its final name.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import __version__, backend
from .errors import UserError

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "tiny-sdxl"
DEFAULT_OUT = Path("engines")
COMPONENTS = ("unet",)
PRECISIONS = ("fp16", "int8", "fp8")


def log(message: str) -> None:
    print(f"[trt_sdxl.build] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- files


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        # An unreadable manifest from an older build is replaced, not merged.
        return {}


def engine_filename(component: str, precision: str, target: str) -> str:
    return f"{component}.{precision}.{backend.get().tag}.{target.lower()}.plan"


# ---------------------------------------------------------------- target


def present_gpu_target() -> str | None:
    """'SM89'-style name of the first GPU, from nvidia-smi; None without a GPU."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return "SM" + out[0].replace(".", "") if out else None


def choose_target(requested: str | None) -> str:
    be = backend.get()
    if requested:
        requested = requested.upper() if requested.lower() != "native" else "native"
        if requested != "native" and not requested.startswith("SM"):
            raise UserError(f"--target {requested}: expected e.g. SM89, SM120 or native")
        return requested
    gpu = present_gpu_target()
    if gpu:
        return gpu if gpu in be.aot_targets else "native"
    if "SM89" in be.aot_targets:
        return "SM89"
    raise UserError(f"no GPU found and {be.name} {be.version} cannot build ahead of time; pass --target or "
                    "run on a machine with the target GPU")


# ---------------------------------------------------------------- building


class _Progress:
    """Prints the builder's phases (TensorRT IProgressMonitor), at most a few lines per second."""

    @staticmethod
    def attach(config) -> None:
        trt = backend.trt()
        if not hasattr(trt, "IProgressMonitor") or not hasattr(config, "progress_monitor"):
            return

        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)
                self.last = 0.0

            def phase_start(self, phase_name, parent_phase, num_steps):
                if parent_phase is None:
                    log(f"  build phase: {phase_name}")

            def step_complete(self, phase_name, step):
                return True

            def phase_finish(self, phase_name):
                pass

        config.progress_monitor = Monitor()


def build_engine(definition, target: str) -> tuple[bytes, float]:
    """Serialize the network for `target`; returns the engine bytes and the seconds it took."""
    be = backend.get()
    config = definition.builder.create_builder_config()
    be.set_target(config, target)
    _Progress.attach(config)
    start = time.perf_counter()
    serialized = definition.builder.build_serialized_network(definition.network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise UserError(f"{be.name} {be.version} could not build the network for {target} "
                        "(the builder's messages above say why)")
    return serialized, seconds


def tensor_specs(network, which: str) -> list[dict]:
    count = network.num_inputs if which == "inputs" else network.num_outputs
    get = network.get_input if which == "inputs" else network.get_output
    return [{"name": t.name, "shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1].lower()}
            for t in (get(i) for i in range(count))]


def report_entry(definition, seconds: float) -> dict:
    macs = definition.macs
    return {
        "macs_total": int(sum(m.macs for m in macs)),
        "macs_8bit": int(sum(m.macs for m in macs if m.quantized)),
        "layers": int(definition.network.num_layers),
        "layers_quantized": int(sum(1 for m in macs if m.quantized)),
        "smoothing_muls": 0,
        "build_seconds": round(seconds, 2),
    }


def define_component(component: str, model, precision: str, batch: int, latent_h: int, latent_w: int):
    if component == "unet":
        from .models import unet

        return unet.define(model, precision=precision, batch=batch, latent_height=latent_h, latent_width=latent_w,
                           progress=lambda message: log(f"{component}: {message}"))
    raise UserError(f"--components {component}: expected one of {', '.join(COMPONENTS)}")


def image_size(model, height: int | None, width: int | None) -> tuple[int, int]:
    """Default image size: the UNet config's sample_size in pixels (1024 for SDXL, 128 for the tiny default)."""
    from . import weights

    if height and width:
        return height, width
    cfg = weights.open_component(model, "unet").config
    side = int(cfg.get("sample_size", 128)) * 8
    return height or side, width or side


def build(model, out: Path, precision: str = "fp16", batch: int = 1, height: int | None = None,
          width: int | None = None, target: str | None = None, components=COMPONENTS) -> dict:
    """Build the engines; returns the manifest written to `out/manifest.json`."""
    from . import weights

    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if precision != "fp16":
        raise UserError(f"--precision {precision}: 8-bit engines are not available yet in this version; "
                        "use --precision fp16")
    if batch < 1:
        raise UserError(f"--batch {batch}: expected a positive integer")
    be = backend.get()
    target = choose_target(target)
    height, width = image_size(model, height, width)
    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise UserError(f"--height {height} --width {width}: image sides must be positive multiples of 8")
    out = Path(out)
    manifest = read_json(out / "manifest.json")
    manifest.update({"trt_sdxl_version": __version__, "backend": be.name, "backend_version": be.version})
    manifest.setdefault("engines", {})
    report = read_json(out / "build_report.json")
    log(f"model {model}; {be.name} {be.version}; target {target}; precision {precision}; "
        f"batch {batch}; image {width}x{height}")
    for component in components:
        start = time.perf_counter()
        log(f"{component}: opening weights")
        checkpoint = weights.open_component(model, component)
        log(f"{component}: {len(checkpoint.keys())} tensors, {checkpoint.weight_bytes / 2**20:.1f} MiB "
            f"({time.perf_counter() - start:.1f} s); defining the network")
        start = time.perf_counter()
        definition = define_component(component, checkpoint, precision, batch, height // 8, width // 8)
        network = definition.network
        log(f"{component}: {network.num_layers} layers defined ({time.perf_counter() - start:.1f} s); "
            f"building for {target}")
        engine, seconds = build_engine(definition.definition, target)
        name = engine_filename(component, precision, target)
        write_atomic(out / name, engine)
        log(f"{component}: wrote {out / name} ({engine.nbytes / 2**20:.1f} MiB, built in {seconds:.1f} s)")
        manifest["engines"][component] = {
            "file": name,
            "component": component,
            "precision": precision,
            "backend": be.name,
            "backend_version": be.version,
            "target": target,
            "batch": batch,
            "image_height": height,
            "image_width": width,
            "inputs": tensor_specs(network, "inputs"),
            "outputs": tensor_specs(network, "outputs"),
            "checkpoint": str(checkpoint.source),
            "checkpoint_fingerprint": checkpoint.fingerprint(),
        }
        report[component] = report_entry(definition.definition, seconds)
        del definition, engine
    write_json(out / "build_report.json", report)
    write_json(out / "manifest.json", manifest)
    log(f"manifest: {out / 'manifest.json'}")
    return manifest


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trt_sdxl.build", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="diffusers pipeline folder, component folder or single-file .safetensors "
                        "(default: the embedded tiny model, weights/tiny-sdxl)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: ./engines)")
    p.add_argument("--precision", default="fp16", help="fp16 (int8 and fp8 come later)")
    p.add_argument("--batch", type=int, default=1, help="batch size the engines take (default 1)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--target", default=None,
                   help="compute capability to build for, e.g. SM89, SM120, or 'native' "
                        "(default: the GPU present, else SM89 ahead of time)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        build(args.model, Path(args.out), precision=args.precision, batch=args.batch, height=args.height,
              width=args.width, target=args.target)
    except UserError as e:
        print(f"trt_sdxl.build: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trt_sdxl.build: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
