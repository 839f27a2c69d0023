"""The anytime-valid drift test: alarms on shifts; false-alarm rate <= alpha under monitoring."""

import math

import numpy as np
import pytest
from scipy.special import betaln

from calibration.drift import DriftTest


def _log_e_paths(x: np.ndarray, p0: float, kappa: float = 10.0) -> np.ndarray:
    """Vectorised log e-value paths for many streams (rows), same formula as DriftTest."""
    k = np.cumsum(x, axis=1)
    n = np.arange(1, x.shape[1] + 1)
    a, b = p0 * kappa, (1 - p0) * kappa
    return betaln(a + k, b + n - k) - betaln(a, b) - k * np.log(p0) - (n - k) * np.log1p(-p0)


def test_matches_vectorised_formula_and_reset():
    rng = np.random.default_rng(0)
    x = rng.random(300) < 0.8
    t = DriftTest(0.9, alpha=0.01)
    stats = []
    for v in x:
        t.update(bool(v))
        stats.append(t.statistic)
    assert np.allclose(stats, _log_e_paths(x[None, :], 0.9)[0])
    assert t.threshold == pytest.approx(math.log(100))
    t.reset()
    assert t.n == 0 and not t.alarm and t.statistic == pytest.approx(0.0)


@pytest.mark.parametrize("p0,p1", [(0.95, 0.85), (0.30, 0.45)])
def test_alarms_on_shifted_stream(p0, p1):
    rng = np.random.default_rng(1)
    alarmed_at = []
    for _ in range(20):
        t = DriftTest(p0, alpha=0.01)
        for i, v in enumerate(rng.random(3000) < p1):
            t.update(bool(v))
            if t.alarm:
                alarmed_at.append(i)
                break
    assert len(alarmed_at) == 20
    assert np.median(alarmed_at) < 1000


def test_alarm_is_sticky():
    t = DriftTest(0.99, alpha=0.05)
    for _ in range(200):
        t.update(False)
    assert t.alarm
    for _ in range(5000):
        t.update(True)
    assert t.alarm


@pytest.mark.parametrize("p0", [0.98, 0.5, 0.1])
def test_false_alarm_rate_under_continuous_monitoring(p0):
    alpha = 0.05
    rng = np.random.default_rng(2)
    x = rng.random((4000, 2000)) < p0          # stationary streams at the baseline rate
    alarms = (_log_e_paths(x, p0) >= math.log(1 / alpha)).any(axis=1)
    rate = alarms.mean()
    assert rate <= alpha
    # and the test is not trivially silent: a fixed-n z-test repeated every step would exceed alpha
    k = np.cumsum(x, axis=1)
    n = np.arange(1, x.shape[1] + 1)
    z = (k - n * p0) / np.sqrt(n * p0 * (1 - p0))
    naive = (np.abs(z[:, 29:]) > 1.96).any(axis=1).mean()
    assert naive > alpha


def test_validation_and_degenerate_baseline():
    with pytest.raises(ValueError):
        DriftTest(1.5)
    with pytest.raises(ValueError):
        DriftTest(0.5, alpha=0)
    t = DriftTest(1.0, alpha=0.01)   # clipped: one failure is not an instant alarm
    t.update(False)
    assert not t.alarm and math.isfinite(t.statistic)
