"""Calibrated binary labels for the synthetic sources: a logit per row, and the intercept that
puts the mean probability at a target rate (a CTR, a CVR)."""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def solve_intercept(logits: np.ndarray, target: float, weights: np.ndarray | None = None) -> float:
    """Bisect the intercept b so that the (weighted) mean of sigmoid(b + logits) hits target."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        mean = np.average(sigmoid(mid + logits), weights=weights)
        lo, hi = (mid, hi) if mean < target else (lo, mid)
    return 0.5 * (lo + hi)
