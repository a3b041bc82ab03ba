"""What the Triton model `sdxl` does with a request: read its tensors, draw the images with one
trt_sdxl.Generator, answer IMAGE (uint8 [B, H, W, 3]) and INFOTEXT ([B] strings, A1111's text),
or one error line naming what to fix.

The request's tensors are the keyword arguments of `Generator.generate` (INPUTS: one tensor of
shape [1] each; every one but PROMPT optional, an absent one gets generate's default), so a
request gives exactly the image `python -m trt_sdxl.generate` draws for the same settings. CFG
travels as FP32 and is read back as the shortest decimal that rounds to it (7.3, not
7.300000190734863), so CFG 7.3 is the CLI's `--cfg 7.3` too.

`pb_utils` is the Python backend's `triton_python_backend_utils` module, passed in by model.py
(tests pass a stand-in).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..generator import Cancelled, Generator


@dataclass(frozen=True)
class Field:
    """One input tensor of the `sdxl` model: its Triton name and type, and the generate argument."""

    name: str
    data_type: str  # Triton's TYPE_* name
    argument: str  # Generator.generate's parameter
    required: bool = False


INPUTS = (
    Field("PROMPT", "TYPE_STRING", "prompt", required=True),
    Field("NEGATIVE_PROMPT", "TYPE_STRING", "negative_prompt"),
    Field("SEED", "TYPE_INT64", "seed"),
    Field("STEPS", "TYPE_INT32", "steps"),
    Field("CFG", "TYPE_FP32", "cfg"),
    Field("SCHEDULER", "TYPE_STRING", "scheduler"),
    Field("WIDTH", "TYPE_INT32", "width"),
    Field("HEIGHT", "TYPE_INT32", "height"),
    Field("BATCH", "TYPE_INT32", "batch"),
    Field("LONG_PROMPTS", "TYPE_BOOL", "long_prompts"),
    Field("WEIGHTING", "TYPE_BOOL", "weighting"),
)
# name, Triton type, dims: IMAGE is [B, H, W, 3] (B = BATCH, 1 by default); INFOTEXT one per image
OUTPUTS = (("IMAGE", "TYPE_UINT8", [-1, -1, -1, 3]), ("INFOTEXT", "TYPE_STRING", [-1]))


def read_value(field: Field, array: np.ndarray):
    """The Python value of a [1]-shaped request tensor."""
    if array.size != 1:
        raise UserError(f"{field.name}: expected one value (shape [1]), got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if field.data_type == "TYPE_STRING":  # Triton hands BYTES elements over as Python bytes
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{field.name}: not UTF-8 text") from None
    if field.data_type == "TYPE_FP32":
        return float(str(np.float32(value)))  # numpy prints a float32's shortest round-tripping decimal
    if field.data_type == "TYPE_BOOL":
        return bool(value)
    return int(value)


def generate_arguments(request, pb_utils) -> dict:
    """Generator.generate's keyword arguments from a request's tensors (absent ones left out)."""
    arguments = {}
    for field in INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, field.name)
        if tensor is None:  # an optional input the request left out (Triton refuses one without PROMPT)
            continue
        arguments[field.argument] = read_value(field, tensor.as_numpy())
    return arguments


class SDXLModel:
    """One Generator over the model's engines folder, answering Triton requests one at a time."""

    def __init__(self, generator: Generator, pb_utils):
        self.generator = generator
        self.pb_utils = pb_utils

    @classmethod
    def load(cls, engines: Path, device: str, instance_device_id: str, pb_utils) -> SDXLModel:
        """`engines` on `device` ("gpu": TensorRT on CUDA device 0; "cpu": netexec). A GPU instance
        Triton placed on another GPU is refused: Generator.load opens device 0."""
        if device == "gpu" and str(instance_device_id) != "0":
            raise UserError(f"this sdxl instance was placed on GPU {instance_device_id}, but trt_sdxl.Generator runs "
                            "on CUDA device 0: keep `gpus: [ 0 ]` in sdxl/config.pbtxt and run one Triton server per "
                            "GPU (CUDA_VISIBLE_DEVICES=N) to use several")

        def log(message: str) -> None:
            pb_utils.Logger.log_info(f"sdxl: {message}")

        return cls(Generator.load(engines, device=device, log=log), pb_utils)

    def execute(self, requests) -> list:
        return [self.answer(request) for request in requests]

    def answer(self, request):
        """The response to one request: the images, or the UserError / cancellation as its error."""
        pb = self.pb_utils
        try:
            arguments = generate_arguments(request, pb)
            prompt = arguments.pop("prompt")
            images = self.generator.generate(prompt, cancel=request.is_cancelled, **arguments)
        except UserError as e:
            return pb.InferenceResponse(error=pb.TritonError(str(e)))
        except Cancelled as e:
            return pb.InferenceResponse(error=pb.TritonError(str(e), pb.TritonError.CANCELLED))
        rgb = np.stack([image.rgb for image in images])  # [B, H, W, 3]
        text = np.array([image.infotext.encode() for image in images], dtype=np.object_)  # [B]
        return pb.InferenceResponse(output_tensors=[pb.Tensor("IMAGE", rgb), pb.Tensor("INFOTEXT", text)])

    def close(self) -> None:
        self.generator.close()
