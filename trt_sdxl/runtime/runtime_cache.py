"""TensorRT-RTX's runtime cache kept on disk next to the engines, so a load does not compile again.

TensorRT-RTX compiles an engine's kernels for the GPU present just in time, when an execution
context is created and at its first enqueues; its runtime cache (IRuntimeCache, attached through
the engine's IRuntimeConfig) holds what it compiled, and serializes to a blob. We keep that blob at

    <engines folder>/.runtime-cache/<engine file>.<key>.cache

where the key is a digest of the engine file's size and modification time and of the backend's
version: rebuilding an engine (trt_sdxl.build writes it through a rename, so its time changes) or
installing another TensorRT-RTX leaves the old cache unused, and the next save removes it.
TensorRT-RTX checks the rest itself (GPU, driver, its own version): a blob it rejects counts as
no cache, and is overwritten with a fresh one. A folder we cannot write to costs the cache, never
the run: the failure is one warning.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

from ..files import write_atomic

FOLDER = ".runtime-cache"


class RuntimeCacheFile:
    """Where one engine file's runtime cache lives, and reading and writing it."""

    def __init__(self, engine_path: Path, backend_version: str):
        engine_path = Path(engine_path)
        stat = engine_path.stat()
        key = hashlib.sha256(f"{stat.st_size} {stat.st_mtime_ns} {backend_version}".encode()).hexdigest()[:16]
        self.folder = engine_path.parent / FOLDER
        self.stem = engine_path.name
        self.path = self.folder / f"{self.stem}.{key}.cache"
        self.saved: bytes | None = None  # what the file holds (read or written by us)
        self.writable = True  # until a write fails: then one warning, and no more tries

    def load(self) -> bytes | None:
        """The cached blob of this engine as it is now, or None."""
        try:
            self.saved = self.path.read_bytes()
        except OSError:
            return None
        return self.saved

    def save(self, blob: bytes) -> bool:
        """Write `blob` unless the file holds it already, and drop the caches of earlier versions of the
        engine file; False (after a warning, the first time) when the folder cannot be written."""
        if not blob or blob == self.saved or not self.writable:
            return False
        try:
            write_atomic(self.path, blob)
            for stale in self.folder.glob(f"{self.stem}.*.cache"):
                if stale != self.path:
                    stale.unlink(missing_ok=True)
        except OSError as e:
            self.writable = False
            warnings.warn(f"{self.path}: the TensorRT-RTX runtime cache cannot be written ({e.strerror}); the next "
                          "load compiles the engine's kernels again")
            return False
        self.saved = blob
        return True


class RuntimeCache:
    """An engine's IRuntimeConfig with a runtime cache loaded from `file` (None: a cache kept in memory
    only); `config` is what `create_execution_context` takes, `save()` persists what was compiled.
    The cache must outlive every execution context created with it."""

    def __init__(self, engine, file: RuntimeCacheFile | None):
        self.file = file
        self.config = engine.create_runtime_config()
        self.cache = self.config.create_runtime_cache()
        blob = file.load() if file is not None else None
        self.loaded = bool(blob) and bool(self.cache.deserialize(blob))  # False: another GPU, driver or version
        if not self.config.set_runtime_cache(self.cache):
            warnings.warn("TensorRT-RTX refused the engine's runtime cache; its kernels are compiled at every load")
            self.file = None

    def save(self) -> bool:
        """Persist the cache (after the work that compiled kernels has completed); True if written."""
        if self.file is None:
            return False
        return self.file.save(bytes(self.cache.serialize()))
