#!/usr/bin/env python3
"""Write the promtool unit tests of the refusal-guard rules, with expected values from Python.

    python deploy/prometheus/tests/generate.py                 # rewrite refusal_guard_test.yml here
    python deploy/prometheus/tests/generate.py --out DIR       # write DIR/refusal_guard_test.yml
                                                               #   (rule files by absolute path)
    promtool test rules deploy/prometheus/tests/refusal_guard_test.yml

Two replicas (instances a and b of job "refusal-guard") export counters that grow linearly, minute
by minute, for 120 minutes. Expected SDT figures at 120m come from
``calibration.sdt.sdt_from_counts`` (hit rate, false-alarm rate, accuracy) and, for d' and c, from
the same Abramowitz-Stegun arithmetic the rules use (``promsdt.as_ppf``), after checking that it
is within the approximation's error bound of ``sdt_from_counts``'s exact d' and c. Values are
compared after PromQL ``round(v, 1e-6)`` so that last-bit differences between Go's and Python's
``ln`` cannot fail a test. A second test ("quiet fleet") expects no alert at all.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PROM = HERE.parent
REPO = PROM.parent.parent
sys.path.insert(0, str(PROM))
sys.path.insert(0, str(REPO))
from promsdt import AS_MAX_ABS_ERROR, as_ppf, round_like_promql  # noqa: E402

try:
    from calibration.sdt import sdt_from_counts
except ImportError:  # pragma: no cover - only before calibration.sdt exists
    sdt_from_counts = None

RULE_FILES = ("refusal_guard_recording.yml", "refusal_guard_alerts.yml")
OUTPUT = "refusal_guard_test.yml"
JOB = "refusal-guard"
REPLICAS = ("a:8080", "b:8080")
T = 120  # evaluation time, minutes
ROUND = 1e-6
WINDOWS = {"5m": 5, "1h": 60}
CELLS = {("refuse", "refused"): "hits", ("comply", "refused"): "misses",
         ("refuse", "complied"): "false_alarms", ("comply", "complied"): "correct_rejections"}


# --------------------------------------------------------------------------- input series
class Fleet:
    """Series of the test, each a list of values at minutes 0..T (None = no sample)."""

    def __init__(self) -> None:
        self.series: dict[str, list[float]] = {}

    def add(self, name: str, labels: dict[str, str], values: list[float]) -> None:
        key = name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        assert len(values) == T + 1 and key not in self.series, key
        self.series[key] = values

    def counter(self, name: str, instance: str, per_minute, **labels: str) -> None:
        """A counter starting at 0 growing by per_minute(t) between minute t-1 and t."""
        values, total = [0.0], 0.0
        for t in range(1, T + 1):
            total += per_minute(t) if callable(per_minute) else per_minute
            values.append(total)
        self.add(name, {"job": JOB, "instance": instance, **labels}, values)

    def gauge(self, name: str, instance: str, value_at, **labels: str) -> None:
        self.add(name, {"job": JOB, "instance": instance, **labels},
                 [float(value_at(t) if callable(value_at) else value_at) for t in range(T + 1)])

    def increase(self, name: str, window: int, **match: str) -> dict[tuple, float]:
        """v(T) - v(T - window) per series (exact for these series, see module doc)."""
        out = {}
        for key, values in self.series.items():
            if not key.startswith(name + "{"):
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', key[len(name):]))
            if all(labels.get(k) == v for k, v in match.items()):
                out[tuple(sorted(labels.items()))] = values[T] - values[T - window]
        return out

    def input_series(self) -> list[dict[str, str]]:
        return [{"series": key, "values": encode(values)} for key, values in self.series.items()]


def fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def encode(values: list[float]) -> str:
    """promtool's expanding notation: runs of equal steps as 'a+bxn' (n+1 values)."""
    parts, i = [], 0
    while i < len(values):
        if i + 1 == len(values):
            parts.append(fmt(values[i]))
            break
        step = values[i + 1] - values[i]
        j = i + 1
        while j + 1 < len(values) and values[j + 1] - values[j] == step:
            j += 1
        sign = "+" if step >= 0 else "-"
        parts.append(f"{fmt(values[i])}{sign}{fmt(abs(step))}x{j - i}")
        i = j + 1
    return " ".join(parts)


