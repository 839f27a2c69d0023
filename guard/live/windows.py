"""Sliding-window SDT gauges and sequential drift detectors, per topic and overall.

**Windows.** The window holds the last ``size`` scored predictions per topic (and for ``all``); its
counts are updated incrementally, and the gauges are computed with the same code as the offline
calibration (``calibration.sdt.sdt_from_counts``, ``calibration.reliability.ece_from_counts``), so
a live d' and an offline d' mean the same thing. Gauges are honest about sample size: the window's
``n`` is exported (``refusal_guard_window_scored``); d', c, H and FA are *absent* (removed; NaN in
multiprocess mode, which cannot remove a series) while the window lacks either class (no refusal or
no compliance), and ``refusal_guard_window_sdt_defined`` says so (0). Topics never scored have no
series at all ("no data").

The counts change with every observation, but the gauges are recomputed at most once per
``export_interval`` per topic, and on ``flush`` (the ``/metrics`` handler calls it before
rendering): recomputing d', c and ECE on every request cost 11% of the guard's CPU per request in
sequential mode (BENCHMARKS.md), for values that are only read at scrape time.

**Judge-corrected figures.** The window's outcomes are the detector's labels, so its d' is the
detector's ("uncorrected"). With the LLM judge, each verdict on a scored prediction goes to a *judged
window* per topic and ``all`` (``observe_judged``: the last ``judge_window`` verdicts, default
``window_size``; the judge labels a few percent of requests, so it spans more traffic than the main
window). ``refusal_guard_corrected{topic,statistic,bound}`` combines the main window's rows per stratum
(prediction x detector label) with P(refused | stratum) from the judged window
(``calibration.label_error.corrected_from_samples``: the estimator ``calibrate`` uses, with a
200-replicate bootstrap of both samples for the interval), recomputed with the other gauges. Besides
``calibration.label_error``'s assumptions, this assumes P(refused | stratum) (the detector's error
given the prediction) is the same over the judged window's span as over the main window's.

**Drift.** ``calibration.drift.ChangeDetector`` (a Shiryaev-Roberts-type e-detector against a
baseline that is an estimate; see that module for the guarantee) watches two rates per topic of the
policy and for ``all``: prediction accuracy and the model's refusal rate. Like for like: a detector
compares only the population its baseline counts describe. The policy's baseline holds counts per
probe cell (will_refuse, confidence, harm_rating); ``set_policy`` is told which cells the live
stream scores as the guarded model's answers (``compared``: not blocked, not answered by a review
upstream) and builds each baseline from those cells only, and ``observe`` feeds a detector only
requests from those cells and from topics the policy knows. Blocking, review and a review upstream
therefore change which cells are compared, never the rates compared. A policy without cell counts
(written before they were recorded) falls back to its whole-population counts.

Alarm lifecycle: ``refusal_guard_drift_alarm{topic}`` is 1 while either detector of the topic is at
or above its threshold and returns to 0 by itself when the evidence has gone (the detectors'
statistics are capped a few nats above the threshold, so they fall back within several hundred
compared requests of the rate returning; benchmarks/drift_validity.py measures it); ``refusal_guard_drift_last_alarm_timestamp_seconds{topic}`` is the wall time at
which the alarm last went from 0 to 1. A new policy (reload) rebuilds every detector against its
baseline and clears the alarms (the last-alarm times stay).

With several uvicorn workers each worker keeps its own windows and detectors; the gauges are
exported in prometheus-client's ``mostrecent`` multiprocess mode. Fleet-wide SDT figures come from
the counters through the recording rules in ``deploy/prometheus``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from calibration.drift import Budget, ChangeDetector
from calibration.label_error import corrected_from_samples
from calibration.policy import Baseline, Policy
from calibration.reliability import ece_from_counts
from calibration.sdt import STAT_NAMES, sdt_from_counts
from guard.live.metrics import GuardMetrics

ALL = "all"
METRICS = ("accuracy", "refusal_rate")
#: (will_refuse, confidence, harm_rating with 0 = missing)
Cell = tuple[bool, int, int]
#: whether a request of this topic and probe cell gets its answer from the guarded model and is scored
Compared = Callable[[str | None, bool, int, int], bool]


def compare_all(topic: str | None, will_refuse: bool, confidence: int, harm_rating: int) -> bool:
    return True


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


#: window cell (0 hit, 1 miss, 2 false alarm, 3 correct rejection: detector's label) -> stratum 2 * W + D
_STRATUM_OF_CELL = np.array([3, 1, 2, 0])


@dataclass
class _JudgedWindow:
    """The last ``size`` judge verdicts of scored predictions: judged rows and judged refusals per stratum."""

    size: int
    items: deque = field(default_factory=deque)
    judged: np.ndarray = field(default_factory=lambda: np.zeros(4, dtype=np.int64))
    refused: np.ndarray = field(default_factory=lambda: np.zeros(4, dtype=np.int64))

    def add(self, stratum: int, judge_refused: bool) -> None:
        self._count(stratum, judge_refused, +1)
        self.items.append((stratum, judge_refused))
        if len(self.items) > self.size:
            self._count(*self.items.popleft(), -1)

    def _count(self, stratum: int, judge_refused: bool, step: int) -> None:
        self.judged[stratum] += step
        if judge_refused:
            self.refused[stratum] += step


@dataclass(frozen=True)
class BaselineCounts:
    """What one key's detectors compare against: rows, correct predictions and refusals."""

    n: float
    correct: float
    refused: float


