"""Minutes for what a build will do (`python -m trt_sdxl.build --dry-run`): UNet calls on a GPU from a
published-peak roofline, engine builds from stated assumptions.

`UNET_MS`: milliseconds per full-size SDXL base UNet call (1024x1024, CFG batch 2) in FP16 and in each
8-bit recipe, with every activation quantize fused into its producer: the `ms_fused` figures of
tools/roofline.py (tools/roofline.json, 2026-12-01), where time per op = max(FLOPs / tensor peak of its
precision, bytes / DRAM bandwidth, exps / SFU exp rate) over each GPU's published dense peaks (their
sources are listed there). A roofline is what a perfect engine would take, so these are lower bounds;
on GeForce cards the FP16 figure assumes FP32 accumulation (NVIDIA measured an RTX 4090 FP16 step at
82 ms, under the 96 ms here: its FP16 engine accumulates in FP16). Another UNet scales by its MACs per
call over full-size SDXL's; a call at CFG batch b costs b / 2 calls at 2 (the UNet is compute-bound).

`BUILD_MINUTES`: engine build minutes per full-size SDXL component, assumptions:
- NVIDIA TensorRT (it times tactics on the GPU): UNet 10 minutes at the default optimization level,
  20 at level 4 (8-bit: more tactics, INT8/FP8 and FP16 kernels both timed), CLIP-L 0.5, OpenCLIP
  bigG 1.5, VAE decoder 3. Not measured here (our machines have no GPU with TensorRT); the run's
  shared timing cache makes later builds of already-timed layers faster, which they do not count.
- TensorRT for RTX (it times nothing when it builds; kernels are compiled when an engine is loaded):
  measured ahead-of-time builds on our CPU machines (tools/bench_build.json: UNet 66 s, text encoders
  1.3 s and 6.2 s, VAE 1.4 s); the 8-bit UNet taken as the FP16 one.
Smaller models scale by their UNet's MACs (at least 1% of the full-size figure).
"""

from __future__ import annotations

from dataclasses import dataclass

FULL_SIZE_MACS = 6_761_236_398_080  # SDXL base UNet, one call at 1024x1024, CFG batch 2 (tools/roofline.json)
FULL_SIZE_LATENT = 128

# GPU -> (compute capability, {precision: ms per full-size UNet call at CFG batch 2}); H100 and H200 are the
# roofline's SXM parts
UNET_MS = {
    "RTX 4090": ("SM89", {"fp16": 95.98, "int8": 46.03, "int8_level3": 40.57, "fp8": 53.66, "fp8_gemm": 68.15}),
    "RTX 6000 Ada": ("SM89", {"fp16": 52.97, "int8": 36.76, "int8_level3": 35.10, "fp8": 32.56, "fp8_gemm": 39.83}),
    "L40S": ("SM89", {"fp16": 55.16, "int8": 38.83, "int8_level3": 37.25, "fp8": 34.34, "fp8_gemm": 42.09}),
    "H100": ("SM90", {"fp16": 18.07, "int8": 12.15, "int8_level3": 11.53, "fp8": 11.46, "fp8_gemm": 13.25}),
    "H200": ("SM90", {"fp16": 16.68, "int8": 10.88, "int8_level3": 10.23, "fp8": 10.26, "fp8_gemm": 11.94}),
    "RTX 5090": ("SM120", {"fp16": 72.30, "int8": 33.10, "int8_level3": 28.69, "fp8": 39.47, "fp8_gemm": 50.77}),
}
# NVIDIA's recipes quantize the layers of ours of the same format: the same roofline
SAME_LAYERS = {"nvidia_modelopt": "int8", "nvidia_modelopt_fp8": "fp8"}

BUILD_MINUTES = {
    "tensorrt": {"unet": 10.0, "unet_8bit": 20.0, "text_encoder": 0.5, "text_encoder_2": 1.5, "vae": 3.0},
    "tensorrt_rtx": {"unet": 1.1, "unet_8bit": 1.1, "text_encoder": 0.02, "text_encoder_2": 0.1, "vae": 0.02},
}
MIN_SCALE = 0.01


@dataclass(frozen=True)
class GpuFigures:
    name: str
    arch: str
    unet_ms: dict[str, float]
    how: str  # how the GPU was picked, for the printout


def gpu_figures(arch: str, gpu_name: str | None = None) -> GpuFigures | None:
    """The figures of the GPU named `gpu_name` (the one present), else of the first GPU of `arch` in the
    table ('SM89': the RTX 4090); None where the table has neither."""
    if gpu_name:
        for name, (cap, ms) in UNET_MS.items():
            if name.lower() in gpu_name.lower():
                return GpuFigures(name, cap, ms, f"the {gpu_name} present")
    for name, (cap, ms) in UNET_MS.items():
        if cap == arch:
            return GpuFigures(name, cap, ms, f"{arch} taken as the {name}")
    return None


def unet_call_ms(figures: GpuFigures, precision: str, cfg_batch: int, macs_ratio: float) -> float:
    """One UNet call at `cfg_batch` rows of a UNet with `macs_ratio` x full-size SDXL's MACs."""
    ms = figures.unet_ms[SAME_LAYERS.get(precision, precision)]
    return ms * macs_ratio * cfg_batch / 2


def build_minutes(backend: str, component: str, precision: str, macs_ratio: float) -> float:
    table = BUILD_MINUTES["tensorrt_rtx" if backend == "tensorrt_rtx" else "tensorrt"]
    key = "unet_8bit" if component == "unet" and precision != "fp16" else component
    return table[key] * max(macs_ratio, MIN_SCALE)