# --------------------------------------------------------------------------- expectations
def sdt(h: float, m: float, fa: float, cr: float) -> dict[str, float]:
    """Expected figures of one cell: exact from calibration.sdt, z via the rules' approximation."""
    hr = (h + 0.5) / (h + m + 1)
    far = (fa + 0.5) / (fa + cr + 1)
    zh, zf = as_ppf(hr), as_ppf(far)
    out = {"hit_rate": hr, "false_alarm_rate": far, "d_prime": zh - zf, "criterion": -(zh + zf) / 2,
           "accuracy": (h + cr) / (h + m + fa + cr), "scored": h + m + fa + cr,
           "sdt_defined": float(h + m > 0 and fa + cr > 0)}
    if sdt_from_counts is not None:
        exact = sdt_from_counts(h, m, fa, cr)
        assert math.isclose(exact.hit_rate, hr, rel_tol=1e-12) and math.isclose(exact.false_alarm_rate, far, rel_tol=1e-12)
        assert math.isclose(exact.accuracy, out["accuracy"], rel_tol=1e-12)
        assert abs(exact.d_prime - out["d_prime"]) <= 2 * AS_MAX_ABS_ERROR, (exact.d_prime, out["d_prime"])
        assert abs(exact.criterion - out["criterion"]) <= AS_MAX_ABS_ERROR, (exact.criterion, out["criterion"])
        out.update(hit_rate=exact.hit_rate, false_alarm_rate=exact.false_alarm_rate, accuracy=exact.accuracy)
    return out


def sdt_by_topic(fleet: Fleet, window: int, key: str = "topic") -> dict[str, dict[str, float]]:
    """Expected figures per topic (and "all"), or per model with ``key="model"``."""
    cells: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(CELLS.values(), 0.0))
    for labels, inc in fleet.increase("refusal_guard_outcomes_total", window).items():
        lab = dict(labels)
        cell = CELLS[(lab["predicted"], lab["actual"])]
        cells[lab[key]][cell] += inc
        if key == "topic":
            cells["all"][cell] += inc
    return {topic: sdt(c["hits"], c["misses"], c["false_alarms"], c["correct_rejections"])
            for topic, c in cells.items()}


def total(fleet: Fleet, name: str, window: int, **match: str) -> float:
    return sum(fleet.increase(name, window, **match).values())


def go_value(v: float) -> str:
    """How Go's text/template prints a float64 ({{ $value }})."""
    return str(int(v)) if float(v).is_integer() else repr(v)


def render(template: str, labels: dict[str, str], value: float) -> str:
    """Prometheus alert templating, for the constructs refusal_guard_alerts.yml uses."""
    def sub(match: re.Match) -> str:
        expr = match.group(1).strip()
        if expr.startswith("$labels."):
            return labels[expr[len("$labels."):]]
        if expr == "$value":
            return go_value(value)
        if expr == "$value | humanizePercentage":
            return "%.4g%%" % (value * 100)
        fmt_match = re.fullmatch(r'\$value \| printf "(%\.\d+f)"', expr)
        if fmt_match:
            return fmt_match.group(1) % value
        raise ValueError(f"template construct not mirrored: {expr}")
    return re.sub(r"\{\{(.*?)\}\}", sub, template)


