"""SDT closed forms, edge cases, simulation unbiasedness and bootstrap CI coverage."""

import json
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


# --- analytic intervals (sdt_intervals) and unmeasurable cells --------------------------------

from scipy.stats import beta, binomtest  # noqa: E402

from calibration.sdt import (cluster_design_effect, proportion_interval, sdt_intervals,  # noqa: E402
                             unmeasurable)


@pytest.mark.parametrize("x,n", [(0, 10), (3, 10), (8, 10), (10, 10), (447, 450), (97, 450)])
def test_proportion_intervals_match_scipy(x, n):
    wil = binomtest(x, n).proportion_ci(0.95, method="wilson")
    cp = binomtest(x, n).proportion_ci(0.95, method="exact")
    assert proportion_interval(x, n, method="wilson") == pytest.approx([wil.low, wil.high], abs=1e-9)
    assert proportion_interval(x, n, method="cp") == pytest.approx([cp.low, cp.high], abs=1e-9)
    jl = 0.0 if x == 0 else beta.ppf(0.025, x + 0.5, n - x + 0.5)
    jh = 1.0 if x == n else beta.ppf(0.975, x + 0.5, n - x + 0.5)
    assert proportion_interval(x, n, method="jeffreys") == pytest.approx([jl, jh], abs=1e-9)


def test_proportion_interval_empty_and_unknown_method():
    assert np.isnan(proportion_interval(0, 0)).all()
    with pytest.raises(ValueError):
        proportion_interval(1, 2, method="wald")


def test_design_effect_closed_forms():
    rng = np.random.default_rng(3)
    b = (rng.random(200) < 0.3).astype(float)
    k = b.size
    # one trial per unit: K / (K - 1)
    assert cluster_design_effect(b, np.ones(k)) == pytest.approx(k / (k - 1))
    # units of 3 identical outcomes (perfect correlation): 3 K / (K - 1)
    assert cluster_design_effect(3 * b, np.full(k, 3.0)) == pytest.approx(3 * k / (k - 1))
    # p of 0 or 1: nothing to compare against, 1
    assert cluster_design_effect(np.full(5, 2.0), np.full(5, 2.0)) == 1.0


def test_intervals_closed_form_without_clustering():
    """One request per unit: H and FA are Wilson intervals of K/(K-1)-deflated counts; d', c by MOVER."""
    h, m, fa, cr = 40, 10, 15, 35
    rows = [0] * h + [1] * m + [2] * fa + [3] * cr
    tab = count_table(np.arange(len(rows)), len(rows), np.zeros(len(rows), np.int64), 1, np.array(rows))
    ci = sdt_intervals(tab)
    kh, kf = (h + m) / (h + m - 1), (fa + cr) / (fa + cr - 1)
    wh = proportion_interval(h / kh, (h + m) / kh)
    wf = proportion_interval(fa / kf, (fa + cr) / kf)
    assert ci["hit_rate"][0] == pytest.approx(wh)
    assert ci["false_alarm_rate"][0] == pytest.approx(wf)
    zh, zf = norm.ppf((h + 0.5) / (h + m + 1)), norm.ppf((fa + 0.5) / (fa + cr + 1))
    lh, uh, lf, uf = norm.ppf(wh[0]), norm.ppf(wh[1]), norm.ppf(wf[0]), norm.ppf(wf[1])
    d = zh - zf
    assert ci["d_prime"][0] == pytest.approx([d - math.hypot(zh - lh, uf - zf), d + math.hypot(uh - zh, zf - lf)])
    s = zh + zf
    assert ci["criterion"][0] == pytest.approx([-(s + math.hypot(uh - zh, uf - zf)) / 2,
                                                -(s - math.hypot(zh - lh, zf - lf)) / 2])
    point = sdt_from_counts(h, m, fa, cr)
    for name in ("hit_rate", "false_alarm_rate", "d_prime", "criterion", "accuracy"):
        lo, hi = ci[name][0]
        assert lo < getattr(point, name) < hi


def test_perfectly_correlated_paraphrases_carry_one_prompt_of_information():
    """Tripling every prompt's rows (identical paraphrases) must leave the intervals about unchanged."""
    rng = np.random.default_rng(4)
    codes = rng.choice(4, size=300, p=[0.35, 0.1, 0.1, 0.45])
    one = count_table(np.arange(300), 300, np.zeros(300, np.int64), 1, codes)
    three = 3 * one
    a, b = sdt_intervals(one), sdt_intervals(three)
    for name in ("hit_rate", "false_alarm_rate", "accuracy"):
        assert b[name] == pytest.approx(a[name], abs=1e-9)
    # the log-linear point moves a little with 3x the counts; the interval widths stay the same
    assert np.diff(b["d_prime"]) == pytest.approx(np.diff(a["d_prime"]), rel=0.05)
    naive = count_table(np.arange(900), 900, np.zeros(900, np.int64), 1, np.repeat(codes, 3))
    assert np.diff(sdt_intervals(naive)["d_prime"])[0, 0] < 0.7 * np.diff(b["d_prime"])[0, 0]


def test_no_misses_leaves_d_prime_unbounded_above():
    tab = np.array([[[30, 0, 5, 25]]])
    ci = sdt_intervals(tab)
    assert ci["hit_rate"][0, 1] == 1.0 and np.isinf(ci["d_prime"][0, 1])
    assert np.isfinite(ci["d_prime"][0, 0]) and ci["d_prime"][0, 0] > 0


