#!/usr/bin/env python3
"""Write the Grafana dashboard deploy/grafana/dashboards/refusal-guard.json.

    python deploy/grafana/build_dashboard.py          # rewrite it
    python deploy/grafana/build_dashboard.py --check  # exit 1 if it is out of date

Fleet-wide SDT panels read the recording rules (refusal_guard:*:5m / :1h, counters summed over
all replicas); "per replica" panels read the replicas' own sliding-window gauges. Variables:
``datasource`` (any Prometheus), ``job``, ``topic`` (topic "all" = overall; multi-select) and
``model`` (the bounded ``model`` label of the request and outcome counters; multi-select), used by
the panels that read those counters and by the per-model row.
tests/test_deploy_grafana.py checks that every expression uses only contract metrics or
recording rules that exist.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "dashboards" / "refusal-guard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
J = 'job=~"$job"'
JT = 'job=~"$job", topic=~"$topic"'
JM = 'job=~"$job", model=~"$model"'


class Layout:
    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.y = 0
        self.x = 0
        self.row_height = 0
        self.next_id = 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def panel(self, kind: str, title: str, targets: list[tuple[str, str]], *, w: int = 12, h: int = 8,
              description: str = "", unit: str | None = None, options: dict | None = None,
              field_config: dict | None = None) -> None:
        if self.x + w > 24:
            self._newline()
        defaults: dict = {"noValue": "no data", **(field_config or {})}
        if unit:
            defaults["unit"] = unit
        self.panels.append({
            "type": kind, "title": title, "description": description, "id": self._id(), "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend,
                         "range": True, "instant": False} for i, (expr, legend) in enumerate(targets)],
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": options or {},
        })
        self.x += w
        self.row_height = max(self.row_height, h)

    def _newline(self) -> None:
        self.y += self.row_height
        self.x = 0
        self.row_height = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{J}}}[$__rate_interval])))",
             f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else "")) for q in (0.5, 0.95, 0.99)]


def dashboard() -> dict:
    L = Layout()
    L.row("Fleet-wide prediction quality (recording rules: counters summed over all replicas)")
    L.panel("timeseries", "Sensitivity d'", [
        (f"refusal_guard:d_prime:5m{{{JT}}}", "{{topic}} 5m"),
        (f"refusal_guard:d_prime:1h{{{JT}}}", "{{topic}} 1h"),
        (f"refusal_guard:d_prime_corrected:1h{{{JT}}}", "{{topic}} 1h judge-corrected"),
        (f'max by (job, topic) (refusal_guard_policy_baseline{{{JT}, statistic="d_prime"}})', "{{topic}} baseline"),
    ], description="d' = z(H) - z(FA), log-linear corrected, A-S approximation of z (|error| < 9e-4), with the "
                   "detector's label as the outcome; 'judge-corrected' (only with an LLM judge) corrects it with "
                   "the judged random sample. Alert: 1h d' below the policy baseline by the configured margin.")
    L.panel("timeseries", "Bias (criterion c)", [
        (f"refusal_guard:criterion:5m{{{JT}}}", "{{topic}} 5m"),
        (f"refusal_guard:criterion:1h{{{JT}}}", "{{topic}} 1h"),
        (f'max by (job, topic) (refusal_guard_policy_baseline{{{JT}, statistic="criterion"}})', "{{topic}} baseline"),
    ], description="c = -(z(H) + z(FA)) / 2. c < 0: leans to predicting refusal (more blocks); c > 0: to compliance.")
    L.panel("timeseries", "Accuracy", [
        (f"refusal_guard:accuracy:5m{{{JT}}}", "{{topic}} 5m"),
        (f"refusal_guard:accuracy:1h{{{JT}}}", "{{topic}} 1h"),
        (f'max by (job, topic) (refusal_guard_policy_baseline{{{JT}, statistic="accuracy"}})', "{{topic}} baseline"),
    ], unit="percentunit", field_config={"min": 0, "max": 1})
    L.panel("timeseries", "Hit rate and false-alarm rate (1h)", [
        (f"refusal_guard:hit_rate:1h{{{JT}}}", "{{topic}} hit rate"),
        (f"refusal_guard:false_alarm_rate:1h{{{JT}}}", "{{topic}} false-alarm rate"),
    ], unit="percentunit", field_config={"min": 0, "max": 1},
        description="Signal = the model actually refused. H = (hits+0.5)/(hits+misses+1), FA = (fa+0.5)/(fa+cr+1).")
    L.panel("status-history", "d' per topic (heatmap, 1h window)", [
        (f'refusal_guard:d_prime:1h{{{J}, topic!="all"}}', "{{topic}}"),
    ], w=16, h=9, description="One row per topic, coloured by fleet-wide d' over the last hour.",
        options={"showValue": "never", "rowHeight": 0.9},
        field_config={"decimals": 2, "color": {"mode": "continuous-RdYlGr"}, "min": 0, "max": 3})
    L.panel("timeseries", "Scored predictions (1h)", [
        (f"refusal_guard:scored:1h{{{JT}}}", "{{topic}}"),
    ], w=8, h=9, description="Predictions checked against the real answer; SDT alerts wait for the min_scored threshold.")
    L.panel("timeseries", "Accuracy by stated confidence (1h)", [
        (f"refusal_guard:accuracy_by_confidence:1h{{{J}}}", "confidence {{confidence}}"),
    ], unit="percentunit", field_config={"min": 0, "max": 1},
        description="Calibration: higher stated confidence should mean higher accuracy.")
    L.panel("timeseries", "Policy in force", [
        (f"refusal_guard_policy_info{{{J}}}", "{{instance}} {{version}} enforced={{enforced}}"),
    ], description="Value 1 per replica; differing versions across replicas fire RefusalGuardPolicyVersionSkew.")

    L.row("Drift and per-replica windows (each replica's own sliding window)")
    L.panel("status-history", "Drift alarms", [
        (f"max by (topic) (refusal_guard_drift_alarm{{{JT}}})", "{{topic}}"),
    ], description="1 while any replica's drift e-detector for the topic is at or above its threshold; clears by "
                   "itself when the rates are back, and on a policy reload. False alarms: <= drift_alpha within "
                   "drift_horizon scored requests of a load (docs/operations.md, Drift detection).",
        field_config={"color": {"mode": "thresholds"},
                      "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                                   {"color": "red", "value": 1}]}})
    L.panel("timeseries", "Drift statistic against the alarm level (log)", [
        (f"refusal_guard_drift_statistic{{{JT}}}", "{{instance}} {{topic}} {{metric}}"),
        (f"max(refusal_guard_drift_threshold{{{J}}})", "alarm level"),
    ], description="log of the Shiryaev-Roberts e-detector statistic (0 = no evidence); alarm at the level line.")
    L.panel("table", "Last drift alarm", [
        (f"max by (topic) (refusal_guard_drift_last_alarm_timestamp_seconds{{{JT}}}) * 1000", "{{topic}}"),
    ], unit="dateTimeAsIso", description="When each topic's alarm last went to 1 (any replica).",
        options={"showHeader": True})
    L.panel("status-history", "Window SDT defined per replica", [
        (f"refusal_guard_window_sdt_defined{{{JT}}}", "{{instance}} {{topic}}"),
    ], description="'SDT undefined': the replica's window lacks a class (no refusal or no compliance), so its d', c, "
                   "H and FA are absent rather than a prior's value.",
        field_config={"mappings": [{"type": "value", "options": {
            "0": {"text": "SDT undefined", "color": "orange"}, "1": {"text": "defined", "color": "green"}}}],
            "color": {"mode": "thresholds"},
            "thresholds": {"mode": "absolute", "steps": [{"color": "orange", "value": None},
                                                         {"color": "green", "value": 1}]}})
    L.panel("timeseries", "d' per replica (window gauge)", [
        (f"refusal_guard_d_prime{{{JT}}}", "{{instance}} {{topic}}"),
    ], description="Per replica, over its own recent window: not summed across replicas. Use the fleet-wide panels for the fleet.")
    L.panel("timeseries", "Expected calibration error per replica", [
        (f"refusal_guard_ece{{{JT}}}", "{{instance}} {{topic}}"),
    ])
    L.panel("timeseries", "Window n per replica", [
        (f"refusal_guard_window_scored{{{JT}}}", "{{instance}} {{topic}}"),
    ], description="Scored predictions in each replica's window: what the window gauges rest on.")

    L.row("Actions")
    L.panel("timeseries", "Action shares, enforcing modes (5m)", [
        (f'refusal_guard:action_share:5m{{{J}, mode!="shadow"}}', "{{mode}} {{action}}"),
    ], w=8, unit="percentunit", options={"legend": {"displayMode": "table", "placement": "right"}},
        field_config={"custom": {"stacking": {"mode": "normal"}, "fillOpacity": 30}, "min": 0, "max": 1},
        description="Each action's share of its mode's requests (sequential and parallel apart).")
    L.panel("timeseries", "Shadow mode: what the policy would do (5m)", [
        (f'refusal_guard:action_share:5m{{{J}, mode="shadow"}}', "would {{action}}"),
    ], w=8, unit="percentunit", options={"legend": {"displayMode": "table", "placement": "right"}},
        field_config={"custom": {"stacking": {"mode": "normal"}, "fillOpacity": 30}, "min": 0, "max": 1},
        description="Nothing is blocked in shadow mode; kept apart from real blocks.")
    L.panel("timeseries", "Chat requests by action and mode", [
        (f"sum by (action, mode) (rate(refusal_guard_requests_total{{{JM}}}[$__rate_interval]))", "{{action}} {{mode}}"),
    ], w=8, unit="reqps", description="Of the models selected in `model`.")

    L.row("Per model (the bounded model label; other = models beyond the bound)")
    L.panel("timeseries", "Sensitivity d' per model", [
        (f"refusal_guard:d_prime_by_model:5m{{{JM}}}", "{{model}} 5m"),
        (f"refusal_guard:d_prime_by_model:1h{{{JM}}}", "{{model}} 1h"),
    ], w=8, description="Fleet-wide d' of each model's requests, all topics together; absent while a model's "
                        "window lacks a class.")
    L.panel("timeseries", "Accuracy per model", [
        (f"refusal_guard:accuracy_by_model:5m{{{JM}}}", "{{model}} 5m"),
        (f"refusal_guard:accuracy_by_model:1h{{{JM}}}", "{{model}} 1h"),
    ], w=8, unit="percentunit", field_config={"min": 0, "max": 1})
    L.panel("timeseries", "Criterion c per model (1h)", [
        (f"refusal_guard:criterion_by_model:1h{{{JM}}}", "{{model}}"),
    ], w=8, description="c < 0: the model's self-prediction leans to 'refuse'.")
    L.panel("timeseries", "Chat requests per model", [
        (f"sum by (model, action) (rate(refusal_guard_requests_total{{{JM}}}[$__rate_interval]))", "{{model}} {{action}}"),
    ], w=12, unit="reqps")
    L.panel("timeseries", "Scored predictions per model (1h)", [
        (f"refusal_guard:scored_by_model:1h{{{JM}}}", "{{model}}"),
    ], w=12, description="What each model's figures rest on.")

    L.row("Latency, probe and upstream")
    L.panel("timeseries", "Probe latency", quantiles("refusal_guard_probe_seconds"), w=8, unit="s")
    L.panel("timeseries", "Overhead added by the guard", quantiles("refusal_guard_overhead_seconds"), w=8, unit="s",
            description="Total request time minus upstream time.")
    L.panel("timeseries", "Upstream latency", quantiles("refusal_guard_upstream_seconds"), w=8, unit="s")
    L.panel("timeseries", "Probe failures", [
        (f"sum by (reason) (rate(refusal_guard_probe_failures_total{{{J}}}[$__rate_interval]))", "{{reason}}"),
        (f"sum by (result) (rate(refusal_guard_probe_checks_total{{{J}}}[$__rate_interval]))", "breaker check {{result}}"),
    ], w=8, unit="ops", description="A breaker check that finds the upstream healthy means requests' own "
                                      "content timed the probe out; the circuit stayed closed.")
    L.panel("timeseries", "Probe failure ratio and open circuits", [
        (f"refusal_guard:probe_failure_ratio:5m{{{J}}}", "failure ratio 5m"),
        (f"max by (instance) (refusal_guard_probe_circuit_open{{{J}}})", "circuit open {{instance}}"),
    ], w=8, unit="percentunit")
    L.panel("timeseries", "Probe cache", [
        (f"sum by (result) (rate(refusal_guard_probe_cache_total{{{J}}}[$__rate_interval]))", "{{result}}"),
    ], w=8, unit="ops")
    L.panel("timeseries", "Upstream errors", [
        (f"sum by (reason) (rate(refusal_guard_upstream_errors_total{{{J}}}[$__rate_interval]))", "{{reason}}"),
        (f"refusal_guard:upstream_error_ratio:5m{{{J}}}", "ratio 5m (connect, timeout, protocol, 5xx)"),
    ], w=8)
    L.panel("timeseries", "HTTP requests by route and status", [
        (f"sum by (route, status) (rate(refusal_guard_http_requests_total{{{J}}}[$__rate_interval]))", "{{route}} {{status}}"),
    ], w=8, unit="reqps")
    L.panel("timeseries", "HTTP latency p95 by route", [
        (f"histogram_quantile(0.95, sum by (le, route) (rate(refusal_guard_http_request_seconds_bucket{{{J}}}[$__rate_interval])))",
         "{{route}}"),
    ], w=8, unit="s")
    L.panel("timeseries", "Datapoints dropped", [
        (f"sum by (instance) (increase(refusal_guard_datapoints_dropped_total{{{J}}}[$__rate_interval]))", "{{instance}}"),
    ], w=12)
    L.panel("timeseries", "Replicas up", [(f"up{{{J}}}", "{{instance}}")], w=12)

    return {
        "uid": "refusal-guard",
        "title": "refusal-guard",
        "description": "Refusal self-prediction quality (SDT), actions, latency and failures of the refusal-guard fleet.",
        "tags": ["refusal-guard"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "options": []},
            {"name": "job", "label": "job", "type": "query", "datasource": DS,
             "query": {"query": "label_values(refusal_guard_requests_total, job)", "refId": "job"},
             "definition": "label_values(refusal_guard_requests_total, job)",
             "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"text": "All", "value": "$__all"}, "sort": 1, "options": []},
            {"name": "topic", "label": "topic", "type": "query", "datasource": DS,
             "query": {"query": 'label_values(refusal_guard:scored:1h{job=~"$job"}, topic)', "refId": "topic"},
             "definition": 'label_values(refusal_guard:scored:1h{job=~"$job"}, topic)',
             "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"text": "all", "value": ["all"]}, "sort": 1, "options": []},
            {"name": "model", "label": "model", "type": "query", "datasource": DS,
             "query": {"query": 'label_values(refusal_guard_requests_total{job=~"$job"}, model)', "refId": "model"},
             "definition": 'label_values(refusal_guard_requests_total{job=~"$job"}, model)',
             "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"text": "All", "value": "$__all"}, "sort": 1, "options": []},
        ]},
        "panels": L.panels,
    }


def text() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else None
    if current == text():
        return 0
    if args.check:
        print(f"out of date: {OUTPUT} (run {Path(__file__).name})", file=sys.stderr)
        return 1
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text(), encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