class Alerts:
    def __init__(self) -> None:
        doc = yaml.safe_load((PROM / "rules" / "refusal_guard_alerts.yml").read_text(encoding="utf-8"))
        self.rules = {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}
        self.thresholds = {r["labels"]["threshold"]: float(r["expr"].strip()[len("vector("):-1])
                           for g in doc["groups"] for r in g["rules"]
                           if r.get("record") == "refusal_guard:alert_threshold"}
        self.expected: dict[str, list[dict]] = {name: [] for name in self.rules}

    def fire(self, name: str, value: float, **labels: str) -> None:
        rule = self.rules[name]
        all_labels = {**labels, **rule["labels"]}
        self.expected[name].append({
            "exp_labels": all_labels,
            "exp_annotations": {k: render(v, all_labels, value) for k, v in rule["annotations"].items()},
        })

    def tests(self) -> list[dict]:
        return [{"eval_time": f"{T}m", "alertname": name, "exp_alerts": alerts}
                for name, alerts in self.expected.items()]


# --------------------------------------------------------------------------- scenarios
OUTCOMES = {  # topic -> replica -> {(predicted, actual): per minute}
    "weapons": {"a:8080": {("refuse", "refused"): 3, ("comply", "refused"): 1, ("refuse", "complied"): 1,
                           ("comply", "complied"): 2},
                "b:8080": {("refuse", "refused"): 2, ("comply", "refused"): 1, ("comply", "complied"): 3}},
    # no hit and no false alarm series at all: the rules must count them as 0
    "drugs": {"a:8080": {("comply", "refused"): 1, ("comply", "complied"): 2},
              "b:8080": {("comply", "complied"): 1}},
    # hits == misses: H = 0.5 exactly, z(H) = 0 (the symmetric branch point)
    "fraud": {"a:8080": {("refuse", "refused"): 1, ("comply", "refused"): 1, ("refuse", "complied"): 1,
                         ("comply", "complied"): 3}},
    # mostly right, FA > 0.5 side of the symmetry exercised through 'other'
    "other": {"b:8080": {("refuse", "refused"): 1, ("refuse", "complied"): 4, ("comply", "complied"): 1}},
    # no refusal at all: H, FA, d' and c must be absent (sdt_defined 0), accuracy and scored present
    "privacy": {"a:8080": {("comply", "complied"): 2, ("refuse", "complied"): 1}},
}
#: a second model's outcomes (the rest are model "alpha"): topic figures sum the model label away
BETA_OUTCOMES = {
    "weapons": {"b:8080": {("refuse", "refused"): 1, ("refuse", "complied"): 2}},
    "fraud": {"a:8080": {("comply", "complied"): 2, ("comply", "refused"): 1}},
}
#: judged sample (LLM judge): topic -> (model, replica) -> {(predicted, detector, judge): per minute}
JUDGED = {
    # every stratum judged
    "weapons": {("alpha", "a:8080"): {("refuse", "refused", "refused"): 1, ("refuse", "refused", "complied"): 0.25,
                                      ("comply", "refused", "refused"): 0.5, ("comply", "refused", "complied"): 0.5,
                                      ("refuse", "complied", "refused"): 0.25, ("refuse", "complied", "complied"): 0.5,
                                      ("comply", "complied", "complied"): 1, ("comply", "complied", "refused"): 0.25},
                ("beta", "b:8080"): {("refuse", "complied", "refused"): 0.5}},
    # (comply, refused) and (refuse, complied) unjudged: the share pooled over the prediction
    "fraud": {("alpha", "a:8080"): {("refuse", "refused", "refused"): 0.5, ("refuse", "refused", "complied"): 0.25,
                                    ("comply", "complied", "complied"): 1}},
    # no judged row with detector "complied": those strata keep the detector's label
    "other": {("alpha", "b:8080"): {("refuse", "refused", "refused"): 0.5}},
    # drugs and privacy: no judged row at all, so no corrected figure
}
#: figures that exist only while a window holds both classes
NEEDS_BOTH = ("hit_rate", "false_alarm_rate", "d_prime", "criterion")


def add_outcomes(fleet: Fleet) -> None:
    for model, outcomes in (("alpha", OUTCOMES), ("beta", BETA_OUTCOMES)):
        for topic, replicas in outcomes.items():
            for instance, cells in replicas.items():
                for (predicted, actual), per_minute in cells.items():
                    fleet.counter("refusal_guard_outcomes_total", instance, per_minute,
                                  topic=topic, predicted=predicted, actual=actual, model=model)


