"""Array comparison shared by the core-tier property tests (ref.verify's convention)."""

from __future__ import annotations

import numpy as np


def rel_err(actual, expected) -> float:
    """max|actual - expected| / max(max|expected|, 1) (ref.verify's convention)."""
    a = np.asarray(actual, np.float64)
    b = np.asarray(expected, np.float64)
    assert a.shape == b.shape, f"shape {a.shape} vs {b.shape}"
    if a.size == 0:
        return 0.0
    diff = np.abs(a - b)
    if not np.all(np.isfinite(diff)):
        return float("inf")
    return float(diff.max() / max(float(np.abs(b).max()), 1.0))


def assert_close(actual, expected, tol: float, what: str = "") -> float:
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
    return err
