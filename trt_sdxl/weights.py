"""Lazy, memory-mapped checkpoint access: one component's tensors under their diffusers names.

`open_component(path, "unet")` takes a diffusers pipeline folder, a component folder
(plain, `*.fp16.*` variant or sharded `*.safetensors.index.json`), or one SGM single-file
`.safetensors` checkpoint (mapped to diffusers names by `trt_sdxl.keymap`, which also says how
a diffusers tensor is read out of a single-file one: as it is, a row block of a fused q/k/v, a
transpose, a 1x1 convolution as a linear weight). The safetensors format is parsed here (8-byte
little-endian header length, JSON header, raw data) over `mmap`: nothing is read until a
tensor is asked for, a tensor in the dtype it is stored in is a read-only zero-copy view of the
file (row blocks and reshapes included; a transpose is a copy), and any other float dtype costs
exactly one conversion. Every user-facing problem (missing or truncated file, bad header, unknown
tensor, wrong shape, config that disagrees with the weights) is a `UserError` naming the file
and tensor.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from . import configs, keymap
from .components import COMPONENTS
from .errors import UserError
from .files import load_json

# The class each component's config names (`_class_name` for diffusers, `architectures` for transformers).
CONFIG_CLASSES = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "text_encoder_2": "CLIPTextModelWithProjection",
}

# Weight files looked for in a component folder, in order: full precision first (plain, then
# sharded), the `fp16` variant only when no full-precision file exists.
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors", "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
    "diffusion_pytorch_model.safetensors.index.fp16.json", "model.safetensors.index.fp16.json",
)

# safetensors dtype codes -> numpy dtypes (bfloat16 and fp8 from ml_dtypes).
SAFETENSORS_DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16), "U16": np.dtype(np.uint16), "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32), "I64": np.dtype(np.int64), "U64": np.dtype(np.uint64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
# Stored dtypes `get` converts from, and dtypes it converts to.
CONVERTIBLE_SOURCES = {np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)}
CONVERTIBLE_TARGETS = CONVERTIBLE_SOURCES | {np.dtype(np.float64)}

MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
FINGERPRINT_SAMPLES = 16  # data blocks hashed per file, evenly spaced
FINGERPRINT_BLOCK = 4096


@dataclass(frozen=True)
class TensorEntry:
    """Where one stored tensor lives: its file, stored name, dtype, shape and byte range."""

    file: SafetensorsFile
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int


class SafetensorsFile:
    """One `.safetensors` file: its validated header, parsed eagerly, and its data, mapped lazily by the OS."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.size = path.stat().st_size
            with open(path, "rb") as f:
                prefix = f.read(8)
                header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
                if header_len < 0:
                    raise UserError(f"{path}: {self.size} bytes is too short for a safetensors file "
                                    "(expected an 8-byte header length first)")
                if header_len > self.size - 8 or header_len > MAX_HEADER_BYTES:
                    raise UserError(f"{path}: header length {header_len} runs past the end of the "
                                    f"{self.size}-byte file (truncated, or not a safetensors file)")
                self.header_bytes = f.read(header_len)
                # mmap duplicates the descriptor, so the map outlives this `with`.
                self.mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
        self.data_offset = 8 + header_len
        self.tensors = self._parse_header()

    def _parse_header(self) -> dict[str, TensorEntry]:
        try:
            header = json.loads(self.header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{self.path}: the safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise UserError(f"{self.path}: the safetensors header is not a JSON object")
        data_size = self.size - self.data_offset
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            where = f"{self.path}: tensor {name!r}"
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
                raise UserError(f"{where}: header entry lacks dtype, shape or data_offsets")
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise UserError(f"{where}: dtype {info['dtype']!r} is not supported "
                                f"(expected one of {', '.join(SAFETENSORS_DTYPES)})")
            shape, offsets = info["shape"], info["data_offsets"]
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise UserError(f"{where}: shape {shape!r} is not a list of non-negative integers")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                    and 0 <= offsets[0] <= offsets[1]):
                raise UserError(f"{where}: data_offsets {offsets!r} is not a [begin, end] byte range")
            begin, end = offsets
            if end > data_size:
                raise UserError(f"{where}: its data ends at byte {self.data_offset + end} but the file has only "
                                f"{self.size} bytes (truncated?)")
            expected = math.prod(shape) * dtype.itemsize
            if end - begin != expected:
                raise UserError(f"{where}: {end - begin} bytes of data, expected {expected} "
                                f"for {info['dtype']} {tuple(shape)}")
            tensors[name] = TensorEntry(self, name, dtype, tuple(shape), self.data_offset + begin, expected)
        return tensors

    def metadata(self) -> dict:
        """The header's `__metadata__` (a dict of strings; empty where the file has none)."""
        meta = json.loads(self.header_bytes).get("__metadata__")
        return meta if isinstance(meta, dict) else {}

    def view(self, entry: TensorEntry) -> np.ndarray:
        """The tensor as a read-only array over the mapped file (no copy)."""
        count = entry.nbytes // entry.dtype.itemsize
        return np.frombuffer(self.mmap, dtype=entry.dtype, count=count, offset=entry.offset).reshape(entry.shape)

    def fingerprint_into(self, h) -> None:
        """Feed size, header and evenly spaced data blocks to hash `h`: cheap, and unlike the header
        alone it tells apart two fine-tunes of one architecture."""
        h.update(self.size.to_bytes(8, "little"))
        h.update(self.header_bytes)
        span = max(self.size - self.data_offset - FINGERPRINT_BLOCK, 0)
        for k in range(FINGERPRINT_SAMPLES):
            start = self.data_offset + span * k // (FINGERPRINT_SAMPLES - 1)
            h.update(self.mmap[start:start + FINGERPRINT_BLOCK])

    def close(self) -> None:
        try:
            self.mmap.close()
        except BufferError:
            pass  # arrays handed out still view the map; it is unmapped when the last one goes


