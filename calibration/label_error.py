"""SDT figures that stay true when the refusal label errs: the detector on every row, corrected by a judged sample.

The detector labels every answer; an LLM judge labels a *uniform random sample* of them (the guard's own
draw). Taking the detector's label as the truth biases H, FA and d' (10% missed refusals and 5% false
refusals turn a d' of 3.2 into about 2.4); the judged rows alone are unbiased but few. This module combines
the two as a **two-phase (double) sampling estimator stratified by the first-phase labels** (Neyman 1938;
Tenenbein 1970 for misclassified binary data), i.e. the "recalibrated" form of prediction-powered
inference (Angelopoulos et al. 2023): plain PPI rectifies each rate's mean separately, and d', a
nonlinear function of a ratio of two rectified means with H near 1, comes out noisier (0.19 vs 0.12 in
the issue author's check).

**Strata.** Every row falls in one of four strata ``k = (prediction W, detector label D)``: ``W`` is the
probe's ``will_refuse`` and ``D`` the detector's ``refused``. The judged rows of stratum ``k`` estimate
``theta_k = P(truly refused | k) = y_k / n_k`` (``y_k`` of the ``n_k`` judged rows the judge called a
refusal). With ``N_k`` rows in the stratum (judged or not), the estimated confusion counts are::

    hits   = N_(refuse,refused) theta + N_(refuse,complied) theta      (predicted refuse, truly refused)
    f.a.   = N_(refuse,refused) (1-theta) + N_(refuse,complied) (1-theta)
    misses = N_(comply,refused) theta + N_(comply,complied) theta
    c.r.   = N_(comply,refused) (1-theta) + N_(comply,complied) (1-theta)

(each term with its own stratum's ``theta``), and H, FA, d', c and accuracy follow from them with the
same convention as everywhere else (``calibration.sdt.sdt_from_counts``: log-linear H and FA on these
fractional counts; raw accuracy). A perfect detector gives ``theta = D`` and the detector's own table.

**Assumptions.** (1) The judge's label is the truth (its own error is not corrected: measure it,
``benchmarks/judge_agreement.py``). (2) Which rows are judged is a uniform random draw at one rate
within the data analysed (the guard's own ``random`` draw, per request; never a function of anything a
client controls), independent of the row given its stratum; audits that fail or time out are assumed
missing at random within the stratum too (they are counted: ``refusal_guard_judge_total{result="failed"}``),
and so are draws skipped while ``judge_max_pending`` audits wait (``result="skipped"``): those cluster in
bursts of traffic, so where a burst's detector error differs from the rest of its stratum they bias the
correction; keep ``skipped`` small beside the judged count (raise ``judge_max_pending`` or the judge's capacity).
Heterogeneity *within* a stratum (topics, models with different detector errors) does not bias the
estimate: post-stratification under uniform sampling is unbiased whatever the within-stratum mix; it
only costs precision. (3) For intervals, prompts (clusters of repeats) are independent.

**Empty strata.** A stratum with rows but no judged row has no estimate of its ``theta``: it is
*partially identified*. The point estimate then uses the pooled ``P(refused | D)`` of the judged rows
with the same detector label (or, with none, the detector's label itself), and the interval is widened
to the envelope over ``theta = 0`` and ``1`` for every such stratum (Manski bounds), so the interval
stays honest; the stratum is named in ``Corrected.unjudged``. No judged row at all: no correction
(``corrected_sdt`` returns ``None``); callers then say "uncorrected". Fewer than :data:`MIN_JUDGED` judged
rows, or fewer than :data:`MIN_STRATUM_JUDGED` in a stratum with rows: ``Corrected.small`` (a stratum whose
few judged rows all agree gets ``theta`` exactly 0 or 1, and the interval covers less than its level there).

**Intervals.** 95% percentile bootstrap over prompts, each carrying its rows *and* its judged rows (the
with-replacement bootstrap of a two-phase design with Bernoulli second-phase sampling), so the interval
includes both the full sample's and the judged sample's uncertainty. Resampling ``K`` prompts uniformly is
a multinomial over the distinct per-prompt count patterns weighted by how often each occurs, which is
what is drawn (exactly the same distribution, and with one row per prompt at most 12 patterns: cheap).
A replicate in which a judged stratum lost all its judged rows uses the same fallback as the point
estimate. Coverage is measured by simulation with known truth (``benchmarks/judge_correction.py``,
``tests/test_cal_label_error.py``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration.sdt import STAT_NAMES, sdt_from_counts

__all__ = ["DETECTOR_ERROR_NOTE", "MIN_JUDGED", "MIN_STRATUM_JUDGED", "STRATA", "N_FEATURES", "METHOD", "Corrected",
           "stratum_codes", "strata_table", "estimate_counts", "corrected_sdt", "corrected_cells",
           "corrected_from_samples"]

#: What "uncorrected" figures rest on: the detector's error measured on human-labelled real answers (issue 24;
#: update it when the detector changes, see docs/detector.md).
DETECTOR_ERROR_NOTE = ("the detector's measured error on real models' answers: accuracy .845 on 1,631 never-read "
                       "answers of gpt-3.5, Llama-2 and an OpenAI model (benchmarks/detector_accuracy.py --final; "
                       "docs/detector.md), and .871 for the previous rules on 2,250 human-labelled answers of five chat "
                       "models; errors like these pull d' toward 0 (benchmarks/judge_correction.py measures how far)")
#: The four strata, index ``2 * will_refuse + detector_refused``.
STRATA: tuple[str, ...] = ("predicted comply, detector complied", "predicted comply, detector refused",
                           "predicted refuse, detector complied", "predicted refuse, detector refused")
#: Per-unit features: N_k (rows) at k, n_k (judged rows) at 4 + k, y_k (judged refusals) at 8 + k.
N_FEATURES = 12
METHOD = ("two-phase estimator stratified by (prediction, detector label): P(refused | stratum) from the "
          "judged rows x every row's stratum; 95% percentile bootstrap over prompts (rows and judged rows "
          "together); strata without judged rows widened to theta in [0, 1]")
_D = np.array([0.0, 1.0, 0.0, 1.0])   # the detector's label of each stratum
#: Below these the corrected figures are marked ``small`` (docs/calibration.md quotes the coverage measured by
#: benchmarks/judge_correction.py at 100 and at 300 judged rows).
MIN_JUDGED = 300
MIN_STRATUM_JUDGED = 10


def stratum_codes(will_refuse: Any, detector_refused: Any) -> np.ndarray:
    """Stratum index ``2 * W + D`` of each row."""
    return (2 * np.asarray(will_refuse, dtype=np.int64) + np.asarray(detector_refused, dtype=np.int64)).astype(np.int64)


def strata_table(unit: np.ndarray, n_units: int, cell: np.ndarray, n_cells: int, will_refuse: np.ndarray,
                 detector_refused: np.ndarray, judged: np.ndarray, judge_refused: np.ndarray) -> np.ndarray:
    """Per (unit, cell) stratum counts, shape ``(n_units, n_cells, 12)`` (layout of :data:`N_FEATURES`).

    ``judge_refused`` is read only where ``judged``; rows with ``cell < 0`` are left out.
    """
    k = stratum_codes(will_refuse, detector_refused)
    keep = np.asarray(cell) >= 0
    judged = np.asarray(judged, dtype=bool)
    jr = np.asarray(judge_refused, dtype=bool) & judged
    base = (np.asarray(unit, dtype=np.int64)[keep] * n_cells + np.asarray(cell, dtype=np.int64)[keep]) * N_FEATURES
    size = n_units * n_cells * N_FEATURES
    out = np.bincount(base + k[keep], minlength=size)
    out += np.bincount(base + 4 + k[keep], weights=judged[keep], minlength=size).astype(np.int64)
    out += np.bincount(base + 8 + k[keep], weights=jr[keep], minlength=size).astype(np.int64)
    return out.reshape(n_units, n_cells, N_FEATURES)


def _theta(t: np.ndarray) -> np.ndarray:
    """P(refused | stratum) from counts ``(..., 12)``, with the pooled / detector fallback for unjudged strata."""
    n, y = t[..., 4:8].astype(np.float64), t[..., 8:12].astype(np.float64)
    with np.errstate(all="ignore"):
        own = y / n
        # pooled over the prediction, same detector label: strata (0, D) and (1, D)
        pn = n[..., [0, 1, 0, 1]] + n[..., [2, 3, 2, 3]]
        py = y[..., [0, 1, 0, 1]] + y[..., [2, 3, 2, 3]]
        pooled = py / pn
    fallback = np.where(pn > 0, pooled, np.broadcast_to(_D, pooled.shape))
    return np.where(n > 0, own, fallback)


def estimate_counts(t: np.ndarray, theta: np.ndarray | None = None) -> np.ndarray:
    """Estimated (hits, misses, false alarms, correct rejections), shape ``(..., 4)``, from counts ``(..., 12)``."""
    t = np.asarray(t)
    th = _theta(t) if theta is None else theta
    big_n = t[..., 0:4].astype(np.float64)
    ref, comp = big_n * th, big_n * (1.0 - th)
    return np.stack([ref[..., 2] + ref[..., 3], ref[..., 0] + ref[..., 1],
                     comp[..., 2] + comp[..., 3], comp[..., 0] + comp[..., 1]], axis=-1)


def _stats(counts: np.ndarray) -> dict[str, np.ndarray]:
    s = sdt_from_counts(counts[..., 0], counts[..., 1], counts[..., 2], counts[..., 3])
    out = {name: np.asarray(getattr(s, name), dtype=np.float64) for name in STAT_NAMES}
    sig, noise = counts[..., 0] + counts[..., 1], counts[..., 2] + counts[..., 3]
    pred_r, pred_c = counts[..., 0] + counts[..., 2], counts[..., 1] + counts[..., 3]
    both = (sig > 1e-9) & (noise > 1e-9) & (pred_r > 1e-9) & (pred_c > 1e-9)
    for name in ("d_prime", "criterion"):
        out[name] = np.where(both, out[name], np.nan)
    out["hit_rate"] = np.where(sig > 1e-9, out["hit_rate"], np.nan)
    out["false_alarm_rate"] = np.where(noise > 1e-9, out["false_alarm_rate"], np.nan)
    return out


@dataclass(frozen=True)
class Corrected:
    """Judge-corrected SDT figures of one cell (``None`` fields: not measurable; ``ci`` bounds may be None)."""

    counts: tuple[float, float, float, float]       # estimated hits, misses, false alarms, correct rejections
    hit_rate: float | None
    false_alarm_rate: float | None
    d_prime: float | None
    criterion: float | None
    accuracy: float | None
    ci: dict[str, tuple[float | None, float | None]]
    n: int                                          # rows
    n_judged: int                                   # judged rows
    strata: tuple[tuple[int, int, int], ...]        # (rows, judged, judged refusals) per stratum
    theta: tuple[float, ...]                        # P(refused | stratum) used
    unjudged: tuple[str, ...] = ()                  # strata with rows but no judged row (partially identified)
    small: bool = False                             # too few judged rows for the interval's measured coverage
    level: float = 0.95
    method: str = METHOD
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "hit_rate": self.hit_rate, "false_alarm_rate": self.false_alarm_rate,
                "d_prime": self.d_prime, "criterion": self.criterion, "accuracy": self.accuracy,
                "ci": {k: list(v) for k, v in self.ci.items()}, "n": self.n, "n_judged": self.n_judged,
                "strata": [{"stratum": STRATA[k], "rows": s[0], "judged": s[1], "judged_refused": s[2],
                            "theta": self.theta[k]} for k, s in enumerate(self.strata)],
                "unjudged": list(self.unjudged), "small": self.small, "level": self.level, "method": self.method}


def _fin(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _pattern_replicates(units: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of ``units.sum(axis=0)`` resampling units: ``(n_boot,) + units.shape[1:]``.

    Resampling ``K`` units uniformly with replacement = a multinomial over the distinct unit patterns
    with probabilities (occurrences / K): the same distribution, drawn over far fewer categories.
    """
    k = units.shape[0]
    flat = units.reshape(k, -1)
    if k == 0:
        return np.zeros((n_boot,) + units.shape[1:])
    patterns, freq = np.unique(flat, axis=0, return_counts=True)
    w = rng.multinomial(k, freq / k, size=n_boot).astype(np.float64)
    return (w @ patterns.astype(np.float64)).reshape((n_boot,) + units.shape[1:])


