"""The one place where TensorRT flavours differ: which library is used and what it can do.

`tensorrt` (NVIDIA TensorRT 10.x / 11.x) is preferred, then `tensorrt_rtx` (TensorRT for
RTX); `TRT_SDXL_BACKEND=tensorrt|tensorrt_rtx` forces one. Everything else in the package
asks this module for the library (`trt()`) and for feature checks, never imports it.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

from .errors import UserError

BACKEND_NAMES = ("tensorrt", "tensorrt_rtx")

INSTALL_HINT = (
    "no TensorRT Python package found: install one with "
    "`pip install -e .[rtx]` (TensorRT for RTX, from PyPI) or "
    "`pip install -e .[trt]` (NVIDIA TensorRT, from NVIDIA's package index)"
)


# TensorRT names that exist only in some flavours; the package uses each one only behind the
# feature check named here (tests/test_backend.py holds the package to this list).
_ATTENTION_API = ("add_attention", "IAttention", "IAttentionBoundaryLayer", "AttentionNormalizationOp",
                  "ATTENTION_INPUT", "ATTENTION_OUTPUT", "attention", "decomposable", "norm_op", "causal",
                  "normalization_quantize_scale", "normalization_quantize_to_type", "mask")
# Attention attributes newer than the attention layer itself (TensorRT 11, TensorRT-RTX 1.7);
# netexec reads them only where `hasattr` says they exist, else falls back to `causal`.
_ATTENTION_V2_API = ("causal_kind", "query_form", "key_value_form", "key_value_lengths")
_AOT_API = ("ComputeCapability", "set_compute_capability", "num_compute_capabilities")
_NORMALIZATION_V2_API = ("add_normalization_v2",)
# TensorRT-RTX 1.2+: engines whose enqueue never allocates at run time, so it can be captured into a CUDA graph.
_USER_ALLOCATION_API = ("REQUIRE_USER_ALLOCATION",)
# TensorRT-RTX: the cache of the kernels it compiles just in time when an engine is loaded.
_RUNTIME_CACHE_API = ("create_runtime_cache", "set_runtime_cache", "deserialize")
# TensorRT-RTX: when the kernels it specializes to each dynamic shape are compiled (LAZY, EAGER, NONE).
_SHAPE_SPECIALIZATION_API = ("DynamicShapesKernelSpecializationStrategy", "dynamic_shapes_kernel_specialization_strategy",
                             "EAGER")
# NVIDIA TensorRT's builder timing cache. TensorRT-RTX still has the names, but there the cache has no
# effect and forces a GPU query during ahead-of-time builds; deprecated in its 1.2, to be removed.
_TIMING_CACHE_API = ("create_timing_cache", "set_timing_cache")
FEATURE_GATED = frozenset(_ATTENTION_API + _ATTENTION_V2_API + _AOT_API + _NORMALIZATION_V2_API
                          + _USER_ALLOCATION_API + _RUNTIME_CACHE_API + _TIMING_CACHE_API + _SHAPE_SPECIALIZATION_API)


def _has_all(module: ModuleType, names: tuple[str, ...], owners: tuple[str, ...]) -> bool:
    """Each name is an attribute of the module or of one of its classes named in `owners`."""
    scopes = [module] + [getattr(module, o) for o in owners if hasattr(module, o)]
    return all(any(hasattr(scope, n) for scope in scopes) for n in names)


def _import_real(name: str) -> ModuleType | None:
    """Import a TensorRT flavour; a stub-only namespace package (no `Builder`) does not count."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    return module if hasattr(module, "Builder") else None