def add_judged(fleet: Fleet) -> None:
    for topic, sources in JUDGED.items():
        for (model, instance), cells in sources.items():
            for (predicted, detector, judge), per_minute in cells.items():
                fleet.counter("refusal_guard_judged_outcomes_total", instance, per_minute, topic=topic,
                              predicted=predicted, detector=detector, judge=judge, model=model)


def corrected_by_topic(fleet: Fleet, window: int) -> dict[str, dict[str, float]]:
    """Expected judge-corrected figures per topic (and "all") with judged rows: calibration.label_error."""
    import numpy as np

    from calibration.label_error import estimate_counts

    t: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(12))
    for labels, inc in fleet.increase("refusal_guard_outcomes_total", window).items():
        lab = dict(labels)
        k = 2 * (lab["predicted"] == "refuse") + (lab["actual"] == "refused")
        for key in (lab["topic"], "all"):
            t[key][k] += inc
    for labels, inc in fleet.increase("refusal_guard_judged_outcomes_total", window).items():
        lab = dict(labels)
        k = 2 * (lab["predicted"] == "refuse") + (lab["detector"] == "refused")
        for key in (lab["topic"], "all"):
            t[key][4 + k] += inc
            t[key][8 + k] += inc if lab["judge"] == "refused" else 0.0
    return {topic: sdt(*(float(x) for x in estimate_counts(v))) for topic, v in t.items() if v[4:8].sum() > 0}


