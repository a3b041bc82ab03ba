"""What the oracle tests share: the one error measure, and counting which checkpoint tensors a network reads."""

from __future__ import annotations

from collections import Counter

import numpy as np


def rel_l2(out, ref) -> float:
    """Relative L2 error ||out - ref|| / ||ref|| in float64; refuses an all-zero reference
    (the comparison would prove nothing) and shapes that differ."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, f"shape {out.shape} != reference {ref.shape}"
    norm = np.linalg.norm(ref)
    assert norm > 0, "reference is all zeros: the comparison would prove nothing"
    return float(np.linalg.norm(out - ref) / norm)


def count_reads(component) -> Counter:
    """Make `component.get` count how often each tensor is read; returns the live counter."""
    reads = Counter()
    inner_get = component.get

    def get(key, *args, **kwargs):
        reads[key] += 1
        return inner_get(key, *args, **kwargs)

    component.get = get
    return reads
