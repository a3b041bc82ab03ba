"""The Triton Python-backend model `sdxl`: `python -m trt_sdxl.export triton` copies this file to
REPO/sdxl/1/model.py. Triton runs it in its own stub process and Python environment.

It imports trt_sdxl as installed in that environment (`pip install trt_sdxl[rtx,cuda]` in the Triton
image, the deployment way); where none is installed, from the source folder the export recorded in
config.pbtxt (parameter `trt_sdxl_path`, a path on the machine that exported). Then everything is
trt_sdxl.triton.serving's: the Generator over the engines folder the export copied into this
version folder (parameter `engines`, relative to the model folder), on the device it names.
"""

import importlib.util
import json
import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        if importlib.util.find_spec("trt_sdxl") is None:  # not installed in Triton's Python environment
            sys.path.append(parameters["trt_sdxl_path"])
        from trt_sdxl.triton.serving import SDXLModel

        engines = Path(args["model_repository"]) / parameters["engines"]
        self.model = SDXLModel.load(engines, parameters["device"], args["model_instance_device_id"], pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.close()
