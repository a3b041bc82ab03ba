"""The backend module: library choice, the no-TensorRT message, and API coverage across flavours.

The coverage test reads the package's source: every name it uses that belongs to the
TensorRT vocabulary (a class, enum member, method or attribute of either the installed
`tensorrt_rtx` or TensorRT 10.13's Python API from the `tensorrt-stubs` package) must
exist in BOTH, or be listed in `backend.FEATURE_GATED` (used only behind a feature check).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trt_sdxl import backend

PACKAGE = Path(backend.__file__).resolve().parent
REPO = PACKAGE.parent
# Where .ci/run installs tensorrt-stubs (kept out of site-packages: its `tensorrt/` stub
# folder would otherwise import as an empty namespace package).
STUBS = Path(os.environ.get("TRT_SDXL_TRT10_STUBS", REPO / "build" / "trt10-stubs"))


# Our own attributes whose names happen to be TensorRT words too: `Definition.precision` /
# `UNetNetwork.precision` (the package never touches TensorRT 10's deprecated ILayer.precision).
OWN_NAMES = {"precision", "unload"}  # our own attributes that share a name with a TensorRT member


def _stub_vocabulary() -> dict[str, set[str]]:
    """{class name: member names} from TensorRT 10's .pyi, with module-level names under ''."""
    pyi = STUBS / "tensorrt_bindings" / "tensorrt.pyi"
    init = STUBS / "tensorrt" / "__init__.pyi"
    if not pyi.exists():
        pytest.skip(f"TensorRT 10 stubs not found at {STUBS} (.ci/run installs them; "
                    "pip install --no-deps --target build/trt10-stubs tensorrt-stubs==10.13.0.35.1)")
    # The stubs are not valid Python everywhere (defaults before non-defaults), so read them
    # line by line: class headers, their indented defs/annotations, and module-level names.
    vocab: dict[str, set[str]] = {"": set()}
    for path in (pyi, init):
        current = None
        for line in path.read_text().splitlines():
            if m := re.match(r"class (\w+)", line):
                current = vocab.setdefault(m.group(1), set())
                vocab[""].add(m.group(1))
            elif m := re.match(r"    (?:def )?(\w+)\s*[:(=]", line):
                if current is not None:
                    current.add(m.group(1))
            elif m := re.match(r"(\w+)\s*:", line):
                vocab[""].add(m.group(1))
                current = None
            elif m := re.match(r"from \S+ import (\w+)", line):
                vocab[""].add(m.group(1))
    return vocab


def _live_vocabulary(module) -> dict[str, set[str]]:
    vocab: dict[str, set[str]] = {"": set(dir(module))}
    for name in dir(module):
        obj = getattr(module, name)
        if isinstance(obj, type):
            vocab[name] = set(dir(obj))
    return vocab


def _all_members(vocab: dict[str, set[str]]) -> set[str]:
    return set().union(*vocab.values())


def _used_names() -> dict[str, set[str]]:
    """Attribute names used in the package (`x.attr`), with the files using them."""
    used: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                used.setdefault(node.attr, set()).add(str(path.relative_to(REPO)))
    return used


def test_every_tensorrt_name_used_exists_in_rtx_and_trt10_or_is_feature_gated():
    rtx = pytest.importorskip("tensorrt_rtx")
    if not hasattr(rtx, "Builder"):
        pytest.skip("tensorrt_rtx not installed")
    stub = _stub_vocabulary()
    live = _live_vocabulary(rtx)
    in_stub, in_live = _all_members(stub), _all_members(live)
    trt_vocabulary = in_stub | in_live
    python_object_members = set(dir(object)) | set(dir(type))
    used = _used_names()
    checked = sorted(n for n in used if n in trt_vocabulary and n not in python_object_members | OWN_NAMES)
    missing = {n: sorted(used[n]) for n in checked
               if not (n in in_stub and n in in_live) and n not in backend.FEATURE_GATED}
    assert len(checked) > 50, f"the scan found only {len(checked)} TensorRT names; is it reading the package?"
    assert not missing, (
        "TensorRT names used that are missing from tensorrt_rtx or TensorRT 10.13 and not in "
        f"backend.FEATURE_GATED: {missing}"
    )
    # Gated names must really be gated: each one is named in a feature check in backend.py.
    backend_src = (PACKAGE / "backend.py").read_text()
    unguarded = [n for n in backend.FEATURE_GATED if f'"{n}"' not in backend_src]
    assert not unguarded, f"FEATURE_GATED names without a hasattr check in backend.py: {unguarded}"


def test_network_is_strongly_typed_and_features_detected():
    be = backend.get()
    builder, network = be.create_network()
    trt = be.module
    assert network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert be.has_normalization_v2 == hasattr(trt.INetworkDefinition, "add_normalization_v2")
    assert be.has_attention_layer == hasattr(trt.INetworkDefinition, "add_attention")
    if be.is_rtx:
        assert "SM89" in be.aot_targets and "SM120" in be.aot_targets
        assert be.tag.startswith("trtrtx")


def _run_without_tensorrt(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    # A site-customizing shim hides both TensorRT flavours from the child interpreter.
    shim = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorrt', 'tensorrt_rtx'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import runpy; sys.argv = ['trt_sdxl.build', '--out', sys.argv[1]]\n"
        "runpy.run_module('trt_sdxl.build', run_name='__main__')\n"
    )
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", shim, str(REPO / "build" / "no-trt-out")], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


def test_without_tensorrt_one_clear_line_naming_the_extras():
    proc = _run_without_tensorrt({})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert ".[rtx]" in proc.stderr and ".[trt]" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_forced_backend_must_be_known():
    proc = _run_without_tensorrt({"TRT_SDXL_BACKEND": "onnxruntime"})
    assert proc.returncode == 2 and "TRT_SDXL_BACKEND" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
