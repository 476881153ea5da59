"""The L2 norm of a float32 update from one float32 BLAS pass, with a proven error bound.

The exact path (:func:`device_agent.parameters.sum_of_squares`) converts each tensor to
float64 and takes a float64 dot product: a 2x larger temporary and a second pass over
memory. Here a float32 tensor's squares are summed by float32 BLAS (``sdot``) and the
result carries a bound on its error, so a caller uses the fast value only when no
decision (a norm bound, a clip threshold) could come out differently, and otherwise
measures exactly. Non-finite entries, and finite ones whose squares overflow float32
(|x| > ~1.8e19), give a non-finite float32 sum: such tensors always take the exact
path, so overflow never reads as "non-finite" and never hides a norm.

Error bound (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., 2002,
section 3.1 and eq. 4.4; any summation order, with or without FMA): for ``n`` squares
of float32 values, each rounded once and summed with ``n - 1`` rounded additions,
``|computed - exact| <= gamma(n + 1) * exact`` with ``gamma(k) = k u / (1 - k u)`` and
``u = 2**-24``. Squares below float32's normal range may be flushed to zero or rounded
absolutely: at most ``2**-126`` each, added as ``n * 2**-126``.
"""

from __future__ import annotations

import math

import numpy as np

_UNIT = 2.0 ** -24
_TINY = 2.0 ** -126
_PAD = 1e-6
"""Relative padding for the float64 arithmetic around the bound (the exact path's own rounding is ~n * 2**-53)."""


def float32_squares(tensor: np.ndarray) -> tuple[float, float] | None:
    """(sum of squares by float32 BLAS, a bound on its absolute error), or None when the exact path must be used:
    not float32, the float32 sum is not finite (NaN/Inf entries or squares beyond float32), or the bound is useless."""
    if tensor.dtype != np.float32:
        return None
    flat = tensor.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the answer "use the exact pass", not a warning
        total = float(np.dot(flat, flat))
    k = flat.size + 1
    if not math.isfinite(total) or k * _UNIT >= 0.5:
        return None
    gamma = k * _UNIT / (1 - k * _UNIT)
    # |total - exact| <= gamma * exact and exact <= total / (1 - gamma)
    return total, gamma * total / (1 - gamma) + flat.size * _TINY


def decided_alike(norm: float, slack_squares: float, thresholds: tuple[float, ...]) -> bool:
    """True when ``norm`` (from squares off by at most ``slack_squares``) is on the same side of every threshold as
    the exact norm: no threshold lies within the interval the exact norm may be in (padded)."""
    if slack_squares <= 0.0:
        return True
    squares = norm * norm
    low = math.sqrt(max(0.0, squares - slack_squares)) * (1 - _PAD)
    high = math.sqrt(squares + slack_squares) * (1 + _PAD)
    return not any(low <= t <= high for t in thresholds if math.isfinite(t))
