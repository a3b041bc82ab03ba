"""Changing the LoRAs of loaded networks without rebuilding them: which LoRAs each refittable network
carries, and the weights a change sends.

A `LoRASwitch` knows, per component (text encoders, UNet), the network's refit map (refit_map.json of a
`--refittable` build), its base weights (the checkpoint with the build's own LoRAs merged) and, for an
8-bit UNet, its quant plan. `set({component: specs})` makes each network carry exactly those LoRAs: it
recomputes the weights the old or the new LoRAs touch (trt_sdxl.refit_map: bit for bit what a fresh
definition binds, the 8-bit plan kept) and hands them to `apply(component, {name: array}, more)` — TensorRT's
refitter on a GPU, the netexec network's weights on the CPU; `more(names)` recomputes any other weight
the refitter asks for. A network whose LoRAs (at its scales) do not change is left alone, and recomputed
weights are kept in a bounded cache, so going back to an earlier set sends the same arrays again without
reading or multiplying anything.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import lora, refit_map
from .components import LORA_COMPONENTS
from .errors import UserError
from .log import Log, silent

# a rank-32 LoRA on every attention and feed-forward weight of full-size SDXL recomputes 3.9 GiB of fp16 weights
# (tools/bench_refit.py): one such set fits
DEFAULT_CACHE_BYTES = 4 << 30


@dataclass
class RefitSource:
    """What one component's weights are recomputed from: its refit map, and openers of its base weights and
    (8-bit UNet) quant plan, called once, when a change first needs them."""

    refit: dict
    open_base: Callable[[], object]
    open_plan: Callable[[object], object] = lambda base: None
    _base: object = field(default=None, repr=False)
    _plan: object = field(default=None, repr=False)
    _planned: bool = field(default=False, repr=False)

    def base(self):
        if self._base is None:
            self._base = self.open_base()
        return self._base

    def plan(self):
        if not self._planned:
            self._plan, self._planned = self.open_plan(self.base()), True
        return self._plan


def folder_sources(folder, entries: dict, model=None) -> dict[str, RefitSource]:
    """component -> RefitSource of each refittable engine of an engines folder (trt_sdxl.runtime.manifest): its
    refit map, its base weights (`model`, else the folder's copy, else the checkpoint the build read) and, for an
    8-bit UNet, the build's quant plan from the folder's calibration table."""
    from .models.unet import make_quant_plan
    from .quant.recipe import RECIPES

    sources = {}
    for c in LORA_COMPONENTS:
        if c not in entries or not entries[c].get("refittable"):
            continue
        open_plan = (lambda base: None)
        if c == "unet" and entries[c]["precision"] in RECIPES:
            precision = entries[c]["precision"]
            open_plan = (lambda base: make_quant_plan(base, precision, folder.calibration_path()))
        sources[c] = RefitSource(folder.refit_map(c), lambda c=c: folder.base_weights(c, model), open_plan)
    return sources


def folder_switch(folder, entries: dict, model, apply, log: Log = silent, carried: bool = True):
    """(LoRASwitch over an engines folder's refittable networks, or None where none is; component -> the LoRAs the
    folder's engines carry). `carried`: the networks carry those already (engines loaded from the folder); else
    (networks defined afresh, as netexec's) they are put in now."""
    sources = folder_sources(folder, entries, model)
    standing = {c: folder.refit_loras(entries[c]) for c in LORA_COMPONENTS if c in entries}
    if not sources:
        return None, standing
    switch = LoRASwitch(sources, apply, carried=standing if carried else None, log=log)
    if not carried:
        switch.set(standing)
    return switch, standing


def set_key(files: list[lora.LoRAFile], component: str) -> tuple:
    """What a component's weights depend on: each file touching it (its content's fingerprint, so a copy of a
    file is the same file) at its scale there."""
    key = []
    for f in files:
        if component in f.modules:
            h = hashlib.sha256()
            f.file.fingerprint_into(h)
            key.append((h.hexdigest(), f.scale_for(component)))
    return tuple(key)


class LoRASwitch:
    """See the module docstring. `carried`: component -> the LoRA specs its network carries now (none: base)."""

    def __init__(self, sources: dict[str, RefitSource], apply: Callable[[str, dict, Callable], None],
                 carried: dict[str, list] | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES, log: Log = silent):
        self.sources = sources
        self.apply = apply
        self.log = log
        self.cache_bytes = cache_bytes
        self._files: dict[tuple, lora.LoRAFile] = {}  # (path, size, mtime) -> the opened file
        self._cache: OrderedDict[tuple, dict] = OrderedDict()
        self.recomputed = 0  # weight sets computed (not taken from the cache), for the tests
        self._warned: set = set()  # LoRA files an 8-bit network was not calibrated with, said once
        self.carried: dict[str, tuple[tuple, list]] = {}  # component -> (set key, files)
        for component, specs in (carried or {}).items():
            files = self.open(specs)
            self.carried[component] = (set_key(files, component), files)

    def open(self, specs) -> list[lora.LoRAFile]:
        """LoRA files at their scales from specs (`FILE[:SCALE]`, (file, scale), (file, te, unet)); a file opened
        before and unchanged since is not read again."""
        files = []
        for spec in specs:
            path, te, unet = lora.spec_tuple(spec)
            if not path.is_file():
                raise UserError(f"LoRA {path}: no such file")
            stat = path.stat()
            where = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
            if where not in self._files:
                self._files[where] = lora.LoRAFile.open(path)
            files.append(self._files[where].at(te, unet))
        return files

    def set(self, specs_by_component: dict[str, list]) -> dict[str, int]:
        """Make each named component's network carry exactly its specs; returns component -> weights sent (only the
        components that changed). Everything is checked before the first network changes."""
        wanted = {c: self.open(specs) for c, specs in specs_by_component.items()}
        plans = []
        for component, files in wanted.items():
            if component not in self.sources:
                if any(component in f.modules for f in files):
                    raise UserError(f"the {component} cannot take other LoRAs: its engine was not built refittable "
                                    "(rebuild with --refittable, or merge the LoRA at build time with --lora)")
                continue
            key = set_key(files, component)
            old_key, old_files = self.carried.get(component, ((), []))
            if key == old_key:
                continue
            source = self.sources[component]
            base = source.base()
            keys = set(lora.deltas_for(base, lora.LoRASet(old_files))) | set(lora.deltas_for(base, lora.LoRASet(files)))
            plans.append((component, key, files, refit_map.touched(source.refit, keys)))
            self._check_calibration(component, files)
        sent = {}
        for component, key, files, names in plans:
            started = time.perf_counter()
            source = self.sources[component]
            merged = lora.merged(source.base(), lora.LoRASet(files))
            weights = self._weights(component, key, merged, names)
            computed = time.perf_counter() - started
            self.apply(component, weights,
                       lambda asked, s=source, m=merged: refit_map.refit_weights(s.refit, m, s.plan(), asked))
            self.carried[component] = (key, files)
            sent[component] = len(weights)
            self.log(f"{component}: refit {len(weights)} weights ({computed:.2f} s to compute, "
                     f"{time.perf_counter() - started - computed:.2f} s to send)")
        return sent

    def _check_calibration(self, component: str, files) -> None:
        """An 8-bit network keeps the activation scales its build calibrated: a LoRA it was not calibrated with can
        move activations past them (tools/lora_refit_quality.py: a style LoRA lost 24 dB of PSNR that way).
        Said once per file."""
        plan = self.sources[component].plan()
        if plan is None:
            return
        covered = {r.get("hash") for r in plan.table.meta.get("calibration_loras") or []}
        for f in files:
            if component in f.modules and lora.short_hash(f.path) not in covered and f.path not in self._warned:
                self._warned.add(f.path)
                self.log(f"warning: the 8-bit {component} was calibrated without {f.path.name}: a refit keeps its "
                         "activation scales, which this LoRA may push past (lower image quality); build with "
                         f"--calibrate-lora {f.path.name} to calibrate for it")

    def _weights(self, component: str, key: tuple, merged, names: list[str]) -> dict:
        cache_key = (component, key, tuple(names))
        found = self._cache.pop(cache_key, None)
        if found is None:
            source = self.sources[component]
            found = refit_map.refit_weights(source.refit, merged, source.plan(), names)
            self.recomputed += 1
        self._cache[cache_key] = found
        while self._cache and sum(a.nbytes for w in self._cache.values() for a in w.values()) > self.cache_bytes:
            self._cache.popitem(last=False)  # the oldest first; a set larger than the budget is not kept at all
        return found
