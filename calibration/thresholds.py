"""Selective-routing thresholds with a finite-sample accuracy guarantee, and risk-coverage curves.

A request is auto-routed when its calibrated P(correct) reaches the threshold of its side (``block``
for predicted refusals, ``pass`` for predicted compliance); everything else goes to review.

Guarantee (Learn-then-Test, Angelopoulos et al. 2021, with fixed-sequence testing): candidate
thresholds are the distinct calibrated scores, tested from the strictest (highest) down.  For each
candidate the null "error rate of routed requests > 1 - target" is rejected when the one-sided
Clopper-Pearson upper bound on the error rate at level ``1 - delta`` is <= ``1 - target``.  Testing
stops at the first non-rejection and the last rejected (loosest certified) threshold is kept, so
coverage is maximised while the family-wise error stays <= delta.  The two sides are tested at
``delta / 2`` each (Bonferroni), so with probability >= 1 - delta *both* sides, and therefore all
auto-routed requests together, have accuracy >= target.  A side with no certified candidate gets
threshold ``None`` (never auto-route it).

Candidates that route too few requests to be certified even with zero errors are skipped before
testing (this depends on the scores only, not on the labels, so it costs no error budget).

The binomial test needs independent requests.  Repeats/paraphrases of a prompt are correlated, so
counts are deflated by Kish's design effect ``1 + (m_w - 1) * ICC`` (``m_w`` = size-weighted mean
cluster size, ICC = one-way ANOVA intra-class correlation of correctness residuals given the score,
clipped to [0, 1]).  With one request per prompt this is the exact Clopper-Pearson test; with
repeats it is an approximation (the ICC is estimated from the same data).  The scores must come from a model
fitted on data *disjoint* from the data tested here (see ``calibrate.py``'s split by prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import beta as _beta

__all__ = [
    "SideThreshold",
    "cp_upper_error",
    "cp_lower",
    "design_effect",
    "ltt_threshold",
    "risk_coverage",
    "route",
]


@dataclass(frozen=True)
class SideThreshold:
    """The certified threshold for one side and what it routes on the calibration data."""

    threshold: float | None
    n_routed: int
    n_correct: int
    n_total: int
    accuracy_lower: float | None   # Clopper-Pearson lower bound at the tested level
    design_effect: float

    @property
    def coverage(self) -> float:
        return self.n_routed / self.n_total if self.n_total else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.n_correct / self.n_routed if self.n_routed else None


def cp_upper_error(errors: Any, n: Any, delta: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound (level 1 - delta) on an error rate; 1 where n == 0.

    Non-integer (design-effect-deflated) counts are allowed: the beta quantile form is continuous.
    """
    k = np.asarray(errors, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(all="ignore"):
        ub = _beta.ppf(1.0 - delta, k + 1.0, np.maximum(n - k, 1e-12))
    return np.where(n > 0, np.where(k >= n, 1.0, ub), 1.0)


def cp_lower(successes: Any, n: Any, delta: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound (level 1 - delta) on a success rate; 0 where n == 0."""
    return 1.0 - cp_upper_error(np.asarray(n, np.float64) - np.asarray(successes, np.float64), n, delta)


def design_effect(unit: np.ndarray, y: np.ndarray, strata: np.ndarray | None = None) -> float:
    """Kish design effect of the mean of ``y`` under clustering by ``unit`` (>= 1).

    With ``strata`` (e.g. the score value) the ICC is that of the residuals ``y - mean(y | stratum)``:
    the correlation left once the scores are known, which is what inflates the binomial variance
    of the routed error count.
    """
    y = np.asarray(y, dtype=np.float64)
    if strata is not None and y.size:
        _, sinv = np.unique(strata, return_inverse=True)
        y = y - (np.bincount(sinv, weights=y) / np.bincount(sinv))[sinv]
    if y.size < 2:
        return 1.0
    _, inv, m = np.unique(unit, return_inverse=True, return_counts=True)
    g = m.size
    if g < 2 or g == y.size:
        return 1.0
    s = np.bincount(inv, weights=y)
    n = y.size
    grand = y.mean()
    ssb = float(np.sum(s * s / m) - n * grand * grand)
    ssw = float(np.sum(y * y) - np.sum(s * s / m))
    msb = ssb / (g - 1)
    msw = ssw / (n - g) if n > g else 0.0
    m0 = (n - np.sum(m * m) / n) / (g - 1)
    denom = msb + (m0 - 1) * msw
    icc = (msb - msw) / denom if denom > 0 else 0.0
    icc = min(max(icc, 0.0), 1.0)
    m_w = float(np.sum(m * m) / n)
    return 1.0 + (m_w - 1.0) * icc


def ltt_threshold(score: Any, correct: Any, target: float, delta: float,
                  unit: Any | None = None) -> SideThreshold:
    """Loosest threshold on ``score`` certified by fixed-sequence Clopper-Pearson tests.

    Routes ``score >= threshold``.  ``unit`` (prompt ids) enables the design-effect deflation.
    """
    s = np.asarray(score, dtype=np.float64)
    y = np.asarray(correct, dtype=bool)
    n_total = int(s.size)
    deff = design_effect(np.asarray(unit), y, strata=s) if unit is not None and s.size else 1.0
    if n_total == 0:
        return SideThreshold(None, 0, 0, 0, None, deff)
    cand, inv = np.unique(-s, return_inverse=True)          # ascending -s = descending score
    n_at = np.bincount(inv, minlength=cand.size)
    k_at = np.bincount(inv, weights=y, minlength=cand.size)
    n_cum = np.cumsum(n_at)
    e_cum = n_cum - np.cumsum(k_at)
    ub = cp_upper_error(e_cum / deff, n_cum / deff, delta)
    # Candidates routing too few requests to be certifiable even with zero errors are not tested
    # (a label-free choice, so it spends no error budget); then fixed-sequence testing.
    n_min = np.log(delta) / np.log(target)
    tested = np.flatnonzero(n_cum / deff >= n_min)
    ok = ub[tested] <= 1.0 - target
    n_ok = int(np.argmin(ok)) if not ok.all() else ok.size   # stop at the first non-rejection
    if n_ok == 0:
        return SideThreshold(None, 0, 0, n_total, None, deff)
    j = int(tested[n_ok - 1])
    return SideThreshold(
        threshold=float(-cand[j]), n_routed=int(n_cum[j]), n_correct=int(n_cum[j] - e_cum[j]),
        n_total=n_total, accuracy_lower=float(1.0 - ub[j]), design_effect=deff,
    )


def route(score: Any, will_refuse: Any, block: float | None, pass_: float | None) -> np.ndarray:
    """Auto-routed mask under the policy's decision rule (see ``calibration.policy``)."""
    s = np.asarray(score, dtype=np.float64)
    wr = np.asarray(will_refuse, dtype=bool)
    b = np.inf if block is None else block
    p = np.inf if pass_ is None else pass_
    return np.where(wr, s >= b, s >= p)


def risk_coverage(score: Any, correct: Any) -> dict[str, Any]:
    """Risk-coverage curve of selective routing by ``score`` (Geifman & El-Yaniv 2017).

    Points are taken at each distinct score (ties routed together).  AURC is the area under the
    step curve risk(coverage) over (0, 1]: lower is better; 0 = perfect.
    """
    s = np.asarray(score, dtype=np.float64)
    y = np.asarray(correct, dtype=bool)
    if s.size == 0:
        return {"threshold": [], "coverage": [], "risk": [], "aurc": float("nan")}
    cand, inv = np.unique(-s, return_inverse=True)
    n_at = np.bincount(inv, minlength=cand.size)
    e_at = n_at - np.bincount(inv, weights=y, minlength=cand.size)
    cov = np.cumsum(n_at) / s.size
    risk = np.cumsum(e_at) / np.cumsum(n_at)
    aurc = float(np.sum(risk * np.diff(np.concatenate([[0.0], cov]))))
    return {"threshold": (-cand).tolist(), "coverage": cov.tolist(), "risk": risk.tolist(), "aurc": aurc}
