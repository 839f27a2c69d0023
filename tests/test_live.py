"""Live statistics: window gauges (when they move, when they are absent) and the drift detectors
(like-for-like baselines, alarm lifecycle), driven by fake clocks and simulated traffic."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from calibration.calibrate import calibrate_table
from calibration.datapoints import DatapointTable
from calibration.sdt import sdt_from_counts, simulate
from guard.live.windows import LiveStats
from guard.live.metrics import GuardMetrics
from tests.scripted_upstream import Script, build_upstream
from tests.servers import ServerThread


def gauge(registry: CollectorRegistry, name: str, topic: str) -> float | None:
    return registry.get_sample_value(name, {"topic": topic})


def test_gauges_follow_counts_at_most_once_per_interval_and_exactly_after_flush():
    registry = CollectorRegistry()
    now = [100.0]
    live = LiveStats(GuardMetrics(registry), window_size=50, drift_alpha=0.01, export_interval=5.0, clock=lambda: now[0])

    live.observe("fraud", predicted_refuse=True, refused=True, confidence=5)  # first: exported at once
    assert gauge(registry, "refusal_guard_accuracy", "fraud") == 1.0
    live.observe("fraud", predicted_refuse=True, refused=False, confidence=5)  # within the interval: counted only
    live.observe("fraud", predicted_refuse=False, refused=False, confidence=3)
    assert gauge(registry, "refusal_guard_accuracy", "fraud") == 1.0

    live.flush()
    for topic in ("fraud", "all"):
        assert gauge(registry, "refusal_guard_accuracy", topic) == pytest.approx(2 / 3)
        assert gauge(registry, "refusal_guard_d_prime", topic) == pytest.approx(sdt_from_counts(1, 0, 1, 1).d_prime)

    now[0] += 5.0  # the interval has passed: the next observation exports again
    live.observe("fraud", predicted_refuse=False, refused=True, confidence=4)
    assert gauge(registry, "refusal_guard_accuracy", "fraud") == pytest.approx(2 / 4)
    assert gauge(registry, "refusal_guard_d_prime", "fraud") == pytest.approx(sdt_from_counts(1, 1, 1, 1).d_prime)


# ------------------------------------------------------------------ honest gauges
def test_sdt_gauges_absent_while_a_class_is_missing_and_n_exported():
    registry = CollectorRegistry()
    live = LiveStats(GuardMetrics(registry), window_size=50, drift_alpha=0.01, export_interval=0.0)
    for _ in range(7):  # seven scored predictions, no refusal among them
        live.observe("fraud", predicted_refuse=False, refused=False, confidence=4)
    live.flush()
    for name in ("refusal_guard_d_prime", "refusal_guard_criterion", "refusal_guard_hit_rate",
                 "refusal_guard_false_alarm_rate"):
        assert gauge(registry, name, "fraud") is None and gauge(registry, name, "all") is None, name
    assert gauge(registry, "refusal_guard_window_scored", "fraud") == 7
    assert gauge(registry, "refusal_guard_window_sdt_defined", "fraud") == 0
    assert gauge(registry, "refusal_guard_accuracy", "fraud") == 1.0  # accuracy needs no second class
    assert gauge(registry, "refusal_guard_window_scored", "weapons") is None  # never scored: no series at all
    live.observe("fraud", predicted_refuse=True, refused=True, confidence=5)
    live.flush()
    assert gauge(registry, "refusal_guard_window_sdt_defined", "fraud") == 1
    assert gauge(registry, "refusal_guard_d_prime", "fraud") == pytest.approx(sdt_from_counts(1, 0, 0, 7).d_prime)
    assert gauge(registry, "refusal_guard_window_scored", "all") == 8


# ------------------------------------------------------------------ drift: like for like, lifecycle
TOPICS = [f"t{t}" for t in range(5)]


@pytest.fixture(scope="module")
def policy():
    d = simulate(900, 1, 3.0, 0.0, n_topics=5, icc=0.0, seed=21)
    return calibrate_table(DatapointTable.from_arrays(topics=TOPICS, **d), n_boot=50, target_accuracy=0.9).policy


def blocks_confident_refusals(topic, will_refuse, confidence, harm):
    return not (will_refuse and confidence == 5)


def stream(n: int, d_prime: float, seed: int):
    d = simulate(n, 1, d_prime, 0.0, n_topics=5, icc=0.0, seed=seed)
    return zip(d["topic"], d["will_refuse"], d["refused"], d["confidence"], d["harm_rating"])


def feed(live: LiveStats, rows, blocking: bool) -> int | None:
    """Feed what the guard would score (blocked requests have no answer); returns the first alarm's index."""
    first = None
    for i, (t, w, r, c, h) in enumerate(rows):
        if blocking and w and c == 5:
            continue
        live.observe(TOPICS[t], bool(w), bool(r), int(c), int(h))
        if first is None and any(live.alarms.values()):
            first = i
    return first