class Component:
    """One model component's tensors by diffusers name, with its config.

    `get` records what was read in `.consumed`, so `check_all_consumed` can prove that a
    network used every tensor of the checkpoint. From a single file, `transforms` says how a
    diffusers tensor is read out of its stored tensor (absent: as it is), and `unused` holds the
    stored names the layout declares unused (stored name -> why).
    """

    def __init__(self, name: str, config: dict, source: str, files: list[SafetensorsFile],
                 entries: dict[str, TensorEntry], transforms: dict[str, keymap.Transform] | None = None,
                 unused: dict[str, str] | None = None):
        self.name = name
        self.config = config
        self.source = source
        self.files = files
        self._entries = entries
        self._transforms = transforms or {}
        self.unused = unused or {}
        self.consumed: set[str] = set()
        self.skipped: dict[str, str] = {}
        self._shapes = {}  # diffusers shapes of the transformed tensors
        for key, transform in self._transforms.items():
            entry = entries[key]
            try:
                self._shapes[key] = transform.shape(entry.shape)
            except ValueError as e:
                raise UserError(f"{entry.file.path}: tensor {entry.name!r} has shape {entry.shape}, which cannot "
                                f"hold {name} tensor {key!r}: {e}") from None

    def __enter__(self) -> Component:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return list(self._entries)

    def _entry(self, key: str) -> TensorEntry:
        entry = self._entries.get(key)
        if entry is None:
            close = difflib.get_close_matches(key, self._entries, n=1, cutoff=0.6)
            hint = f"; closest name there: {close[0]!r}" if close else ""
            raise UserError(f"{self.source}: the {self.name} has no tensor {key!r}{hint}")
        return entry

    def _describe(self, key: str, entry: TensorEntry) -> str:
        transform = self._transforms.get(key, keymap.SAME)
        stored = f" (stored as {transform.describe(entry.name)})" if entry.name != key else ""
        return f"{entry.file.path}: tensor {key!r}{stored}"

    def shape(self, key: str) -> tuple[int, ...]:
        entry = self._entry(key)
        return self._shapes[key] if key in self._shapes else entry.shape

    def dtype(self, key: str) -> str:
        """The numpy dtype name of the stored tensor: 'float16', 'float32', 'bfloat16', ..."""
        return self._entry(key).dtype.name

    def stored_names(self) -> set[str]:
        """Every stored tensor name the component accounts for: those it reads and those declared unused."""
        return {e.name for e in self._entries.values()} | set(self.unused)

    @property
    def weight_bytes(self) -> int:
        """Bytes of tensor data the component reads (its tensors only, for a single file; a fused
        q/k/v tensor counts once)."""
        stored = {(e.file.path, e.name): e.nbytes for e in self._entries.values()}
        return sum(stored.values())

    def get(self, key: str, dtype=np.float16, shape=None) -> np.ndarray:
        """Tensor `key` as `dtype`: a read-only zero-copy view when stored so (a transposed one is a
        copy), else one converted copy.

        `dtype=None` reads it as stored. `shape`, when given, must equal the tensor's (diffusers) shape.
        """
        entry = self._entry(key)
        have = self.shape(key)
        if shape is not None and tuple(shape) != have:
            raise UserError(f"{self._describe(key, entry)} has shape {have}, expected {tuple(shape)}")
        want = entry.dtype if dtype is None else np.dtype(dtype)
        array = self._transforms.get(key, keymap.SAME).apply(entry.file.view(entry))
        if want != entry.dtype:
            if entry.dtype not in CONVERTIBLE_SOURCES or want not in CONVERTIBLE_TARGETS:
                raise UserError(f"{self._describe(key, entry)} is stored as {entry.dtype.name} and cannot be read "
                                f"as {want.name} (conversions are from float16, bfloat16 and float32)")
            # bfloat16 -> float32 is exact, so bfloat16 -> float16 rounds once, like float32 -> float16.
            array = array.astype(want)
        self.consumed.add(key)
        return array

    def skip(self, key: str, reason: str) -> None:
        """Mark tensor `key` as deliberately unused by the network (e.g. the text encoder 1 layer after
        the penultimate one SDXL reads); `reason` documents why at the call site."""
        self._entry(key)
        self.skipped[key] = reason
        self.consumed.add(key)

    def check_all_consumed(self) -> None:
        """UserError if any tensor was never read: the network and the checkpoint disagree."""
        left = [k for k in self._entries if k not in self.consumed]
        if left:
            shown = ", ".join(left[:10]) + (f", ... ({len(left) - 10} more)" if len(left) > 10 else "")
            raise UserError(f"{self.source}: {len(left)} of the {self.name}'s {len(self)} tensors were not "
                            f"used by the network (does the config describe this checkpoint?): {shown}")

    def fingerprint(self) -> str:
        """sha256 over the component name, its config and, per file, size, header and sampled data blocks."""
        h = hashlib.sha256(self.name.encode())
        h.update(json.dumps(self.config, sort_keys=True).encode())
        for f in self.files:
            f.fingerprint_into(h)
        return h.hexdigest()


