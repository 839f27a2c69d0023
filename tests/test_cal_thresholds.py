"""Clopper-Pearson bounds, Learn-then-Test thresholds (guarantee by simulation), risk-coverage."""

import numpy as np
import pytest
from scipy.stats import binom

from calibration.thresholds import (cp_lower, cp_upper_error, design_effect, ltt_threshold,
                                    risk_coverage, route)


def test_cp_upper_matches_binomial_inversion():
    for k, n in [(0, 10), (3, 50), (10, 10)]:
        ub = float(cp_upper_error(k, n, 0.05))
        if k < n:
            # P(X <= k | p = ub) = delta at the exact bound
            assert binom.cdf(k, n, ub) == pytest.approx(0.05, abs=1e-6)
        else:
            assert ub == 1.0
    assert float(cp_upper_error(0, 0, 0.05)) == 1.0
    assert float(cp_lower(10, 10, 0.05)) == pytest.approx(0.05 ** (1 / 10))


def test_design_effect():
    rng = np.random.default_rng(0)
    unit = np.repeat(np.arange(100), 10)
    assert design_effect(unit, rng.random(1000) < 0.5) == pytest.approx(1.0, abs=0.2)
    # perfectly clustered outcomes: deff = cluster size
    y = np.repeat(rng.random(100) < 0.5, 10)
    assert design_effect(unit, y) == pytest.approx(10.0, rel=0.02)
    assert design_effect(np.arange(50), rng.random(50) < 0.5) == 1.0


def test_ltt_hand_example():
    # 200 requests at score 0.99 all correct, then 100 at 0.5 with half wrong
    score = np.r_[np.full(200, 0.99), np.full(100, 0.5)]
    correct = np.r_[np.ones(200, bool), np.arange(100) % 2 == 0]
    st = ltt_threshold(score, correct, target=0.98, delta=0.05)
    assert st.threshold == 0.99 and st.n_routed == 200 and st.accuracy == 1.0
    assert st.accuracy_lower == pytest.approx(0.05 ** (1 / 200))
    assert st.coverage == pytest.approx(200 / 300)
    # too little data to certify anything -> None
    none = ltt_threshold(score[:20], correct[:20], target=0.98, delta=0.05)
    assert none.threshold is None and none.n_routed == 0
    assert ltt_threshold([], [], 0.98, 0.05).threshold is None


def test_route_rule():
    s = np.array([0.9, 0.9, 0.5, 0.99])
    wr = np.array([True, False, True, False])
    assert route(s, wr, 0.8, None).tolist() == [True, False, False, False]
    assert route(s, wr, None, 0.95).tolist() == [False, False, False, True]


def test_threshold_guarantee_holds_in_simulated_deployments():
    """Realised accuracy of routed requests >= target in >= confidence of simulated deployments."""
    rng = np.random.default_rng(42)
    target, delta = 0.95, 0.10
    levels = np.linspace(0.80, 0.995, 25)          # true P(correct) of 25 score levels
    n_cal, trials, ok, routed_any = 3000, 1000, 0, 0
    for _ in range(trials):
        lvl = rng.integers(0, levels.size, n_cal)
        score = levels[lvl] + rng.normal(0, 0.01, levels.size)[lvl]   # noisy but monotone-ish scores
        correct = rng.random(n_cal) < levels[lvl]
        st = ltt_threshold(score, correct, target, delta)
        if st.threshold is None:
            ok += 1
            continue
        routed_any += 1
        # the deployment population: realised accuracy = mean true level among routed levels
        sel = np.unique(lvl[score >= st.threshold])
        counts = np.bincount(lvl, minlength=levels.size)[sel]   # same level mix as calibration
        realised = float(np.sum(levels[sel] * counts) / counts.sum())
        ok += realised >= target
    assert routed_any > 0.8 * trials                   # the test is not vacuous
    assert ok / trials >= 1 - delta


def test_risk_coverage_hand_computed():
    score = [0.9, 0.9, 0.5, 0.1]
    correct = [True, False, True, False]
    rc = risk_coverage(score, correct)
    assert rc["coverage"] == [0.5, 0.75, 1.0]
    assert rc["risk"] == pytest.approx([0.5, 1 / 3, 0.5])
    assert rc["aurc"] == pytest.approx(0.5 * 0.5 + 0.25 / 3 + 0.25 * 0.5)
    perfect = risk_coverage([0.9, 0.8, 0.1], [True, True, False])
    assert perfect["aurc"] == pytest.approx(1 / 3 * 1 / 3)   # only the last third has risk 1/3