def test_blocking_alone_never_alarms_when_the_baseline_is_like_for_like(policy):
    registry = CollectorRegistry()
    live = LiveStats(GuardMetrics(registry), window_size=500, drift_alpha=0.01, drift_horizon=20_000)
    live.set_policy(policy, blocks_confident_refusals)
    assert feed(live, stream(20_000, 3.0, seed=22), blocking=True) is None
    assert registry.get_sample_value("refusal_guard_drift_compared", {"topic": "all"}) < 20_000
    # the same stream against the whole-population baseline (what blocking hides is still expected): alarms
    naive = LiveStats(GuardMetrics(CollectorRegistry()), window_size=500, drift_alpha=0.01, drift_horizon=20_000)
    naive.set_policy(policy)
    first = feed(naive, stream(20_000, 3.0, seed=22), blocking=True)
    assert first is not None and first < 2_000


def test_alarm_lifecycle_detect_clear_last_alarm_time_and_reset_on_reload(policy):
    registry = CollectorRegistry()
    wall = [1_700_000_000.0]
    live = LiveStats(GuardMetrics(registry), window_size=500, drift_alpha=0.01, drift_horizon=100_000,
                     wall_clock=lambda: wall[0])
    live.set_policy(policy)
    threshold = registry.get_sample_value("refusal_guard_drift_threshold")
    assert threshold == pytest.approx(math.log(4 * 100_000 / 0.005))
    assert feed(live, stream(3_000, 3.0, seed=23), blocking=False) is None
    wall[0] += 100
    first = feed(live, stream(3_000, 1.0, seed=24), blocking=False)   # the probe got much worse
    assert first is not None and first < 1_000
    alarm = lambda topic: registry.get_sample_value("refusal_guard_drift_alarm", {"topic": topic})  # noqa: E731
    assert alarm("all") == 1
    assert registry.get_sample_value("refusal_guard_drift_last_alarm_timestamp_seconds", {"topic": "all"}) == wall[0]
    stat = registry.get_sample_value("refusal_guard_drift_statistic", {"topic": "all", "metric": "accuracy"})
    assert stat >= threshold
    wall[0] += 100
    feed(live, stream(3_000, 3.0, seed=25), blocking=False)            # the change is undone: the alarm clears
    assert alarm("all") == 0 and not any(live.alarms.values())
    feed(live, stream(3_000, 1.0, seed=26), blocking=False)
    assert alarm("all") == 1
    live.set_policy(policy)                                             # reload: re-baselined, alarms cleared
    assert alarm("all") == 0 and all(alarm(t) == 0 for t in TOPICS)
    assert registry.get_sample_value("refusal_guard_drift_compared", {"topic": "all"}) == 0
    assert registry.get_sample_value("refusal_guard_drift_last_alarm_timestamp_seconds", {"topic": "all"}) == wall[0]
    live.set_policy(None)                                               # no policy: no detectors
    feed(live, stream(300, 1.0, seed=27), blocking=False)
    assert live.alarms == {}


def test_topics_unknown_to_the_policy_are_not_compared(policy):
    registry = CollectorRegistry()
    live = LiveStats(GuardMetrics(registry), window_size=50, drift_alpha=0.01)
    live.set_policy(policy)
    for _ in range(30):
        live.observe("weapons", predicted_refuse=True, refused=False, confidence=5, harm_rating=5)
    live.flush()
    assert registry.get_sample_value("refusal_guard_drift_compared", {"topic": "all"}) == 0
    assert gauge(registry, "refusal_guard_window_scored", "weapons") == 30  # still windowed


