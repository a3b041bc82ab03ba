"""The drivers of 8-bit quantization: they run networks over prompts and denoising steps.

prompts: the built-in calibration prompts and reading a user's prompt file.
calibrate: the calibration run over prompts and denoising steps (per-step statistics).
tune: choosing alpha per layer group and the amax rule: over whole trajectories where networks
are cheap, per layer on the calibration rows where each would be an engine build.
workflow: calibrate -> tune -> table, as the build runs it, over an executor factory
(netexec on the CPU, TensorRT engines on a GPU) and a `log` callable; and its plan, counted
before anything runs (`--dry-run`).
estimate: minutes for that plan (per-GPU UNet call times, engine build times).

The numbers and plans they produce are trt_sdxl.quant's.
"""
