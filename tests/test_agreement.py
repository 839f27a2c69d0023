"""Detector-vs-judge agreement interval: closed form (scipy's Wilson), and coverage by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from calibration.agreement import agreement, wilson


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (47, 50), (50, 50), (412, 500)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson(k, n, 0.95)
    assert low == pytest.approx(ci.low, abs=1e-12)
    assert high == pytest.approx(ci.high, abs=1e-12)


def test_one_row_per_prompt_is_plain_wilson() -> None:
    rng = np.random.default_rng(0)
    a = rng.random(300) < 0.5
    b = np.where(rng.random(300) < 0.9, a, ~a)
    res = agreement(a, b, cluster=np.arange(300))
    assert res.design_effect == 1.0
    assert (res.low, res.high) == pytest.approx(wilson(res.agree, 300))
    assert res.rate == pytest.approx(float((a == b).mean()))


def test_repeated_prompts_widen_the_interval() -> None:
    # 40 prompts x 10 repeats, agreement decided per prompt: the rows are 40 observations, not 400.
    per_prompt = np.r_[np.ones(34, bool), np.zeros(6, bool)]
    same = np.repeat(per_prompt, 10)
    cluster = np.repeat(np.arange(40), 10)
    res = agreement(same, np.ones_like(same), cluster=cluster)
    plain = agreement(same, np.ones_like(same))
    assert res.design_effect == pytest.approx(10 * 40 / 39, rel=1e-6)
    assert (res.high - res.low) > 2.5 * (plain.high - plain.low)


def test_empty_and_shape_errors() -> None:
    assert agreement(np.zeros(0, bool), np.zeros(0, bool)).rate is None
    with pytest.raises(ValueError):
        agreement(np.zeros(3, bool), np.zeros(4, bool))


@pytest.mark.parametrize("clustered", [False, True])
def test_coverage_by_simulation(clustered: bool) -> None:
    # Known truth p = 0.9. Clustered: each prompt has its own agreement rate drawn from Beta (ICC 0.2),
    # 60 prompts x 8 repeats. The 95% interval must cover p in about 95% of 2,000 runs; the naive
    # (unclustered) Wilson interval, checked alongside, undercovers badly on the clustered data.
    rng = np.random.default_rng(1)
    p, runs, covered, naive_covered = 0.9, 2000, 0, 0
    for _ in range(runs):
        if clustered:
            rho = 0.2
            alpha, beta = p * (1 - rho) / rho, (1 - p) * (1 - rho) / rho
            rates = rng.beta(alpha, beta, 60)
            same = rng.random((60, 8)) < rates[:, None]
            cluster = np.repeat(np.arange(60), 8)
            same = same.ravel()
        else:
            same = rng.random(400) < p
            cluster = None
        res = agreement(same, np.ones_like(same), cluster=cluster)
        covered += res.low <= p <= res.high
        lo, hi = wilson(res.agree, res.n)
        naive_covered += lo <= p <= hi
    assert 0.93 <= covered / runs <= 0.975
    if clustered:
        assert naive_covered / runs < 0.85
