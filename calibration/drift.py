"""Sequential drift detection for a Bernoulli rate whose baseline is itself an estimate.

The proxy checks accuracy and refusal rate after every scored request, for ever, against counts from
a calibration run of a few hundred rows. Three facts shape the procedure:

1. **The baseline is an estimate.** ``k`` successes in ``n`` calibration rows do not give the rate
   ``p``; treating ``k / n`` as exact makes "no drift" false almost surely (a test martingale
   against the wrong ``p`` grows without bound). So the null is the *composite* hypothesis
   ``p in [lo, hi]``, a two-sided Clopper-Pearson interval from the counts at level
   ``alpha_interval``. With probability ``>= 1 - alpha_interval`` the interval covers the
   calibration-time rate; given that, every per-step e-value below has mean ``<= 1`` under the
   unchanged rate.
2. **Per-step e-values for a composite null.** For an alternative rate ``a`` outside the
   interval, ``e(x) = a/b if x else (1-a)/(1-b)`` with ``b`` the interval's end nearest ``a``.
   ``E_p[e] = p a/b + (1-p)(1-a)/(1-b)`` is linear in ``p``, equals 1 at ``p = b`` and is at most
   1 for every ``p`` in the interval (``b`` is the worst case). Alternatives: a fixed grid
   ``SHIFTS`` of log-odds steps beyond each end of the interval, mixed with equal weights.
3. **Change detection, not a one-shot test.** A test martingale started when the policy loaded
   reacts ever more slowly to a change that comes late (its evidence against the change grows
   while nothing happens). A Shiryaev-Roberts-type e-detector (Shin, Ramdas & Rinaldo 2022)
   restarts implicitly at every observation: ``M_t = e_t (M_{t-1} + 1)``, ``M_0 = 0``, i.e.
   ``M_t = sum_j prod_{i=j..t} e_i``, so its delay does not depend on when the change came.
   One ``M`` per alternative; the detector's statistic is their equal-weight average.

**The guarantee (exactly this one).** Under "no change", ``M_t - t`` is a supermartingale for every
rate in the interval, so ``M_t + (T - t)`` is a nonnegative supermartingale on ``t <= T`` and by
Ville's inequality ``P(M_t >= A for some t <= T) <= T / A``. An e-detector bounds the false-alarm
probability *within a horizon* (equivalently the average run length, ``>= A``), never for ever:
any detector with a bounded delay alarms eventually on an unchanged stream. ``Budget`` sets ``A``
from the horizon ``H`` (scored requests since the policy loaded, fleet-wide) and alpha:

* half of alpha goes to the baseline intervals, split evenly (Bonferroni) over all tests
  (``2 metrics x (topics + 1)``);
* the other half to the detectors. The topic detectors of one metric see disjoint parts of the
  stream, so their ``M``'s sum to at most ``N_t`` in expectation; with the ``all`` detector that
  is ``2 t`` per metric, ``4 t`` over both metrics, whatever the number of topics (or of workers
  and replicas, which also see disjoint traffic). Alarm when one detector's ``M >= A`` with
  ``A = 4 H / (alpha / 2)``: the sum of all ``M`` then exceeds ``A`` too, so
  ``P(any false alarm within H) <= alpha / 2 + alpha / 2``. Alpha is *split* (no e-values are
  merged across tests).

Assumptions: under "no change" the live observations of a test are independent Bernoulli draws with
the calibration-time rate of the population the baseline counts describe (see
``guard.live.windows`` for how the live stream is restricted to that population); the baseline's
rows are independent, or their clustering is corrected by a design effect (``k`` and ``n``
divided by it, as ``calibration.calibrate`` records it).

**Alarm lifecycle.** The alarm is the level ``M_t >= A``. Each alternative's ``M`` is capped at
``e^CAP_NATS`` times what alone would lift the average to ``A`` (a cap only lowers ``M``, so the bound
holds), so once the rate is back inside the interval every ``M`` falls below ``A`` after a bounded
amount of contrary evidence and the alarm clears by itself (several hundred observations for the
shifts in ``benchmarks/drift_validity.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta as _beta

__all__ = ["Budget", "ChangeDetector", "rate_interval", "alternatives", "e_values", "sr_step", "SHIFTS", "CAP_NATS"]

#: log-odds steps of the alternative rates beyond each end of the baseline interval
SHIFTS = (0.1, 0.3, 0.7, 1.5)
#: how far (in nats) above the alarm level one alternative's statistic may climb
CAP_NATS = 3.0
_EDGE = 1e-6


@dataclass(frozen=True)
class Budget:
    """How alpha is spent over ``n_tests`` detectors watching a stream for ``horizon`` observations."""

    alpha: float
    horizon: int
    n_tests: int
    baseline_share: float = 0.5
    #: expected growth of the sum of all detectors' M per observation: 2 metrics x (its topic + all)
    growth: int = 4

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")
        if self.horizon < 1 or self.n_tests < 1:
            raise ValueError("horizon and n_tests must be positive")
        if not 0.0 < self.baseline_share < 1.0:
            raise ValueError("baseline_share must be in (0, 1)")

    @property
    def alpha_interval(self) -> float:
        """Level of each baseline interval (its miscoverage probability)."""
        return self.alpha * self.baseline_share / self.n_tests

    @property
    def log_threshold(self) -> float:
        """log A: alarm when a detector's M reaches A = growth * horizon / alpha_detectors."""
        return math.log(self.growth * self.horizon / (self.alpha * (1.0 - self.baseline_share)))