# ------------------------------------------------------------------ what gets scored, end to end
def scraped(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **match: str) -> float:
    return sum(v for (n, labels), v in samples.items() if n == name and match.items() <= dict(labels).items())


def test_review_upstream_answers_are_not_scored_as_the_guarded_models(start_proxy, script, tmp_path):
    review_script = Script(reply="I'm sorry, but I can't help with that.")
    db = tmp_path / "datapoints.sqlite3"
    with ServerThread(build_upstream(review_script)) as review:
        proxy = start_proxy(mode="sequential", review_upstream=review.url + "/v1", datapoints=str(db))
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
        for confidence in (2, 5):  # default rule: confidence 2 -> review (review upstream), 5 -> pass
            script.probe_reply = json.dumps({"will_refuse": False, "confidence": confidence, "harm_rating": 1,
                                             "topic": "fraud"})
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q{confidence}"}])
        deadline = time.monotonic() + 10
        while total(samples := scraped(proxy.url), "refusal_guard_requests_total") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert review_script.calls["generation"] == 1 and script.calls["generation"] == 1
        assert total(samples, "refusal_guard_requests_total", action="review") == 1
        assert total(samples, "refusal_guard_outcomes_total") == 1          # only the guarded model's answer
        assert total(samples, "refusal_guard_outcomes_total", actual="complied") == 1
        assert samples[("refusal_guard_window_scored", (("topic", "fraud"),))] == 1
    deadline = time.monotonic() + 10
    while True:
        rows = sqlite3.connect(db).execute("SELECT action, label, refused FROM datapoints ORDER BY action").fetchall() \
            if db.exists() else []
        if len(rows) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    (pass_action, _, pass_refused), (review_action, review_label, review_refused) = rows
    assert (pass_action, pass_refused) == ("pass", 0)
    assert review_action == "review" and review_label is not None and review_refused is None


def test_compared_cells_follow_the_routing():
    from guard.probe.policy import ActivePolicy
    from guard.stores.recorder import DatapointRecorder
    from guard.truth.detector import RefusalDetector
    from guard.live.model_labels import ModelLabels
    from guard.truth.scoring import Scorer

    d = simulate(900, 1, 3.0, 0.0, n_topics=5, icc=0.0, seed=21)
    # a target that leaves some cells to review: every action occurs
    policy = calibrate_table(DatapointTable.from_arrays(topics=TOPICS, **d), n_boot=50, target_accuracy=0.95).policy
    metrics = GuardMetrics(CollectorRegistry())
    live = LiveStats(metrics, window_size=10, drift_alpha=0.01)
    cells = [(t, w, c, h) for t in TOPICS for w in (False, True) for c in range(1, 6) for h in range(6)]
    for review_upstream in (False, True):
        scorer = Scorer(RefusalDetector(), live, DatapointRecorder(None, metrics.datapoints_dropped), metrics,
                        ModelLabels((), 0, lambda model: None), topics=tuple(TOPICS),
                        strict=False, review_upstream=review_upstream)
        active = ActivePolicy(policy, True, "test")
        compared = scorer.compared(active, "sequential")
        actions = {cell: policy.decide(cell[0], cell[1], cell[2], cell[3] or None) for cell in cells}
        assert set(actions.values()) == {"block", "pass", "review"}
        for cell, action in actions.items():
            expected = action == "pass" or (action == "review" and not review_upstream)
            assert compared(*cell) == expected, (cell, action)
        assert all(scorer.compared(active, "shadow")(*cell) for cell in cells)  # shadow: every answer is the model's


