"""Calibration of the probe's stated confidence: reliability table, ECE, Brier, and a recalibrator.

The event being forecast is "the probe's prediction is correct" (``will_refuse == refused``).
Stated confidence ``k`` in 1..5 is read as the probability ``k / 5`` (the published convention for
this probe).  ECE follows Naeini et al. (2015) / Guo et al. (2017) with one bin per confidence
level: ``ECE = sum_k (n_k / N) * |acc_k - k/5|``.  The Brier score (Brier 1950) is
``mean((k/5 - correct)^2)``.

:class:`Recalibrator` maps (will_refuse, confidence, harm_rating, topic) to a calibrated
P(prediction correct).  It is fitted hierarchically with beta-binomial shrinkage (each cell's
counts are pulled toward its parent's rate with ``prior_strength`` pseudo-observations):

    side -> side x confidence -> side x harm_rating x confidence -> topic x (the same)

and after each shrinkage step the map is made non-decreasing in confidence by weighted pool
adjacent violators (Ayer et al. 1955; weights = n + prior_strength).  A topic with little data
therefore lands on the global map, and a missing harm rating uses the map pooled over harm.  It is
a plain object with ``fit``/``apply`` and JSON round-trip, used identically offline and online.

The continuous score: where the probe returned ``p_refuse_logprob`` (the token probability of
``will_refuse: true``), the table's P(correct) is refined by a logistic adjustment fitted on the rows
that have it, ``logit P = logit(table P) + a[side] + b[side] * logit(q)`` with ``q`` the token
probability of the predicted answer (``p_refuse_logprob`` for a predicted refusal, ``1 -`` it for a
predicted compliance), clipped to [1e-4, 1 - 1e-4].  The adjustment is kept only when a
likelihood-ratio test on the fitting rows finds it (chi-square, 2 df per side present, p < 0.01), so
a logprob without signal leaves the map as it was; requests without a logprob always use the table.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.special import expit, logit
from scipy.stats import beta as _beta
from scipy.stats import chi2 as _chi2

__all__ = ["ece", "brier", "ece_from_counts", "ece_prob", "reliability_table", "pav", "Recalibrator"]

_LEVELS = np.arange(1, 6)
_STATED = _LEVELS / 5.0


def ece_from_counts(n_correct_by_conf: Any, n_by_conf: Any) -> float:
    """ECE from per-confidence counts (length-5 arrays, index 0 = confidence 1); nan if empty."""
    k = np.asarray(n_correct_by_conf, dtype=np.float64)
    n = np.asarray(n_by_conf, dtype=np.float64)
    if k.shape[-1] != 5 or n.shape[-1] != 5:
        raise ValueError("need counts for the 5 confidence levels")
    total = n.sum()
    if total <= 0:
        return float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(n > 0, k / np.where(n > 0, n, 1.0), 0.0)
    return float(np.sum(n / total * np.abs(acc - _STATED) * (n > 0)))


def _conf_counts(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(confidence, dtype=np.int64)
    y = np.asarray(correct, dtype=bool)
    if c.size and (c.min() < 1 or c.max() > 5):
        raise ValueError("confidence must be in 1..5")
    n = np.bincount(c, minlength=6)[1:6]
    k = np.bincount(c, weights=y, minlength=6)[1:6]
    return k, n


def ece(confidence: Any, correct: Any) -> float:
    """Expected calibration error, one bin per confidence level, stated confidence = conf/5."""
    k, n = _conf_counts(confidence, correct)
    return ece_from_counts(k, n)


def brier(confidence: Any, correct: Any) -> float:
    """Brier score of stated confidence conf/5 as a forecast of correctness; nan if empty."""
    c = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if c.size == 0:
        return float("nan")
    return float(np.mean((c / 5.0 - y) ** 2))


def ece_prob(p: Any, correct: Any, n_bins: int = 10) -> float:
    """ECE of arbitrary probabilities with equal-width bins (Guo et al. 2017); nan if empty."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if p.size == 0:
        return float("nan")
    b = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    sp = np.bincount(b, weights=p, minlength=n_bins)
    sy = np.bincount(b, weights=y, minlength=n_bins)
    return float(np.sum(np.abs(sy - sp)) / p.size)


