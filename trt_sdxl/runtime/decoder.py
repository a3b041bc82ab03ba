"""Latents to 8-bit RGB on the GPU: the VAE engine and the image_to_rgb8 kernel, with the latents
the denoiser left on the device; only the uint8 image comes back to the host.

Per image: scale_cast(latents, 1 / scaling_factor) into the VAE's input (as Pipeline.decode does
on the CPU), the VAE engine, image_to_rgb8_f32 into the image's place in one uint8 buffer
[B, H, W, 3]. A VAE engine built for fewer images than the call has runs on slices of them; one
with dynamic shapes takes any latent size and batch its profiles hold (its buffers are allocated
for their largest shapes).
"""

from __future__ import annotations

import numpy as np

from .. import kernels
from ..errors import UserError
from .cuda import DeviceBuffer, HostBuffer, KernelLibrary, Stream
from .denoiser import DeviceLatents
from .engine import Engine, nbytes


class ImageDecoder:
    """`decode(latents)` -> uint8 RGB [B, H, W, 3] through the VAE engine `vae` (input `latent`, output
    `image` float32 [b, 3, H, W] in [-1, 1]); its I/O buffers are allocated once."""

    def __init__(self, vae: Engine, library: KernelLibrary, stream: Stream, scaling_factor: float):
        self.vae, self.library, self.stream = vae, library, stream
        self.scaling_factor = float(scaling_factor)
        self.latent_spec, self.image_spec = vae.inputs["latent"], vae.outputs["image"]
        if self.image_spec[1] != np.float32:
            raise UserError(f"{vae.name}: its image output is {self.image_spec[1]}, the RGB kernel takes float32; "
                            "rebuild the VAE engine with this version of trt_sdxl")
        self.suffix = kernels.dtype_suffix(self.latent_spec[1])
        largest = vae.max_shapes(stream)
        self.batch = largest["latent"][0]
        self.latent = DeviceBuffer(nbytes((largest["latent"], self.latent_spec[1])))
        self.image = DeviceBuffer(nbytes((largest["image"], self.image_spec[1])))
        self.decodes = 0

    def decode(self, latents: DeviceLatents | np.ndarray) -> np.ndarray:
        """The RGB images of `latents` (on the device, which this frees, or numpy float32)."""
        if isinstance(latents, DeviceLatents):
            source, shape, owned = latents.buffer, latents.shape, latents
        else:
            host = np.ascontiguousarray(latents, np.float32)
            source, shape = DeviceBuffer(host.nbytes), host.shape
            source.upload(host, self.stream)
            owned = source
        try:
            return self._decode(source, tuple(shape))
        finally:
            self.stream.synchronize()
            owned.free()

    def _decode(self, source: DeviceBuffer, shape: tuple[int, ...]) -> np.ndarray:
        images, per_image = shape[0], int(np.prod(shape[1:]))
        fixed = self.latent_spec[0]
        if not self.vae.dynamic and tuple(shape[1:]) != tuple(fixed[1:]):
            raise UserError(f"{self.vae.name} takes latents {fixed[1:]}, these are {shape[1:]}")
        rows = fixed[0] if fixed[0] > 0 else min(images, self.batch)  # a dynamic batch: the call's, up to the max
        _, _, height, width = self.vae.set_shapes({"latent": (rows, *shape[1:])}, self.stream)["image"]
        rgb_bytes = height * width * 3
        rgb = DeviceBuffer(images * rgb_bytes)
        host = HostBuffer((images, height, width, 3), np.uint8)
        try:
            for first in range(0, images, rows):
                count = min(rows, images - first)
                self.library.launch(f"scale_cast_{self.suffix}", count * per_image, self.stream, self.latent,
                                    int(source) + 4 * first * per_image, 1.0 / self.scaling_factor,
                                    count * per_image, 1)
                self.vae.set_address("latent", self.latent)
                self.vae.set_address("image", self.image)
                self.vae.enqueue(self.stream)
                self.library.launch("image_to_rgb8_f32", count * rgb_bytes, self.stream,
                                    int(rgb) + first * rgb_bytes, self.image, count, height, width)
            rgb.download(host, self.stream)
            self.stream.synchronize()
            self.decodes += 1
            save_cache = getattr(self.vae, "save_runtime_cache", None)  # an engine with a runtime cache: warm now
            if self.decodes == 1 and save_cache is not None:
                save_cache()
            return host.array.copy()
        finally:
            self.stream.synchronize()  # nothing enqueued may still use what is freed below
            rgb.free()
            host.free()

    def release(self) -> None:
        self.latent.free()
        self.image.free()