def test_exported_metrics_match_the_deploy_contract(policy):
    import importlib.util

    spec = importlib.util.spec_from_file_location("contract", Path(__file__).resolve().parent.parent / "deploy" / "metrics_contract.py")
    contract = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(contract)
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry)
    metrics.initialise(("hacking",), ("sequential",), judging=True)  # a judge: the judged-outcome series too
    metrics.initialise_model("other")
    live = LiveStats(metrics, window_size=50, drift_alpha=0.01, wall_clock=lambda: 1.0)
    live.set_policy(policy)
    feed(live, stream(600, 0.5, seed=31), blocking=False)   # a drifted stream: every drift series appears
    live.observe_judged("hacking", True, True, False)        # and a verdict: the corrected gauges appear
    metrics.judge_tokens.labels("prompt").inc(10)
    live.flush()
    gauges = {s.name: tuple(sorted(s.labels)) for family in registry.collect() if family.type == "gauge"
              for s in family.samples}
    assert {n: tuple(sorted(l)) for n, l in contract.GAUGES.items() if n in gauges} == gauges
    counters = {s.name: tuple(sorted(s.labels)) for family in registry.collect() if family.type == "counter"
                for s in family.samples if s.name.endswith("_total")}
    assert {n: tuple(sorted(l)) for n, l in contract.COUNTERS.items() if n in counters} == counters
    assert {"refusal_guard_requests_total", "refusal_guard_outcomes_total",
            "refusal_guard_confidence_outcomes_total", "refusal_guard_judged_outcomes_total",
            "refusal_guard_judge_tokens_total"} <= set(counters)
    assert {"refusal_guard_corrected", "refusal_guard_window_judged"} <= set(gauges)
    assert {"refusal_guard_window_scored", "refusal_guard_window_sdt_defined", "refusal_guard_drift_threshold",
            "refusal_guard_drift_last_alarm_timestamp_seconds", "refusal_guard_drift_compared"} <= set(gauges)


# ------------------------------------------------------------------ judge-corrected gauges
def corrected(registry: CollectorRegistry, topic: str, stat: str, bound: str) -> float | None:
    return registry.get_sample_value("refusal_guard_corrected", {"topic": topic, "statistic": stat, "bound": bound})


def test_corrected_gauges_combine_the_window_with_the_judged_sample():
    import numpy as np

    from calibration.label_error import estimate_counts

    registry = CollectorRegistry()
    live = LiveStats(GuardMetrics(registry), window_size=4000, drift_alpha=0.01, export_interval=0.0, seed=1)
    rng = np.random.default_rng(8)
    n = 3000
    y = rng.random(n) < 0.35
    wr = np.where(rng.random(n) < 0.9, y, ~y)
    det = y ^ (rng.random(n) < np.where(y, 0.15, 0.05))
    judged = rng.random(n) < 0.2
    for i in range(n):
        live.observe("fraud", bool(wr[i]), bool(det[i]), 3)
    live.flush()
    # no verdict yet: the figures are uncorrected and no corrected series exists
    assert corrected(registry, "fraud", "d_prime", "estimate") is None
    assert registry.get_sample_value("refusal_guard_window_judged", {"topic": "fraud"}) is None
    for i in np.flatnonzero(judged):
        live.observe_judged("fraud", bool(wr[i]), bool(det[i]), bool(y[i]))
    live.flush()
    k = 2 * wr + det
    t = np.concatenate([np.bincount(k, minlength=4), np.bincount(k[judged], minlength=4),
                        np.bincount(k[judged & y], minlength=4)])
    expect = sdt_from_counts(*estimate_counts(t))
    for topic in ("fraud", "all"):
        assert registry.get_sample_value("refusal_guard_window_judged", {"topic": topic}) == judged.sum()
        for stat in ("d_prime", "criterion", "hit_rate", "false_alarm_rate", "accuracy"):
            est = corrected(registry, topic, stat, "estimate")
            assert est == pytest.approx(float(getattr(expect, stat)))
            assert corrected(registry, topic, stat, "lower") < est < corrected(registry, topic, stat, "upper")
    truth = sdt_from_counts((wr & y).sum(), (~wr & y).sum(), (wr & ~y).sum(), (~wr & ~y).sum()).d_prime
    detector = gauge(registry, "refusal_guard_d_prime", "fraud")
    assert abs(corrected(registry, "fraud", "d_prime", "estimate") - truth) < abs(detector - truth)
    assert corrected(registry, "fraud", "d_prime", "lower") <= truth <= corrected(registry, "fraud", "d_prime", "upper")


def test_the_judged_window_is_bounded():
    registry = CollectorRegistry()
    live = LiveStats(GuardMetrics(registry), window_size=50, drift_alpha=0.01, export_interval=0.0, judge_window=10)
    for i in range(40):
        live.observe("fraud", i % 2 == 0, i % 3 == 0, 4)
    for i in range(15):
        live.observe_judged("fraud", i % 2 == 0, i % 3 == 0, i % 2 == 0)
    live.flush()
    assert registry.get_sample_value("refusal_guard_window_judged", {"topic": "fraud"}) == 10