# ---------------------------------------------------------------- opening


def open_component(path, component: str, config: dict | None = None) -> Component:
    """Open `component` ("unet", "vae", "text_encoder", "text_encoder_2") of the checkpoint at `path`.

    `path`: a diffusers pipeline folder, the component's own folder, one SGM single-file
    `.safetensors` checkpoint, or an already opened Component (returned as is). The config is
    `config` if given, else the folder's `config.json`, else the packaged SDXL config
    (refiner when the UNet's first convolution has the refiner's 384 channels, else base).
    """
    if isinstance(path, Component):
        if path.name != component:
            raise UserError(f"{path.source}: opened as the {path.name}, but the {component} was asked for")
        return path
    if component not in COMPONENTS:
        raise UserError(f"unknown component {component!r}: expected one of {', '.join(COMPONENTS)}")
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".safetensors":
            raise UserError(f"{p}: expected a single-file .safetensors checkpoint or a diffusers folder")
        return _open_single_file(p, component, config)
    if p.is_dir():
        if (p / component).is_dir():
            return _open_folder(p / component, component, config)
        if (p / "model_index.json").is_file():
            raise UserError(f"{p}: this pipeline folder has no {component}/ folder")
        return _open_folder(p, component, config)
    raise UserError(f"{p}: no such file or folder (expected a diffusers pipeline folder, "
                    f"a {component}/ folder or a single-file .safetensors checkpoint)")


