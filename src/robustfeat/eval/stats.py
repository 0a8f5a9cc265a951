"""The statistics of evaluation reports: confidence intervals of an accuracy and of a paired difference."""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy correct/n."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference(a, b) -> dict[str, float]:
    """Accuracy of b minus a on the same examples (robust flags a, b): the difference in points, its 95%
    interval (Wald, paired) and the exact two-sided McNemar p-value of the discordant pairs."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n = len(a)
    only_b, only_a = int((b & ~a).sum()), int((a & ~b).sum())
    d = (only_b - only_a) / n
    se = math.sqrt(max(only_b + only_a - (only_b - only_a) ** 2 / n, 0.0)) / n
    m = only_a + only_b
    k = min(only_a, only_b)
    # exact binomial tail of the discordant pairs; lgamma keeps it finite for thousands of pairs
    tail = sum(math.exp(math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) - m * math.log(2))
               for i in range(k + 1)) if m else 0.5
    return {"diff": 100 * d, "ci95": [100 * (d - 1.96 * se), 100 * (d + 1.96 * se)], "only_a": only_a,
            "only_b": only_b, "n": n, "p_mcnemar": min(1.0, 2 * tail)}
