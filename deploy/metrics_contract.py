"""The metrics every refusal-guard replica exports (the contract the rules and dashboard rely on).

Machine-readable, for tests and tools: ``METRICS`` maps each exported sample name to its label
names. Counters appear with their ``_total`` suffix (prometheus-client naming); histograms with
``_bucket``/``_count``/``_sum``. ``PROMETHEUS_SYNTHETIC`` are series Prometheus adds itself.
"""

from __future__ import annotations

TOPICS = ("weapons", "drugs", "hacking", "self_harm", "hate_speech", "fraud", "privacy",
          "illegal_activities", "manipulation", "violence", "other")

COUNTERS = {
    "refusal_guard_requests_total": ("action", "mode", "model"),
    "refusal_guard_outcomes_total": ("topic", "predicted", "actual", "model"),
    "refusal_guard_confidence_outcomes_total": ("topic", "confidence", "correct", "model"),
    "refusal_guard_probe_failures_total": ("reason",),
    "refusal_guard_probe_cache_total": ("result",),
    "refusal_guard_probe_checks_total": ("result",),
    "refusal_guard_datapoints_dropped_total": (),
    "refusal_guard_upstream_errors_total": ("reason",),
    "refusal_guard_http_requests_total": ("route", "status"),
    # with an LLM judge (judge_url): its audits, tokens and the judged sample behind the corrected figures
    "refusal_guard_judge_total": ("result",),
    "refusal_guard_judge_tokens_total": ("kind",),
    "refusal_guard_judged_outcomes_total": ("topic", "predicted", "detector", "judge", "model"),
    "refusal_guard_detector_stages_total": ("stage",),
}
HISTOGRAMS = {
    "refusal_guard_http_request_seconds": ("route",),
    "refusal_guard_probe_seconds": (),
    "refusal_guard_upstream_seconds": (),
    "refusal_guard_overhead_seconds": (),
}
GAUGES = {
    "refusal_guard_d_prime": ("topic",),
    "refusal_guard_criterion": ("topic",),
    "refusal_guard_hit_rate": ("topic",),
    "refusal_guard_false_alarm_rate": ("topic",),
    "refusal_guard_accuracy": ("topic",),
    "refusal_guard_ece": ("topic",),
    "refusal_guard_corrected": ("topic", "statistic", "bound"),
    "refusal_guard_window_judged": ("topic",),
    "refusal_guard_window_scored": ("topic",),
    "refusal_guard_window_sdt_defined": ("topic",),
    "refusal_guard_drift_statistic": ("topic", "metric"),
    "refusal_guard_drift_threshold": (),
    "refusal_guard_drift_alarm": ("topic",),
    "refusal_guard_drift_last_alarm_timestamp_seconds": ("topic",),
    "refusal_guard_drift_compared": ("topic",),
    "refusal_guard_policy_baseline": ("topic", "statistic"),
    "refusal_guard_policy_info": ("version", "probe_template", "enforced"),
    "refusal_guard_probe_circuit_open": (),
    "refusal_guard_upstream_up": (),
}
PROMETHEUS_SYNTHETIC = {"up": (), "scrape_duration_seconds": (), "scrape_samples_scraped": ()}

METRICS: dict[str, tuple[str, ...]] = {
    **COUNTERS,
    **{f"{name}{suffix}": labels + (("le",) if suffix == "_bucket" else ())
       for name, labels in HISTOGRAMS.items() for suffix in ("_bucket", "_count", "_sum")},
    **GAUGES,
}
