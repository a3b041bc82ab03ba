"""LoRA files merged into a checkpoint's weights as they are read: W + Σ scale·(alpha/rank)·(up @ down).

Two file formats are read. kohya/A1111 (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`,
`.alpha`; `lora_te1_`/`lora_te_` for text_encoder, `lora_te2_` for text_encoder_2), whose module
path has every `.` written `_` and is the SGM one (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`)
or the diffusers one (`down_blocks_1_attentions_0_...`); and diffusers/PEFT (`unet.<module>.lora_A.weight`,
`.lora_B.weight`, `text_encoder.`, `text_encoder_2.`; an optional `.alpha`, or diffusers' adapter
metadata holding PEFT's `lora_alpha`), with the older `processor.to_q_lora.down.weight` names.
An `_`-joined name is ambiguous (`to_out_0` vs `attn1_to_q`), so it is resolved by looking it up
among the model's own module names written the same way; a LoRA module that names no module of
the model is a UserError listing every such key, never skipped.

`merged(component, lora_set)` returns the component with `get` adding the LoRA deltas in float32
before the cast to the dtype asked for (merging into an already merged component adds the new terms
after its own, as one set of both would). Every layer, SmoothQuant's folding and the quantizers read
weights through `Component.get`, so they all see the merged weights; its `fingerprint` covers the
LoRA files and scales, so a calibration table of the base model does not match the merged one.

A file's scale applies to every component it changes, or, as A1111's `<lora:name:te:unet>` says, one
to the text encoders and another to the UNet. `prompt_loras` reads those tags out of a prompt, and a
`LoRAFolder` (`--lora-dir`) finds a tag's file by its name or alias, as A1111 does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import keymap, weights
from .components import COMPONENTS
from .errors import UserError

FLAG = "--lora"

# Key prefix -> component, longest first where one prefix starts another.
COMPONENT_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),  # SD 1.x-era kohya files: the one text encoder
    ("unet.", "unet"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"),
)
# Key suffix -> which part of a LoRA module it is. `down` is A [r, in(, kh, kw)], `up` is B [out, r(, 1, 1)].
PART_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # attention processors: to_q_lora.down
    (".alpha", "alpha"),
)
# diffusers' attention-processor LoRA names -> the module the processor's LoRA modifies.
PROCESSOR_MODULES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights: PEFT's LoraConfig per component


def parse_spec(spec: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` -> (path, scale); the scale defaults to 1.0."""
    text = str(spec).strip()
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and not tail.startswith(("/", "\\")):  # not a Windows drive letter's colon
        try:
            scale, path = float(tail), head
        except ValueError:
            if not Path(text).expanduser().is_file():  # else a file name with a ':' in it
                raise UserError(f"{FLAG} {spec!r}: the scale after ':' must be a number, e.g. "
                                f"{FLAG} style.safetensors:0.8") from None
    if not path:
        raise UserError(f"{FLAG} {spec!r}: expected FILE[:SCALE], e.g. {FLAG} style.safetensors:0.8")
    if not math.isfinite(scale):
        raise UserError(f"{FLAG} {spec!r}: the scale must be a finite number, got {scale}")
    p = Path(path).expanduser()
    if p.suffix != ".safetensors":
        raise UserError(f"{FLAG} {spec!r}: expected a .safetensors LoRA file")
    if not p.is_file():
        raise UserError(f"{FLAG} {spec!r}: no such file {p}")
    return p, scale


@dataclass
class LoRAModule:
    """One module's LoRA in one file, by the name the file gives it (less its component prefix)."""

    name: str
    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)  # the file's keys, for messages


