"""The GPU runtime without PyTorch: cuda-python (driver API) and TensorRT engines.

- `cuda`: checked driver calls, the device, device and pinned host buffers, streams, events,
  CUDA graphs, the NVRTC-compiled kernels of kernels/.
- `manifest`: an engines folder's manifest and the checks that need no GPU (TensorRT version,
  compute capability, image size), each failing with one line and the rebuild command.
- `engine`: engines loaded through the backend's runtime; `EngineExecutor`, the executor seam
  (`run(feeds) -> outputs`) on an engine, also the calibration executor.
- `runtime_cache`: TensorRT-RTX's just-in-time compiled kernels, kept on disk next to the engines.
- `denoiser`: the UNet loop as one CUDA graph replayed per step.
- `decoder`: the VAE engine and the RGB kernel on latents that stay on the GPU.

Importing this package needs neither a GPU nor cuda-python; using `cuda` does.
"""
