"""8-bit post-training quantization of the UNet: recipes, calibration, SmoothQuant, percentile scales.

recipe: which layers run in 8 bits and where SmoothQuant's 1/s is folded (tables).
prompts: the built-in calibration prompts and reading a user's prompt file.
calibrate: the calibration run over prompts and denoising steps (per-step statistics).
table: the CalibrationTable file.
percentile: activation amax from per-step statistics.
smoothquant: smoothing scales and the per-layer alpha search.
plan: what the layer helpers consult (calibration taps; the quantization plan of a table).
tune: choosing alpha per layer group and the amax rule over whole trajectories.
workflow: calibrate -> tune -> table, as the build runs it.
"""
