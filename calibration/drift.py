"""An anytime-valid sequential drift test for a Bernoulli rate (accuracy, refusal rate).

Why this test: the proxy checks its live metrics after *every* request, forever.  A fixed-n test
(binomial, chi-square) repeated like that is guaranteed to raise false alarms eventually.  A
test-martingale stays valid under continuous monitoring: by Ville's inequality a nonnegative
martingale with mean 1 exceeds ``1/alpha`` at *any* time with probability at most ``alpha``.

Which test: the mixture sequential probability ratio test (Robbins 1970) with a conjugate Beta
mixture over the alternative rate.  After ``n`` observations with ``k`` successes the e-value is

    E_n = B(a + k, b + n - k) / B(a, b)  /  (p0^k (1 - p0)^(n - k))

i.e. the Bayes factor of "p ~ Beta(a, b)" against "p = p0".  Under the baseline rate ``p0`` it is
a nonnegative martingale with E_0 = 1, so ``P(sup_n E_n >= 1/alpha) <= alpha``.  The mixture is
centred on the baseline (``a = p0 * kappa``, ``b = (1 - p0) * kappa``) so drift in either
direction is detected; ``kappa`` sets which effect sizes are detected fastest (smaller = broader).
The alarm is sticky until :meth:`DriftTest.reset`.

Caveats: ``p0`` is treated as known (take it from a large calibration set); it is clipped to
``[1e-4, 1 - 1e-4]`` so a baseline of exactly 0 or 1 does not make one contrary observation an
instant alarm.  After very long stationary periods the test reacts more slowly to a new shift, so
the proxy should ``reset()`` when a new policy (and baseline) is loaded.
"""

from __future__ import annotations

import math

__all__ = ["DriftTest"]

_CLIP = 1e-4


class DriftTest:
    """Beta-mixture SPRT of a Bernoulli stream against ``baseline_rate``; alarms at e >= 1/alpha."""

    def __init__(self, baseline_rate: float, alpha: float = 0.01, kappa: float = 10.0) -> None:
        if not 0.0 <= baseline_rate <= 1.0 or math.isnan(baseline_rate):
            raise ValueError("baseline_rate must be in [0, 1]")
        if not 0.0 < alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")
        if kappa <= 0:
            raise ValueError("kappa must be positive")
        self.baseline_rate = float(baseline_rate)
        self.alpha = float(alpha)
        self.kappa = float(kappa)
        p0 = min(max(self.baseline_rate, _CLIP), 1.0 - _CLIP)
        self._a = p0 * self.kappa
        self._b = (1.0 - p0) * self.kappa
        self._log_p0 = math.log(p0)
        self._log_q0 = math.log1p(-p0)
        self._lbeta_ab = _lbeta(self._a, self._b)
        self._threshold = math.log(1.0 / self.alpha)
        self.reset()

    def reset(self) -> None:
        """Forget all observations and clear the alarm."""
        self.n = 0
        self.k = 0
        self._alarm = False

    def update(self, x: bool) -> None:
        """Add one observation (True = success, e.g. a correct prediction or a refusal)."""
        self.n += 1
        self.k += 1 if x else 0
        if not self._alarm and self.statistic >= self._threshold:
            self._alarm = True

    @property
    def statistic(self) -> float:
        """log e-value (log Bayes factor against the baseline); alarm when >= log(1/alpha)."""
        k, f = self.k, self.n - self.k
        return (_lbeta(self._a + k, self._b + f) - self._lbeta_ab
                - k * self._log_p0 - f * self._log_q0)

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def alarm(self) -> bool:
        """True once the e-value has reached 1/alpha (sticky until reset)."""
        return self._alarm

    @property
    def rate(self) -> float:
        """The observed rate since the last reset (nan before any observation)."""
        return self.k / self.n if self.n else float("nan")


def _lbeta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
