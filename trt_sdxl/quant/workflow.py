"""calibrate -> tune -> CalibrationTable: the quantization workflow `python -m trt_sdxl.build` runs.

Executors come from `executor_factory`: netexec on the CPU (the only choice without a GPU:
fine for tiny models, hours for a full-size one, so a full-size model on the CPU is refused
with a pointer to `--calibration FILE`), or the TensorRT runtime on a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError
from ..pipeline import Pipeline
from .calibrate import run_calibration
from .prompts import load_prompts
from .table import CalibrationTable
from .tune import tune

CPU_LIMIT_BYTES = 256 * 2**20  # UNets larger than this are not calibrated with netexec


def heldout_count(prompts: int) -> int:
    """Prompts held aside from calibration for the trajectory-level tuning: an eighth, 2 to 8
    (the 72 built-in prompts: 64 calibrate, 8 tune)."""
    return max(2, min(8, prompts // 8))


def log(message: str) -> None:
    print(f"[trt_sdxl.build] {message}", file=sys.stderr, flush=True)


def netexec_factory(model, batch: int, latent_h: int, latent_w: int):
    """Executors for the four networks, run by netexec (CPU)."""
    from ..executors import NetexecExecutor
    from ..models import clip, unet

    def make(kind: str, **options):
        if kind == "unet":
            return NetexecExecutor(unet.define(model, batch=2 * batch, latent_height=latent_h,
                                               latent_width=latent_w, **options))
        if kind.startswith("text_encoder"):
            return NetexecExecutor(clip.define(model, encoder=2 if kind.endswith("_2") else 1, batch=batch))
        raise ValueError(kind)

    return make


def text_conditioning(model, make, height: int, width: int):
    """encode([prompt]) -> Conditioning, through our tokenizers and text encoder networks."""
    from ..tokenizer import open_tokenizer

    pipe = Pipeline(make("text_encoder"), make("text_encoder_2"), None, None,
                    open_tokenizer(model, encoder=1), open_tokenizer(model, encoder=2))
    return lambda prompts: pipe.encode_prompt(prompts, None, height, width)


def calibrate_and_tune(model, unet_component, recipe: str, *, height: int, width: int, table_path: Path,
                       calibration: str | None = None, prompts_file: str | None = None, steps: int = 20,
                       scheduler: str = "euler", cfg: float = 5.0, seed: int = 0, factory=None) -> CalibrationTable:
    """The table for `recipe`: read from `calibration` (tuned now if it lacks `recipe`), or measured."""
    latent = (4, height // 8, width // 8)
    fingerprint = unet_component.fingerprint()
    table = CalibrationTable.load(calibration, fingerprint) if calibration else None
    if table is not None and recipe in table.meta.get("tuned", {}):
        log(f"calibration: using {calibration} ({table.meta['prompts']} prompts, {table.meta['steps']} steps)")
        return table
    if factory is None:
        if unet_component.weight_bytes > CPU_LIMIT_BYTES:
            raise UserError(
                f"--precision {recipe}: calibrating this {unet_component.weight_bytes / 2**30:.1f} GiB UNet needs a GPU "
                "(on the CPU it would take hours); calibrate on a machine with a GPU and TensorRT and pass the "
                "table with --calibration FILE")
        factory = netexec_factory(model, 1, latent[1], latent[2])
    encode = text_conditioning(model, factory, height, width)
    if table is None:
        prompts = load_prompts(prompts_file)
        held = heldout_count(len(prompts))
        calib, heldout = prompts[:-held], prompts[-held:]
        log(f"calibration: {len(calib)} prompts x {steps} steps ({scheduler}, CFG {cfg}), "
            f"{held} held aside for tuning")
        table = run_calibration(factory("unet", calibration_taps=True), encode, calib, scheduler=scheduler,
                                steps=steps, cfg=cfg, seed=seed, latent_shape=latent, unet_fingerprint=fingerprint,
                                log=log)
        table.meta["heldout"] = heldout
    log(f"tuning {recipe}: SmoothQuant alpha per layer group, then the amax rule over whole trajectories")
    tune(table, recipe, unet_component, lambda options: factory("unet", precision=recipe, calibration=table,
                                                                quant_options=options),
         factory("unet"), encode, table.meta.get("heldout") or load_prompts(None)[-heldout_count(len(load_prompts(None))):],
         scheduler=table.meta["scheduler"], steps=table.meta["steps"], cfg=table.meta["cfg"], seed=seed,
         latent_shape=tuple(table.meta["latent_shape"]), log=log)
    table.save(table_path)
    log(f"calibration table: {table_path}")
    return table
