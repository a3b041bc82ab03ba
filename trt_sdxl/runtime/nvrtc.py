"""NVRTC compilation of the kernels of kernels/*.cu (registered in trt_sdxl.kernels), with a cache.

Compilation goes through NVRTC (cuda-python's `cuda.bindings.nvrtc`, the `cuda` extra) to a CUBIN
for one architecture (or PTX), cached on disk under $TRT_SDXL_KERNEL_CACHE (default
~/.cache/trt_sdxl/kernels) by a key over the sources, options, target and NVRTC version. CUBIN is
the default: a CUBIN from NVRTC 13.x loads on any driver of CUDA 13.x, while PTX from an NVRTC newer
than the driver cannot be loaded. Compiling needs no GPU.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..files import write_atomic
from ..kernels import KERNEL_DIR, KERNELS, Kernel

HEADERS = ("common.cuh",)  # handed to NVRTC in memory, so they are part of the cache key
# --fmad=false: no contraction of a*b+c into one rounding, so the twins' float32 numpy arithmetic
# reproduces the kernels' results. Math functions (logf, sincospif) stay accurate (no fast math).
COMPILE_OPTIONS = ("-std=c++17", "--fmad=false")
CACHE_ENV = "TRT_SDXL_KERNEL_CACHE"
CACHE_FORMAT = b"trt_sdxl kernel cache v1"
INSTALL_HINT = "install the 'cuda' extra: pip install 'trt_sdxl[cuda]' (cuda-bindings and nvidia-cuda-nvrtc)"


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message carries NVRTC's log."""


@dataclass(frozen=True)
class CompiledKernel:
    """A compiled kernel module: load `image` with cuModuleLoadData, then cuModuleGetFunction(entry name)."""

    kernel: Kernel
    arch: str  # "sm_89"
    output: str  # "cubin" or "ptx" (NUL-terminated, as cuModuleLoadData wants it)
    image: bytes
    nvrtc_version: tuple[int, int]
    from_cache: bool


def _nvrtc():
    try:
        nvrtc = importlib.import_module("cuda.bindings.nvrtc")
    except ImportError as e:
        raise UserError(f"compiling the CUDA kernels in {KERNEL_DIR} needs NVRTC through cuda-python "
                        f"({e}); {INSTALL_HINT}") from None
    try:
        nvrtc.nvrtcVersion()
    except RuntimeError as e:  # cuda-bindings is there but libnvrtc is not (cuda-pathfinder's error)
        raise UserError(f"the NVRTC library could not be loaded ({e}); {INSTALL_HINT}") from None
    return nvrtc


def _check(nvrtc, result, what: str):
    """Unpack a cuda.bindings result tuple (error, *values), raising on any error."""
    err, *values = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, name = nvrtc.nvrtcGetErrorString(err)
        raise KernelCompileError(f"NVRTC {what} failed: {name.decode(errors='replace')}")
    return values[0] if len(values) == 1 else tuple(values)


def nvrtc_version() -> tuple[int, int]:
    nvrtc = _nvrtc()
    return _check(nvrtc, nvrtc.nvrtcVersion(), "nvrtcVersion")


