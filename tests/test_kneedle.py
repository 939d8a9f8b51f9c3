"""Kneedle on curves whose knee is known (the paper's Figure 2, kneed's reference cases, 1 - exp(-x))."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ocomp.kneedle import knee, knee_index

X = np.arange(10)
CONVEX_INC = np.array([1, 2, 3, 4, 5, 10, 15, 20, 40, 100])
CURVES = {  # (y, curve, direction) -> knee index, as in the reference implementation's tests
    "concave-increasing": (100 - CONVEX_INC[::-1], "concave", "increasing", 2),
    "concave-decreasing": (100 - CONVEX_INC, "concave", "decreasing", 7),
    "convex-increasing": (CONVEX_INC, "convex", "increasing", 7),
    "convex-decreasing": (CONVEX_INC[::-1], "convex", "decreasing", 2),
}


@pytest.mark.parametrize("case", sorted(CURVES))
def test_four_curve_shapes(case: str) -> None:
    y, curve, direction, expected = CURVES[case]
    assert knee_index(X, y, curve, direction) == expected
    assert knee(X, y, curve, direction) == float(expected)


@pytest.mark.parametrize("case,expected", [("concave-increasing", 0.2), ("concave-decreasing", 0.4),
                                           ("convex-increasing", 0.4), ("convex-decreasing", 0.2)])
def test_truncated_and_rescaled_curves(case: str, expected: float) -> None:
    y, curve, direction, _ = CURVES[case]
    assert knee(X[:-3] / 10, y[:-3] / 10, curve, direction) == pytest.approx(expected, abs=1e-12)


def test_paper_figure2() -> None:
    x = np.linspace(0.0, 1.0, 10)
    y = -1.0 / (x + 0.1) + 5.0
    assert math.isclose(knee(x, y, "concave", "increasing"), 0.2222, rel_tol=1e-3)


def test_one_minus_exp_has_its_analytic_knee() -> None:
    # normalized on [0, 10], D(x) = (1 - e^-x)/(1 - e^-10) - x/10 peaks at x = ln(10 (1 - e^-10)) ~ 2.3026
    x = np.linspace(0.0, 10.0, 1001)
    assert knee(x, 1.0 - np.exp(-x)) == pytest.approx(math.log(10 * (1 - math.exp(-10))), abs=0.01)
    assert knee(x, np.exp(-x), "convex", "decreasing") == pytest.approx(2.3026, abs=0.01)
    # mirrored: the knee of exp(x) (convex increasing) is at 10 - 2.3026
    assert knee(x, np.exp(x), "convex", "increasing") == pytest.approx(10 - 2.3026, abs=0.01)


def test_sensitivity_picks_first_or_global_maximum() -> None:
    # the reference implementation's "flat maxima" case (counts / 1366)
    y = np.array([1366, 1076, 1016, 896, 692, 502, 348, 222, 142, 92, 60, 38, 26, 18, 14, 10, 8, 6]) / 1366
    x = np.arange(len(y), dtype=float)
    assert knee(x, y, "convex", "decreasing", S=0.0) == 1.0  # the first local maximum
    assert knee(x, y, "convex", "decreasing", S=1.0) == 8.0  # the global one


def test_no_knee_and_bad_arguments() -> None:
    assert knee([1, 2, 3], [0.9048, 0.8187, 0.7408], "convex", "decreasing") is None
    assert knee(range(10), [1.0] * 10) is None
    assert knee(range(10), np.arange(10.0)) is None  # a straight line
    with pytest.raises(ValueError, match="curve"):
        knee(range(3), [1, 3, 5], curve="bent")
    with pytest.raises(ValueError, match="direction"):
        knee(range(3), [1, 3, 5], direction="up")
    with pytest.raises(ValueError, match="increasing"):
        knee([0, 2, 1], [1, 3, 5])


def test_paper_style_hyperbola_on_integers() -> None:
    # y = -1/x + 5 on x = 1..10: D = (1 - 1/x)/0.9 - (x - 1)/9 peaks at x = 3 (0.5185); the threshold
    # 0.5185 - 1/9 = 0.407 is crossed at x = 6 (0.370), so the knee is x = 3
    x = np.arange(1, 11)
    assert knee(x, -1.0 / x + 5) == 3.0
    assert knee(x, 1.0 / x, "convex", "decreasing") == 3.0  # the same curve flipped upside down


def test_piecewise_linear_elbow() -> None:
    x = np.arange(21)
    rising = np.where(x <= 5, 2.0 * x, 10 + 0.1 * (x - 5))  # steep, then almost flat: knee at 5
    assert knee(x, rising) == 5.0
    assert knee(x, -rising, "convex", "decreasing") == 5.0
    loss = np.where(x <= 8, 0.05 * x, 0.4 + 1.5 * (x - 8))  # flat, then steep: elbow at 8
    assert knee(x, loss, "convex", "increasing") == 8.0
    assert knee(x, loss[::-1], "convex", "decreasing") == 12.0
    assert knee(x, -loss, "concave", "decreasing") == 8.0


def test_straight_lines_have_no_knee_despite_rounding() -> None:
    x = np.linspace(0.0, 1.0, 37)
    for y in (3.0 * x + 2.0, -0.7 * x + 1.1):
        direction = "increasing" if y[-1] > y[0] else "decreasing"
        for curve in ("concave", "convex"):
            assert knee(x, y, curve, direction) is None, (curve, direction)
