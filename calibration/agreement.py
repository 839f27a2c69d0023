"""Detector-vs-judge agreement: the share of rows where two refusal labels agree, with a CI.

Convention: a **Wilson score interval** (not Clopper-Pearson) on the agreement proportion. When rows
repeat a prompt (``cluster`` codes), rows of one prompt are not independent, so the interval uses the
**effective sample size** ``n / deff``, with the design effect ``deff`` from the ratio estimator's
cluster-robust variance (Kish; clamped at 1, i.e. never narrower than the unclustered interval):

    p = sum(a_j) / sum(m_j)         (a_j agreements and m_j rows of cluster j, k clusters)
    var_cl = k / (k - 1) * sum((a_j - p m_j)^2) / n^2
    deff = max(1, var_cl / (p (1 - p) / n))

Assumptions: clusters (prompts) are independent of each other; within a prompt any correlation is
allowed. With one row per prompt the result is exactly the plain Wilson interval. Coverage is checked by
simulation in tests/test_agreement.py (independent and strongly clustered data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm


@dataclass(frozen=True)
class Agreement:
    """Agreement of two binary labels on the rows where both exist."""

    n: int                  # rows with both labels
    agree: int
    rate: float | None      # agree / n (None when n == 0)
    low: float | None
    high: float | None
    n_clusters: int
    design_effect: float
    confidence: float
    method: str = "wilson (effective n = n / design effect, clustered by prompt)"

    def as_dict(self) -> dict:
        return {"n": self.n, "agree": self.agree, "rate": self.rate, "ci": [self.low, self.high],
                "n_clusters": self.n_clusters, "design_effect": self.design_effect,
                "confidence": self.confidence, "method": self.method}


def wilson(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (``n`` may be a non-integer effective size)."""
    if n <= 0:
        raise ValueError("n must be positive")
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def agreement(a: np.ndarray, b: np.ndarray, cluster: np.ndarray | None = None,
              confidence: float = 0.95) -> Agreement:
    """Agreement of boolean arrays ``a`` and ``b`` (same length), clustered by ``cluster`` codes."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError("a and b must have the same shape")
    same = a == b
    n = int(same.size)
    if n == 0:
        return Agreement(0, 0, None, None, None, 0, 1.0, confidence)
    agree = int(same.sum())
    p = agree / n
    if cluster is None:
        cluster = np.arange(n)
    _, codes = np.unique(np.asarray(cluster), return_inverse=True)
    k = int(codes.max()) + 1
    deff = 1.0
    if k > 1 and 0 < p < 1 and k < n:
        m = np.bincount(codes, minlength=k)
        s = np.bincount(codes, weights=same.astype(float), minlength=k)
        var_cl = k / (k - 1) * float(((s - p * m) ** 2).sum()) / n**2
        deff = max(1.0, var_cl / (p * (1 - p) / n))
    low, high = wilson(p * n / deff, n / deff, confidence)
    return Agreement(n, agree, p, low, high, k, round(deff, 6), confidence)


def detector_judge_agreement(table: object, confidence: float = 0.95) -> dict | None:
    """Detector-vs-judge agreement on a ``DatapointTable``'s judged rows, clustered by prompt; ``None``
    when no row carries a judge label. (Those rows' ``refused`` already is the judge's.)"""
    judged = getattr(table, "judged", None)
    if judged is None or not judged.any():
        return None
    res = agreement(table.detector_refused[judged], table.refused[judged], table.prompt[judged], confidence)
    return res.as_dict()