@dataclass
class LoRAFile:
    """One LoRA file at its user scale (`unet_scale`, where given, for the UNet instead): its modules per
    component, still under the file's names."""

    path: Path
    scale: float
    file: weights.SafetensorsFile
    modules: dict[str, dict[str, LoRAModule]]  # component -> file's module name -> module
    peft_alpha: dict[str, dict]  # component -> PEFT LoraConfig fields from diffusers' metadata
    unet_scale: float | None = None

    @classmethod
    def open(cls, path: Path, scale: float = 1.0, unet_scale: float | None = None) -> LoRAFile:
        f = weights.SafetensorsFile(Path(path))
        modules: dict[str, dict[str, LoRAModule]] = {}
        unknown = []
        for key, entry in f.tensors.items():
            component, rest = _component_of(key)
            part = next(((rest[:-len(s)], p) for s, p in PART_SUFFIXES if rest.endswith(s)), None)
            if component is None or part is None:
                unknown.append(key)
                continue
            name, which = part
            module = modules.setdefault(component, {}).setdefault(name, LoRAModule(name))
            module.keys.append(key)
            array = np.asarray(f.view(entry), np.float32)
            if which == "alpha":
                if array.size != 1:
                    raise UserError(f"{path}: {key!r} has shape {entry.shape}; an alpha is one number")
                module.alpha = float(array.reshape(()))
            else:
                setattr(module, which, array)
        if unknown:
            raise UserError(f"{path}: {len(unknown)} keys are not LoRA down/up/alpha tensors of the unet or a text "
                            f"encoder (LyCORIS LoHa/LoKr, DoRA and LoRA biases are not supported): {_shown(unknown)}")
        for component, by_name in modules.items():
            for module in by_name.values():
                _check_module(path, module)
        return cls(Path(path), float(scale), f, modules, _peft_metadata(f),
                   None if unet_scale is None else float(unet_scale))

    def at(self, scale: float, unet_scale: float | None = None) -> LoRAFile:
        """The same opened file at other scales (nothing is read again)."""
        return LoRAFile(self.path, float(scale), self.file, self.modules, self.peft_alpha,
                        None if unet_scale is None else float(unet_scale))

    def scale_for(self, component: str) -> float:
        return self.unet_scale if component == "unet" and self.unet_scale is not None else self.scale

    def factor(self, component: str, module: LoRAModule, target: str) -> float:
        """scale · alpha / rank (alpha: the file's, else PEFT's from the metadata, else the rank)."""
        rank = module.down.shape[0]
        alpha, rslora = module.alpha, False
        config = self.peft_alpha.get(component)
        if alpha is None and config:
            pattern = config.get("alpha_pattern") or {}
            # PEFT matches a pattern key against the end of the module's dotted name.
            hit = next((v for k, v in pattern.items() if target == k or target.endswith("." + k)), None)
            alpha = float(hit if hit is not None else config.get("lora_alpha", rank))
            rslora = bool(config.get("use_rslora"))
        if alpha is None:
            alpha = float(rank)
        return self.scale_for(component) * alpha / (math.sqrt(rank) if rslora else rank)

    def fingerprint_into(self, h) -> None:
        h.update(str(self.path.name).encode())
        self.file.fingerprint_into(h)
        h.update(repr(self.scale).encode())
        if self.unet_scale is not None:
            h.update(repr(("unet", self.unet_scale)).encode())

    def close(self) -> None:
        self.file.close()


def _component_of(key: str) -> tuple[str | None, str]:
    for prefix, component in COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return component, key[len(prefix):]
    return None, key


def _shown(keys: list[str], n: int = 10) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _check_module(path: Path, m: LoRAModule) -> None:
    if m.down is None or m.up is None:
        missing = "down (lora_down / lora_A)" if m.down is None else "up (lora_up / lora_B)"
        raise UserError(f"{path}: LoRA module {m.name!r} has no {missing} weight (keys: {', '.join(m.keys)})")
    rank = m.down.shape[0] if m.down.ndim else 0
    if m.down.ndim not in (2, 4) or m.up.ndim != m.down.ndim or m.up.shape[1] != rank or m.up.shape[2:] not in ((), (1, 1)):
        raise UserError(f"{path}: LoRA module {m.name!r}: down {m.down.shape} and up {m.up.shape} are not a "
                        "rank-r pair (expected down [r, in] and up [out, r], or conv down [r, C, kh, kw] and "
                        "up [O, r, 1, 1])")