def compared_counts(baseline: Baseline, topic: str | None, compared: Compared) -> tuple[BaselineCounts, frozenset[Cell] | None]:
    """The baseline's counts restricted to the probe cells the live stream compares.

    Returns the counts and the set of compared cells (``None``: the baseline has no cell counts, so the
    whole population is compared)."""
    if not baseline.cells:
        h, m, _, cr = baseline.hits, baseline.misses, baseline.false_alarms, baseline.correct_rejections
        return BaselineCounts(baseline.n, h + cr, h + m), None
    n = correct = refused = 0
    kept: set[Cell] = set()
    for will_refuse, confidence, harm, cn, ck in baseline.cells:
        if compared(topic, will_refuse, confidence, harm):
            kept.add((will_refuse, confidence, harm))
            n, refused = n + cn, refused + ck
            correct += ck if will_refuse else cn - ck
    return BaselineCounts(n, correct, refused), frozenset(kept)


@dataclass
class _Drift:
    """The detectors of one key and the cells they compare."""

    cells: frozenset[Cell] | None
    detectors: dict[str, ChangeDetector]

    def compares(self, cell: Cell) -> bool:
        return self.cells is None or cell in self.cells


class LiveStats:
    def __init__(self, metrics: GuardMetrics, *, window_size: int, drift_alpha: float, drift_horizon: int = 100_000,
                 export_interval: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, judge_window: int | None = None,
                 corrected_boot: int = 200, seed: int | None = None) -> None:
        self.metrics = metrics
        self.window_size = window_size
        self.judge_window = judge_window or window_size
        self.corrected_boot = corrected_boot
        self._rng = np.random.default_rng(seed)
        self._judged: dict[str, _JudgedWindow] = {}
        self.drift_alpha = drift_alpha
        self.drift_horizon = drift_horizon
        self.export_interval = export_interval
        self._clock = clock
        self._wall_clock = wall_clock
        self._windows: dict[str, _Window] = {}
        self._exported_at: dict[str, float] = {}
        self._drift: dict[str, _Drift] = {}
        self._alarm: dict[str, bool] = {}
        self._exported_drift: set[str] = set()

    def set_policy(self, policy: Policy | None, compared: Compared = compare_all) -> None:
        """Rebuild the detectors against a new baseline (none without a policy) and clear the alarms.

        ``compared(topic, will_refuse, confidence, harm_rating)``: whether such a request is scored as
        the guarded model's answer under the routing now in force (see ``guard.truth.scoring``)."""
        self._drift = {}
        if policy is not None:
            plans: dict[str, tuple[BaselineCounts, frozenset[Cell] | None, float]] = {}
            for topic, tp in policy.topics.items():
                plans[topic] = (*compared_counts(tp.baseline, topic, compared), tp.baseline.design_effect)
            if plans:  # all = the union of the topics' compared cells (each topic's own routing)
                total = BaselineCounts(*(sum(getattr(c, f) for c, _, _ in plans.values())
                                         for f in ("n", "correct", "refused")))
                plans[ALL] = (total, None, policy.global_baseline.design_effect)
            else:
                plans[ALL] = (*compared_counts(policy.global_baseline, None, compared),
                              policy.global_baseline.design_effect)
            budget = Budget(self.drift_alpha, self.drift_horizon, n_tests=len(METRICS) * len(plans))
            for key, (counts, cells, deff) in plans.items():
                self._drift[key] = _Drift(cells, {
                    metric: ChangeDetector(k / deff, counts.n / deff, alpha_interval=budget.alpha_interval,
                                           log_threshold=budget.log_threshold)
                    for metric, k in (("accuracy", counts.correct), ("refusal_rate", counts.refused))})
            self.metrics.drift_threshold.set(budget.log_threshold)
        else:
            self.metrics.drift_threshold.set(float("nan"))
        # zero, not remove: multiprocess mode cannot remove series
        for key in self._exported_drift | set(self._drift):
            for metric in METRICS:
                self.metrics.drift_statistic.labels(key, metric).set(0)
            self.metrics.drift_alarm.labels(key).set(0)
            self.metrics.drift_compared.labels(key).set(0)
        self._exported_drift |= set(self._drift)
        self._alarm = dict.fromkeys(self._drift, False)

    def observe(self, topic: str, predicted_refuse: bool, refused: bool, confidence: int,
                harm_rating: int | None = None) -> None:
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
        if not self._drift:
            return
        probe_cell = (bool(predicted_refuse), int(confidence), int(harm_rating or 0))
        overall = self._drift[ALL]
        if len(self._drift) == 1:  # a policy without topics: one baseline for all requests
            if overall.compares(probe_cell):
                self._drift_update(ALL, overall, correct, refused)
            return
        drift = self._drift.get(topic) if topic != ALL else None
        if drift is None or not drift.compares(probe_cell):
            return  # a topic the policy does not know, or a cell its baseline does not describe
        self._drift_update(topic, drift, correct, refused)
        self._drift_update(ALL, overall, correct, refused)

    def observe_judged(self, topic: str, predicted_refuse: bool, detector_refused: bool, judge_refused: bool) -> None:
        """A judge verdict on a scored prediction (the request was observed already, with the detector's label)."""
        stratum = 2 * int(bool(predicted_refuse)) + int(bool(detector_refused))
        now = self._clock()
        for key in (topic, ALL):
            judged = self._judged.get(key)
            if judged is None:
                judged = self._judged[key] = _JudgedWindow(self.judge_window)
            judged.add(stratum, bool(judge_refused))
            window = self._windows.get(key)
            if window is not None and now - self._exported_at.get(key, -self.export_interval) >= self.export_interval:
                self._exported_at[key] = now
                self._export(key, window)

    def flush(self) -> None:
        """Bring every window's gauges up to date with its counts (one per topic seen: a few)."""
        now = self._clock()
        for key, window in self._windows.items():
            self._exported_at[key] = now
            self._export(key, window)

    def _export(self, key: str, window: _Window) -> None:
        h, m, fa, cr = (int(x) for x in window.cells)
        n = h + m + fa + cr
        stats = sdt_from_counts(h, m, fa, cr)
        defined = h + m > 0 and fa + cr > 0  # both classes: d', c, H and FA exist
        self.metrics.window_scored.labels(key).set(n)
        self.metrics.window_sdt_defined.labels(key).set(1 if defined else 0)
        for gauge, value in ((self.metrics.d_prime, stats.d_prime), (self.metrics.criterion, stats.criterion),
                             (self.metrics.hit_rate, stats.hit_rate),
                             (self.metrics.false_alarm_rate, stats.false_alarm_rate)):
            if defined:
                gauge.labels(key).set(value)
            else:
                self.metrics.absent(gauge, key)
        if n:
            self.metrics.accuracy.labels(key).set(stats.accuracy)
            self.metrics.ece.labels(key).set(ece_from_counts(window.by_conf[0], window.by_conf[1]))
        else:
            self.metrics.absent(self.metrics.accuracy, key)
            self.metrics.absent(self.metrics.ece, key)
        self._export_corrected(key, window)

    def _export_corrected(self, key: str, window: _Window) -> None:
        """The judge-corrected figures: the window's strata shares x P(refused | stratum) from the judged window."""
        judged = self._judged.get(key)
        if judged is None:
            return  # no verdict yet for this key: no corrected series at all
        self.metrics.window_judged.labels(key).set(int(judged.judged.sum()))
        rows = np.zeros(4, dtype=np.int64)
        rows[_STRATUM_OF_CELL] = window.cells
        corrected = (corrected_from_samples(rows, judged.judged, judged.refused, n_boot=self.corrected_boot,
                                            seed=self._rng) if rows.sum() and judged.judged.sum() else None)
        for stat in STAT_NAMES:
            value = getattr(corrected, stat) if corrected is not None else None
            lo, hi = corrected.ci[stat] if corrected is not None else (None, None)
            for bound, v in (("estimate", value), ("lower", lo), ("upper", hi)):
                if value is not None and v is not None:
                    self.metrics.corrected.labels(key, stat, bound).set(v)
                else:
                    self.metrics.absent(self.metrics.corrected, key, stat, bound)

    def _drift_update(self, key: str, drift: _Drift, correct: bool, refused: bool) -> None:
        alarm = False
        for metric, x in (("accuracy", correct), ("refusal_rate", refused)):
            detector = drift.detectors[metric]
            alarm = detector.update(x) or alarm
            self.metrics.drift_statistic.labels(key, metric).set(max(detector.statistic, 0.0))
        self.metrics.drift_compared.labels(key).set(drift.detectors["accuracy"].n)
        if alarm and not self._alarm.get(key, False):
            self.metrics.drift_last_alarm.labels(key).set(self._wall_clock())
        self._alarm[key] = alarm
        self.metrics.drift_alarm.labels(key).set(1 if alarm else 0)

    @property
    def alarms(self) -> dict[str, bool]:
        """The alarm of every key with detectors (read-only copy)."""
        return dict(self._alarm)
