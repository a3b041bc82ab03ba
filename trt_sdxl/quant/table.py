"""The CalibrationTable: what calibration measured and what tuning chose, in one versioned file.

Per tapped layer input (by module path):
- `tensor/<path>` [prompts, steps]: per-tensor abs-max of every UNet call (before smoothing);
- `chan/<path>` [3, steps, C]: per-input-channel abs-max combined over prompts (mean, max, min);
- `rows/<path>` [N, C]: activation rows sampled from a few calls — token rows of linear inputs,
  [N, C*k*k] im2col patches of conv inputs (the SmoothQuant alpha search and the per-layer tuning;
  tables written before conv patches were sampled lack those).
Plus `meta` (JSON): format version, the UNet checkpoint's fingerprint, scheduler, steps,
guidance scale, seeds, number and hash of the prompts, and the tuned choices: the amax rule
and the alpha of every smoothing group. A quantized network is a pure function of this file.

Written as one .npz through a temporary file and a rename.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import write_atomic
from .percentile import RuleSet

FORMAT_VERSION = 2  # 2: amax rules per layer kind, rule `leading_min` (was `reference`)


@dataclass
class CalibrationTable:
    meta: dict
    tensor_amax: dict[str, np.ndarray] = field(default_factory=dict)  # path -> [P, T]
    channel_amax: dict[str, np.ndarray] = field(default_factory=dict)  # path -> [3, T, C]
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # path -> [N, C]

    def choices(self, recipe: str) -> dict:
        """The tuned choices for `recipe`: {"rule": RuleSet, "alphas": {group: alpha or None}}."""
        tuned = self.meta.get("tuned", {}).get(recipe)
        if tuned is None:
            raise UserError(f"the calibration table has no tuned parameters for {recipe} "
                            f"(it has: {', '.join(self.meta.get('tuned', {})) or 'none'}); calibrate for {recipe}")
        return {"rule": RuleSet.from_json(tuned["rule"]), "alphas": dict(tuned["alphas"])}

    def set_choices(self, recipe: str, rule, alphas: dict, report: dict | None = None) -> None:
        self.meta.setdefault("tuned", {})[recipe] = {"rule": RuleSet.of(rule).to_json(), "alphas": alphas,
                                                     "report": report or {}}

    def channel_max(self, path: str) -> np.ndarray:
        """Per-channel abs-max over every call of the calibration run."""
        return self.channel_amax[path][1].max(axis=0)

    def save(self, path: str | Path) -> None:
        write_atomic(Path(path), self.to_bytes())

    def to_bytes(self) -> bytes:
        """The table as the .npz bytes `save` writes."""
        arrays = {"meta": np.frombuffer(json.dumps(self.meta, sort_keys=True).encode(), dtype=np.uint8)}
        for prefix, table in (("tensor", self.tensor_amax), ("chan", self.channel_amax), ("rows", self.rows)):
            arrays.update({f"{prefix}/{k}": v for k, v in table.items()})
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None, arrays: bool = True) -> CalibrationTable:
        """Read a table; with `fingerprint`, refuse one made for another UNet checkpoint. `arrays=False`:
        its meta only (the statistics stay on disk)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if not isinstance(meta, dict):
                    raise ValueError("its meta entry is not a JSON object")
                table = cls(meta=meta)
                for key in z.files if arrays else ():
                    prefix, _, name = key.partition("/")
                    target = {"tensor": table.tensor_amax, "chan": table.channel_amax, "rows": table.rows}.get(prefix)
                    if target is not None:
                        target[name] = z[key]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise UserError(f"--calibration {path}: not a readable calibration table ({e.__class__.__name__}: {e})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"--calibration {path}: table format version {meta.get('format_version')}, this "
                            f"version of trt_sdxl reads version {FORMAT_VERSION}; calibrate again")
        if fingerprint is not None and meta.get("unet_fingerprint") != fingerprint:
            raise UserError(f"--calibration {path}: made for another UNet checkpoint (fingerprint "
                            f"{str(meta.get('unet_fingerprint'))[:12]}…, this model's is {fingerprint[:12]}…); "
                            "calibrate this model, or pass the table made for it")
        return table