def _peft_metadata(f: weights.SafetensorsFile) -> dict[str, dict]:
    """component -> the LoraConfig fields diffusers' `save_lora_weights` put in the file's metadata."""
    meta = f.metadata()
    try:
        flat = json.loads(meta.get(METADATA_KEY) or "{}")
    except json.JSONDecodeError:
        raise UserError(f"{f.path}: its {METADATA_KEY!r} metadata is not valid JSON") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        if component in COMPONENTS:
            configs.setdefault(component, {})[name] = value
    return configs


def spec_tuple(spec) -> tuple[Path, float, float | None]:
    """A LoRA spec — `FILE[:SCALE]` (or a path), (file, scale) or (file, text encoders' scale, UNet scale) — as that
    triple."""
    if isinstance(spec, (str, Path)):
        path, scale = parse_spec(str(spec))
        return path, scale, None
    unet = spec[2] if len(spec) > 2 else None
    return Path(spec[0]), float(spec[1]) if len(spec) > 1 else 1.0, None if unet is None else float(unet)


@dataclass
class LoRASet:
    """Several LoRA files, each at its own scale, applied together."""

    files: list[LoRAFile]

    @classmethod
    def load(cls, specs) -> LoRASet:
        """From `FILE[:SCALE]` strings (as `--lora` gives them), (path, scale) pairs or (path, text encoders'
        scale, UNet's scale) triples."""
        return cls([LoRAFile.open(*spec_tuple(spec)) for spec in specs])

    def components(self) -> set[str]:
        """The components some file modifies (a build that does not build one of them should say so)."""
        return {c for f in self.files for c in f.modules}

    def close(self) -> None:
        for f in self.files:
            f.close()


def module_names(component: weights.Component) -> dict[str, str]:
    """Every name a LoRA file may give a module of `component` -> its diffusers module name.

    The diffusers name itself and with `.` as `_`; for the UNet also the SGM name both ways;
    for the text encoders also without transformers' `text_model.` prefix. A `_` name two
    modules share maps to None (ambiguous).
    """
    modules = {k[:-len(".weight")] for k in component.keys() if k.endswith(".weight")}
    aliases = {m: m for m in modules}
    if component.name == "unet":
        aliases.update({sgm: d for sgm, d in keymap.unet_modules(component.config).items() if d in modules})
    elif component.name in ("text_encoder", "text_encoder_2"):
        aliases.update({m[len("text_model."):]: m for m in modules if m.startswith("text_model.")})
    names = dict(aliases)
    for alias, module in aliases.items():
        underscored = alias.replace(".", "_")
        if underscored in names and names[underscored] != module:
            names[underscored] = None
        else:
            names.setdefault(underscored, module)
    return names


def _target_module(name: str, names: dict[str, str]) -> str | None:
    if name in names:
        return names[name]
    head, sep, tail = name.rpartition(".processor.")  # `attn1.processor.to_q` (from `to_q_lora`)
    if sep and tail in PROCESSOR_MODULES:
        return names.get(f"{head}.{PROCESSOR_MODULES[tail]}")
    return None


@dataclass(frozen=True)
class Delta:
    """One file's term for one weight: factor · (up @ down), reshaped to the weight."""

    factor: float
    up: np.ndarray
    down: np.ndarray

    def apply(self, w: np.ndarray) -> np.ndarray:
        """w + factor · (up @ down) in float32 (conv: up [O, r, 1, 1] @ down [r, C, kh, kw] -> [O, C, kh, kw]),
        in place in the product (the same roundings as the expression, without its temporaries)."""
        up = self.up.reshape(self.up.shape[0], -1)  # [O, r]
        down = self.down.reshape(self.down.shape[0], -1)  # [r, C·kh·kw]
        term = (up @ down).reshape(w.shape)
        term *= np.float32(self.factor)
        term += w
        return term