def _open_folder(folder: Path, component: str, config: dict | None) -> Component:
    found = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if found is None:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        hint = f"; {', '.join(pickles)} is a PyTorch pickle, convert it to .safetensors" if pickles else ""
        raise UserError(f"{folder}: no {component} weights found (looked for {', '.join(WEIGHT_FILES)}){hint}")
    files = _open_index(found) if found.name.endswith(".json") else [SafetensorsFile(found)]
    entries = {}
    for f in files:
        for name, entry in f.tensors.items():
            if name in entries:
                raise UserError(f"{found}: tensor {name!r} is stored twice, in {entries[name].file.path.name} "
                                f"and {f.path.name}")
            entries[name] = entry
    entries = _text_model_names(component, entries)
    if config is None:
        config_path = folder / "config.json"
        if config_path.is_file():
            config = load_json(config_path)
            _check_config_class(config, component, config_path)
        else:
            config = configs.load(_sdxl_variant(entries.get("conv_in.weight"), component, folder), component)
    return Component(component, config, str(folder), files, entries)


def _text_model_names(component: str, entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """The text_encoder's tensors under `text_model.*`, the names of the published SDXL text_encoder
    (saved by transformers 4.x) and of single files: transformers >= 5 saves CLIPTextModel without
    that prefix."""
    if component == "text_encoder" and entries and not any(k.startswith("text_model.") for k in entries):
        return {"text_model." + k: e for k, e in entries.items()}
    return entries


def _open_index(index_path: Path) -> list[SafetensorsFile]:
    """The shards a `*.safetensors.index*.json` lists, checked against its weight_map."""
    index = load_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index_path}: expected a JSON object with a non-empty \"weight_map\"")
    shards = {}
    for name, shard in weight_map.items():
        if shard not in shards:
            shard_path = index_path.parent / str(shard)
            if not shard_path.is_file():
                raise UserError(f"{index_path}: shard {shard!r} (for tensor {name!r}) is missing from {index_path.parent}")
            shards[shard] = SafetensorsFile(shard_path)
        if name not in shards[shard].tensors:
            raise UserError(f"{index_path}: tensor {name!r} is listed in {shard}, which does not hold it")
    return list(shards.values())


def _open_single_file(path: Path, component: str, config: dict | None) -> Component:
    f = SafetensorsFile(path)
    if keymap.find_prefix(component, f.tensors, str(path)) is None:
        prefixes = " or ".join(repr(p) for p in keymap.component_prefixes(component))
        raise UserError(f"{path}: no {component} tensors (no names starting with {prefixes}); "
                        f"expected an SDXL single-file checkpoint that holds the {component}")
    if config is None:
        conv_in = f.tensors.get(keymap.SINGLE_FILE_PREFIXES["unet"] + "input_blocks.0.0.weight")
        config = configs.load(_sdxl_variant(conv_in, component, path), component)
    layout = keymap.sgm_to_diffusers(component, config, f.tensors, source=str(path))
    entries = {diffusers: f.tensors[s.key] for diffusers, s in layout.sources.items()}
    transforms = {diffusers: s.transform for diffusers, s in layout.sources.items() if s.transform != keymap.SAME}
    return Component(component, config, str(path), [f], entries, transforms, layout.unused)


def _sdxl_variant(conv_in: TensorEntry | None, component: str, where: Path) -> str:
    """Which packaged SDXL config fits: the UNet's conv_in width is 320 in base, 384 in the refiner."""
    if component != "unet":
        return "sdxl_base_1.0"  # the refiner's VAE and bigG text encoder configs are the base's
    width = conv_in.shape[0] if conv_in is not None and conv_in.shape else None
    variants = {320: "sdxl_base_1.0", 384: "sdxl_refiner_1.0"}
    if width not in variants:
        name = conv_in.name if conv_in is not None else "conv_in.weight"
        raise UserError(f"{where}: no config.json, and the UNet's first convolution {name!r} has "
                        f"{width} output channels, neither SDXL base (320) nor refiner (384); "
                        "provide the model's config.json")
    return variants[width]


def _check_config_class(config, component: str, path: Path) -> None:
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    named = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if named is not None and named != CONFIG_CLASSES[component]:
        raise UserError(f"{path}: describes a {named}, but the {component} is a {CONFIG_CLASSES[component]}")
