"""Selective-routing thresholds with a finite-sample accuracy guarantee, and risk-coverage curves.

A request is auto-routed (blocked if predicted refuse, passed if predicted comply) when its calibrated
P(correct) reaches the threshold of its *group*: a topic with a threshold of its own, or the global
group (every other topic, unknown topics included); everything else goes to review.  One threshold
per group serves both sides: routing the requests most likely to be right first is what maximises
coverage at a given accuracy.

Procedure (select on the fitting split, certify on the calibration split; Learn-then-Test,
Angelopoulos et al. 2021, with fixed-sequence testing):

1. **Select** (:func:`candidate_sequence`, fitting split only).  For one group the candidate
   thresholds are the distinct scores (thinned to at most ``max_candidates`` nested sets).  For each,
   the fitting split predicts the bound the test would give on the calibration split (its error rate
   and design effect, scaled to the calibration split's size).  The sequence starts at the candidate
   with the *smallest* predicted bound (the one most likely to pass, usually a large set, never a
   tiny noisy one) and continues through every looser candidate whose fitting-split error rate is
   within the target.  A group with no candidate predicted to pass is not tested at all.  A topic is
   its own group only if the fitting split predicts a gain in coverage over the global threshold
   (:func:`certify_policy`).
2. **Share delta**: with ``m`` = the number of sequences actually tested, each gets ``delta / m``
   (Bonferroni).  ``m`` is fixed before any calibration label is looked at (it depends on the fitting
   split and on calibration-split sizes only).
3. **Certify** (:func:`certify_sequence`, calibration split): candidates are tested in sequence order
   at level ``delta / m``; the null "error rate of the requests this threshold routes > 1 - target"
   is rejected when the one-sided Clopper-Pearson upper bound on the error rate, with counts deflated
   by the design effect (:func:`cluster_bound`), is <= ``1 - target``.  Testing stops at the first
   non-rejection; the last rejected (loosest certified) threshold is kept.  Fixed-sequence testing
   with an order fixed in advance controls the family-wise error of one sequence at its level; the
   Bonferroni share makes it hold jointly.  So, with probability >= 1 - delta, **every** group's
   auto-routed requests (both sides together) have accuracy >= target, and hence so does any mix of
   groups.  One side of a group may be below the target when the other is above it.

Clustering: repeats and paraphrases of one prompt share an ``id`` and their correctness is
correlated, so rows are not independent trials.  :func:`cluster_bound` uses an effective sample size
(Korn & Graubard 1998): ``n_eff = n / deff`` with ``deff = max(1, cluster-robust variance of the
routed error rate / its binomial variance on the calibration split, Kish design effect
1 + (m_w - 1) * ICC with the ICC estimated on the fitting split)``, capped at the largest routed
cluster size.  The fitting-split term keeps the correction from collapsing when the calibration
split happens to show few errors.  This is an approximation, not an exact bound: its realised
guarantee is measured by ``benchmarks/routing_guarantee.py`` with clustered data of known truth.
With one request per prompt it is the exact Clopper-Pearson test.

Assumptions: prompts (clusters) are exchangeable between calibration and deployment within each
group (the topic mix may change: the guarantee is per group); the scores come from a model fitted on
prompts disjoint from the calibration split (``calibrate.py`` splits by prompt).

:func:`ltt_threshold` is the previous procedure (fixed sequence from the strictest candidate, one
sequence per side and topic at ``delta / 2``, stopping at the first failure), kept for comparison in
the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import betaincinv

__all__ = [
    "SideThreshold",
    "Bound",
    "cp_upper_error",
    "cp_lower",
    "icc",
    "design_effect",
    "cluster_bound",
    "candidate_sequence",
    "predicted_share",
    "certify_sequence",
    "certify_policy",
    "Certified",
    "GLOBAL",
    "n_needed",
    "ltt_threshold",
    "risk_coverage",
    "route",
]


@dataclass(frozen=True)
class SideThreshold:
    """The certified threshold of one group (or one side, for :func:`ltt_threshold`) and what it routes
    on the calibration data."""

    threshold: float | None
    n_routed: int
    n_correct: int
    n_total: int
    accuracy_lower: float | None   # 1 - the bound of the certified candidate
    design_effect: float
    delta: float | None = None     # level this side's sequence was tested at (None: not tested)
    tested: tuple[tuple[float, float], ...] = field(default_factory=tuple)  # (threshold, bound) in order

    @property
    def coverage(self) -> float:
        return self.n_routed / self.n_total if self.n_total else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.n_correct / self.n_routed if self.n_routed else None


@dataclass(frozen=True)
class Bound:
    """One-sided upper bound on the routed error rate, with the effective counts behind it."""

    upper: float
    errors: int
    n: int
    n_clusters: int
    design_effect: float

    @property
    def n_eff(self) -> float:
        return self.n / self.design_effect


def cp_upper_error(errors: Any, n: Any, delta: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound (level 1 - delta) on an error rate; 1 where n == 0.

    Non-integer (design-effect-deflated) counts are allowed: the beta quantile form is continuous.
    """
    k = np.asarray(errors, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(all="ignore"):
        ub = betaincinv(k + 1.0, np.maximum(n - k, 1e-12), 1.0 - delta)
    return np.where(n > 0, np.where(k >= n, 1.0, ub), 1.0)


def cp_lower(successes: Any, n: Any, delta: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound (level 1 - delta) on a success rate; 0 where n == 0."""
    return 1.0 - cp_upper_error(np.asarray(n, np.float64) - np.asarray(successes, np.float64), n, delta)


def icc(unit: Any, y: Any, strata: Any | None = None) -> float:
    """One-way ANOVA intra-class correlation of ``y`` within ``unit``, clipped to [0, 1].

    With ``strata`` (e.g. the score) it is the ICC of the residuals ``y - mean(y | stratum)``: the
    correlation left once the scores are known.
    """
    y = np.asarray(y, dtype=np.float64)
    if strata is not None and y.size:
        _, sinv = np.unique(strata, return_inverse=True)
        y = y - (np.bincount(sinv, weights=y) / np.bincount(sinv))[sinv]
    if y.size < 2:
        return 0.0
    _, inv, m = np.unique(unit, return_inverse=True, return_counts=True)
    g = m.size
    if g < 2 or g == y.size:
        return 0.0
    s = np.bincount(inv, weights=y)
    n = y.size
    grand = y.mean()
    msb = float(np.sum(s * s / m) - n * grand * grand) / (g - 1)
    msw = float(np.sum(y * y) - np.sum(s * s / m)) / (n - g) if n > g else 0.0
    m0 = (n - np.sum(m * m) / n) / (g - 1)
    denom = msb + (m0 - 1) * msw
    r = (msb - msw) / denom if denom > 0 else 0.0
    return min(max(r, 0.0), 1.0)


def _mean_cluster_size(unit: Any) -> float:
    """Size-weighted mean cluster size ``sum m^2 / n`` (Kish's m_w)."""
    _, m = np.unique(unit, return_counts=True)
    return float(np.sum(m * m) / m.sum()) if m.size else 1.0


def design_effect(unit: Any, y: Any, strata: Any | None = None) -> float:
    """Kish design effect ``1 + (m_w - 1) * ICC`` of the mean of ``y`` under clustering by ``unit``."""
    if np.asarray(y).size < 2:
        return 1.0
    return 1.0 + (_mean_cluster_size(unit) - 1.0) * icc(unit, y, strata)


def _nested_bounds(score: np.ndarray, errors: np.ndarray, unit: np.ndarray, cutoffs: np.ndarray,
                   delta: float, icc_prior: float) -> tuple[np.ndarray, ...]:
    """:func:`cluster_bound` of the ``cutoffs[i]`` highest-scoring rows, for every i at once.

    Rows are added in descending score; per-cluster sums are updated incrementally, so the
    cluster-robust variance ``sum_j (e_j - p n_j)^2 = S_ee - 2 p S_en + p^2 S_nn`` is read off
    cumulative sums.  Returns (upper bound, errors, n, clusters, design effect) arrays.
    """
    order = np.argsort(-score, kind="stable")
    x = errors[order].astype(np.float64)
    _, u = np.unique(unit[order], return_inverse=True)
    by_cluster = np.lexsort((np.arange(u.size), u))      # rows grouped by cluster, in score order
    first = np.r_[True, u[by_cluster][1:] != u[by_cluster][:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(u.size), 0))
    prior_n = np.empty(u.size)
    prior_n[by_cluster] = np.arange(u.size) - start
    cx = np.cumsum(x[by_cluster])
    prior_e = np.empty(u.size)
    prior_e[by_cluster] = cx - x[by_cluster] - np.r_[0.0, cx][start]
    k = np.cumsum(x)
    s_ee = np.cumsum(2 * prior_e * x + x * x)
    s_en = np.cumsum(prior_e + x * prior_n + x)
    s_nn = np.cumsum(2 * prior_n + 1)
    g = np.cumsum(prior_n == 0)
    m_max = np.maximum.accumulate(prior_n + 1)
    i = np.asarray(cutoffs, dtype=np.int64) - 1
    ok = i >= 0
    i = np.maximum(i, 0)
    n = (i + 1).astype(np.float64)
    k, s_ee, s_en, s_nn, g, m_max = k[i], s_ee[i], s_en[i], s_nn[i], g[i], m_max[i]
    deff = 1.0 + (s_nn / n - 1.0) * min(max(icc_prior, 0.0), 1.0)
    with np.errstate(all="ignore"):
        p = k / n
        v_cl = g / (g - 1) * (s_ee - 2 * p * s_en + p * p * s_nn) / (n * n)
        ratio = v_cl / (p * (1 - p) / n)
    usable = (k > 0) & (k < n) & (g > 1)
    deff = np.minimum(np.maximum(np.where(usable, np.maximum(deff, ratio), deff), 1.0), m_max)
    ub = cp_upper_error(k / deff, n / deff, delta)
    return (np.where(ok, ub, 1.0), np.where(ok, k, 0).astype(np.int64), np.where(ok, n, 0).astype(np.int64),
            np.where(ok, g, 0).astype(np.int64), np.where(ok, deff, 1.0))


def cluster_bound(errors: Any, unit: Any, delta: float, icc_prior: float = 0.0) -> Bound:
    """Upper bound at level ``1 - delta`` on the error rate of a routed set of clustered rows.

    ``errors`` marks each routed row wrong (True) or right; ``unit`` is its cluster.  The design
    effect is the largest of 1, the cluster-robust (ratio-estimator, CR1) variance over the binomial
    variance, and Kish's ``1 + (m_w - 1) * icc_prior``; it is capped at the largest cluster size.
    """
    e = np.asarray(errors, dtype=bool)
    if e.size == 0:
        return Bound(1.0, 0, 0, 0, 1.0)
    ub, k, n, g, deff = _nested_bounds(np.zeros(e.size), e, np.asarray(unit), np.array([e.size]), delta, icc_prior)
    return Bound(float(ub[0]), int(k[0]), int(n[0]), int(g[0]), float(deff[0]))


def _nested(score: np.ndarray, max_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate thresholds (descending) and each one's routed count, thinned to nested steps.

    Thinning keeps at most ``max_candidates`` thresholds, each routing at least ``n / max_candidates``
    more rows than the previous kept one (plus always the loosest), so no candidate is a few rows'
    noise away from its neighbour.
    """
    cand = np.unique(score)[::-1]
    n_cum = score.size - np.searchsorted(np.sort(score), cand, side="left")   # rows with score >= cand
    step = max(1, score.size // max(max_candidates, 1))
    keep, last = [], 0
    for i, c in enumerate(n_cum):
        if c - last >= step or i == cand.size - 1:
            keep.append(i)
            last = c
    keep_a = np.asarray(keep, dtype=np.int64)
    return cand[keep_a], n_cum[keep_a]


def candidate_sequence(score: Any, correct: Any, unit: Any, target: float, delta: float,
                       n_cal: int, max_candidates: int = 40) -> list[tuple[float, float, float]]:
    """The fixed testing order for one group, chosen on the fitting split (see module doc).

    ``score``/``correct``/``unit`` are the fitting split's rows of this group; ``n_cal`` is
    the number of calibration-split rows the sequence will be tested on (label-free).  Returns
    ``(threshold, predicted bound, fitting-split share routed)`` to test, in order (empty: nothing
    worth testing).
    """
    s = np.asarray(score, dtype=np.float64)
    y = np.asarray(correct, dtype=bool)
    u = np.asarray(unit)
    if s.size == 0 or n_cal <= 0:
        return []
    eps = 1.0 - target
    prior = icc(u, y, strata=s)
    cand, n_cum = _nested(s, max_candidates)
    scale = n_cal / s.size
    ub, k, n, _, deff = _nested_bounds(s, ~y, u, n_cum, delta, prior)
    # the bound the calibration split would give if it looked like the fitting split
    pred = cp_upper_error(k * scale / deff, n * scale / deff, delta)
    rate, share = k / n, n_cum / s.size
    pred_a, rate_a = np.asarray(pred), np.asarray(rate)
    if not (pred_a <= eps).any():
        return []
    start = int(np.argmin(pred_a))
    keep = [start] + [i for i in range(start + 1, cand.size) if rate_a[i] <= eps]
    return [(float(cand[i]), float(pred_a[i]), float(share[i])) for i in keep]


def predicted_share(seq: list[tuple[float, float, float]], target: float) -> float:
    """Share the sequence is expected to certify (the fitting split's prediction): that of the
    loosest candidate before the first predicted failure."""
    out = 0.0
    for _, bound, share in seq:
        if bound > 1.0 - target:
            break
        out = share
    return out


@dataclass(frozen=True)
class Certified:
    """Certified thresholds for every group, and how the error budget was shared."""

    groups: dict[str, SideThreshold]             # group ("(global)" or a topic) -> its threshold
    own_topics: tuple[str, ...]                  # topics with thresholds of their own
    tests: int                                   # sequences tested (the Bonferroni divisor)
    delta_per_test: float | None
    candidates: dict[str, list[tuple[float, float, float]]]   # the sequences, in testing order

    def threshold(self, group: str) -> float | None:
        return self.groups[group].threshold


GLOBAL = "(global)"


def certify_policy(score: Any, correct: Any, topic: Any, unit: Any, fit: Any,
                   topic_names: tuple[str, ...] | list[str], target: float, delta: float,
                   min_gain: float = 0.05) -> Certified:
    """Select on the fitting rows (``fit``), certify on the others, jointly over all groups.

    One threshold per group on the calibrated P(correct), for both sides together (routing the
    requests most likely to be right first is what maximises coverage at a given accuracy).
    ``topic`` holds codes into ``topic_names`` (-1 = missing).  A topic gets a threshold of its own
    only when the fitting split predicts its own sequence certifies at least ``min_gain`` more of
    its requests than the global threshold would (this and every other choice before the tests
    uses the fitting split and calibration-split sizes only); all other topics, missing and unknown
    ones form the global group.  Every non-empty sequence is then tested at ``delta / m``.
    """
    s = np.asarray(score, dtype=np.float64)
    y = np.asarray(correct, dtype=bool)
    tp = np.asarray(topic, dtype=np.int64)
    u = np.asarray(unit)
    fit = np.asarray(fit, dtype=bool)
    cal = ~fit
    names = list(topic_names)
    d_sel = delta / (1 + len(names))                # selection level: the most tests there could be

    def seq(mask: np.ndarray) -> list[tuple[float, float, float]]:
        f = mask & fit
        return candidate_sequence(s[f], y[f], u[f], target, d_sel, int((mask & cal).sum()))

    everything = np.ones(s.shape, dtype=bool)
    glob_all = seq(everything)
    g_cut = [c for c, b, _ in glob_all if b <= 1.0 - target]
    own: list[str] = []
    for t, name in enumerate(names):
        tmask = tp == t
        f = tmask & fit
        theirs = float((s[f] >= g_cut[-1]).mean()) if g_cut and f.any() else 0.0
        if predicted_share(seq(tmask), target) - theirs >= min_gain:
            own.append(name)
    own_codes = [names.index(n) for n in own]
    in_global = ~np.isin(tp, own_codes) if own_codes else everything
    if not in_global.any():
        in_global = everything                          # every topic has its own: unknown topics
    groups = {GLOBAL: in_global, **{n: tp == names.index(n) for n in own}}
    cands = {g: seq(mask) for g, mask in groups.items()}
    m = sum(1 for sq in cands.values() if sq)
    d_test = delta / m if m else None
    prior = icc(u[fit], y[fit], strata=s[fit])
    out: dict[str, SideThreshold] = {}
    for g, mask in groups.items():
        c = mask & cal
        out[g] = certify_sequence([t for t, _, _ in cands[g]], s[c], y[c], u[c], target,
                                  d_test if d_test is not None else delta, prior)
    return Certified(out, tuple(own), m, d_test, cands)


def certify_sequence(thresholds: list[float], score: Any, correct: Any, unit: Any, target: float,
                     delta: float, icc_prior: float = 0.0) -> SideThreshold:
    """Fixed-sequence test of ``thresholds`` (in the given order) on the calibration split."""
    s = np.asarray(score, dtype=np.float64)
    y = np.asarray(correct, dtype=bool)
    u = np.asarray(unit)
    n_total = int(s.size)
    eps = 1.0 - target
    if not thresholds or n_total == 0:
        return SideThreshold(None, 0, 0, n_total, None, 1.0, delta if thresholds else None, ())
    t = np.asarray(thresholds, dtype=np.float64)
    n_cum = n_total - np.searchsorted(np.sort(s), t, side="left")       # rows with score >= t
    ub, k, n, _, deff = _nested_bounds(s, ~y, u, n_cum, delta, icc_prior)
    passed = (ub <= eps) & (n > 0)
    n_ok = int(np.argmin(passed)) if not passed.all() else passed.size   # stop at the first failure
    tested = tuple((float(a), float(b)) for a, b in zip(t[:n_ok + 1], ub[:n_ok + 1]))
    if n_ok == 0:
        return SideThreshold(None, 0, 0, n_total, None, 1.0, delta, tested)
    j = n_ok - 1
    return SideThreshold(float(t[j]), int(n[j]), int(n[j] - k[j]), n_total, float(1.0 - ub[j]), float(deff[j]),
                         delta, tested)


def n_needed(error_rate: float, target: float, delta: float, design_effect: float = 1.0) -> int | None:
    """Rows a routed set with this error rate needs before its bound can reach ``1 - target``.

    Smallest ``n`` with ``cp_upper_error(error_rate * n / deff, n / deff, delta) <= 1 - target``;
    None when ``error_rate >= 1 - target`` (no amount of data certifies it).
    """
    eps = 1.0 - target
    if not error_rate < eps:
        return None
    lo, hi = 1, 2
    while float(cp_upper_error(error_rate * hi / design_effect, hi / design_effect, delta)) > eps:
        lo, hi = hi, hi * 2
        if hi > 10 ** 9:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if float(cp_upper_error(error_rate * mid / design_effect, mid / design_effect, delta)) > eps:
            lo = mid
        else:
            hi = mid
    return hi


def ltt_threshold(score: Any, correct: Any, target: float, delta: float,
                  unit: Any | None = None) -> SideThreshold:
    """The previous procedure (policy schema 1), kept for comparison in the benchmarks.

    Fixed sequence over every distinct score from the strictest down (skipping candidates that
    could not pass with zero errors), stopping at the first failure; counts deflated by Kish's
    design effect with the ICC estimated on the same data.
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