@dataclass(frozen=True)
class Backend:
    """The TensorRT library in use and the features it has."""

    module: ModuleType
    name: str  # "tensorrt" or "tensorrt_rtx"
    version: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt_rtx"

    @property
    def has_attention_layer(self) -> bool:
        """The fused IAttention API (TensorRT >= 10.14 and TensorRT-RTX)."""
        return _has_all(self.module, _ATTENTION_API,
                        ("INetworkDefinition", "IAttention", "IAttentionBoundaryLayer", "LayerType"))

    @property
    def has_normalization_v2(self) -> bool:
        """`add_normalization_v2` takes per-channel [1, C, 1, 1] GroupNorm affine; v1 takes [1, G, 1, 1]."""
        return _has_all(self.module, _NORMALIZATION_V2_API, ("INetworkDefinition",))

    @property
    def has_require_user_allocation(self) -> bool:
        """`BuilderFlag.REQUIRE_USER_ALLOCATION` (TensorRT-RTX 1.2+; its release notes: required for CUDA stream
        capture)."""
        return _has_all(self.module, _USER_ALLOCATION_API, ("BuilderFlag",))

    @property
    def has_runtime_cache(self) -> bool:
        """`IRuntimeConfig.create_runtime_cache` (TensorRT-RTX): just-in-time compiled kernels kept across loads."""
        return _has_all(self.module, _RUNTIME_CACHE_API, ("IRuntimeConfig", "IRuntimeCache"))

    @property
    def has_shape_specialization(self) -> bool:
        """`IRuntimeConfig.dynamic_shapes_kernel_specialization_strategy` (TensorRT-RTX)."""
        return _has_all(self.module, _SHAPE_SPECIALIZATION_API,
                        ("IRuntimeConfig", "DynamicShapesKernelSpecializationStrategy"))

    @property
    def has_timing_cache(self) -> bool:
        """A builder timing cache that speeds up later builds: NVIDIA TensorRT's (TensorRT-RTX times no
        tactics when it builds; its timing cache APIs are no-ops there, per its release notes)."""
        return not self.is_rtx and _has_all(self.module, _TIMING_CACHE_API, ("IBuilderConfig",))

    @property
    def aot_targets(self) -> tuple[str, ...]:
        """Compute capabilities this backend can build for without that GPU present ('SM89', ...)."""
        if not _has_all(self.module, _AOT_API, ("IBuilderConfig",)):
            return ()
        members = self.module.ComputeCapability.__members__
        return tuple(n for n in members if n.startswith("SM"))

    @property
    def tag(self) -> str:
        """Short name used in engine file names, e.g. 'trtrtx1.7.1' or 'trt10.13.0'."""
        short = ".".join(self.version.split(".")[:3])
        return ("trtrtx" if self.is_rtx else "trt") + short

    def create_network(self):
        """A new builder and strongly typed network; both must be kept alive together."""
        trt = self.module
        builder = trt.Builder(logger())
        flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        return builder, builder.create_network(flag)

    def add_normalization(self, network, x, scale, bias, axes_mask: int):
        if self.has_normalization_v2:
            return network.add_normalization_v2(x, scale, bias, axes_mask)
        return network.add_normalization(x, scale, bias, axes_mask)

    def check_target(self, target: str) -> None:
        """UserError unless this backend can build ahead of time for `target` ('SM89')."""
        if target not in self.aot_targets:
            other = ("; TensorRT for RTX runs on RTX GPUs only — for this one install NVIDIA TensorRT "
                     "(pip install -e .[trt])" if self.is_rtx else "")
            raise UserError(
                f"--target {target}: {self.name} {self.version} cannot build ahead of time for it; "
                f"it can build for: {', '.join(self.aot_targets) or 'only the GPU present'}{other}"
            )

    def set_target(self, config, target: str) -> None:
        """Ask the builder config for an ahead-of-time build for `target` ('SM89'); no-op for 'native'."""
        if target == "native":
            return
        trt = self.module
        self.check_target(target)
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, target), 0)


@functools.lru_cache(maxsize=None)
def _logger(module_name: str):
    module = importlib.import_module(module_name)
    return module.Logger(module.Logger.ERROR)


def logger():
    return _logger(get().name)


@functools.lru_cache(maxsize=None)
def get() -> Backend:
    """The backend in use; raises UserError with install instructions when none is installed."""
    forced = os.environ.get("TRT_SDXL_BACKEND", "").strip()
    if forced and forced not in BACKEND_NAMES:
        raise UserError(f"TRT_SDXL_BACKEND={forced!r}: expected one of {', '.join(BACKEND_NAMES)}")
    for name in (forced,) if forced else BACKEND_NAMES:
        module = _import_real(name)
        if module is not None:
            return Backend(module=module, name=name, version=module.__version__)
    if forced:
        raise UserError(f"TRT_SDXL_BACKEND={forced}: that package is not installed; {INSTALL_HINT}")
    raise UserError(INSTALL_HINT)


def trt() -> ModuleType:
    """The TensorRT module in use (`tensorrt` or `tensorrt_rtx`)."""
    return get().module
