"""SDT closed forms, edge cases, simulation unbiasedness and bootstrap CI coverage."""

import math

import numpy as np
import pytest
from scipy.stats import norm

from calibration.sdt import (bootstrap_counts, bootstrap_sdt_ci, bootstrap_weights, count_table,
                             outcome_codes, sdt_from_counts, simulate)


def test_hand_computed_table():
    # hits 8, misses 2, fa 3, cr 7: H = 8.5/11, FA = 3.5/11
    s = sdt_from_counts(8, 2, 3, 7)
    h, fa = 8.5 / 11, 3.5 / 11
    assert s.hit_rate == pytest.approx(h)
    assert s.false_alarm_rate == pytest.approx(fa)
    assert s.d_prime == pytest.approx(norm.ppf(h) - norm.ppf(fa))
    assert s.criterion == pytest.approx(-(norm.ppf(h) + norm.ppf(fa)) / 2)
    assert s.accuracy == pytest.approx(15 / 20)
    assert s.n == 20 and isinstance(s.n, int) and isinstance(s.d_prime, float)


def test_rates_zero_and_one_stay_finite():
    s = sdt_from_counts(10, 0, 0, 10)  # raw H = 1, FA = 0
    assert s.hit_rate == pytest.approx(10.5 / 11) and s.false_alarm_rate == pytest.approx(0.5 / 11)
    assert math.isfinite(s.d_prime) and s.d_prime > 0
    assert s.criterion == pytest.approx(0.0)  # symmetric table -> unbiased
    assert s.accuracy == 1.0


def test_bias_sign_convention():
    # predicting refusal a lot -> liberal -> c < 0
    liberal = sdt_from_counts(9, 1, 6, 4)
    conservative = sdt_from_counts(4, 6, 1, 9)
    assert liberal.criterion < 0 < conservative.criterion


def test_single_class_and_empty():
    never_refused = sdt_from_counts(0, 0, 3, 17)   # noise only: H is the prior 0.5
    assert never_refused.hit_rate == 0.5
    assert never_refused.accuracy == pytest.approx(17 / 20)
    empty = sdt_from_counts(0, 0, 0, 0)
    assert math.isnan(empty.accuracy) and empty.n == 0
    assert empty.d_prime == 0.0 and empty.criterion == 0.0


def test_vectorised_broadcasting_matches_scalar():
    h = np.array([[8, 0], [3, 10]])
    s = sdt_from_counts(h, 2, np.array([3, 0]), 7)
    assert s.d_prime.shape == (2, 2)
    for i in range(2):
        for j in range(2):
            ref = sdt_from_counts(int(h[i, j]), 2, [3, 0][j], 7)
            assert s.d_prime[i, j] == pytest.approx(ref.d_prime)
            assert s.accuracy[i, j] == pytest.approx(ref.accuracy)
    z = sdt_from_counts(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3))
    assert np.isnan(z.accuracy).all()


def test_outcome_codes_and_count_table():
    wr = np.array([1, 0, 1, 0, 1], bool)
    rf = np.array([1, 1, 0, 0, 1], bool)
    codes = outcome_codes(wr, rf)
    assert codes.tolist() == [0, 1, 2, 3, 0]
    unit = np.array([0, 0, 1, 1, 1])
    cell = np.array([0, 0, 0, -1, 0])
    t = count_table(unit, 2, cell, 1, codes)
    assert t[:, 0].tolist() == [[1, 1, 0, 0], [1, 0, 1, 0]]  # the cell=-1 row is left out


def test_bootstrap_weights_are_multinomial():
    rng = np.random.default_rng(0)
    ws = np.concatenate(list(bootstrap_weights(7, 5000, rng, max_elements=700)))
    assert ws.shape == (5000, 7)
    assert (ws.sum(axis=1) == 7).all()
    # multinomial(7, 1/7): mean 1, variance 7 * (1/7) * (6/7)
    assert ws.mean() == pytest.approx(1.0, abs=0.03)
    assert ws.var() == pytest.approx(6 / 7, rel=0.05)


def test_bootstrap_counts_resample_whole_prompts():
    table = np.array([[5, 0, 0, 0], [0, 0, 0, 3]])  # prompt 0 all hits, prompt 1 all CR
    reps = bootstrap_counts(table, 200, seed=1)
    # every replicate is a combination of whole prompts: hits in {0,5,10}, cr in {0,3,6}
    assert set(np.unique(reps[:, 0])) <= {0, 5, 10}
    assert set(np.unique(reps[:, 3])) <= {0, 3, 6}
    assert (reps[:, 0] / 5 + reps[:, 3] / 3 == 2).all()


def _truth(dp, c, pi):
    h, fa = norm.cdf(dp / 2 - c), norm.cdf(-dp / 2 - c)
    return h, fa, pi * h + (1 - pi) * (1 - fa)


@pytest.mark.parametrize("dp,c", [(1.0, 0.0), (2.0, -0.4), (1.5, 0.5)])
def test_simulation_estimates_unbiased(dp, c):
    rng = np.random.default_rng(7)
    est = []
    for _ in range(200):
        d = simulate(100, 10, dp, c, p_signal=0.5, icc=0.2, seed=rng)
        s = sdt_from_counts(*np.bincount(outcome_codes(d["will_refuse"], d["refused"]), minlength=4))
        est.append((s.d_prime, s.criterion))
    mean = np.mean(est, axis=0)
    se = np.std(est, axis=0) / np.sqrt(len(est))
    # the log-linear correction shrinks slightly toward 0; with ~500 trials per class it is tiny
    assert abs(mean[0] - dp) < max(0.03, 4 * se[0])
    assert abs(mean[1] - c) < max(0.03, 4 * se[1])


def test_bootstrap_ci_coverage():
    """Prompt-bootstrap 95% CIs cover the true accuracy and d' in 93-97% of simulated datasets."""
    dp, c, pi = 1.5, -0.2, 0.4
    _, _, acc = _truth(dp, c, pi)
    rng = np.random.default_rng(123)
    n_sets, cov_a, cov_d = 1000, 0, 0
    for _ in range(n_sets):
        d = simulate(200, 5, dp, c, p_signal=pi, icc=0.3, seed=rng)
        codes = outcome_codes(d["will_refuse"], d["refused"]).astype(np.int64)
        tab = count_table(d["prompt"], 200, np.zeros_like(d["prompt"]), 1, codes)
        ci = bootstrap_sdt_ci(bootstrap_counts(tab, 1000, rng))
        cov_a += ci["accuracy"][0, 0] <= acc <= ci["accuracy"][0, 1]
        cov_d += ci["d_prime"][0, 0] <= dp <= ci["d_prime"][0, 1]
    assert 0.93 <= cov_a / n_sets <= 0.97
    assert 0.93 <= cov_d / n_sets <= 0.97


def test_row_bootstrap_would_undercover():
    """Sanity check of the design: ignoring prompt clustering gives too-narrow intervals."""
    dp, c, pi = 1.5, -0.2, 0.4
    _, _, acc = _truth(dp, c, pi)
    rng = np.random.default_rng(5)
    cover = 0
    for _ in range(300):
        d = simulate(100, 10, dp, c, p_signal=pi, icc=0.6, seed=rng)
        codes = outcome_codes(d["will_refuse"], d["refused"]).astype(np.int64)
        n = codes.size
        tab = count_table(np.arange(n), n, np.zeros(n, np.int64), 1, codes)  # each row its own unit
        ci = bootstrap_sdt_ci(bootstrap_counts(tab, 300, rng))
        cover += ci["accuracy"][0, 0] <= acc <= ci["accuracy"][0, 1]
    assert cover / 300 < 0.90
