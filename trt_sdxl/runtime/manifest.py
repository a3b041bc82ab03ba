"""What an engines folder holds (`manifest.json`, written by `python -m trt_sdxl.build`) and whether
its engines can run here: checks that need no GPU, so a mismatch is one clear line before any load.

Manifest layout (see trt_sdxl/build.py): top-level `backend`, `backend_version`, `model` (the
folder, relative to the engines folder, holding the model's copied configs, tokenizers and
scheduler config, and for models small enough to preview on the CPU their weights), `model_name`,
`calibration` (8-bit: the table's file name) and `engines`, mapping a component (`text_encoder`,
`text_encoder_2`, `unet`, `vae`) to its `file` (relative), `precision`, `backend`,
`backend_version`, `target` ("SM89", or "native" for the GPU it was built on), `batch` (images per
prompt at the opt shape; the UNet's engine takes `cfg_batch` = 2 x batch), `image_height`/`image_width`
(UNet, VAE: the opt size, what a request without a size gets), `profiles` (the requests it serves,
trt_sdxl.shapes.ImageProfile as JSON, one per optimization profile), `inputs`/`outputs` ([{name,
shape, dtype}], -1 on a dynamic axis), `input_profiles` (per optimization profile, each input's
min/opt/max shape; [] for a static engine), `checkpoint` (where it was built from, a record only)
and `checkpoint_fingerprint`, `refittable` (built with --refittable: `refit_weights` weights may change)
and `refit_loras` (the LoRAs `python -m trt_sdxl.refit` put into it: [{file, scale, unet_scale}]). A refittable
build's folder also holds `refit_map.json` (per component, its network's refit map) and `loras`: the LoRAs
merged at build time. Every path the runtime follows is relative, so the folder can be moved or copied
to another machine.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .. import shapes
from ..components import COMPONENTS
from ..errors import UserError
from ..files import load_json

BUILD = "python -m trt_sdxl.build"


def model_folder(entry: dict) -> Path:
    """The checkpoint an engine was built from, as `--model` takes it: the pipeline folder when the
    manifest names one of its component folders (`.../unet`), else the file or folder itself."""
    path = Path(entry.get("checkpoint", ""))
    if path.name in COMPONENTS and (path.parent / "model_index.json").is_file():
        return path.parent
    return path


class EnginesFolder:
    """An engines folder and its manifest; `entry(component)` is a component's manifest entry with
    `path` (the engine file) added. Every failure names the file and prints the rebuild command."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.manifest: dict = {}
        if not self.folder.is_dir():
            raise UserError(f"engines folder {self.folder} not found: build the engines first with "
                            f"`{self.rebuild_command()}` (add --model PATH for your checkpoint), or pass --engines DIR")
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise UserError(f"{path} not found: {self.folder} is not an engines folder written by {BUILD}; "
                            f"build with `{self.rebuild_command()}`")
        try:
            manifest = load_json(path)
        except UserError as e:
            raise UserError(f"{path}: unreadable ({str(e).removeprefix(f'{path}: ')}); rebuild with "
                            f"`{self.rebuild_command()}`") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("engines"), dict):
            raise UserError(f"{path}: no `engines` table; rebuild with `{self.rebuild_command()}`")
        self.manifest = manifest

    @property
    def engines(self) -> dict:
        return self.manifest.get("engines", {})

    def rebuild_command(self, **overrides) -> str:
        """The build command recreating this folder as its manifest describes it; `overrides` replace
        flags (`height=768`)."""
        unet, vae = self.engines.get("unet", {}), self.engines.get("vae", {})
        first = next(iter(self.engines.values()), {})
        profiles = [shapes.ImageProfile.from_json(p) for p in (unet or vae or first).get("profiles") or []]
        flags = {"model": str(model_folder(first)) if first.get("checkpoint") else None, "out": str(self.folder),
                 "precision": unet.get("precision"), "vae_precision": vae.get("precision"),
                 "batch": profiles[0].batch.text() if profiles else first.get("batch")}
        dynamic = len(profiles) > 1 or (profiles and not profiles[0].static)
        if dynamic and not {"height", "width"} & overrides.keys():
            flags["resolutions"] = [p.resolutions for p in profiles]
            if profiles[0].chunks.hi > 1:
                flags["prompt_chunks"] = profiles[0].chunks.hi
        else:
            flags.update({"height": (unet or vae).get("image_height"), "width": (unet or vae).get("image_width")})
        loras = [f"{self.folder / e['file']}:{e['scale']:g}" for e in self.manifest.get("loras") or []]
        if loras:
            flags["lora"] = loras
        flags["refittable"] = any(e.get("refittable") for e in self.engines.values())
        flags["no_engines"] = bool(self.engines) and not any(e.get("file") for e in self.engines.values())
        flags.update(overrides)
        parts = [BUILD]
        for name, value in flags.items():
            for one in value if isinstance(value, list) else [value]:
                if one is True:
                    parts.append(f"--{name.replace('_', '-')}")
                elif one is not None and one is not False:
                    parts += [f"--{name.replace('_', '-')}", shlex.quote(str(one))]
        return " ".join(parts)

    def entry(self, component: str, need_file: bool = True) -> dict:
        """The manifest entry of `component`; its engine file must exist (unless `need_file` is
        False: the CPU preview runs the networks, not the engines)."""
        if component not in self.engines:
            listed = ", ".join(self.engines) or "none"
            raise UserError(f"{self.folder / 'manifest.json'} has no {component} engine (it lists: {listed}); "
                            f"build all components with `{self.rebuild_command()}`")
        entry = dict(self.engines[component])
        entry["path"] = self.folder / (entry.get("file") or "")
        if need_file and (not entry.get("file") or not entry["path"].is_file()):
            raise UserError(f"{entry['path']}: the {component} engine listed in the manifest is missing; "
                            f"rebuild with `{self.rebuild_command()}`")
        return entry

    def check_backend(self, entry: dict, name: str, version: str) -> None:
        """An engine deserializes only in the TensorRT flavour and version that built it."""
        built = (entry.get("backend"), entry.get("backend_version"))
        if built != (name, version):
            raise UserError(f"{entry['path']} was built with {built[0]} {built[1]}, but {name} {version} is "
                            f"installed (an engine runs only on the TensorRT that built it): rebuild with "
                            f"`{self.rebuild_command()}`")

    def check_target(self, entry: dict, compute_capability: tuple[int, int], gpu_name: str) -> None:
        """An engine built ahead of time for SMxy runs only on a GPU of compute capability x.y ("native"
        engines say nothing here: TensorRT itself rejects them on another GPU)."""
        target = str(entry.get("target", "native")).upper()
        present = f"SM{compute_capability[0]}{compute_capability[1]}"
        if target.startswith("SM") and target != present:
            raise UserError(f"{entry['path']} was built for {target}, but this GPU ({gpu_name}) is {present}: "
                            f"rebuild on this machine with `{self.rebuild_command()}`")

    def profiles(self, entry: dict) -> list[shapes.ImageProfile]:
        """The requests an engine serves (an entry from before profiles: its one static shape)."""
        if entry.get("profiles"):
            return [shapes.ImageProfile.from_json(p) for p in entry["profiles"]]
        batch = shapes.Range.one(int(entry.get("batch", 1)))
        if entry.get("component") == "unet" or "image_height" in entry:
            h, w = int(entry.get("image_height", 0)), int(entry.get("image_width", 0))
            if entry.get("component") == "unet" and entry.get("inputs"):
                _, _, lh, lw = input_shape(entry, "sample")
                h, w = 8 * lh, 8 * lw
            return [shapes.ImageProfile(batch, shapes.Range.one(h), shapes.Range.one(w), shapes.Range.one(1), f"{w}x{h}")]
        any_side = shapes.Range(8, 8, 2**16)
        return [shapes.ImageProfile(batch, any_side, any_side, shapes.Range.one(1), "")]

    def check_request(self, entries: dict, batch: int, height: int, width: int, chunks: int = 1,
                      multiple: int = 8) -> dict[str, int]:
        """component -> the index of its engine's profile that serves the request; a UserError naming the
        ranges the engines take (and how to build for the request) where one of them cannot."""
        chosen = {}
        for component, entry in sorted(entries.items(), key=lambda item: item[0] != "unet"):  # the UNet's first
            try:
                chosen[component] = shapes.choose(self.profiles(entry), batch, height, width, chunks, multiple,
                                                  where=f"the {component} engine")
            except UserError as e:
                raise UserError(f"{e}; e.g. `{self.rebuild_command(**build_flags(batch, height, width, chunks))}`") \
                    from None
        return chosen

    def image_size(self, entries: dict) -> tuple[int, int]:
        """(height, width) a request without a size gets: the UNet's opt size; the VAE must serve it."""
        opt = self.profiles(entries["unet"])[0]
        height, width = opt.height.opt, opt.width.opt
        if not any(p.height.lo <= height <= p.height.hi and p.width.lo <= width <= p.width.hi
                   for p in self.profiles(entries["vae"])):
            vae = "; or ".join(p.describe() for p in self.profiles(entries["vae"]))
            raise UserError(f"{self.folder}: the VAE engine takes {vae}, not the UNet's {width}x{height}; rebuild one "
                            f"of them, e.g. {self.rebuild_command()} --components vae")
        return height, width

    def model_folder(self, require_weights: bool) -> Path:
        """The model copy in the folder (configs, tokenizers, scheduler config; weights when the
        model is small enough for the CPU preview). `require_weights`: every component's weights."""
        name = self.manifest.get("model")
        if not name:
            raise UserError(f"{self.folder / 'manifest.json'} records no model folder (an engines folder from an "
                            f"older trt_sdxl); rebuild with `{self.rebuild_command()}`")
        folder = self.folder / name
        if not folder.is_dir():
            raise UserError(f"{folder}: the model folder the manifest names is missing; rebuild with "
                            f"`{self.rebuild_command()}`")
        if require_weights and not self.manifest.get("model_weights"):
            raise UserError(f"{self.folder}: the model's weights were not copied into the engines folder (its UNet "
                            "is too large for the CPU preview, which netexec would take hours on); run the engines "
                            "on a GPU")
        return folder

    def lora_set(self):
        """The LoRAs merged into the engines (their copies in the folder), as a trt_sdxl.lora.LoRASet; None."""
        entries = self.manifest.get("loras") or []
        if not entries:
            return None
        from ..lora import LoRASet

        missing = [e["file"] for e in entries if not (self.folder / e["file"]).is_file()]
        if missing:
            raise UserError(f"{self.folder / missing[0]}: the LoRA the engines were built with is missing; rebuild "
                            f"with `{self.rebuild_command()}`")
        return LoRASet.load([(self.folder / e["file"], float(e["scale"])) for e in entries])

    def refit_map(self, component: str) -> dict:
        """The refit map of `component`'s network (trt_sdxl.refit_map), from refit_map.json."""
        from ..refit_map import from_json

        path = self.folder / "refit_map.json"
        maps = load_json(path, missing={})
        if not isinstance(maps, dict) or component not in maps:
            raise UserError(f"{path}: holds no refit map of the {component}; rebuild with "
                            f"`{self.rebuild_command(refittable=True)}`")
        return from_json(maps[component], str(path))

    def refit_loras(self, entry: dict) -> list[tuple[Path, float, float | None]]:
        """The LoRAs a refit put into an engine: (file in the folder, scale, UNet scale or None)."""
        specs = []
        for e in entry.get("refit_loras") or []:
            path = self.folder / e["file"]
            if not path.is_file():
                raise UserError(f"{path}: the LoRA the {entry.get('component')} engine was refit with is missing; "
                                f"refit again with `python -m trt_sdxl.refit --engines {self.folder} --lora FILE`")
            specs.append((path, float(e["scale"]), None if e.get("unet_scale") is None else float(e["unet_scale"])))
        return specs

    def base_weights(self, component: str, model=None):
        """`component`'s weights as the engine was built from them — the checkpoint with the build's LoRAs merged —
        opened from `model`, else the folder's model copy, else the checkpoint the build read; checked against the
        fingerprint the manifest recorded."""
        from .. import lora, weights

        entry = self.entry(component, need_file=False)
        if model is not None:
            source = Path(model)
        elif self.manifest.get("model_weights"):
            source = self.folder / self.manifest["model"]
        else:
            source = model_folder(entry)
            if not source.exists():
                raise UserError(f"{self.folder}: the engines folder holds no weights (too large to copy) and the "
                                f"checkpoint it was built from, {source}, is not here; pass --model PATH")
        component_weights = lora.merged(weights.open_component(source, component), self.lora_set())
        if component_weights.fingerprint() != entry.get("checkpoint_fingerprint"):
            raise UserError(f"{source}: its {component} is not the one the engines of {self.folder} were built from "
                            "(the fingerprints differ); pass --model with that checkpoint")
        return component_weights

    def calibration_path(self) -> Path:
        path = self.folder / str(self.manifest.get("calibration") or "calibration.npz")
        if not path.is_file():
            raise UserError(f"{path}: the calibration table of this 8-bit UNet is missing; rebuild with "
                            f"`{self.rebuild_command()}`")
        return path

    def model_name(self) -> str:
        return str(self.manifest.get("model_name") or model_folder(self.engines.get("unet", {})).name)

    def model_hash(self) -> str:
        return str(self.engines.get("unet", {}).get("checkpoint_fingerprint", ""))[:10]


def build_flags(batch: int, height: int, width: int, chunks: int) -> dict:
    """Build flags for engines that serve one request of this shape."""
    flags = {"height": height, "width": width, "batch": batch}
    if chunks > 1:
        flags["prompt_chunks"] = chunks
    return flags


def input_shape(entry: dict, name: str) -> tuple[int, ...]:
    for spec in entry.get("inputs", []):
        if spec.get("name") == name:
            return tuple(int(d) for d in spec["shape"])
    raise UserError(f"{entry['path']}: the manifest lists no input {name!r} for this engine; rebuild it")