def deltas_for(component: weights.Component, lora_set: LoRASet) -> dict[str, list[Delta]]:
    """weight key of `component` -> the LoRA terms on it, in file order; UserError for modules the model lacks."""
    names = module_names(component)
    out: dict[str, list[Delta]] = {}
    for f in lora_set.files:
        unmatched = []
        for name, m in f.modules.get(component.name, {}).items():
            target = _target_module(name, names)
            if target is None:
                unmatched.extend(m.keys)
                continue
            key = f"{target}.weight"
            shape = component.shape(key)
            if shape[0] != m.up.shape[0] or math.prod(shape) != m.up.shape[0] * math.prod(m.down.shape[1:]):
                raise UserError(f"{f.path}: LoRA module {name!r} (down {m.down.shape}, up {m.up.shape}) does not fit "
                                f"the {component.name} weight {key!r} of shape {shape}")
            out.setdefault(key, []).append(Delta(f.factor(component.name, m, target), m.up, m.down))
        if unmatched:
            raise UserError(f"file {f.path}: {len(unmatched)} LoRA keys match no module of the {component.name} "
                            f"of {component.source}: {_shown(sorted(unmatched))}")
    return out


class MergedComponent(weights.Component):
    """A component whose weights are read with the LoRA terms added (float32, before the cast)."""

    def __init__(self, base: weights.Component, deltas: dict[str, list[Delta]], loras: list[LoRAFile]):
        super().__init__(base.name, base.config, base.source, base.files, base._entries, base._transforms, base.unused)
        self.base = base
        self.deltas = deltas
        self.loras = loras

    def get(self, key: str, dtype=np.float16, shape=None) -> np.ndarray:
        if key not in self.deltas:
            return super().get(key, dtype, shape)
        w = np.array(super().get(key, np.float32, shape), np.float32)
        for delta in self.deltas[key]:
            w = delta.apply(w)
        want = np.dtype(self.dtype(key) if dtype is None else dtype)
        return w if want == w.dtype else w.astype(want)

    def fingerprint(self) -> str:
        """The base fingerprint, then each LoRA file that touches this component and its scale."""
        h = hashlib.sha256(self.base.fingerprint().encode())
        for f in self.loras:
            f.fingerprint_into(h)
        return h.hexdigest()


def merged(component: weights.Component, lora_set: LoRASet | None) -> weights.Component:
    """`component` with every LoRA of `lora_set` on it merged in (itself when none touches it). Into a merged
    component, the new terms come after its own: the same weights as one set of both files."""
    if lora_set is None:
        return component
    deltas = deltas_for(component, lora_set)
    if not deltas:
        return component
    touching = [f for f in lora_set.files if component.name in f.modules]
    if isinstance(component, MergedComponent):
        combined = {key: list(terms) for key, terms in component.deltas.items()}
        for key, terms in deltas.items():
            combined.setdefault(key, []).extend(terms)
        return MergedComponent(component.base, combined, component.loras + touching)
    return MergedComponent(component, deltas, touching)


# ---------------------------------------------------------------- A1111's prompt tags and LoRA folder

# A1111's extra-network tag (modules/extra_networks.py): `<kind:arg1:arg2:...>`, removed from the prompt
# before it is encoded; `lyco` is the LyCORIS extension's name for the same thing.
TAG = re.compile(r"<(\w+):([^>]+)>")
TAG_KINDS = ("lora", "lyco")


@dataclass(frozen=True)
class PromptLoRA:
    """One `<lora:name:te:unet>` tag: the name, and the text encoders' and the UNet's multipliers."""

    name: str
    te: float
    unet: float
    tag: str


