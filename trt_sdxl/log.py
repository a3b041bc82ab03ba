"""The one way the package reports progress: `logger(prog)` is a callable that prints
`[prog] message` on stderr, flushed. Library code takes a `log` callable and never prints itself."""

from __future__ import annotations

import sys
from collections.abc import Callable

Log = Callable[[str], None]


def logger(prog: str) -> Log:
    def log(message: str) -> None:
        print(f"[{prog}] {message}", file=sys.stderr, flush=True)

    return log


def silent(message: str) -> None:
    """A `log` that drops every message."""


def format_seconds(seconds: float) -> str:
    """'42 s', '3 min 5 s', '1 h 2 min': for estimates of the time left."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
