"""Judge-corrected SDT figures (calibration.label_error): closed forms, fallbacks, and a coverage simulation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.stats import norm

from calibration.calibrate import calibrate_table
from calibration.datapoints import DatapointTable
from calibration.label_error import (_pattern_replicates, corrected_sdt, estimate_counts, strata_table)
from calibration.sdt import sdt_from_counts


def rows_from_strata(big_n, n, y, rng=None):
    """Rows with exactly these per-stratum counts (rows N_k, judged n_k, judged refusals y_k)."""
    wr, det, judged, jr = [], [], [], []
    for k in range(4):
        w, d = bool(k // 2), bool(k % 2)
        for i in range(big_n[k]):
            wr.append(w)
            det.append(d)
            judged.append(i < n[k])
            jr.append(i < y[k])
    arrs = [np.array(a, dtype=bool) for a in (wr, det, judged, jr)]
    if rng is not None:
        perm = rng.permutation(arrs[0].size)
        arrs = [a[perm] for a in arrs]
    return arrs


def test_closed_form_counts_and_statistics():
    big_n, n, y = [800, 100, 50, 400], [80, 10, 10, 40], [4, 5, 5, 38]
    c = corrected_sdt(*rows_from_strata(big_n, n, y, np.random.default_rng(1)), n_boot=200)
    # theta = (.05, .5, .5, .95): hits = 50*.5 + 400*.95, misses = 800*.05 + 100*.5, fa = 50*.5 + 400*.05,
    # cr = 800*.95 + 100*.5
    assert c.theta == pytest.approx((0.05, 0.5, 0.5, 0.95))
    assert c.counts == pytest.approx((405.0, 90.0, 45.0, 810.0))
    expect = sdt_from_counts(405.0, 90.0, 45.0, 810.0)
    assert c.hit_rate == pytest.approx((405.5) / 496.0)
    assert c.d_prime == pytest.approx(expect.d_prime)
    assert c.criterion == pytest.approx(expect.criterion)
    assert c.accuracy == pytest.approx((405 + 810) / 1350)
    assert (c.n, c.n_judged, c.unjudged) == (1350, 140, ())
    assert c.small and any("few judged rows" in note for note in c.notes)   # 140 < MIN_JUDGED
    for s in ("accuracy", "hit_rate", "false_alarm_rate", "d_prime", "criterion"):
        lo, hi = c.ci[s]
        assert lo < getattr(c, s) < hi


def test_a_perfect_detector_gives_its_own_table():
    rng = np.random.default_rng(2)
    y = rng.random(3000) < 0.3
    wr = np.where(rng.random(3000) < 0.85, y, ~y)
    judged = rng.random(3000) < 0.1
    c = corrected_sdt(wr, y, judged, y, n_boot=200)
    h, m, fa, cr = (int((wr & y).sum()), int((~wr & y).sum()), int((wr & ~y).sum()), int((~wr & ~y).sum()))
    assert c.counts == pytest.approx((h, m, fa, cr))
    assert c.d_prime == pytest.approx(float(sdt_from_counts(h, m, fa, cr).d_prime))


def test_no_judged_row_means_no_correction():
    wr = np.array([True, False, True, False])
    assert corrected_sdt(wr, wr, np.zeros(4, bool), wr) is None


def test_an_unjudged_stratum_falls_back_to_the_pooled_rate_and_widens_to_its_bounds():
    big_n, n, y = [800, 100, 50, 400], [80, 0, 10, 40], [4, 0, 5, 38]
    c = corrected_sdt(*rows_from_strata(big_n, n, y, np.random.default_rng(3)), n_boot=300)
    assert c.unjudged == ("predicted comply, detector refused",)
    # pooled over the prediction with the same detector label: (0 + 38) / (0 + 40)
    assert c.theta[1] == pytest.approx(38 / 40)
    assert any("not identified" in note for note in c.notes) and c.small
    # the interval holds the figures at theta = 0 and theta = 1 for that stratum
    t = np.array([800, 100, 50, 400, 80, 0, 10, 40, 4, 0, 5, 38], dtype=float)
    for v in (0.0, 1.0):
        th = np.array([0.05, v, 0.5, 0.95])
        s = sdt_from_counts(*estimate_counts(t, th))
        for name in ("d_prime", "hit_rate", "accuracy"):
            lo, hi = c.ci[name]
            assert lo <= float(getattr(s, name)) <= hi, (name, v)


def test_pattern_bootstrap_has_the_unit_bootstraps_variance():
    # Var of the resampled sum over K units drawn with replacement = K * population variance of the units.
    rng = np.random.default_rng(4)
    units = rng.integers(0, 4, size=(60, 1, 3))
    reps = _pattern_replicates(units, 40_000, rng)[:, 0, :]
    flat = units[:, 0, :].astype(float)
    assert reps.mean(axis=0) == pytest.approx(flat.sum(axis=0), rel=0.01)
    assert reps.var(axis=0) == pytest.approx(60 * flat.var(axis=0), rel=0.05)


def _world(rng, n, judged_share, d=2.5, p=0.35, fn=0.12, fp=0.06):
    y = rng.random(n) < p
    x = d * y + rng.normal(size=n)
    wr = x > d / 2
    det = y ^ (rng.random(n) < np.where(y, fn, fp))
    judged = rng.random(n) < judged_share
    return wr, det, judged, y


def test_interval_coverage_by_simulation_and_a_broken_interval_is_caught():
    """200 datasets (n 4,000, 8% judged): the corrected d' interval covers the true d' about 95% of the time;
    the same bootstrap holding P(refused | stratum) fixed (ignoring the judged sample's uncertainty) does not."""
    rng = np.random.default_rng(5)
    true_d = 2.5  # H = Phi(d/2), FA = Phi(-d/2): the criterion sits in the middle
    covered = broken = 0
    est = []
    datasets = 200
    for _ in range(datasets):
        wr, det, judged, y = _world(rng, 4000, 0.08)
        c = corrected_sdt(wr, det, judged, y, n_boot=400, seed=rng)
        lo, hi = c.ci["d_prime"]
        covered += lo <= true_d <= hi
        est.append(c.d_prime)
        # broken: resample rows but keep theta at its point estimate
        t = strata_table(np.arange(wr.size), wr.size, np.zeros(wr.size, np.int64), 1, wr, det, judged, y)
        reps = _pattern_replicates(t, 400, rng)[:, 0, :]
        s = sdt_from_counts(*np.moveaxis(estimate_counts(reps, np.array(c.theta)), -1, 0))
        q = np.quantile(np.asarray(s.d_prime), [0.025, 0.975])
        broken += q[0] <= true_d <= q[1]
    assert 0.90 <= covered / datasets <= 0.99
    assert broken / datasets < 0.75
    assert abs(np.mean(est) - true_d) < 0.08   # ratio-estimator bias at 320 judged rows: about +0.04
    # and the detector alone is far off (what the correction is for)
    wr, det, judged, y = _world(rng, 200_000, 0.0)
    assert float(sdt_from_counts((wr & det).sum(), (~wr & det).sum(), (wr & ~det).sum(),
                                 (~wr & ~det).sum()).d_prime) < true_d - 0.3


def test_calibrate_reports_corrected_beside_the_detectors_figures():
    rng = np.random.default_rng(6)
    n = 6000
    wr, det, judged, y = _world(rng, n, 0.1)
    conf = rng.integers(1, 6, n)
    base = DatapointTable.from_arrays(prompt=np.arange(n), will_refuse=wr, confidence=conf,
                                      refused=np.where(judged, y, det), topic=rng.integers(0, 2, n), topics=("a", "b"))
    table = dataclasses.replace(base, judged=judged, detector_refused=det)
    res = calibrate_table(table, n_boot=200)
    overall = res.cells[0]
    # uncorrected = the detector's labels on every row
    assert overall.counts == (int((wr & det).sum()), int((~wr & det).sum()), int((wr & ~det).sum()),
                              int((~wr & ~det).sum()))
    assert overall.corrected is not None and overall.corrected.n_judged == int(judged.sum())
    assert not overall.corrected.small and not overall.corrected.notes
    assert abs(overall.corrected.d_prime - 2.5) < 0.3 < abs(overall.summary.d_prime - 2.5)
    assert all(c.corrected is not None for c in res.cells if c.group == "topic")
    assert any("judge-corrected" in note for note in res.notes)
    # the baseline (drift) counts the detector's labels, like the live stream
    assert res.policy.global_baseline.hits == overall.counts[0]
    plain = calibrate_table(dataclasses.replace(base, refused=det, judged=np.zeros(n, bool), detector_refused=det),
                            n_boot=50)
    assert plain.cells[0].corrected is None
    assert any(note.startswith("SDT figures uncorrected") and "accuracy .845" in note for note in plain.notes)


def test_truth_of_the_simulated_world():
    # the world of the coverage test: H = Phi(d/2) and FA = Phi(-d/2) exactly
    rng = np.random.default_rng(7)
    wr, det, judged, y = _world(rng, 400_000, 0.0)
    assert wr[y].mean() == pytest.approx(norm.cdf(1.25), abs=0.004)
    assert wr[~y].mean() == pytest.approx(norm.cdf(-1.25), abs=0.003)


def test_two_sample_form_used_live_covers_too():
    """The live form: a window of rows and an independent window of judged verdicts (same world)."""
    from calibration.label_error import corrected_from_samples

    rng = np.random.default_rng(9)
    true_d, covered, datasets = 2.5, 0, 200
    for _ in range(datasets):
        wr, det, _, _ = _world(rng, 3000, 0.0)
        jw, jdet, _, jy = _world(rng, 500, 0.0)        # the judged window: other requests, same process
        k, jk = 2 * wr + det, 2 * jw + jdet
        c = corrected_from_samples(np.bincount(k, minlength=4), np.bincount(jk, minlength=4),
                                   np.bincount(jk[jy], minlength=4), n_boot=300, seed=rng)
        lo, hi = c.ci["d_prime"]
        covered += lo <= true_d <= hi
    assert 0.90 <= covered / datasets <= 0.99