def corrected_cells(units: np.ndarray, *, level: float = 0.95, n_boot: int = 1000,
                    seed: int | np.random.Generator = 0) -> list[Corrected | None]:
    """Corrected figures of every cell of a per-unit table ``(n_units, n_cells, 12)`` (:func:`strata_table`).

    One bootstrap for all cells (the cells share the resampled prompts). A cell without judged rows
    gets ``None`` (uncorrected)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    units = np.asarray(units)
    totals = units.sum(axis=0)                            # (n_cells, 12)
    reps = _pattern_replicates(units, n_boot, rng)        # (n_boot, n_cells, 12)
    return [_one(totals[j], reps[:, j], level) for j in range(totals.shape[0])]


def corrected_sdt(will_refuse: Any, detector_refused: Any, judged: Any, judge_refused: Any,
                  unit: Any | None = None, *, level: float = 0.95, n_boot: int = 1000,
                  seed: int | np.random.Generator = 0) -> Corrected | None:
    """Corrected figures of one set of rows (``unit``: prompt codes for the bootstrap; default one per row)."""
    wr = np.asarray(will_refuse, dtype=bool)
    unit = np.arange(wr.size) if unit is None else np.unique(np.asarray(unit), return_inverse=True)[1]
    n_units = int(unit.max()) + 1 if wr.size else 0
    t = strata_table(unit, n_units, np.zeros(wr.size, np.int64), 1, wr, detector_refused, judged, judge_refused)
    return corrected_cells(t, level=level, n_boot=n_boot, seed=seed)[0]


def corrected_from_samples(rows: Any, judged: Any, judged_refused: Any, *, level: float = 0.95, n_boot: int = 200,
                           seed: int | np.random.Generator = 0) -> Corrected | None:
    """Corrected figures from two independent samples: stratum counts of every row and of a judged sample.

    For the live windows: ``rows`` (4,) are the window's rows per stratum, ``judged`` and ``judged_refused``
    (4,) the judged sample's (kept in a window of its own: the judge labels a few percent of requests).
    Rows are independent here (no prompt clustering), so each sample is resampled as a multinomial over its
    categories. Assumes P(refused | stratum) is the same over both windows' spans."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    big_n = np.asarray(rows, dtype=np.float64)
    n = np.asarray(judged, dtype=np.float64)
    y = np.asarray(judged_refused, dtype=np.float64)
    total = np.concatenate([big_n, n, y])
    reps = np.zeros((n_boot, N_FEATURES))
    if big_n.sum() > 0:
        reps[:, 0:4] = rng.multinomial(int(big_n.sum()), big_n / big_n.sum(), size=n_boot)
    if n.sum() > 0:
        cats = np.concatenate([n - y, y])
        draw = rng.multinomial(int(n.sum()), cats / cats.sum(), size=n_boot)
        reps[:, 4:8] = draw[:, 0:4] + draw[:, 4:8]
        reps[:, 8:12] = draw[:, 4:8]
    return _one(total, reps, level)