def rate_interval(k: float, n: float, alpha: float) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval for a Bernoulli rate (``(0, 1)`` without data).

    ``k`` and ``n`` may be fractional (counts divided by a design effect)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0.0 <= k <= n:
        raise ValueError("need 0 <= k <= n")
    lo = 0.0 if k <= 0 else float(_beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k >= n else float(_beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def alternatives(lo: float, hi: float, shifts: tuple[float, ...] = SHIFTS) -> tuple[np.ndarray, np.ndarray]:
    """Alternative rates ``a`` beyond the interval and the null rate ``b`` each is tested against.

    No alternative below ``lo = 0`` or above ``hi = 1`` (nothing can drift there)."""
    alt, null = [], []
    logit = lambda p: math.log(p / (1.0 - p))  # noqa: E731
    expit = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
    if lo > _EDGE:
        b = min(lo, 1.0 - _EDGE)
        for s in shifts:
            alt.append(max(expit(logit(b) - s), _EDGE / 10))
            null.append(b)
    if hi < 1.0 - _EDGE:
        b = max(hi, _EDGE)
        for s in shifts:
            alt.append(min(expit(logit(b) + s), 1.0 - _EDGE / 10))
            null.append(b)
    return np.array(alt, dtype=np.float64), np.array(null, dtype=np.float64)


def e_values(alt: np.ndarray, null: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The e-value of an observation 0 and of an observation 1, one entry per alternative."""
    return (1.0 - alt) / (1.0 - null), alt / null


def sr_step(m: np.ndarray, e: np.ndarray, cap: float | np.ndarray) -> np.ndarray:
    """One Shiryaev-Roberts step ``M <- min(e (M + 1), cap)``, elementwise (any shape).

    The one place the recursion is written: :class:`ChangeDetector` applies it to its
    alternatives, ``benchmarks/drift_validity.py`` to (alternatives x streams) arrays. ``M`` stays
    in the linear domain: it is at most ``cap`` (about ``e^26`` at the defaults), so it cannot overflow.
    """
    return np.minimum(e * (m + 1.0), cap)


class ChangeDetector:
    """SR-type e-detector of a Bernoulli stream against the baseline ``k`` of ``n`` (module doc)."""

    def __init__(self, k: float, n: float, *, alpha_interval: float, log_threshold: float,
                 cap_nats: float = CAP_NATS) -> None:
        if not 0.0 < alpha_interval < 1.0:
            raise ValueError("alpha_interval must be in (0, 1)")
        self.lo, self.hi = rate_interval(k, n, alpha_interval)
        alt, null = alternatives(self.lo, self.hi)
        self._e0, self._e1 = e_values(alt, null)
        self.log_threshold = float(log_threshold)
        #: per alternative: e^cap_nats times the level that alone lifts the average to the threshold
        self.cap = math.exp(self.log_threshold + cap_nats) * max(len(alt), 1)
        self.reset()

    def reset(self) -> None:
        """Forget every observation; the alarm clears."""
        self.n = 0
        self._m = np.zeros(self._e0.shape)
        self.alarm = False

    def update(self, x: bool) -> bool:
        """Add one observation; returns the alarm (statistic >= log A) after it."""
        self.n += 1
        if self._m.size:
            self._m = sr_step(self._m, self._e1 if x else self._e0, self.cap)
            self.alarm = self.statistic >= self.log_threshold
        return self.alarm

    @property
    def statistic(self) -> float:
        """log of the average M over the alternatives (-inf before any observation)."""
        mean = float(self._m.mean()) if self._m.size else 0.0
        return math.log(mean) if mean > 0 else -math.inf

    @property
    def testable(self) -> bool:
        """False when the baseline interval is (0, 1): there is nothing to compare with."""
        return self._m.size > 0
