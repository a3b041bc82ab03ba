"""trt_sdxl: Stable Diffusion XL as TensorRT networks written layer by layer from .safetensors weights."""

__version__ = "0.1.0"