def reliability_table(confidence: Any, correct: Any, level: float = 0.95) -> list[dict[str, Any]]:
    """One row per confidence level: n, stated probability, observed accuracy, Clopper-Pearson CI."""
    k, n = _conf_counts(confidence, correct)
    a = (1.0 - level) / 2.0
    rows = []
    for i in range(5):
        ni, ki = int(n[i]), float(k[i])
        lo = float(_beta.ppf(a, ki, ni - ki + 1)) if ki > 0 else 0.0
        hi = float(_beta.ppf(1 - a, ki + 1, ni - ki)) if ki < ni else 1.0
        rows.append({
            "confidence": i + 1, "stated": float(_STATED[i]), "n": ni, "n_correct": int(ki),
            "accuracy": ki / ni if ni else None, "ci": [lo, hi] if ni else None,
        })
    return rows


def pav(y: Any, w: Any) -> np.ndarray:
    """Weighted pool-adjacent-violators: the non-decreasing sequence closest to ``y`` in weighted L2."""
    y = np.asarray(y, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    vals: list[float] = []
    wts: list[float] = []
    sizes: list[int] = []
    for yi, wi in zip(y, w):
        vals.append(float(yi))
        wts.append(float(wi))
        sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            wsum = wts[-2] + wts[-1]
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / wsum if wsum > 0 else (vals[-2] + vals[-1]) / 2
            vals[-2:] = [v]
            wts[-2:] = [wsum]
            sizes[-2:] = [sizes[-2] + sizes[-1]]
    return np.repeat(vals, sizes)


def _shrink_pav(k: np.ndarray, n: np.ndarray, prior: np.ndarray, m: float) -> np.ndarray:
    """Beta-binomial shrinkage toward ``prior`` then PAV along the last axis (confidence)."""
    p = (k + m * prior) / (n + m)
    flat_p = p.reshape(-1, 5)
    flat_w = (n + m).reshape(-1, 5)
    return np.stack([pav(a, b) for a, b in zip(flat_p, flat_w)]).reshape(p.shape)


class Recalibrator:
    """Calibrated P(prediction correct | will_refuse, confidence, harm_rating, topic).

    Tables have shape ``(2, 6, 5)``: side (0 = predicted comply, 1 = predicted refuse), harm rating
    (0 = missing/pooled, 1..5), confidence (1..5).  Unknown topics use the global table.
    """

    KIND = "refusal-guard/recalibrator"
    VERSION = 2
    #: Fewest fitting rows with a logprob before the adjustment is tried; its test level.
    MIN_LOGPROB_ROWS = 100
    LOGPROB_ALPHA = 0.01

    def __init__(self, prior_strength: float = 20.0) -> None:
        if prior_strength <= 0:
            raise ValueError("prior_strength must be positive")
        self.prior_strength = float(prior_strength)
        self.logprob: np.ndarray | None = None    # shape (2, 2): [side] -> (a, b)
        self.global_table: np.ndarray | None = None
        self.topic_tables: dict[str, np.ndarray] = {}
        self.topic_n: dict[str, int] = {}

    # -- fitting -----------------------------------------------------------------------------
    def fit(self, will_refuse: Any, confidence: Any, harm_rating: Any, topic: Any, correct: Any,
            topic_names: Sequence[str] | None = None, p_refuse_logprob: Any | None = None) -> "Recalibrator":
        """Fit from per-request arrays.

        ``topic`` is either a sequence of names (``None`` = missing) or, when ``topic_names`` is
        given, integer codes into it (-1 = missing).  ``harm_rating`` uses 0 or None for missing;
        ``p_refuse_logprob`` uses nan (or None) for missing.
        """
        wr = np.asarray(will_refuse, dtype=bool)
        conf = np.asarray(confidence, dtype=np.int64)
        harm = np.asarray([0 if h is None else h for h in harm_rating] if not isinstance(
            harm_rating, np.ndarray) else harm_rating, dtype=np.int64)
        y = np.asarray(correct, dtype=np.float64)
        codes, names = _topic_codes(topic, topic_names)
        if conf.size and (conf.min() < 1 or conf.max() > 5):
            raise ValueError("confidence must be in 1..5")
        harm = np.where((harm >= 1) & (harm <= 5), harm, 0)
        m = self.prior_strength
        nt = len(names)
        # counts per (topic+1, side, harm, conf); topic index 0 collects missing topics
        idx = (((codes + 1) * 2 + wr) * 6 + harm) * 5 + (conf - 1)
        size = (nt + 1) * 2 * 6 * 5
        n = np.bincount(idx, minlength=size).reshape(nt + 1, 2, 6, 5).astype(np.float64)
        k = np.bincount(idx, weights=y, minlength=size).reshape(nt + 1, 2, 6, 5)

        n_g, k_g = n.sum(axis=0), k.sum(axis=0)                         # (2, 6, 5)
        n_s, k_s = n_g.sum(axis=(1, 2)), k_g.sum(axis=(1, 2))            # (2,)
        side = (k_s + 0.5) / (n_s + 1.0)                                 # Jeffreys-like root
        n_sc, k_sc = n_g.sum(axis=1), k_g.sum(axis=1)                    # (2, 5)
        g1 = _shrink_pav(k_sc, n_sc, np.repeat(side[:, None], 5, axis=1), m)
        g2 = _shrink_pav(k_g[:, 1:], n_g[:, 1:], np.repeat(g1[:, None, :], 5, axis=1), m)
        glob = np.concatenate([g1[:, None, :], g2], axis=1)
        self.global_table = glob
        self.topic_tables, self.topic_n = {}, {}
        for t, name in enumerate(names):
            nt_, kt_ = n[t + 1], k[t + 1]
            t1 = _shrink_pav(kt_.sum(axis=1), nt_.sum(axis=1), g1, m)
            t2 = _shrink_pav(kt_[:, 1:], nt_[:, 1:], g2, m)
            self.topic_tables[name] = np.concatenate([t1[:, None, :], t2], axis=1)
            self.topic_n[name] = int(nt_.sum())
        self.logprob = None
        if p_refuse_logprob is not None:
            lp = _floats(p_refuse_logprob)
            has = np.isfinite(lp)
            if has.sum() >= self.MIN_LOGPROB_ROWS:
                base = self.apply_many(wr[has], conf[has], harm[has], codes[has], topic_names=names)
                self.logprob = _fit_logprob(base, wr[has], _agree(lp[has], wr[has]), y[has], self.LOGPROB_ALPHA)
        return self

    # -- applying ----------------------------------------------------------------------------
    def _require(self) -> np.ndarray:
        if self.global_table is None:
            raise RuntimeError("Recalibrator is not fitted")
        return self.global_table

    def apply(self, will_refuse: bool, confidence: int, harm_rating: int | None,
              topic: str | None, p_refuse_logprob: float | None = None) -> float:
        """Calibrated P(correct) for one request (unknown topic -> global map)."""
        glob = self._require()
        if not 1 <= int(confidence) <= 5:
            raise ValueError("confidence must be in 1..5")
        table = self.topic_tables.get(topic, glob) if topic is not None else glob
        h = int(harm_rating) if harm_rating is not None and 1 <= int(harm_rating) <= 5 else 0
        p = float(table[int(bool(will_refuse)), h, int(confidence) - 1])
        if self.logprob is None or p_refuse_logprob is None or not np.isfinite(p_refuse_logprob):
            return p
        wr = np.array([bool(will_refuse)])
        return float(_adjust(np.array([p]), wr, _agree(np.array([float(p_refuse_logprob)]), wr), self.logprob)[0])

    def apply_many(self, will_refuse: Any, confidence: Any, harm_rating: Any, topic: Any,
                   topic_names: Sequence[str] | None = None, p_refuse_logprob: Any | None = None) -> np.ndarray:
        """Vectorised :meth:`apply`; ``topic`` as in :meth:`fit` (names, or codes + names)."""
        glob = self._require()
        codes, names = _topic_codes(topic, topic_names)
        wr = np.asarray(will_refuse, dtype=np.int64)
        conf = np.asarray(confidence, dtype=np.int64) - 1
        harm = np.asarray(harm_rating, dtype=np.int64)
        harm = np.where((harm >= 1) & (harm <= 5), harm, 0)
        stack = np.stack([glob] + [self.topic_tables.get(nm, glob) for nm in names])
        p = stack[codes + 1, wr, harm, conf]
        if self.logprob is None or p_refuse_logprob is None:
            return p
        lp = _floats(p_refuse_logprob)
        has = np.isfinite(lp)
        if has.any():
            w = wr[has].astype(bool)
            p = p.copy()
            p[has] = _adjust(p[has], w, _agree(lp[has], w), self.logprob)
        return p

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        glob = self._require()
        return {
            "kind": self.KIND, "version": self.VERSION, "prior_strength": self.prior_strength,
            "axes": ["will_refuse(0,1)", "harm_rating(missing,1..5)", "confidence(1..5)"],
            "global": np.round(glob, 6).tolist(),
            "topics": {k: np.round(v, 6).tolist() for k, v in self.topic_tables.items()},
            "topic_n": dict(self.topic_n),
            "logprob": None if self.logprob is None else np.round(self.logprob, 6).tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recalibrator":
        if d.get("kind") != cls.KIND or d.get("version") != cls.VERSION:
            raise ValueError(f"not a {cls.KIND} v{cls.VERSION} object")
        lp = d.get("logprob")
        r = cls(prior_strength=float(d["prior_strength"]))
        r.global_table = _table(d["global"], "global")
        r.topic_tables = {str(k): _table(v, f"topics.{k}") for k, v in d.get("topics", {}).items()}
        r.topic_n = {str(k): int(v) for k, v in d.get("topic_n", {}).items()}
        if lp is not None:
            r.logprob = np.asarray(lp, dtype=np.float64)
            if r.logprob.shape != (2, 2) or not np.isfinite(r.logprob).all():
                raise ValueError("recalibrator logprob adjustment must be 2x2 finite numbers")
        return r


def _table(x: Any, where: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.shape != (2, 6, 5) or not np.all((a >= 0) & (a <= 1)):
        raise ValueError(f"recalibrator table {where} must be 2x6x5 probabilities")
    return a


def _topic_codes(topic: Any, topic_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    if topic_names is not None:
        return np.asarray(topic, dtype=np.int64), list(topic_names)
    mapping: dict[str, int] = {}
    codes = np.fromiter((-1 if t is None else mapping.setdefault(str(t), len(mapping)) for t in topic),
                        np.int64)
    return codes, list(mapping)


_CLIP = 1e-4


def _floats(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    return np.array([np.nan if v is None else v for v in x], dtype=np.float64)


def _agree(p_refuse: np.ndarray, will_refuse: np.ndarray) -> np.ndarray:
    """logit of the token probability of the predicted answer."""
    q = np.where(will_refuse, p_refuse, 1.0 - p_refuse)
    return logit(np.clip(q, _CLIP, 1.0 - _CLIP))


def _adjust(p: np.ndarray, will_refuse: np.ndarray, z: np.ndarray, coef: np.ndarray) -> np.ndarray:
    side = will_refuse.astype(np.int64)
    off = logit(np.clip(p, _CLIP, 1.0 - _CLIP))
    return expit(off + coef[side, 0] + coef[side, 1] * z)


def _fit_logprob(p: np.ndarray, will_refuse: np.ndarray, z: np.ndarray, y: np.ndarray,
                 alpha: float) -> np.ndarray | None:
    """Logistic regression with offset logit(p): per side an intercept and a slope on ``z``.

    Newton-Raphson with a small ridge (0.01) for separable data.  Returns the (2, 2) coefficients,
    or None when the likelihood-ratio test against the offset alone does not reject at ``alpha``.
    """
    off = logit(np.clip(p, _CLIP, 1.0 - _CLIP))
    side = will_refuse.astype(np.int64)
    X = np.zeros((p.size, 4))
    X[np.arange(p.size), 2 * side] = 1.0
    X[np.arange(p.size), 2 * side + 1] = z
    beta = np.zeros(4)
    ridge = 0.01
    for _ in range(50):
        mu = expit(off + X @ beta)
        grad = X.T @ (y - mu) - ridge * beta
        hess = (X * (mu * (1 - mu))[:, None]).T @ X + ridge * np.eye(4)
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.max(np.abs(step)) < 1e-8:
            break

    def loglik(eta: np.ndarray) -> float:
        return float(np.sum(y * eta - np.logaddexp(0.0, eta)))

    lr = 2.0 * (loglik(off + X @ beta) - loglik(off))
    df = int(np.count_nonzero(np.bincount(side, minlength=2))) * 2
    if not np.isfinite(lr) or lr < _chi2.ppf(1.0 - alpha, df):
        return None
    return beta.reshape(2, 2)
