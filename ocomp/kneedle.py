"""Kneedle knee/elbow detection (Satopaa, Albrecht, Irwin, Raghavan: "Finding a 'Kneedle' in a Haystack:
Detecting Knee Points in System Behavior", ICDCS workshops 2011).

The curve is normalized to the unit square and turned into a concave increasing one
(flipping x and/or y); the knee candidates are the local maxima of the difference curve
D = y - x. A candidate becomes a knee when D falls below its threshold
T = D_max - S * mean(diff(x)) before the next local maximum (a local minimum resets the
threshold to 0, as in the reference implementation `kneed`). Offline mode (the default)
returns the first knee found; `online=True` keeps scanning and returns the last one.
Only maxima above the chord (D > 0) are candidates, and |D| < 1e-12 counts as 0, so a straight
line (even with rounding noise) has no knee.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

CURVES = ("concave", "convex")
DIRECTIONS = ("increasing", "decreasing")


def knee_index(x: Sequence[float], y: Sequence[float], curve: str = "concave", direction: str = "increasing",
               S: float = 1.0, online: bool = False) -> int | None:
    """Index of the knee in (x, y), or None when the curve has none. x must be strictly increasing."""
    if curve not in CURVES:
        raise ValueError(f"curve must be one of {CURVES}, got {curve!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    xs = np.asarray(x, dtype=np.float64).reshape(-1)
    ys = np.asarray(y, dtype=np.float64).reshape(-1)
    if xs.shape != ys.shape:
        raise ValueError(f"x and y have different lengths ({xs.size} and {ys.size})")
    if xs.size < 3:
        return None
    if np.any(np.diff(xs) <= 0):
        raise ValueError("x must be strictly increasing")
    y_span = ys.max() - ys.min()
    if y_span == 0:
        return None  # a flat line has no knee
    xn = (xs - xs[0]) / (xs[-1] - xs[0])
    yn = (ys - ys.min()) / y_span
    # make the knee a concave-increasing one; `reverse` scans from the right end
    reverse = (curve == "concave") == (direction == "decreasing")
    if curve == "convex":
        yn = 1.0 - yn
    if reverse:
        xn, yn = 1.0 - xn[::-1], yn[::-1]
    diff = yn - xn
    diff[np.abs(diff) < 1e-12] = 0.0  # rounding noise of the normalization is no curvature (straight lines)
    found = _scan(xn, diff, S, online)
    if found is None:
        return None
    return xs.size - 1 - found if reverse else found


def knee(x: Sequence[float], y: Sequence[float], curve: str = "concave", direction: str = "increasing",
         S: float = 1.0, online: bool = False) -> float | None:
    """The x value of the knee (see knee_index), or None."""
    index = knee_index(x, y, curve, direction, S, online)
    return None if index is None else float(np.asarray(x, dtype=np.float64).reshape(-1)[index])


def _scan(xn: np.ndarray, diff: np.ndarray, S: float, online: bool) -> int | None:
    inner = np.arange(1, diff.size - 1)
    maxima = inner[(diff[inner] >= diff[inner - 1]) & (diff[inner] >= diff[inner + 1])]
    maxima = maxima[diff[maxima] > 0]  # a knee lies above the chord (the straight line has D = 0)
    minima = set(inner[(diff[inner] <= diff[inner - 1]) & (diff[inner] <= diff[inner + 1])].tolist())
    if maxima.size == 0:
        return None
    step = float(np.mean(np.diff(xn)))
    thresholds = {int(i): diff[i] - S * step for i in maxima}
    threshold, candidate, found = None, None, None
    for i in range(int(maxima[0]), diff.size - 1):
        if i in thresholds:
            threshold, candidate = thresholds[i], i
        elif i in minima:
            threshold = 0.0
        if threshold is not None and candidate is not None and diff[i + 1] < threshold:
            found = candidate
            candidate = None  # a knee is reported once; the next maximum starts a new candidate
            if not online:
                break
    return found