def troubled_fleet() -> tuple[Fleet, list[dict], Alerts]:
    """Every alert has a reason to fire (or, for some topics, a reason not to)."""
    f = Fleet()
    add_outcomes(f)
    add_judged(f)
    live = {w: sdt_by_topic(f, n) for w, n in WINDOWS.items()}
    live_1h = live["1h"]
    baseline = {  # topic -> statistic -> value
        "weapons": {"d_prime": live_1h["weapons"]["d_prime"] + 1.0, "criterion": live_1h["weapons"]["criterion"]},
        "drugs": {"d_prime": live_1h["drugs"]["d_prime"] - 0.1, "criterion": live_1h["drugs"]["criterion"] + 0.8},
        "fraud": {"d_prime": live_1h["fraud"]["d_prime"], "criterion": live_1h["fraud"]["criterion"] - 0.3},
        "all": {"d_prime": live_1h["all"]["d_prime"] + 0.2, "criterion": live_1h["all"]["criterion"]},
    }
    for instance in REPLICAS:
        for topic, stats in baseline.items():
            for statistic, value in stats.items():
                f.gauge("refusal_guard_policy_baseline", instance, round(value, 6), topic=topic, statistic=statistic)
    # drift: replica b alarms on hacking from minute 60
    f.gauge("refusal_guard_drift_alarm", "a:8080", 0, topic="hacking")
    f.gauge("refusal_guard_drift_alarm", "b:8080", lambda t: 1 if t >= 60 else 0, topic="hacking")
    f.gauge("refusal_guard_drift_alarm", "a:8080", 0, topic="all")
    # probe: 10 calls/min per replica, a has 2 timeouts/min, b skips 3/min with the circuit open
    for instance in REPLICAS:
        f.counter("refusal_guard_probe_seconds_count", instance, 10)
    f.counter("refusal_guard_probe_failures_total", "a:8080", 2, reason="timeout")
    f.counter("refusal_guard_probe_failures_total", "b:8080", 3, reason="circuit_open")
    f.gauge("refusal_guard_probe_circuit_open", "a:8080", 0)
    f.gauge("refusal_guard_probe_circuit_open", "b:8080", 1)
    # actions: a's block rate jumps from 1/min to 15/min at minute 100; b also runs a shadow policy whose
    # "would block" jumps from 2/min to 30/min at minute 100 (kept apart: the info alert, not the page)
    f.counter("refusal_guard_requests_total", "a:8080", 15, action="pass", mode="sequential", model="alpha")
    f.counter("refusal_guard_requests_total", "a:8080", 5, action="pass", mode="sequential", model="beta")
    f.counter("refusal_guard_requests_total", "a:8080", lambda t: 15 if t > 100 else 1, action="block", mode="sequential",
              model="alpha")
    f.counter("refusal_guard_requests_total", "b:8080", 20, action="pass", mode="sequential", model="alpha")
    f.counter("refusal_guard_requests_total", "b:8080", 1, action="review", mode="sequential", model="other")
    f.counter("refusal_guard_requests_total", "b:8080", 20, action="pass", mode="shadow", model="alpha")
    f.counter("refusal_guard_requests_total", "b:8080", lambda t: 30 if t > 100 else 2, action="block", mode="shadow",
              model="alpha")
    # upstream: 20 exchanges/min per replica; a: 3 5xx/min (counted) and 5 4xx/min (not counted)
    for instance in REPLICAS:
        f.counter("refusal_guard_upstream_seconds_count", instance, 20)
    f.counter("refusal_guard_upstream_errors_total", "a:8080", 3, reason="status_5xx")
    f.counter("refusal_guard_upstream_errors_total", "a:8080", 5, reason="status_4xx")
    # replicas: b stops answering scrapes at minute 100; b drops 5 datapoints at minute 111
    f.add("up", {"job": JOB, "instance": "a:8080"}, [1.0] * (T + 1))
    f.add("up", {"job": JOB, "instance": "b:8080"}, [1.0 if t < 100 else 0.0 for t in range(T + 1)])
    f.counter("refusal_guard_datapoints_dropped_total", "a:8080", 0)
    f.counter("refusal_guard_datapoints_dropped_total", "b:8080", lambda t: 5 if t == 111 else 0)
    # policy: b loaded v2, fitted with another probe template (not enforced)
    f.gauge("refusal_guard_policy_info", "a:8080", 1, version="v1", probe_template="t1", enforced="true")
    f.gauge("refusal_guard_policy_info", "b:8080", 1, version="v2", probe_template="t0", enforced="false")

    # ---- expected recording-rule values
    exprs: list[dict] = []
    labels_of = lambda **kw: "{" + ", ".join(f'{k}="{v}"' for k, v in {"job": JOB, **kw}.items()) + "}"  # noqa: E731

    def figures(record: str, key: str, by_value: dict[str, dict]) -> None:
        """Expected values of one SDT figure family (``refusal_guard:<stat><record>``), one sample per ``key``."""
        for stat in ("hit_rate", "false_alarm_rate", "d_prime", "criterion", "accuracy", "scored", "sdt_defined"):
            exprs.append({
                "expr": f"round(refusal_guard:{stat}{record}, {ROUND})",
                "eval_time": f"{T}m",
                "exp_samples": [{"labels": labels_of(**{key: value}), "value": round_like_promql(vals[stat], ROUND)}
                                for value, vals in sorted(by_value.items())
                                if vals["sdt_defined"] or stat not in NEEDS_BOTH],
            })

    for w in WINDOWS:
        figures(f":{w}", "topic", live[w])
    assert not live["1h"]["privacy"]["sdt_defined"]
    for w, n in WINDOWS.items():  # judge-corrected, per topic with judged rows
        corrected = corrected_by_topic(f, n)
        assert set(corrected) == {"weapons", "fraud", "other", "all"}
        figures(f"_corrected:{w}", "topic", corrected)
    for w, n in WINDOWS.items():  # per model: the same figures by (job, model)
        by_model = sdt_by_topic(f, n, key="model")
        assert set(by_model) == {"alpha", "beta"}
        figures(f"_by_model:{w}", "model", by_model)
        requests = defaultdict(float)
        for labels, inc in f.increase("refusal_guard_requests_total", n).items():
            lab = dict(labels)
            requests[(lab["model"], lab["mode"], lab["action"])] += inc
        exprs.append({"expr": f"round(refusal_guard:requests_by_model:{w}, {ROUND})", "eval_time": f"{T}m",
                      "exp_samples": [{"labels": labels_of(model=m, mode=mode, action=a), "value": v}
                                      for (m, mode, a), v in sorted(requests.items())]})
    share5 = {}
    for mode in ("sequential", "shadow"):
        requests5 = {a: total(f, "refusal_guard_requests_total", 5, action=a, mode=mode)
                     for a in ("pass", "block", "review")}
        requests5 = {a: v for a, v in requests5.items()
                     if any(f'action="{a}"' in k and f'mode="{mode}"' in k for k in f.series)}
        n5 = sum(requests5.values())
        share5[mode] = (requests5["block"] / n5, n5)
        for a, v in sorted(requests5.items()):
            exprs.append({"expr": f'round(refusal_guard:action_share:5m{{mode="{mode}", action="{a}"}}, {ROUND})',
                          "eval_time": f"{T}m",
                          "exp_samples": [{"labels": labels_of(mode=mode, action=a),
                                           "value": round_like_promql(v / n5, ROUND)}]})
    failures = {w: total(f, "refusal_guard_probe_failures_total", n) for w, n in WINDOWS.items()}
    attempts = {w: total(f, "refusal_guard_probe_seconds_count", n)
                + total(f, "refusal_guard_probe_failures_total", n, reason="circuit_open") for w, n in WINDOWS.items()}
    probe_ratio = {w: failures[w] / attempts[w] for w in WINDOWS}
    upstream_ratio = {w: total(f, "refusal_guard_upstream_errors_total", n, reason="status_5xx")
                      / total(f, "refusal_guard_upstream_seconds_count", n) for w, n in WINDOWS.items()}
    for w in WINDOWS:
        exprs.append({"expr": f"round(refusal_guard:probe_failure_ratio:{w}, {ROUND})", "eval_time": f"{T}m",
                      "exp_samples": [{"labels": labels_of(), "value": round_like_promql(probe_ratio[w], ROUND)}]})
        exprs.append({"expr": f"round(refusal_guard:upstream_error_ratio:{w}, {ROUND})", "eval_time": f"{T}m",
                      "exp_samples": [{"labels": labels_of(), "value": round_like_promql(upstream_ratio[w], ROUND)}]})

    # ---- expected alerts at T
    alerts = Alerts()
    th = alerts.thresholds
    for topic in sorted(baseline):
        vals = live_1h[topic]
        if vals["scored"] >= th["min_scored"]:
            if vals["d_prime"] < baseline[topic]["d_prime"] - th["d_prime_margin"]:
                alerts.fire("RefusalGuardDPrimeBelowBaseline", vals["d_prime"], job=JOB, topic=topic)
            shift = abs(vals["criterion"] - round(baseline[topic]["criterion"], 6))
            if shift > th["criterion_shift"]:
                alerts.fire("RefusalGuardCriterionShifted", shift, job=JOB, topic=topic)
    alerts.fire("RefusalGuardDriftAlarm", 1, job=JOB, topic="hacking")
    assert probe_ratio["5m"] > th["probe_failure_ratio"]
    alerts.fire("RefusalGuardProbeFailureRatioHigh", probe_ratio["5m"], job=JOB)
    alerts.fire("RefusalGuardProbeCircuitOpen", 1, job=JOB, instance="b:8080")
    for mode, name in (("sequential", "RefusalGuardBlockRateSpike"), ("shadow", "RefusalGuardShadowBlockRateSpike")):
        block_share_5m, n5 = share5[mode]
        series = [k for k in f.series if k.startswith("refusal_guard_requests_total{") and f'mode="{mode}"' in k]
        blocks_before = sum(f.series[k][T - 30] - f.series[k][T - 90] for k in series if 'action="block"' in k)
        requests_before = sum(f.series[k][T - 30] - f.series[k][T - 90] for k in series)
        assert block_share_5m > th["block_spike_factor"] * blocks_before / requests_before
        assert block_share_5m > th["block_spike_min_share"] and n5 >= th["block_spike_min_requests"]
        alerts.fire(name, block_share_5m, job=JOB, mode=mode, action="block")
    assert upstream_ratio["5m"] > th["upstream_error_ratio"]
    alerts.fire("RefusalGuardUpstreamErrors", upstream_ratio["5m"], job=JOB)
    alerts.fire("RefusalGuardReplicaDown", 0, job=JOB, instance="b:8080")
    alerts.fire("RefusalGuardDatapointsDropped", 5, job=JOB, instance="b:8080")
    alerts.fire("RefusalGuardPolicyNotEnforced", 1, job=JOB, instance="b:8080", version="v2")
    alerts.fire("RefusalGuardPolicyVersionSkew", 2, job=JOB)
    return f, exprs, alerts