def prompt_loras(prompt: str) -> tuple[str, list[PromptLoRA]]:
    """(the prompt without its LoRA tags, the tags), A1111's reading: `<lora:name>` is 1, `<lora:name:m>` is m for
    both, `<lora:name:te:unet>` one each, or named `te=`/`unet=`. Another kind of tag is refused by name."""
    found = []

    def take(match) -> str:
        kind, args = match.group(1), match.group(2).split(":")
        tag = match.group(0)
        if kind not in TAG_KINDS:
            raise UserError(f"prompt tag {tag}: '{kind}' extra networks are not supported (LoRAs are: <lora:name:0.8>)")
        positional = [a.strip() for a in args if "=" not in a]
        named = dict(a.split("=", 1) for a in args if "=" in a)
        named = {k.strip(): v.strip() for k, v in named.items()}
        unknown = sorted(set(named) - {"te", "unet"})
        if unknown or len(positional) > 3 or not positional or not positional[0]:
            raise UserError(f"prompt tag {tag}: expected <lora:name>, <lora:name:weight>, <lora:name:te_weight:"
                            "unet_weight> or te=/unet= (dyn= and other arguments are not supported)")
        try:
            te = float(positional[1]) if len(positional) > 1 else 1.0
            te = float(named.get("te", te))
            unet = float(positional[2]) if len(positional) > 2 else te
            unet = float(named.get("unet", unet))
        except ValueError:
            raise UserError(f"prompt tag {tag}: a weight is not a number") from None
        if not (math.isfinite(te) and math.isfinite(unet)):
            raise UserError(f"prompt tag {tag}: weights must be finite numbers")
        found.append(PromptLoRA(positional[0], te, unet, tag))
        return ""

    return TAG.sub(take, prompt), found


def metadata_of(path: Path) -> dict:
    """A safetensors file's `__metadata__` (strings); empty for a file that is not a readable safetensors file."""
    try:
        f = weights.SafetensorsFile(Path(path))
    except UserError:
        return {}
    try:
        return f.metadata()
    finally:
        f.close()


def short_hash(path: Path) -> str:
    """A1111's `Lora hashes` entry: the first 12 hex digits of sha256 over the file's tensor data (after the
    safetensors header), the "AddNet" hash kohya's tools write and A1111 shows; computed once per file version."""
    stat = Path(path).stat()
    return _short_hash(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _short_hash(path: str, size: int, mtime_ns: int) -> str:
    f = weights.SafetensorsFile(Path(path))
    data = memoryview(f.mmap)[f.data_offset:]  # the mapped file itself: no copy of a large LoRA
    try:
        return hashlib.sha256(data).hexdigest()[:12]
    finally:
        data.release()
        f.close()


class LoRAFolder:
    """The LoRA files under a folder (`--lora-dir`), as A1111 lists them: `name` is the file's stem, `alias`
    its `ss_output_name` metadata (else the name); a tag finds a file by name, else by alias, exactly (case
    matters). A name two files share is refused with both paths. `refresh` looks again."""

    def __init__(self, folder):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise UserError(f"--lora-dir {folder}: not a folder")
        self.refresh()

    def refresh(self) -> None:
        self.entries = []
        for path in sorted(self.folder.rglob("*.safetensors")):
            meta = metadata_of(path)
            self.entries.append({"name": path.stem, "alias": meta.get("ss_output_name") or path.stem,
                                 "path": str(path), "metadata": meta})

    def find(self, name: str) -> Path:
        for field_name in ("name", "alias"):
            hits = [e for e in self.entries if e[field_name] == name]
            if len(hits) > 1:
                raise UserError(f"<lora:{name}>: {len(hits)} LoRA files in {self.folder} are called {name!r} "
                                f"({', '.join(e['path'] for e in hits)}); rename one")
            if hits:
                return Path(hits[0]["path"])
        have = ", ".join(e["name"] for e in self.entries[:20]) or "none"
        raise UserError(f"<lora:{name}>: no LoRA named {name!r} in {self.folder} (it has: {have})")

    def resolve(self, tags: list[PromptLoRA]) -> list[tuple[Path, float, float]]:
        """The (file, text encoders' scale, UNet's scale) of each tag."""
        return [(self.find(t.name), t.te, t.unet) for t in tags]
