"""The backend module: library choice, the no-TensorRT message, and API coverage across flavours.

The coverage tests read the package's source: every name it uses that belongs to the
TensorRT vocabulary (a class, enum member, method or attribute of either the installed
`tensorrt_rtx` or TensorRT 10.13's Python API from the `tensorrt-stubs` package) must
exist in BOTH, and in TensorRT 11.4's bindings (read from the `tensorrt-cu13-bindings`
wheel's files, never imported), or be feature-gated. Feature-gated means: listed in
`backend.FEATURE_GATED`, and named as a string in backend.py, where the `hasattr` check that
decides whether the package touches it lives (`_has_all(...)` behind the Backend properties).
"""

from __future__ import annotations

import ast
import os
import re
import struct
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
# Where .ci/run installs TensorRT 11.4's bindings wheel. Its extension module needs libnvinfer 11,
# which CI does not have, so the files are only read, never imported (the folder is not on sys.path).
TRT11 = Path(os.environ.get("TRT_SDXL_TRT11_BINDINGS", REPO / "build" / "trt11-bindings"))
TRT11_INSTALL = "pip install --no-deps --target build/trt11-bindings tensorrt-cu13-bindings==11.4.0.106"


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


def _rtx():
    rtx = pytest.importorskip("tensorrt_rtx")
    if not hasattr(rtx, "Builder"):
        pytest.skip("tensorrt_rtx not installed")
    return rtx


def _tensorrt_names_used(trt_vocabulary: set[str]) -> dict[str, list[str]]:
    """{name: files using it} for the package's attribute names that are TensorRT words (in
    `trt_vocabulary`), leaving out members every Python object has and OWN_NAMES."""
    python_object_members = set(dir(object)) | set(dir(type))
    used = _used_names()
    checked = {n: sorted(used[n]) for n in sorted(used)
               if n in trt_vocabulary and n not in python_object_members | OWN_NAMES}
    assert len(checked) > 50, f"the scan found only {len(checked)} TensorRT names; is it reading the package?"
    return checked


def test_every_tensorrt_name_used_exists_in_rtx_and_trt10_or_is_feature_gated():
    rtx = _rtx()
    stub = _stub_vocabulary()
    live = _live_vocabulary(rtx)
    in_stub, in_live = _all_members(stub), _all_members(live)
    checked = _tensorrt_names_used(in_stub | in_live)
    missing = {n: files for n, files in checked.items()
               if not (n in in_stub and n in in_live) and n not in backend.FEATURE_GATED}
    assert not missing, (
        "TensorRT names used that are missing from tensorrt_rtx or TensorRT 10.13 and not in "
        f"backend.FEATURE_GATED: {missing}"
    )
    # Gated names must really be gated: each one is named in a feature check in backend.py.
    backend_src = (PACKAGE / "backend.py").read_text()
    unguarded = [n for n in backend.FEATURE_GATED if f'"{n}"' not in backend_src]
    assert not unguarded, f"FEATURE_GATED names without a hasattr check in backend.py: {unguarded}"


# ---------------------------------------------------------------- TensorRT 11.4, from the wheel's files


def _elf_section(path: Path, wanted: str) -> bytes:
    """The bytes of one section of a 64-bit little-endian ELF file, found through its section headers."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not a 64-bit little-endian ELF file"
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]  # sh_offset of the section-name table
    for name_offset, _type, _flags, _addr, offset, size in headers:
        start = names_at + name_offset
        if data[start:data.index(b"\0", start)].decode() == wanted:
            return data[offset:offset + size]
    raise AssertionError(f"{path}: no {wanted} section")


def _python_names(path: Path) -> set[str]:
    """The names a Python file defines or assigns, at any depth (`DataType.itemsize = ...` gives
    'itemsize'; `import ctypes` gives 'ctypes')."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


class BindingNames:
    """The Python-visible names of a pybind11 TensorRT binding module, read from its files without
    loading them: the extension's `.rodata` strings plus what its package `__init__.py` defines.

    The method. The wheel ships no `.pyi`, only `tensorrt_bindings/tensorrt.so` and `__init__.py`;
    importing the .so needs libnvinfer.so.11 (absent here), so it is never loaded. pybind11 registers
    every name Python sees (class, enum member, method, property, keyword argument) from a C string
    literal, and the compiler places those NUL-terminated in `.rodata`. The linker merges identical
    literals and also tails of longer ones: 'float16' is stored only as the end of 'bfloat16' and
    'DataType' as the end of 'PluginArgDataType'. So a name counts as present when `name` followed
    by NUL occurs anywhere in `.rodata`. `__init__.py` adds the pure-Python part (`__version__`,
    `volume`, `nptype`, `DataType.itemsize`), read with `ast`.

    The limits. It is a name-level check: which class owns a name is not recorded, so
    `BuilderFlag.INT8` looks present because `DataType.INT8` is (see the precision-flag test for
    that case). The tail rule and keyword-argument strings over-count: a name may look present
    because a longer string or a docstring ends with it, or because some function takes an argument
    of that name. Measured on tensorrt_rtx's own extension (same binding sources, importable here):
    every name its live module shows is found (test below), while 8 of the 112 TensorRT 10.13 names
    it lacks still look present. An absent verdict is certain; a present one is very likely."""

    def __init__(self, extension: Path, init: Path):
        self.rodata = _elf_section(extension, ".rodata")
        self.python = _python_names(init)

    def __contains__(self, name: str) -> bool:
        return name in self.python or name.encode() + b"\0" in self.rodata