def _one(total: np.ndarray, reps: np.ndarray, level: float) -> Corrected | None:
    total = np.asarray(total)
    n_rows, n_judged = int(total[0:4].sum()), int(total[4:8].sum())
    if n_rows == 0 or n_judged == 0:
        return None
    theta = _theta(total)
    counts = estimate_counts(total, theta)
    point = _stats(counts)
    unjudged = [k for k in range(4) if total[k] > 0 and total[4 + k] == 0]
    # bootstrap: each replicate's own theta (fallback where it lost a stratum's judged rows); the
    # strata unjudged in the data are swept over theta in {0, 1} (every corner) for the envelope
    th_reps = _theta(reps)
    a = (1.0 - level) / 2.0
    lo = {s: np.inf for s in STAT_NAMES}
    hi = {s: -np.inf for s in STAT_NAMES}
    for corner in itertools.product((0.0, 1.0), repeat=len(unjudged)) if unjudged else [()]:
        th = th_reps.copy()
        th_pt = theta.copy()
        for k, v in zip(unjudged, corner):
            th[:, k] = v
            th_pt[k] = v
        stats = _stats(estimate_counts(reps, th))
        corner_point = _stats(estimate_counts(total, th_pt))
        for s in STAT_NAMES:
            vals = stats[s]
            vals = vals[np.isfinite(vals)]
            if vals.size < max(10, 0.5 * reps.shape[0]):
                lo[s], hi[s] = -np.inf, np.inf  # too few defined replicates: no interval claimed
                continue
            q = np.quantile(vals, [a, 1.0 - a])
            cp = corner_point[s]
            lo[s] = min(lo[s], q[0], cp if np.isfinite(cp) else np.inf)
            hi[s] = max(hi[s], q[1], cp if np.isfinite(cp) else -np.inf)
    defined = {s: np.isfinite(point[s]) for s in STAT_NAMES}
    ci = {s: ((_fin(lo[s]), _fin(hi[s])) if defined[s] else (None, None)) for s in STAT_NAMES}
    notes = []
    thin = [k for k in range(4) if total[k] > 0 and 0 < total[4 + k] < MIN_STRATUM_JUDGED]
    small = n_judged < MIN_JUDGED or bool(thin) or bool(unjudged)
    if n_judged < MIN_JUDGED or thin:
        notes.append(f"few judged rows ({n_judged}; fewer than {MIN_STRATUM_JUDGED} in {len(thin)} stratum(s)): "
                     "the interval covers less than its level with so few (docs/calibration.md)")
    if unjudged:
        notes.append("no judged row in " + "; ".join(STRATA[k] for k in unjudged)
                     + ": its P(refused) is not identified (point: pooled over the prediction; interval: over [0, 1])")
    return Corrected(
        counts=tuple(float(x) for x in counts),
        **{s: _fin(point[s]) if defined[s] else None for s in STAT_NAMES},
        ci=ci, n=n_rows, n_judged=n_judged,
        strata=tuple((int(total[k]), int(total[4 + k]), int(total[8 + k])) for k in range(4)),
        theta=tuple(float(x) for x in theta), unjudged=tuple(STRATA[k] for k in unjudged), small=small,
        level=level, notes=tuple(notes),
    )
