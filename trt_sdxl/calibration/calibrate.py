"""The calibration run: the FP16 UNet plus in-graph abs-max taps over real prompts and real steps.

Each prompt is encoded by our text encoders, then denoised with the chosen scheduler, CFG as
batch 2 and a fixed seed per prompt; every UNet call hands back the per-channel abs-max of
each tapped layer input (and a few sampled rows), bucketed by denoising step. The executor
is whatever runs the calibration network: netexec on the CPU (tiny models, tests) or a
TensorRT engine on a GPU (`trt_sdxl.runtime`), behind the same `run(feeds)` seam.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import numpy as np

from .. import schedulers
from ..denoising import Conditioning, trajectory
from ..log import Log, format_seconds, silent
from ..quant.table import FORMAT_VERSION, CalibrationTable

SAMPLE_PROMPTS = 4  # prompts whose sampled rows are kept for the SmoothQuant alpha search


class StatsCollector:
    """Streams per-call tap outputs into per-step statistics (constant memory in the prompt count)."""

    def __init__(self, prompts: int, steps: int):
        self.prompts, self.steps = prompts, steps
        self.tensor: dict[str, np.ndarray] = {}
        self._sum: dict[str, np.ndarray] = {}
        self._max: dict[str, np.ndarray] = {}
        self._min: dict[str, np.ndarray] = {}
        self.rows: dict[str, list[np.ndarray]] = {}
        self.sample_steps = sorted({0, steps // 3, (2 * steps) // 3, steps - 1})

    def add_batch(self, first: int, count: int, step: int, outputs: dict[str, np.ndarray]) -> None:
        """One UNet call of prompts first..first+count-1: its CFG rows are the uncond halves of the
        prompts, then their cond halves (2 * count rows); a prompt's statistics cover both."""
        for k in range(count):
            self.add(first + k, step, {name: np.concatenate([value[k:k + 1], value[count + k:count + k + 1]])
                                       for name, value in outputs.items() if name.partition(":")[0] in ("amax", "rows")})

    def add(self, prompt: int, step: int, outputs: dict[str, np.ndarray]) -> None:
        """One prompt's tap outputs at one step: `amax:<path>` [rows, C] and `rows:<path>` [rows, R, C]."""
        for name, value in outputs.items():
            kind, _, path = name.partition(":")
            if kind == "amax":
                v = np.asarray(value, np.float32).reshape(-1, np.shape(value)[-1]).max(axis=0)
                if path not in self.tensor:
                    self.tensor[path] = np.zeros((self.prompts, self.steps), np.float32)
                    self._sum[path] = np.zeros((self.steps, v.size), np.float64)
                    self._max[path] = np.zeros((self.steps, v.size), np.float32)
                    self._min[path] = np.full((self.steps, v.size), np.inf, np.float32)
                self.tensor[path][prompt, step] = v.max()
                self._sum[path][step] += v
                np.maximum(self._max[path][step], v, out=self._max[path][step])
                np.minimum(self._min[path][step], v, out=self._min[path][step])
            elif kind == "rows" and prompt < SAMPLE_PROMPTS and step in self.sample_steps:
                value = np.asarray(value, np.float32)
                self.rows.setdefault(path, []).append(value.reshape(-1, value.shape[-1]))

    def table(self, meta: dict) -> CalibrationTable:
        chan = {p: np.stack([self._sum[p] / self.prompts, self._max[p], self._min[p]]).astype(np.float32)
                for p in self.tensor}
        rows = {p: np.concatenate(r).astype(np.float16) for p, r in self.rows.items()}
        return CalibrationTable(meta=meta, tensor_amax=dict(self.tensor), channel_amax=chan, rows=rows)


def calibration_meta(prompts: list[str], *, scheduler: str, steps: int, cfg: float, seed: int,
                     latent_shape: tuple[int, int, int], unet_fingerprint: str) -> dict:
    """A table's meta for a calibration over `prompts` with these settings."""
    return {
        "format_version": FORMAT_VERSION,
        "unet_fingerprint": unet_fingerprint,
        "scheduler": scheduler,
        "steps": steps,
        "cfg": cfg,
        "seed": seed,
        "prompts": len(prompts),
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "latent_shape": list(latent_shape),
    }


def calibrate_into(collector: StatsCollector, unet_executor, encode: Callable[[list[str]], Conditioning],
                   prompts: list[str], *, offset: int = 0, scheduler: str = "euler", steps: int = 20, cfg: float = 5.0,
                   seed: int = 0, latent_shape: tuple[int, int, int] = (4, 128, 128), batch: int = 1,
                   log: Log = silent, what: str = "") -> None:
    """Run `prompts` through `unet_executor`, `batch` per UNet call (CFG batch 2 x batch; prompt p seeded with
    seed + p whatever the batch), into `collector` as its prompts offset..offset+len-1."""
    started = time.perf_counter()
    for first in range(0, len(prompts), batch):
        chunk = prompts[first:first + batch]
        trajectory(unet_executor, encode(chunk), schedulers.create(scheduler, steps), cfg, seed + first,
                   (len(chunk), *latent_shape),
                   on_step=lambda i, t, out, first=first, n=len(chunk): collector.add_batch(offset + first, n, i, out))
        done = first + len(chunk)
        left = (time.perf_counter() - started) / done * (len(prompts) - done)
        log(f"calibration{what}: prompt {done}/{len(prompts)} ({steps} steps), about {format_seconds(left)} left")


def run_calibration(unet_executor, encode: Callable[[list[str]], Conditioning], prompts: list[str], *,
                    scheduler: str = "euler", steps: int = 20, cfg: float = 5.0, seed: int = 0,
                    latent_shape: tuple[int, int, int] = (4, 128, 128), unet_fingerprint: str = "",
                    batch: int = 1, log: Log = silent) -> CalibrationTable:
    """Calibrate over `prompts`, `batch` prompts per UNet call; returns the statistics as a table."""
    collector = StatsCollector(len(prompts), steps)
    calibrate_into(collector, unet_executor, encode, prompts, scheduler=scheduler, steps=steps, cfg=cfg, seed=seed,
                   latent_shape=latent_shape, batch=batch, log=log)
    return collector.table(calibration_meta(prompts, scheduler=scheduler, steps=steps, cfg=cfg, seed=seed,
                                            latent_shape=latent_shape, unet_fingerprint=unet_fingerprint))
