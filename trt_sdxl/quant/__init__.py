"""8-bit post-training quantization as numbers and plans (no TensorRT calls, no graph emission).

recipe: which layers run in 8 bits and where SmoothQuant's 1/s is folded (tables); QMAX.
table: the CalibrationTable file.
percentile: activation amax from per-step statistics.
smoothquant: smoothing scales and the per-layer alpha search.
plan: what the layer helpers consult (which inputs calibration taps; the quantization plan of a table).

The graph side (taps, smoothing multiplies, Q/DQ) is trt_sdxl.layers; the drivers that run
calibration and tuning are trt_sdxl.calibration.
"""
