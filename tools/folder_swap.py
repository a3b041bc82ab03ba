"""Replacing a folder whole: the new one is built beside the target, then swapped in by renames."""

from __future__ import annotations

import shutil
from pathlib import Path


def swap_in(staging: Path, target: Path) -> None:
    """Give `staging` a shared folder's modes (mkdtemp and safetensors write private files), move an
    existing `target` aside, rename `staging` to `target`, and drop the old one."""
    for path in [staging, *staging.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    old = target.with_name(f".{target.name}-old")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
