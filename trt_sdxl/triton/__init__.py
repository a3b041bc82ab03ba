"""Serving an engines folder with NVIDIA Triton Inference Server (`python -m trt_sdxl.export triton`).

`model.py` is the Python-backend model source the export copies into the repository as
`sdxl/1/model.py`; it finds trt_sdxl and hands every call to `serving`, which reads a request's
tensors, draws the images with one `trt_sdxl.Generator` and answers IMAGE and INFOTEXT. `serving`
imports nothing of Triton's (the backend's `triton_python_backend_utils` is passed in), so the
request handling runs in tests without a server.
"""
