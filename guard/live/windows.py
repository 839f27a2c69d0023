"""Sliding-window SDT gauges and sequential drift tests, per topic and overall.

The window holds the last ``size`` scored predictions per topic (and for ``all``); its
counts are updated incrementally, and the gauges are computed with the same code as the
offline calibration (``calibration.sdt.sdt_from_counts``, ``calibration.reliability.
ece_from_counts``), so a live d' and an offline d' mean the same thing.

Drift compares each topic's stream with the loaded policy's baseline using
``calibration.drift.DriftTest`` (a Beta-mixture SPRT, valid under continuous monitoring:
checking after every request does not inflate its false-alarm rate). Two rates are tested:
prediction accuracy and the model's actual refusal rate. A new policy resets the tests.

The counts change with every observation, but the gauges are recomputed from them at most once
per ``export_interval`` per topic, and on ``flush`` (the ``/metrics`` handler calls it before
rendering): recomputing d', c and ECE on every request cost 11% of the guard's CPU per request
in sequential mode (BENCHMARKS.md), for values that are only read at scrape time.

With several uvicorn workers each worker keeps its own window; the gauges are exported in
prometheus-client's ``mostrecent`` multiprocess mode. Fleet-wide figures come from the
counters through the recording rules in ``deploy/prometheus``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from calibration.drift import DriftTest
from calibration.policy import Policy
from calibration.reliability import ece_from_counts
from calibration.sdt import sdt_from_counts
from guard.live.metrics import GuardMetrics

ALL = "all"


@dataclass
class _Window:
    size: int
    items: deque = field(default_factory=deque)
    cells: np.ndarray = field(default_factory=lambda: np.zeros(4, dtype=np.int64))  # hit, miss, fa, cr
    by_conf: np.ndarray = field(default_factory=lambda: np.zeros((2, 5), dtype=np.int64))  # [correct, n] x conf

    def add(self, cell: int, confidence: int, correct: bool) -> None:
        self._count(cell, confidence, correct, +1)
        self.items.append((cell, confidence, correct))
        if len(self.items) > self.size:
            self._count(*self.items.popleft(), -1)

    def _count(self, cell: int, confidence: int, correct: bool, step: int) -> None:
        self.cells[cell] += step
        self.by_conf[1, confidence - 1] += step
        if correct:
            self.by_conf[0, confidence - 1] += step


class LiveStats:
    def __init__(self, metrics: GuardMetrics, *, window_size: int, drift_alpha: float, export_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.window_size = window_size
        self.drift_alpha = drift_alpha
        self.export_interval = export_interval
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._exported_at: dict[str, float] = {}
        self._drift: dict[tuple[str, str], DriftTest] = {}
        self._policy: Policy | None = None

    def set_policy(self, policy: Policy | None) -> None:
        """Rebuild the drift tests against a new baseline (or none without a policy)."""
        self._policy = policy
        for key, metric in self._drift:  # zero, not remove: multiprocess mode cannot remove series
            self.metrics.drift_statistic.labels(key, metric).set(0)
            self.metrics.drift_alarm.labels(key).set(0)
        self._drift.clear()

    def observe(self, topic: str, predicted_refuse: bool, refused: bool, confidence: int) -> None:
        correct = predicted_refuse == refused
        cell = (0 if predicted_refuse else 1) if refused else (2 if predicted_refuse else 3)
        now = self._clock()
        for key in (topic, ALL):
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(self.window_size)
            window.add(cell, confidence, correct)
            if now - self._exported_at.get(key, -self.export_interval) >= self.export_interval:
                self._exported_at[key] = now
                self._export(key, window)
            self._drift_update(key, correct, refused)

    def flush(self) -> None:
        """Bring every window's gauges up to date with its counts (one per topic seen: a few)."""
        now = self._clock()
        for key, window in self._windows.items():
            self._exported_at[key] = now
            self._export(key, window)

    def _export(self, key: str, window: _Window) -> None:
        h, m, fa, cr = (int(x) for x in window.cells)
        stats = sdt_from_counts(h, m, fa, cr)
        self.metrics.d_prime.labels(key).set(stats.d_prime)
        self.metrics.criterion.labels(key).set(stats.criterion)
        self.metrics.hit_rate.labels(key).set(stats.hit_rate)
        self.metrics.false_alarm_rate.labels(key).set(stats.false_alarm_rate)
        self.metrics.accuracy.labels(key).set(stats.accuracy)
        self.metrics.ece.labels(key).set(ece_from_counts(window.by_conf[0], window.by_conf[1]))

    def _drift_update(self, key: str, correct: bool, refused: bool) -> None:
        if self._policy is None:
            return
        baseline = self._policy.baseline(None if key == ALL else key)
        alarm = False
        for metric, x, rate in (("accuracy", correct, baseline.accuracy), ("refusal_rate", refused, baseline.refusal_rate)):
            if rate is None:
                continue
            test = self._drift.get((key, metric))
            if test is None:
                test = self._drift[(key, metric)] = DriftTest(rate, alpha=self.drift_alpha)
            test.update(x)
            self.metrics.drift_statistic.labels(key, metric).set(test.statistic)
            alarm = alarm or test.alarm
        self.metrics.drift_alarm.labels(key).set(1 if alarm else 0)