def supported_archs() -> list[int]:
    """The SM versions the installed NVRTC compiles for, e.g. [75, 80, ..., 120]."""
    nvrtc = _nvrtc()
    return [int(a) for a in _check(nvrtc, nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")]


def _arch_number(arch) -> int:
    """89, "89", "sm_89", "compute_89" or (8, 9) -> 89."""
    if isinstance(arch, tuple) and len(arch) == 2:
        return 10 * int(arch[0]) + int(arch[1])
    m = re.fullmatch(r"(?:sm_|compute_)?(\d+)", str(arch).strip().lower())
    if not m:
        raise UserError(f"GPU architecture {arch!r}: expected an SM version such as 89, 'sm_89' or (8, 9)")
    return int(m.group(1))


def _check_output(output: str) -> None:
    if output not in ("cubin", "ptx"):
        raise ValueError(f"output {output!r}: expected 'cubin' or 'ptx'")


def _headers() -> dict[str, bytes]:
    return {name: (KERNEL_DIR / name).read_bytes() for name in HEADERS}


def compile_source(source: bytes | str, filename: str, arch, output: str = "cubin",
                   headers: dict[str, bytes] | None = None) -> bytes:
    """Compile one CUDA C source with NVRTC for SM `arch`; returns the CUBIN or the NUL-terminated PTX."""
    _check_output(output)
    nvrtc = _nvrtc()
    sm = _arch_number(arch)
    supported = supported_archs()
    if sm not in supported:
        major, minor = nvrtc_version()
        raise UserError(f"GPU architecture sm_{sm}: NVRTC {major}.{minor} compiles for "
                        f"{', '.join(f'sm_{a}' for a in supported)}; install an NVRTC that supports it")
    headers = _headers() if headers is None else headers
    src = source.encode() if isinstance(source, str) else source
    target = f"--gpu-architecture={'sm' if output == 'cubin' else 'compute'}_{sm}"
    options = [o.encode() for o in (target, *COMPILE_OPTIONS)]
    prog = _check(nvrtc, nvrtc.nvrtcCreateProgram(src, filename.encode(), len(headers), list(headers.values()),
                                                  [n.encode() for n in headers]), "nvrtcCreateProgram")
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = _check(nvrtc, nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = bytearray(size)
            _check(nvrtc, nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            text = log.rstrip(b"\0").decode(errors="replace")
            flags = " ".join(o.decode() for o in options)
            raise KernelCompileError(f"NVRTC could not compile {filename} for sm_{sm} (options: {flags}):\n{text}")
        if output == "cubin":
            size = _check(nvrtc, nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
            image = bytearray(size)
            _check(nvrtc, nvrtc.nvrtcGetCUBIN(prog, image), "nvrtcGetCUBIN")
        else:
            size = _check(nvrtc, nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
            image = bytearray(size)
            _check(nvrtc, nvrtc.nvrtcGetPTX(prog, image), "nvrtcGetPTX")
        return bytes(image)
    finally:
        _check(nvrtc, nvrtc.nvrtcDestroyProgram(prog), "nvrtcDestroyProgram")


def cache_dir() -> Path:
    """$TRT_SDXL_KERNEL_CACHE, else $XDG_CACHE_HOME/trt_sdxl/kernels, else ~/.cache/trt_sdxl/kernels."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "trt_sdxl" / "kernels"


def compile_kernel(name: str, arch, output: str = "cubin") -> CompiledKernel:
    """The registered kernel `name` compiled for SM `arch`, from the cache when an identical build is there."""
    if name not in KERNELS:
        raise UserError(f"unknown kernel {name!r}: expected one of {', '.join(KERNELS)}")
    _check_output(output)
    kernel = KERNELS[name]
    sm = _arch_number(arch)
    version = nvrtc_version()
    source, headers = kernel.path.read_bytes(), _headers()
    key = hashlib.sha256()
    for part in (CACHE_FORMAT, kernel.file.encode(), source, *(n.encode() + b"\0" + h for n, h in headers.items()),
                 " ".join(COMPILE_OPTIONS).encode(), f"sm_{sm} {output} nvrtc {version[0]}.{version[1]}".encode()):
        key.update(len(part).to_bytes(8, "little") + part)
    path = cache_dir() / f"{name}.sm_{sm}.{key.hexdigest()[:24]}.{output}"
    if path.is_file() and path.stat().st_size > 0:
        return CompiledKernel(kernel, f"sm_{sm}", output, path.read_bytes(), version, from_cache=True)
    image = compile_source(source, kernel.file, sm, output, headers)
    try:
        write_atomic(path, image)
    except OSError as e:
        warnings.warn(f"kernel cache {path.parent} is not writable ({e}); set {CACHE_ENV} to a writable folder")
    return CompiledKernel(kernel, f"sm_{sm}", output, image, version, from_cache=False)


def compile_all(arch, output: str = "cubin") -> dict[str, CompiledKernel]:
    """Every registered kernel compiled (or taken from the cache) for SM `arch`."""
    return {name: compile_kernel(name, arch, output) for name in KERNELS}
