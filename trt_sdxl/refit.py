"""`python -m trt_sdxl.refit --engines DIR --lora FILE[:SCALE]`: put other LoRAs into a folder's engines without
rebuilding them.

The folder must have been built `--refittable`. Each refittable engine (text encoders, UNet) gets exactly the
weights a build with these LoRAs would bind (trt_sdxl.refit_map; an 8-bit UNet keeps its SmoothQuant factors
and activation scales, and its weights are re-quantized per channel), through TensorRT's refitter on the GPU;
only the weights the old or the new LoRAs touch are sent. `--lora` is repeatable, each file at its own scale;
`--clear` takes every refit LoRA out again. LoRAs merged at build time (`build --lora`) stay: a refit adds to
them.

The change is atomic: refitted engines are written under new file names, the LoRA files are copied into the
folder, and the manifest — which names the engine files and records each engine's `refit_loras` — is replaced
last, in one rename; only then are the old engine files removed. An interrupted refit leaves the folder as it
was. A folder built `--no-engines` has only networks: the LoRAs are checked and recorded, and `generate --cpu`
runs the networks with them.

Engines load only on a GPU: refitting engine files needs the GPU they run on. `Generator.set_loras` and
`<lora:name:w>` prompt tags (generate --lora-dir, serve --lora-dir) refit the engines in memory instead,
between requests.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from . import lora
from .build import LORA_FOLDER, MODEL_FOLDER
from .components import LORA_COMPONENTS
from .errors import UserError, run_cli
from .files import write_json, write_temporary
from .log import logger
from .lora_switch import folder_switch
from .runtime.manifest import EnginesFolder
from .runtime.runtime_cache import FOLDER as RUNTIME_CACHE_FOLDER

log = logger("trt_sdxl.refit")


def refit_filename(base: str, specs: list) -> str:
    """`unet.fp16.trtrtx1.7.1.sm89.plan` carrying LoRAs -> `unet.fp16.trtrtx1.7.1.sm89.lora-1a2b3c4d.plan` (a digest of
    the LoRA files' contents and scales); the plain name again without LoRAs."""
    stem = base.split(".lora-")[0].removesuffix(".plan")
    if not specs:
        return f"{stem}.plan"
    digest = hashlib.sha256(repr([(lora.short_hash(p), te, unet) for p, te, unet in specs]).encode()).hexdigest()[:8]
    return f"{stem}.lora-{digest}.plan"


def copy_into(folder: EnginesFolder, path: Path, staged: dict) -> str:
    """The folder-relative name of LoRA `path` copied under model/loras/ (a different file of the same name gets
    its digest added); staged as a temporary file next to where it goes."""
    data = Path(path).read_bytes()
    target = folder.folder / MODEL_FOLDER / LORA_FOLDER / Path(path).name
    if target.is_file() and target.read_bytes() != data:
        target = target.with_name(f"{target.stem}-{hashlib.sha256(data).hexdigest()[:8]}{target.suffix}")
    if not target.is_file() and target not in staged:
        staged[target] = write_temporary(target, data)
    return target.relative_to(folder.folder).as_posix()


@contextmanager
def gpu_refitters(folder: EnginesFolder, components: list[str]):
    """component -> (refit(weights, more), serialize()) over its engine loaded on the GPU."""
    from .runtime import cuda
    from .runtime.engine import Engine, EngineRefitter

    count, reason = cuda.probe()
    if not count:
        raise UserError(f"refitting engine files needs the GPU they run on, and none is usable here: {reason}. "
                        f"Without a GPU, merge the LoRAs at build time: `{folder.rebuild_command()} --lora FILE`")
    device = cuda.Device.open()
    stream = cuda.Stream()
    engines, refitters = [], {}
    try:
        for c in components:
            engine = Engine.load(folder.entry(c)["path"])
            engines.append(engine)
            refitter = EngineRefitter(engine)
            refitters[c] = (lambda weights, more, r=refitter: r.refit(weights, stream, more), refitter.serialize)
        yield refitters
    finally:
        refitters.clear()
        for engine in engines:
            engine.release()
        stream.destroy()
        device.close()


def refit(engines_dir, loras: list, model=None, log=log, refitters=gpu_refitters) -> dict:
    """Make the folder's refittable engines carry exactly `loras` (`FILE[:SCALE]`; [] for none besides the build's
    own); returns the manifest written. `model`: the checkpoint the engines were built from, where the folder has
    no copy of its weights. `refitters`: how engines are refit (a GPU's TensorRT; tests give their own)."""
    folder = EnginesFolder(engines_dir)
    specs = [lora.spec_tuple(s) for s in loras]
    entries = {c: folder.entry(c, need_file=False) for c in LORA_COMPONENTS if c in folder.engines}
    refittable = [c for c, e in entries.items() if e.get("refittable")]
    if not refittable:
        raise UserError(f"{folder.folder}: its engines were not built refittable; rebuild with "
                        f"`{folder.rebuild_command(refittable=True)}`")
    engine_refitters: dict = {}  # component -> (refit, serialize), once the engines are loaded
    switch, _ = folder_switch(folder, entries, model,
                              lambda c, weights, more: engine_refitters[c][0](weights, more) if c in engine_refitters
                              else None,  # a component without an engine file: its network alone, nothing to send
                              log)
    touched = {c for f in switch.open(specs) for c in f.modules}  # each file read once: set() takes them from here
    fixed = sorted(touched - set(refittable))
    if fixed:
        raise UserError(f"the LoRAs change the {', '.join(fixed)}, whose engine in {folder.folder} is not refittable; "
                        f"rebuild with `{folder.rebuild_command(refittable=True)}`")
    with_files = [c for c in refittable if entries[c].get("file")]
    started = time.perf_counter()
    serialized = {}
    if with_files:
        with refitters(folder, with_files) as made:
            engine_refitters.update(made)
            sent = switch.set({c: specs for c in refittable})
            serialized = {c: engine_refitters[c][1]() for c in sent if c in engine_refitters}
    else:  # networks only (--no-engines): the LoRAs are checked against them, and recorded
        sent = switch.set({c: specs for c in refittable})
    if not sent:
        log(f"{folder.folder}: the engines carry these LoRAs already; nothing changed")
        return folder.manifest
    manifest = dict(folder.manifest)
    manifest["engines"] = {c: dict(e) for c, e in folder.engines.items()}
    staged: dict[Path, Path] = {}  # final path -> its temporary file
    removed = []
    try:
        recorded = [{"file": copy_into(folder, path, staged), "scale": te, "unet_scale": unet}
                    for path, te, unet in specs]
        for c in refittable:  # each carries them now (one whose weights did not change, e.g. at its own scale, too)
            entry = manifest["engines"][c]
            entry["refit_loras"] = recorded
            if c in serialized:
                name = refit_filename(entry["file"], specs)
                staged[folder.folder / name] = write_temporary(folder.folder / name, serialized[c])
                if name != entry["file"]:
                    removed.append(folder.folder / entry["file"])
                entry["file"] = name
        for final, tmp in list(staged.items()):
            os.replace(tmp, final)
            del staged[final]
        write_json(folder.folder / "manifest.json", manifest)  # the commit: from here on the new files are the folder
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    for old in removed:
        old.unlink(missing_ok=True)
        for cache in (old.parent / RUNTIME_CACHE_FOLDER).glob(f"{old.name}.*.cache"):
            cache.unlink(missing_ok=True)
    kept = {e["file"] for e in manifest.get("loras") or []} | {
        r["file"] for e in manifest["engines"].values() for r in e.get("refit_loras") or []}
    for stale in (folder.folder / MODEL_FOLDER / LORA_FOLDER).glob("*.safetensors"):
        if stale.relative_to(folder.folder).as_posix() not in kept:  # an earlier refit's LoRA no engine carries
            stale.unlink(missing_ok=True)
    what = ", ".join(f"{Path(p).name}:{te:g}" + (f" (UNet {unet:g})" if unet is not None else "")
                     for p, te, unet in specs) or "none"
    log(f"{folder.folder}: refit {', '.join(f'{c} ({n} weights)' for c, n in sent.items())} in "
        f"{time.perf_counter() - started:.1f} s; LoRAs now: {what}"
        + ("" if with_files else " (networks only: generate --cpu runs them)"))
    return manifest


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trt_sdxl.refit", description=__doc__.split("\n")[0])
    p.add_argument("--engines", default="engines", help="engines folder built with --refittable (default ./engines)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA (kohya/A1111 or diffusers/PEFT .safetensors) at SCALE (default 1); repeatable; the "
                        "engines then carry exactly these")
    p.add_argument("--clear", action="store_true", help="take every refit LoRA out (the build's own stay)")
    p.add_argument("--model", default=None,
                   help="the checkpoint the engines were built from, where the folder holds no copy of its weights "
                        "(default: the path the build recorded)")
    args = p.parse_args(argv)
    if bool(args.lora) == args.clear:
        p.error("give --lora FILE[:SCALE] (repeatable), or --clear")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli("trt_sdxl.refit", lambda: refit(args.engines, [] if args.clear else args.lora, args.model),
                   "the engines folder is as it was")


if __name__ == "__main__":
    sys.exit(main())
