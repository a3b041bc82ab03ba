"""8-bit post-training quantization of the UNet: recipes, calibration, SmoothQuant, percentile scales.

recipe: which layers run in 8 bits and where SmoothQuant's 1/s is folded (tables).
percentile: activation amax from per-denoising-step statistics.
smoothquant: smoothing scales and the per-layer alpha search.
table: the CalibrationTable file.
calibrate: the calibration run (executor interface, prompts, scheduler loop).
"""