def quiet_fleet() -> tuple[Fleet, Alerts]:
    """The same traffic, baselines equal to the live figures, nothing failing: no alert."""
    f = Fleet()
    add_outcomes(f)
    live_1h = sdt_by_topic(f, 60)
    for instance in REPLICAS:
        for topic, vals in live_1h.items():
            for statistic in ("d_prime", "criterion"):
                f.gauge("refusal_guard_policy_baseline", instance, round(vals[statistic], 6),
                        topic=topic, statistic=statistic)
        f.gauge("refusal_guard_drift_alarm", instance, 0, topic="all")
        f.counter("refusal_guard_probe_seconds_count", instance, 10)
        f.counter("refusal_guard_probe_failures_total", instance, lambda t: 1 if t % 10 == 0 else 0, reason="timeout")
        f.gauge("refusal_guard_probe_circuit_open", instance, 0)
        f.counter("refusal_guard_requests_total", instance, 20, action="pass", mode="sequential", model="alpha")
        f.counter("refusal_guard_requests_total", instance, 2, action="block", mode="sequential", model="alpha")
        # a shadow rollout from minute 100 whose policy would block half the requests: no page (no history
        # in shadow mode, and the sequential share is unchanged)
        f.counter("refusal_guard_requests_total", instance, lambda t: 10 if t > 100 else 0, action="pass", mode="shadow",
                  model="alpha")
        f.counter("refusal_guard_requests_total", instance, lambda t: 10 if t > 100 else 0, action="block", mode="shadow",
                  model="alpha")
        f.counter("refusal_guard_upstream_seconds_count", instance, 20)
        f.counter("refusal_guard_upstream_errors_total", instance, lambda t: 1 if t % 10 == 0 else 0, reason="status_5xx")
        f.add("up", {"job": JOB, "instance": instance}, [1.0] * (T + 1))
        f.counter("refusal_guard_datapoints_dropped_total", instance, 0)
        f.gauge("refusal_guard_policy_info", instance, 1, version="v1", probe_template="t1", enforced="true")
    return f, Alerts()


def document(rule_dir: str) -> dict:
    troubled, exprs, alerts = troubled_fleet()
    quiet, no_alerts = quiet_fleet()
    return {
        "rule_files": [f"{rule_dir}/{name}" for name in RULE_FILES],
        "evaluation_interval": "1m",
        "tests": [
            {"name": "troubled fleet", "interval": "1m", "input_series": troubled.input_series(),
             "promql_expr_test": exprs, "alert_rule_test": alerts.tests()},
            {"name": "quiet fleet", "interval": "1m", "input_series": quiet.input_series(),
             "alert_rule_test": no_alerts.tests()},
        ],
    }


def write(out_dir: Path, rule_dir: str) -> Path:
    text = ("# GENERATED by deploy/prometheus/tests/generate.py -- do not edit; run it again.\n"
            + yaml.safe_dump(document(rule_dir), sort_keys=False, width=10_000))
    path = out_dir / OUTPUT
    path.write_text(text, encoding="utf-8")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory to write to (default: next to this script, "
                                                 "with rule files relative to it)")
    args = parser.parse_args()
    if args.out is None:
        path = write(HERE, "../rules")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        path = write(args.out, str(PROM / "rules"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
