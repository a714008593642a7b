"""How sure a rule can be of a median: a distribution-free confidence interval from the values' own spread.

For n independent values, the interval between the order statistics x_(l) and x_(u) covers the
median with probability P(l <= K < u), K ~ Binomial(n, 1/2) (e.g. Hollander & Wolfe, Nonparametric
Statistical Methods, ch. 3). A rule acts only when that interval lies entirely on one side of its
threshold: a median of 1.01 against a threshold of 1 with a spread of 0.3 is noise, not evidence.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np

LEVEL = 0.95


def median_interval(values, level: float = LEVEL) -> Tuple[float, float]:
    """(low, high): a ``level`` confidence interval of the median of ``values`` (finite values only);
    the widest one, (min, max), when there are too few values for ``level``; (NaN, NaN) for none."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return math.nan, math.nan
    # the largest k with P(K < k) <= (1 - level) / 2: the interval is [x_(k), x_(n-k-1)] (0-based)
    alpha = (1.0 - level) / 2.0
    cdf, k = 0.0, 0
    for i in range(n // 2 + 1):
        p = math.comb(n, i) / 2.0 ** n
        if cdf + p > alpha:
            break
        cdf += p
        k = i + 1
    k = max(0, k - 1) if k else 0
    return float(v[k]), float(v[n - 1 - k])


def clearly_above(values, threshold: float, level: float = LEVEL) -> bool:
    """The median's interval lies above ``threshold``."""
    lo, _ = median_interval(values, level)
    return bool(lo > threshold)


def clearly_below(values, threshold: float, level: float = LEVEL) -> bool:
    """The median's interval lies below ``threshold``."""
    _, hi = median_interval(values, level)
    return bool(hi < threshold)
