"""Live window gauges: counts change per observation, gauges at most once per interval and on flush.

A fake clock drives the interval, so the test asserts exactly when a gauge moves.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from calibration.sdt import sdt_from_counts
from guard.live.windows import LiveStats
from guard.live.metrics import GuardMetrics


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
