"""The drift e-detector: its pieces against closed forms, its guarantee by simulation, and the
vectorised benchmark runner against the live class (the same math)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from scipy.stats import beta, binom

from calibration.calibrate import calibrate_table
from calibration.datapoints import DatapointTable
from calibration.drift import (Budget, ChangeDetector, alternatives, e_values, rate_interval, sr_step)
from calibration.sdt import simulate
from guard.live.metrics import GuardMetrics
from guard.live.windows import LiveStats

REPO = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("drift_validity", REPO / "benchmarks" / "drift_validity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["drift_validity"] = module
    spec.loader.exec_module(module)
    return module


def test_clopper_pearson_interval_closed_form():
    lo, hi = rate_interval(30, 100, 0.05)
    assert lo == pytest.approx(beta.ppf(0.025, 30, 71)) and hi == pytest.approx(beta.ppf(0.975, 31, 70))
    # exact: P(X >= 30 | p = lo) = alpha / 2 and P(X <= 30 | p = hi) = alpha / 2
    assert binom.sf(29, 100, lo) == pytest.approx(0.025, rel=1e-6)
    assert binom.cdf(30, 100, hi) == pytest.approx(0.025, rel=1e-6)
    assert rate_interval(0, 50, 0.05)[0] == 0.0 and rate_interval(50, 50, 0.05)[1] == 1.0
    assert rate_interval(0, 0, 0.05) == (0.0, 1.0)
    with pytest.raises(ValueError):
        rate_interval(5, 3, 0.05)


@pytest.mark.parametrize("lo,hi", [(0.2, 0.35), (0.9, 0.96), (0.0, 0.1), (0.95, 1.0)])
def test_every_e_value_has_mean_at_most_one_on_the_whole_interval(lo, hi):
    alt, null = alternatives(lo, hi)
    assert ((alt < lo) | (alt > hi)).all()
    e0, e1 = e_values(alt, null)
    for p in np.linspace(lo, hi, 41):
        mean = p * e1 + (1 - p) * e0
        assert (mean <= 1 + 1e-12).all(), (p, mean.max())
    at_edge = np.where(null == lo, lo, hi)  # equality at the interval end each alternative is tested against
    assert np.allclose(at_edge * e1 + (1 - at_edge) * e0, 1.0)


def test_budget_splits_alpha():
    b = Budget(0.01, 100_000, n_tests=12)
    assert b.alpha_interval == pytest.approx(0.005 / 12)
    assert b.log_threshold == pytest.approx(math.log(4 * 100_000 / 0.005))
    with pytest.raises(ValueError):
        Budget(0.0, 10, 1)


def test_sr_recursion_is_the_sum_of_restarted_products():
    rng = np.random.default_rng(0)
    e = rng.uniform(0.5, 1.6, size=50)
    m = np.zeros(())
    for t in range(50):
        m = sr_step(m, e[t], np.inf)
        expected = sum(np.prod(e[j:t + 1]) for j in range(t + 1))
        assert float(m) == pytest.approx(expected, rel=1e-12)
    assert float(sr_step(np.array(10.0), 3.0, 20.0)) == 20.0  # the cap


def test_detector_detects_and_clears():
    d = ChangeDetector(840, 900, alpha_interval=4e-4, log_threshold=18.0)
    rng = np.random.default_rng(1)
    for _ in range(3000):
        d.update(bool(rng.random() < 0.933))
    assert not d.alarm
    for i in range(2000):
        if d.update(bool(rng.random() < 0.77)):
            break
    assert d.alarm and i < 600
    for _ in range(400):  # persistent drift: stays on, at the cap at most
        d.update(bool(rng.random() < 0.77))
    assert d.alarm and d.statistic <= d.log_threshold + 3.0 + math.log(8) + 1e-9  # 8 alternatives, each capped
    for j in range(5000):  # the drift stops: the alarm clears by itself
        if not d.update(bool(rng.random() < 0.933)):
            break
    assert not d.alarm and j < 500
    d.reset()
    assert d.n == 0 and not d.alarm and d.statistic == -math.inf


def test_detector_without_baseline_data_is_not_testable():
    d = ChangeDetector(0, 0, alpha_interval=0.01, log_threshold=10)
    assert not d.testable and not d.update(True)


def _false_alarm_share(intervals: list[tuple[float, float]], p: float, horizon: int, log_threshold: float,
                       rng: np.random.Generator) -> float:
    """Share of stationary Bernoulli(p) streams whose detector (one interval each) alarms within horizon."""
    S = len(intervals)
    tables = [e_values(*alternatives(lo, hi)) for lo, hi in intervals]
    G = max(len(t[0]) for t in tables)
    e0, e1, w = np.ones((S, G)), np.ones((S, G)), np.zeros((S, G))
    for s, (z0, z1) in enumerate(tables):
        e0[s, :len(z0)], e1[s, :len(z1)], w[s, :len(z0)] = z0, z1, 1 / len(z0)
    m = np.zeros((S, G))
    alarmed = np.zeros(S, dtype=bool)
    level = math.exp(log_threshold)
    for _ in range(horizon):
        x = rng.random(S) < p
        m = sr_step(m, np.where(x[:, None], e1, e0), np.inf) * (w > 0)
        alarmed |= (m * w).sum(axis=1) >= level
    return float(alarmed.mean())


def test_false_alarm_probability_within_horizon_with_estimated_baseline():
    """The guarantee, simulated: a 60-row baseline (so the estimate is far off), 4,000 streams of the
    horizon: P(alarm within horizon) <= alpha. The same detector against the point estimate (the baseline
    taken as exact, as the previous test did) fails on the same kind of data."""
    alpha, horizon, S, n0, p = 0.05, 2_000, 4_000, 60, 0.3
    rng = np.random.default_rng(5)
    k0 = rng.binomial(n0, p, size=S)
    budget = Budget(alpha, horizon, n_tests=1, growth=1)  # one test on its own: A = H / (alpha / 2)
    intervals = [rate_interval(k, n0, budget.alpha_interval) for k in k0]
    assert _false_alarm_share(intervals, p, horizon, budget.log_threshold, rng) <= alpha
    points = [(k / n0, k / n0) for k in k0]
    assert _false_alarm_share(points, p, horizon, math.log(horizon / alpha), rng) > 5 * alpha


def test_benchmark_runner_and_live_stats_agree():
    """benchmarks/drift_validity.py's vectorised detectors and LiveStats, fed the same requests, give the
    same statistics and the same alarm times (with a policy from calibrate, blocking conf-5 refusals)."""
    bench = _bench()
    rng = np.random.default_rng(3)
    d = simulate(900, 1, 3.0, 0.0, n_topics=5, icc=0.0, seed=4)  # one row per prompt: design effect 1
    d["harm_rating"] = np.zeros_like(d["harm_rating"])                # the benchmark's probe gives no harm rating
    table = DatapointTable.from_arrays(topics=[f"t{t}" for t in range(5)], **d)
    policy = calibrate_table(table, n_boot=50, target_accuracy=0.9).policy
    bases = [{t: tp.baseline for t, tp in policy.topics.items()}]
    registry = CollectorRegistry()
    live = LiveStats(GuardMetrics(registry), window_size=100, drift_alpha=0.05, drift_horizon=200)
    live.set_policy(policy, bench.compared_by(True))
    det = bench.NewDetectors(bases, blocking=True, alpha=0.05, horizon=200)
    C = 1500
    b = bench.draw(rng, (C, 1), np.where(np.arange(C)[:, None] >= 300, 1.0, 3.0))
    include = ~bench.blocks(b.will_refuse, b.confidence)
    first_live = None
    for i in range(C):
        if include[i, 0]:
            live.observe(f"t{b.topic[i, 0]}", bool(b.will_refuse[i, 0]), bool(b.refused[i, 0]), int(b.confidence[i, 0]))
        if first_live is None and any(live.alarms.values()):
            first_live = i
    first_bench = det.run(b, include, 0, 0)[0]
    assert first_live is not None and first_bench == first_live
    for key, g in [(f"t{t}", ("top", t)) for t in range(5)] + [("all", ("all", None))]:
        for metric_index, metric in enumerate(("accuracy", "refusal_rate")):
            ours = live._drift[key].detectors[metric].statistic
            m = det.m_top[:, g[1], 0, metric_index] if g[0] == "top" else det.m_all[:, 0, metric_index]
            theirs = math.log(m.mean()) if m.mean() > 0 else -math.inf
            assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-9), (key, metric)