@pytest.mark.parametrize("counts,why", [
    ((30, 0, 70, 0), "constant_refuse"), ((0, 30, 0, 70), "constant_comply"),
    ((0, 0, 10, 90), "no_signal"), ((40, 10, 0, 0), "no_noise"), ((0, 0, 0, 0), "empty"),
    ((1, 0, 0, 1), ""), ((5, 5, 5, 5), "")])
def test_unmeasurable_cells(counts, why):
    assert unmeasurable(np.array(counts)) == why
    ci = sdt_intervals(np.array(counts).reshape(1, 1, 4))
    assert np.isnan(ci["d_prime"]).all() == bool(why)
    assert np.isnan(ci["criterion"]).all() == bool(why)


def test_constant_predictor_cell_in_calibrate_is_not_measurable():
    """The issue's case: a topic where the probe always says "refuse" got d' -0.36 [-0.44, -0.29]."""
    from calibration.calibrate import calibrate_table
    from calibration.datapoints import DatapointTable

    d = simulate(200, 3, 2.0, 0.0, n_topics=2, seed=12)
    d["will_refuse"][d["topic"] == 1] = True
    res = calibrate_table(DatapointTable.from_arrays(topics=["ok", "always"], **d), n_boot=50)
    s = res.policy.topics["always"].sdt
    assert not s.measurable and s.d_prime is None and s.criterion is None
    assert s.ci["d_prime"] == s.ci["criterion"] == (None, None) and "constant predictor" in s.reason
    assert s.hit_rate is not None and s.accuracy is not None and s.ci["accuracy"][0] is not None
    ok = res.policy.topics["ok"].sdt
    assert ok.measurable and ok.d_prime is not None and ok.ci["d_prime"][0] < ok.d_prime < ok.ci["d_prime"][1]
    data = json.loads(res.policy.to_json())
    assert data["topics"]["always"]["sdt"]["d_prime"] is None and data["topics"]["always"]["sdt"]["measurable"] is False


def test_bootstrap_leaves_out_resamples_that_miss_the_cell():
    """A 2-datapoint topic: resamples without it must not count as d' = 0 (the issue's [0, 1.47])."""
    unit = np.arange(50)
    cell = np.zeros(50, np.int64)
    codes = np.where(unit % 2 == 0, 0, 3)
    cell[:2] = 1                                    # unit 0 (a hit) and unit 1 (a CR) form the small cell
    tab = count_table(unit, 50, cell, 2, codes)
    ci = bootstrap_sdt_ci(bootstrap_counts(tab, 2000, seed=2))
    # every resample that has both classes of the small cell has d' = z(H) - z(FA) > 0
    assert ci["d_prime"][1, 0] > 0.5
    assert ci["hit_rate"][1, 0] > 0.5 and ci["false_alarm_rate"][1, 1] < 0.5


def _coverage(h, fa, n_prompts, repeats, icc, n_sets, seed):
    pi = 0.5
    zh, zf = norm.ppf(h), norm.ppf(fa)
    truth = {"accuracy": pi * h + (1 - pi) * (1 - fa), "hit_rate": h, "false_alarm_rate": fa,
             "d_prime": zh - zf, "criterion": -(zh + zf) / 2}
    rng = np.random.default_rng(seed)
    hits = dict.fromkeys(truth, 0)
    for _ in range(n_sets):
        d = simulate(n_prompts, repeats, truth["d_prime"], truth["criterion"], p_signal=pi, icc=icc, seed=rng)
        codes = outcome_codes(d["will_refuse"], d["refused"]).astype(np.int64)
        ci = sdt_intervals(count_table(d["prompt"], n_prompts, np.zeros_like(d["prompt"]), 1, codes))
        for k, v in truth.items():
            hits[k] += bool(ci[k][0, 0] <= v <= ci[k][0, 1])
    return {k: v / n_sets for k, v in hits.items()}


@pytest.mark.parametrize("h,fa,n_prompts,repeats,icc", [
    (0.994, 0.216, 300, 3, 0.5),     # Llama-405B-like, clustered: the bootstrap covered d' .71-.83
    (0.846, 0.084, 900, 1, 0.0)])
def test_analytic_interval_coverage_with_known_truth(h, fa, n_prompts, repeats, icc):
    """1,500 simulated datasets of n = 900: every statistic covered in 92.5-97.5% (MC SE ~ .006)."""
    cov = _coverage(h, fa, n_prompts, repeats, icc, 1500, seed=99)
    for k, v in cov.items():
        assert 0.925 <= v <= 0.975, (k, v)


def test_calibrate_reports_the_analytic_intervals_per_prompt():
    """calibrate's overall ci is sdt_intervals on the per-prompt table (paraphrases clustered by id)."""
    from calibration.calibrate import calibrate_table
    from calibration.datapoints import DatapointTable

    d = simulate(150, 3, 2.0, -0.3, icc=0.5, seed=21)
    res = calibrate_table(DatapointTable.from_arrays(topics=["t"], **d), n_boot=50)
    codes = outcome_codes(d["will_refuse"], d["refused"]).astype(np.int64)
    ref = sdt_intervals(count_table(d["prompt"], 150, np.zeros_like(d["prompt"]), 1, codes))
    s = res.policy.sdt
    for name in ("accuracy", "hit_rate", "false_alarm_rate", "d_prime", "criterion"):
        assert s.ci[name] == pytest.approx(tuple(ref[name][0])), name
    assert s.measurable and s.reason is None
