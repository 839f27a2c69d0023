"""ECE/Brier closed forms, PAV, and the Recalibrator (monotone, shrinkage, JSON round-trip)."""

import json
import math

import numpy as np
import pytest

from calibration.reliability import (Recalibrator, brier, ece, ece_from_counts, pav,
                                     reliability_table)


def test_ece_hand_computed():
    # conf 5 (stated 1.0): 4 of 5 correct -> gap 0.2, weight 5/10
    # conf 3 (stated 0.6): 3 of 5 correct -> gap 0.0, weight 5/10
    conf = [5] * 5 + [3] * 5
    correct = [1, 1, 1, 1, 0] + [1, 1, 1, 0, 0]
    assert ece(conf, correct) == pytest.approx(0.1)
    assert ece_from_counts([0, 0, 3, 0, 4], [0, 0, 5, 0, 5]) == pytest.approx(0.1)
    # Brier: five times (1-1)^2 + (1-0)^2 at conf 5, (0.6-1)^2 x3 + 0.6^2 x2 at conf 3
    expected = (1.0 + 3 * 0.16 + 2 * 0.36) / 10
    assert brier(conf, correct) == pytest.approx(expected)


def test_ece_edges():
    assert math.isnan(ece([], []))
    assert math.isnan(ece_from_counts(np.zeros(5), np.zeros(5)))
    assert ece([5, 5], [1, 1]) == 0.0       # perfectly calibrated at 1.0
    assert ece([1, 1], [0, 0]) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        ece([0, 6], [1, 1])


def test_ece_from_counts_matches_rows():
    rng = np.random.default_rng(0)
    conf = rng.integers(1, 6, 500)
    correct = rng.random(500) < conf / 6
    n = np.bincount(conf, minlength=6)[1:]
    k = np.bincount(conf, weights=correct, minlength=6)[1:]
    assert ece_from_counts(k, n) == pytest.approx(ece(conf, correct))


def test_reliability_table_rows():
    rows = reliability_table([5, 5, 5, 1], [1, 1, 0, 0])
    assert [r["n"] for r in rows] == [1, 0, 0, 0, 3]
    assert rows[4]["accuracy"] == pytest.approx(2 / 3)
    lo, hi = rows[4]["ci"]
    assert lo < 2 / 3 < hi
    assert rows[1]["accuracy"] is None


def test_pav():
    assert pav([1, 3, 2, 4], [1, 1, 1, 1]).tolist() == [1, 2.5, 2.5, 4]
    assert pav([3, 1], [3, 1]).tolist() == [2.5, 2.5]
    out = pav([0.9, 0.5, 0.7, 0.2, 1.0], [1, 2, 3, 4, 5])
    assert (np.diff(out) >= -1e-12).all()


def _data(rng, n=4000, topics=3):
    conf = rng.integers(1, 6, n)
    harm = rng.integers(0, 6, n)
    wr = rng.random(n) < 0.5
    topic = rng.integers(0, topics, n)
    p = 0.5 + 0.09 * conf  # increasing in confidence
    correct = rng.random(n) < p
    return wr, conf, harm, topic, correct


def test_recalibrator_monotone_and_accurate():
    rng = np.random.default_rng(1)
    wr, conf, harm, topic, correct = _data(rng)
    names = ["a", "b", "c"]
    rec = Recalibrator().fit(wr, conf, harm, topic, correct, topic_names=names)
    for t in names + [None]:
        for side in (False, True):
            for h in (None, 1, 3, 5):
                ps = [rec.apply(side, c, h, t) for c in range(1, 6)]
                assert all(b >= a - 1e-12 for a, b in zip(ps, ps[1:]))
    # roughly recovers the true rate 0.5 + 0.09 * conf at the pooled level
    assert rec.apply(True, 5, None, None) == pytest.approx(0.95, abs=0.05)
    assert rec.apply(False, 1, None, None) == pytest.approx(0.59, abs=0.06)
    # vectorised apply agrees with scalar apply
    many = rec.apply_many(wr[:50], conf[:50], harm[:50], topic[:50], topic_names=names)
    one = [rec.apply(bool(w), int(c), int(h), names[t]) for w, c, h, t in zip(wr[:50], conf[:50], harm[:50], topic[:50])]
    assert np.allclose(many, one)


def test_small_topic_shrinks_to_global():
    rng = np.random.default_rng(2)
    wr, conf, harm, topic, correct = _data(rng, topics=1)
    names = ["big", "tiny"]
    # the tiny topic: 3 requests, all wrong at confidence 5
    wr2 = np.r_[wr, [True] * 3]
    conf2 = np.r_[conf, [5] * 3]
    harm2 = np.r_[harm, [0] * 3]
    topic2 = np.r_[topic, [1] * 3]
    correct2 = np.r_[correct, [False] * 3]
    rec = Recalibrator(prior_strength=20).fit(wr2, conf2, harm2, topic2, correct2, topic_names=names)
    g = rec.apply(True, 5, None, None)
    tiny = rec.apply(True, 5, None, "tiny")
    assert tiny < g                     # moved toward its own data...
    assert tiny > 0.5 * g               # ...but 3 points cannot overturn the global map
    assert rec.apply(True, 5, None, "unknown-topic") == g


def test_recalibrator_json_round_trip():
    rng = np.random.default_rng(3)
    wr, conf, harm, topic, correct = _data(rng, n=500)
    rec = Recalibrator().fit(wr, conf, harm, [["x", "y", None][t] for t in topic], correct)
    d = json.loads(json.dumps(rec.to_dict()))
    back = Recalibrator.from_dict(d)
    for args in [(True, 5, 3, "x"), (False, 1, None, "y"), (True, 2, 4, None), (False, 4, 2, "nope")]:
        assert back.apply(*args) == pytest.approx(rec.apply(*args), abs=1e-6)
    with pytest.raises(ValueError):
        Recalibrator.from_dict({**d, "global": [[0.5]]})
    with pytest.raises(RuntimeError):
        Recalibrator().apply(True, 5, None, None)


def test_recalibrator_single_class_data():
    # a model that is always right: fitted probabilities are high but stay below 1
    rec = Recalibrator().fit([True] * 50, [5] * 50, [None] * 50, ["t"] * 50, [True] * 50)
    p = rec.apply(True, 5, None, "t")
    assert 0.95 < p < 1.0
