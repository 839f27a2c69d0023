"""Clopper-Pearson and cluster bounds (closed forms), the select-then-certify thresholds (realised
guarantee by simulation with known truth, clustered, jointly over topics), risk-coverage."""

import math

import numpy as np
import pytest
from scipy.stats import binom

from calibration.thresholds import (GLOBAL, candidate_sequence, certify_policy, certify_sequence, cluster_bound,
                                    cp_lower, cp_upper_error, design_effect, icc, ltt_threshold, n_needed,
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


def test_design_effect_and_icc():
    rng = np.random.default_rng(0)
    unit = np.repeat(np.arange(100), 10)
    assert design_effect(unit, rng.random(1000) < 0.5) == pytest.approx(1.0, abs=0.2)
    # perfectly clustered outcomes: ICC 1, deff = cluster size
    y = np.repeat(rng.random(100) < 0.5, 10)
    assert icc(unit, y) == pytest.approx(1.0, abs=0.01)
    assert design_effect(unit, y) == pytest.approx(10.0, rel=0.02)
    assert design_effect(np.arange(50), rng.random(50) < 0.5) == 1.0


def test_cluster_bound_closed_forms():
    # one row per cluster: the exact Clopper-Pearson bound
    e = np.r_[np.ones(3, bool), np.zeros(297, bool)]
    b = cluster_bound(e, np.arange(300), 0.05)
    assert b.design_effect == 1.0 and b.upper == pytest.approx(float(cp_upper_error(3, 300, 0.05)))
    # clusters of 3 that are all right or all wrong: CR1 variance / binomial variance by hand
    e = np.repeat(np.r_[np.ones(5, bool), np.zeros(95, bool)], 3)
    unit = np.repeat(np.arange(100), 3)
    b = cluster_bound(e, unit, 0.05)
    p, n, g = 15 / 300, 300, 100
    v_cl = g / (g - 1) * (5 * (3 - 3 * p) ** 2 + 95 * (3 * p) ** 2) / n ** 2
    deff = v_cl / (p * (1 - p) / n)
    assert b.design_effect == pytest.approx(min(deff, 3.0))
    assert b.upper == pytest.approx(float(cp_upper_error(15 / b.design_effect, 300 / b.design_effect, 0.05)))
    assert b.n_clusters == 100 and b.errors == 15
    # no errors seen: the fitting split's ICC keeps the correction (Kish 1 + (m - 1) * ICC)
    z = cluster_bound(np.zeros(300, bool), unit, 0.05, icc_prior=0.5)
    assert z.design_effect == pytest.approx(2.0)
    assert z.upper == pytest.approx(1 - 0.05 ** (1 / 150))


def test_n_needed_closed_form():
    # zero errors: 1 - delta^(1/n) <= eps  <=>  n >= log(delta) / log(1 - eps)
    assert n_needed(0.0, 0.98, 0.05) == math.ceil(math.log(0.05) / math.log(0.98))
    assert n_needed(0.0, 0.98, 0.05, design_effect=2.0) == math.ceil(2 * math.log(0.05) / math.log(0.98)) or \
        n_needed(0.0, 0.98, 0.05, design_effect=2.0) == math.ceil(2 * math.log(0.05) / math.log(0.98)) + 1
    n = n_needed(0.01, 0.98, 0.05)
    assert float(cp_upper_error(0.01 * n, n, 0.05)) <= 0.02 < float(cp_upper_error(0.01 * (n - 1), n - 1, 0.05))
    assert n_needed(0.02, 0.98, 0.05) is None and n_needed(0.03, 0.98, 0.05) is None


def test_certify_sequence_is_a_fixed_sequence():
    # 600 rows at 0.99 (all right), 200 at 0.9 (10% wrong), 2000 at 0.8 (all right)
    score = np.r_[np.full(600, 0.99), np.full(200, 0.9), np.full(2000, 0.8)]
    correct = np.r_[np.ones(600, bool), np.arange(200) % 10 != 0, np.ones(2000, bool)]
    unit = np.arange(score.size)
    st = certify_sequence([0.99, 0.9, 0.8], score, correct, unit, 0.98, 0.05)
    assert st.threshold == 0.99 and st.n_routed == 600 and st.accuracy == 1.0
    assert st.accuracy_lower == pytest.approx(0.05 ** (1 / 600))
    # 0.9 fails (20 errors in 800) so 0.8 (20 in 2,800, which would pass) is never tested
    assert [t for t, _ in st.tested] == [0.99, 0.9]
    assert float(cp_upper_error(20, 2800, 0.05)) <= 0.02
    # the order given is the order tested: starting at the large set certifies it
    assert certify_sequence([0.8], score, correct, unit, 0.98, 0.05).threshold == 0.8
    assert certify_sequence([], score, correct, unit, 0.98, 0.05).threshold is None


def test_a_small_noisy_candidate_does_not_end_the_search():
    """The failure the old procedure had: a small top set with a few errors stopped everything."""
    rng = np.random.default_rng(1)
    score = np.r_[np.full(200, 0.999), np.full(3000, 0.995)]
    correct = np.r_[np.arange(200) % 40 != 0, rng.random(3000) < 0.995]
    unit = np.arange(score.size)
    seq = candidate_sequence(score, correct, unit, 0.98, 0.05, n_cal=score.size)
    assert seq[0][0] == 0.995                      # starts at the large set
    old = ltt_threshold(score, correct, 0.98, 0.05)
    assert old.threshold is None                   # the old fixed sequence stops at the 200 rows
    assert certify_sequence([t for t, _, _ in seq], score, correct, unit, 0.98, 0.05).threshold == 0.995


def test_route_rule():
    s = np.array([0.9, 0.9, 0.5, 0.99])
    wr = np.array([True, False, True, False])
    assert route(s, wr, 0.8, None).tolist() == [True, False, False, False]
    assert route(s, wr, None, 0.95).tolist() == [False, False, False, True]


def _world(rng, n_prompts, levels, n_topics=1, reps=3, shift=0.0):
    """Clustered data with known P(correct): each prompt has a level (its score), its paraphrases are
    all right or all wrong together with probability 0.5, else independently (latent ICC ~ 0.5)."""
    lvl = rng.integers(0, levels.size, n_prompts)
    p = np.clip(levels[lvl] - shift, 0, 1)
    together = rng.random(n_prompts) < 0.5
    shared = rng.random(n_prompts) < p
    prompt = np.repeat(np.arange(n_prompts), reps)
    own = rng.random(prompt.size) < p[prompt]
    correct = np.where(together[prompt], shared[prompt], own)
    topic = (np.arange(n_prompts) % n_topics)[prompt]
    return levels[lvl][prompt], correct, topic, prompt, lvl


def _certify(rng, score, correct, topic, prompt, n_topics, target, delta):
    n_prompts = prompt.max() + 1
    fit_p = np.zeros(n_prompts, bool)
    fit_p[rng.permutation(n_prompts)[: int(0.3 * n_prompts)]] = True
    return certify_policy(score, correct, topic, prompt, fit_p[prompt], [f"t{i}" for i in range(n_topics)],
                          target, delta)


def test_realised_guarantee_with_clustered_data_and_known_truth():
    """Realised accuracy (known truth) of every group's routed requests >= target in >= 1 - delta
    of simulated deployments, with paraphrase clusters of 3; the test is not vacuous."""
    rng = np.random.default_rng(42)
    target, delta = 0.95, 0.10
    levels = np.linspace(0.85, 0.995, 12)
    trials, ok, cov = 300, 0, []
    for _ in range(trials):
        score, correct, topic, prompt, lvl = _world(rng, 600, levels)
        cert = _certify(rng, score, correct, topic, prompt, 1, target, delta)
        t = cert.threshold(GLOBAL)
        if t is None:
            ok += 1
            cov.append(0.0)
            continue
        sel = levels >= t                                  # every level is equally likely
        ok += levels[sel].mean() >= target
        cov.append(sel.mean())
    assert ok / trials >= 1 - delta
    assert np.mean(np.asarray(cov) > 0) > 0.4 and np.mean(cov) > 0.15   # not vacuous (truth allows 0.58)


def test_naive_row_level_bound_would_fail_where_the_cluster_bound_holds():
    """Everything slightly below target, paraphrases fully correlated: treating rows as independent
    certifies far too often; the cluster bound does not."""
    rng = np.random.default_rng(7)
    target, delta, trials = 0.95, 0.05, 400
    naive = ours = 0
    for _ in range(trials):
        n_prompts = 150
        wrong = np.repeat(rng.random(n_prompts) < 0.06, 4)       # truth: accuracy 0.94 < 0.95
        unit = np.repeat(np.arange(n_prompts), 4)
        naive += float(cp_upper_error(wrong.sum(), wrong.size, delta)) <= 1 - target
        ours += cluster_bound(wrong, unit, delta).upper <= 1 - target
    assert naive / trials > 2 * delta                        # the simulation can catch a failure
    assert ours / trials <= delta


def test_joint_over_topics_below_target_everywhere():
    """Ten topics, every request at 0.94 < target 0.95: any auto-routing is a violation; it must
    happen in <= delta of deployments (the old per-topic procedure spent delta on every topic)."""
    rng = np.random.default_rng(3)
    target, delta, trials = 0.95, 0.10, 200
    routed_any = 0
    for _ in range(trials):
        score, correct, topic, prompt, _ = _world(rng, 1500, np.array([0.94, 0.94]), n_topics=10, reps=2)
        score = score + rng.normal(0, 1e-3, score.size)           # distinct scores: many candidates
        cert = _certify(rng, score, correct, topic, prompt, 10, target, delta)
        routed_any += any(st.threshold is not None for st in cert.groups.values())
    assert routed_any / trials <= delta


def test_topics_get_their_own_threshold_only_with_the_data_for_it():
    rng = np.random.default_rng(5)
    # topic t0: large and very accurate at the top level; t1, t2: small
    n = 6000
    score = np.where(rng.random(n) < 0.5, 0.995, 0.9)
    topic = np.where(np.arange(n) < 4000, 0, 1 + (np.arange(n) % 2))
    p = np.where(topic == 0, np.where(score > 0.99, 0.999, 0.99), np.where(score > 0.99, 0.97, 0.6))
    correct = rng.random(n) < p
    prompt = np.arange(n)
    cert = _certify(rng, score, correct, topic, prompt, 3, 0.98, 0.05)
    assert cert.own_topics == ("t0",)
    assert cert.threshold("t0") == 0.9                             # routes all of t0
    assert cert.tests == sum(1 for c in cert.candidates.values() if c)
    assert cert.delta_per_test == pytest.approx(0.05 / cert.tests)


def test_risk_coverage_hand_computed():
    score = [0.9, 0.9, 0.5, 0.1]
    correct = [True, False, True, False]
    rc = risk_coverage(score, correct)
    assert rc["coverage"] == [0.5, 0.75, 1.0]
    assert rc["risk"] == pytest.approx([0.5, 1 / 3, 0.5])
    assert rc["aurc"] == pytest.approx(0.5 * 0.5 + 0.25 / 3 + 0.25 * 0.5)
    perfect = risk_coverage([0.9, 0.8, 0.1], [True, True, False])
    assert perfect["aurc"] == pytest.approx(1 / 3 * 1 / 3)   # only the last third has risk 1/3