def _trt11_names() -> BindingNames:
    extension, init = TRT11 / "tensorrt_bindings" / "tensorrt.so", TRT11 / "tensorrt_bindings" / "__init__.py"
    if not (extension.exists() and init.exists()):
        pytest.skip(f"TensorRT 11.4 bindings not found at {TRT11} (.ci/run installs them; {TRT11_INSTALL})")
    version = re.search(r'^__version__ = "([^"]+)"', init.read_text(), re.M)
    assert version and version.group(1).startswith("11.4."), f"{init}: expected TensorRT 11.4's bindings"
    return BindingNames(extension, init)


def test_binding_name_reader_finds_every_name_of_the_live_rtx_module():
    """The method behind the TensorRT 11.4 check, applied to tensorrt_rtx's extension, must find
    every class and member name that the imported module actually has."""
    rtx = _rtx()
    extension = Path(sys.modules[rtx.Builder.__module__].__file__)
    names = BindingNames(extension, extension.parent / "__init__.py")
    python_object_members = set(dir(object)) | set(dir(type))
    import_system = {"__builtins__", "__cached__", "__file__", "__loader__", "__package__", "__path__", "__spec__"}
    live = _all_members(_live_vocabulary(rtx)) - python_object_members - import_system
    not_found = sorted(n for n in live if n not in names)
    assert len(live) > 500 and not not_found, f"names of the live tensorrt_rtx the reader misses: {not_found}"


def test_every_tensorrt_name_used_exists_in_trt11_or_is_feature_gated():
    trt11 = _trt11_names()
    rtx = _rtx()
    checked = _tensorrt_names_used(_all_members(_stub_vocabulary()) | _all_members(_live_vocabulary(rtx)))
    missing = {n: files for n, files in checked.items() if n not in trt11 and n not in backend.FEATURE_GATED}
    assert not missing, f"TensorRT names used that TensorRT 11.4 lacks and not in backend.FEATURE_GATED: {missing}"


# TensorRT 11 builds strongly typed networks only (as TensorRT-RTX does): the precision builder
# flags are gone. INT8, BF16, FP8, INT4 and FP4 stay DataType members, so the name-level check
# above cannot see a `BuilderFlag.INT8`; this test looks at the owner too.
PRECISION_BUILDER_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4",
                           "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS")


def _trt10_builder_flag_descriptions() -> dict[str, str]:
    """{member: first line of its description} from the BuilderFlag docstring of TensorRT 10.13's stubs."""
    _stub_vocabulary()  # skips when the stubs are absent
    pyi = (STUBS / "tensorrt_bindings" / "tensorrt.pyi").read_text()
    doc = re.search(r'^class BuilderFlag:\n    """(.*?)"""', pyi, re.M | re.S).group(1)
    return dict(re.findall(r"^      (\w+) : (.+)$", doc, re.M))


def test_precision_builder_flags_are_gone_in_trt11_and_rtx_and_the_package_never_names_them():
    trt11 = _trt11_names()
    descriptions = _trt10_builder_flag_descriptions()
    # From the wheel: pybind11 keeps each enum member's description as its own string, so a member
    # that is gone takes its TensorRT 10.13 description with it; one that stays keeps it.
    still_described = [f for f in PRECISION_BUILDER_FLAGS if descriptions[f].strip().encode() in trt11.rodata]
    assert not still_described, f"TensorRT 11.4 still describes these builder flags: {still_described}"
    assert descriptions["DEBUG"].strip().encode() in trt11.rodata, "the description comparison found nothing"
    assert "FP16" not in trt11 and "OBEY_PRECISION_CONSTRAINTS" not in trt11
    rtx_flags = set(_rtx().BuilderFlag.__members__)
    assert not rtx_flags & set(PRECISION_BUILDER_FLAGS), f"tensorrt_rtx has: {rtx_flags & set(PRECISION_BUILDER_FLAGS)}"
    # The package: never `...BuilderFlag.FP16` directly; such a flag may only be looked up by name
    # behind a check (`getattr(trt.BuilderFlag, "FP16", None)`), which this scan does not flag.
    direct = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in PRECISION_BUILDER_FLAGS:
                owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
                if owner == "BuilderFlag":
                    direct.append(f"{path.relative_to(REPO)}:{node.lineno} BuilderFlag.{node.attr}")
    assert not direct, f"precision builder flags TensorRT 11 and TensorRT-RTX lack, used directly: {direct}"


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
