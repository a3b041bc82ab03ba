"""trt_sdxl: Stable Diffusion XL as TensorRT networks written layer by layer from .safetensors weights.

The library API is `trt_sdxl.Generator` (trt_sdxl.generator), imported on first use so that
`import trt_sdxl` stays cheap for the command-line tools.
"""

from .version import __version__

__all__ = ["Generator", "Image", "Cancelled", "__version__"]


def __getattr__(name: str):
    if name in ("Generator", "Image", "Cancelled"):
        from . import generator

        return getattr(generator, name)
    raise AttributeError(f"module 'trt_sdxl' has no attribute {name!r}")
