"""Writing files so that nothing on disk is ever half-written: a temporary file in the same
folder (with a plain file's mode, not mkstemp's private one), flushed, then renamed."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import UserError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_temporary(path: Path, data: bytes | memoryview) -> Path:
    """Write `data` to a hidden temporary file next to `path` (flushed to disk); returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's file is private; give it a plain file's mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    tmp = write_temporary(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_bytes(obj, indent: int | None = 2) -> bytes:
    return (json.dumps(obj, indent=indent, sort_keys=False) + "\n").encode()


def write_json(path: Path, obj) -> None:
    write_atomic(path, json_bytes(obj))


_REQUIRED = object()


def load_json(path, what: str | None = None, missing=_REQUIRED):
    """The one JSON reader: a file a user gave us (or package data: anything with `read_text`).

    Any problem is a UserError naming the file (and `what` it should be). A file that does not
    exist is an error, unless `missing` is given: then that value is returned instead.
    """
    path = Path(path) if isinstance(path, (str, os.PathLike)) else path
    expected = f"; expected {what}" if what else ""
    if not path.is_file():
        if missing is not _REQUIRED:
            return missing
        raise UserError(f"{path}: missing" + (f" (expected {what})" if what else ""))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}){expected}") from None
