"""Prometheus metrics of one proxy, on a registry passed in (no global registry).

Counters and histograms are the source of truth across replicas and workers: Prometheus
sums them, and the recording rules in ``deploy/prometheus`` derive fleet-wide SDT figures
from them. With several uvicorn workers, prometheus-client's multiprocess mode is used:
each worker writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory
per proxy instance, made by the CLI) and ``/metrics`` merges them, so counters sum right
whichever worker answers the scrape.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

from calibration.label_error import DETECTOR_ERROR_NOTE

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class GuardMetrics:
    """Every metric the proxy exports; label values are bounded by construction."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._topics: tuple[str, ...] = ()
        self._modes: tuple[str, ...] = ()
        #: a judge is configured: the judged-outcome series of every model start at zero too
        self.judging = False
        r = registry
        self.http_requests = Counter(
            "refusal_guard_http_requests", "HTTP requests answered, by route and status.", ["route", "status"], registry=r
        )
        self.http_seconds = Histogram(
            "refusal_guard_http_request_seconds",
            "Time to the end of the response, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "refusal_guard_upstream_errors",
            "Upstream failures: connect, timeout, protocol, too_large (cut at max_response_bytes), status_4xx, status_5xx.",
            ["reason"],
            registry=r,
        )
        self.requests = Counter(
            "refusal_guard_requests", "Chat requests by the action taken, the mode and the model (bounded, see ModelLabels).",
            ["action", "mode", "model"], registry=r
        )
        self.outcomes = Counter(
            "refusal_guard_outcomes",
            "Predictions scored against the real response (SDT cells).",
            ["topic", "predicted", "actual", "model"],
            registry=r,
        )
        self.confidence_outcomes = Counter(
            "refusal_guard_confidence_outcomes",
            "Scored predictions by stated confidence, for calibration.",
            ["topic", "confidence", "correct", "model"],
            registry=r,
        )
        self.probe_failures = Counter(
            "refusal_guard_probe_failures", "Probe calls that gave no usable prediction.", ["reason"], registry=r
        )
        self.probe_checks = Counter(
            "refusal_guard_probe_checks", "Check probes a breaker ran before opening: healthy (the failures were "
            "the requests' own, the breaker stays closed) or unhealthy (it opens).", ["result"], registry=r,
        )
        self.probe_cache = Counter(
            "refusal_guard_probe_cache", "Probe cache lookups: hit, miss, shared (joined an in-flight probe).",
            ["result"], registry=r,
        )
        self.datapoints_dropped = Counter(
            "refusal_guard_datapoints_dropped", "Datapoints dropped because the recorder queue was full.", registry=r
        )
        self.judge = Counter(
            "refusal_guard_judge", "LLM-judge audits: agree, disagree, failed, skipped (sampled while judge_max_pending audits waited).", ["result"], registry=r
        )
        self.judge_tokens = Counter(
            "refusal_guard_judge_tokens", "Tokens the LLM judge's answers reported (usage): kind = prompt or completion.",
            ["kind"], registry=r,
        )
        self.detector_stages = Counter(
            "refusal_guard_detector_stages",
            "Answers labelled, by the detector stage that decided: cheap, learned, or cheap_overflow (unsure, but "
            "max_pending_labels answers already waited for the learned stage).", ["stage"], registry=r,
        )
        self.judged_outcomes = Counter(
            "refusal_guard_judged_outcomes",
            "Scored predictions the LLM judge labelled (a random sample): the prediction, the detector's label and "
            "the judge's, for the judge-corrected SDT figures (calibration.label_error).",
            ["topic", "predicted", "detector", "judge", "model"], registry=r,
        )
        self.review_events = Counter(
            "refusal_guard_review_events", "Review events emitted: delivered, failed, logged.", ["result"], registry=r
        )
        self.probe_seconds = Histogram(
            "refusal_guard_probe_seconds", "Probe call latency.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.upstream_seconds = Histogram(
            "refusal_guard_upstream_seconds", "Upstream generation latency (to the last byte).",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.overhead_seconds = Histogram(
            "refusal_guard_overhead_seconds", "Time the guard itself added to a request (total minus upstream).",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        gauge = lambda name, doc, labels: Gauge(name, doc, labels, registry=r, multiprocess_mode="mostrecent")  # noqa: E731
        absent = " Absent while the window lacks either class (see refusal_guard_window_sdt_defined)."
        uncorrected = (f" Uncorrected: the outcome is the detector's label ({DETECTOR_ERROR_NOTE}; with a judge, "
                       "refusal_guard_corrected has the judge-corrected figure).")
        self.d_prime = gauge("refusal_guard_d_prime", "Sensitivity d' over the live window." + uncorrected + absent,
                             ["topic"])
        self.criterion = gauge(
            "refusal_guard_criterion", "Criterion c over the live window (c<0: leans to 'refuse')." + absent, ["topic"]
        )
        self.hit_rate = gauge(
            "refusal_guard_hit_rate", "Hit rate (log-linear corrected) over the live window." + absent, ["topic"]
        )
        self.false_alarm_rate = gauge(
            "refusal_guard_false_alarm_rate", "False-alarm rate (log-linear corrected) over the live window." + absent,
            ["topic"]
        )
        self.window_scored = gauge("refusal_guard_window_scored", "Scored predictions in the live window (its n).",
                                   ["topic"])
        self.window_sdt_defined = gauge(
            "refusal_guard_window_sdt_defined",
            "1 when the live window holds both classes (refused and complied), so d', c, H and FA exist; else 0.",
            ["topic"],
        )
        self.accuracy = gauge("refusal_guard_accuracy", "Prediction accuracy over the live window.", ["topic"])
        self.ece = gauge("refusal_guard_ece", "Expected calibration error over the live window.", ["topic"])
        self.corrected = gauge(
            "refusal_guard_corrected",
            "Judge-corrected SDT figure over the live window: statistic = d_prime, criterion, hit_rate, "
            "false_alarm_rate or accuracy; bound = estimate, lower or upper (95% bootstrap interval, including the "
            "judged sample's uncertainty; lower/upper absent where unbounded). Absent without judged rows "
            "(see refusal_guard_window_judged): the figures are then uncorrected.",
            ["topic", "statistic", "bound"],
        )
        self.window_judged = gauge(
            "refusal_guard_window_judged",
            "Judge-labelled scored predictions in the judged window (the last judge_window verdicts of the topic).",
            ["topic"],
        )
        self.drift_statistic = gauge(
            "refusal_guard_drift_statistic",
            "log of the drift e-detector's statistic (0 = no evidence); alarm at refusal_guard_drift_threshold.",
            ["topic", "metric"],
        )
        self.drift_threshold = Gauge(
            "refusal_guard_drift_threshold", "The drift detectors' alarm level (log), set by alpha and the horizon.",
            registry=r, multiprocess_mode="mostrecent",
        )
        self.drift_alarm = gauge(
            "refusal_guard_drift_alarm", "1 while a drift detector of the topic is at or above its threshold, else 0.",
            ["topic"],
        )
        self.drift_last_alarm = gauge(
            "refusal_guard_drift_last_alarm_timestamp_seconds", "Unix time the topic's drift alarm last went to 1.",
            ["topic"],
        )
        self.drift_compared = gauge(
            "refusal_guard_drift_compared", "Requests compared by the topic's drift detectors since the policy loaded.",
            ["topic"],
        )
        self.policy_baseline = gauge(
            "refusal_guard_policy_baseline", "The loaded policy's calibration-time figures.", ["topic", "statistic"]
        )
        self.policy_info = gauge(
            "refusal_guard_policy_info", "The loaded policy (value 1).", ["version", "probe_template", "enforced"]
        )
        self.upstream_up = gauge("refusal_guard_upstream_up",
                                 "1 if the upstream answered its last health check (GET /models), else 0.", [])
        self.circuit_open = gauge("refusal_guard_probe_circuit_open",
                                  "Probe circuit breakers (one per upstream, model, query string and credentials) open or half-open.", [])

    def initialise(self, topics: tuple[str, ...], modes: tuple[str, ...], *, judging: bool = False) -> None:
        """Create every bounded label combination at zero (those with a model: :meth:`initialise_model`;
        ``judging``: a judge is configured, so the judged-outcome series too).

        A series that first appears with a non-zero value loses that first value in
        Prometheus' ``increase()``; starting each at 0 makes fleet-wide counts exact.
        """
        self._topics, self._modes, self.judging = topics, modes, judging
        for reason in ("timeout", "error", "rejected", "unparseable", "unsupported_content", "circuit_open"):
            self.probe_failures.labels(reason)
        for reason in ("connect", "timeout", "protocol", "too_large", "status_4xx", "status_5xx"):
            self.upstream_errors.labels(reason)
        for result in ("hit", "miss", "shared"):
            self.probe_cache.labels(result)
        for result in ("healthy", "unhealthy"):
            self.probe_checks.labels(result)

    def initialise_model(self, model: str) -> None:
        """Create the request and outcome series of one ``model`` label value at zero (after :meth:`initialise`)."""
        for topic in (*self._topics, "other"):
            for predicted in ("refuse", "comply"):
                for actual in ("refused", "complied"):
                    self.outcomes.labels(topic, predicted, actual, model)
            for confidence in "12345":
                for correct in ("true", "false"):
                    self.confidence_outcomes.labels(topic, confidence, correct, model)
            for predicted in ("refuse", "comply") if self.judging else ():
                for detector in ("refused", "complied"):
                    for judge in ("refused", "complied"):
                        self.judged_outcomes.labels(topic, predicted, detector, judge, model)
        for mode in self._modes:
            for action in ("pass", "block", "review", "invalid"):
                self.requests.labels(action, mode, model)

    @staticmethod
    def absent(gauge: Gauge, *labels: str) -> None:
        """Withdraw a labelled gauge value: removed, or NaN in multiprocess mode (which cannot remove)."""
        gauge.labels(*labels).set(float("nan"))
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            gauge.remove(*labels)

    def render(self) -> tuple[bytes, str]:
        """The exposition text; merged across worker processes in multiprocess mode."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
