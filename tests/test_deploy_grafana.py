"""deploy/grafana: provisioning and the dashboard, whose queries may use only contract metrics
(deploy/metrics_contract.py) and recording rules that exist in deploy/prometheus/rules."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "refusal-guard.json"
RULES = REPO / "deploy" / "prometheus" / "rules"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


contract = _load(REPO / "deploy" / "metrics_contract.py", "refusal_guard_metrics_contract")
build_dashboard = _load(GRAFANA / "build_dashboard.py", "refusal_guard_build_dashboard")

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
             "unless", "inf", "nan", "Inf", "NaN"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (functions, keywords, labels and numbers left out)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range and subquery selectors
    e = re.sub(r"\boffset\s+-?[0-9a-z$_]+", " ", e)  # offset durations
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # grouping labels
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables
    e = re.sub(r"(?<![\w:])[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?", " ", e)  # numbers
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[match.end():].lstrip().startswith("(") or match.group() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(match.group())
    return names


def recorded_names() -> set[str]:
    return {r["record"] for path in sorted(RULES.glob("*.yml"))
            for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"] if "record" in r}


def dashboard_exprs() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


def test_metric_name_parser() -> None:
    assert metric_names('sum by (a, b) (rate(foo_total{x="y", z=~"$v"}[$__rate_interval])) / on (a) bar offset 1h') \
        == {"foo_total", "bar"}
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate(h_bucket[5m])))') == {"h_bucket"}
    assert metric_names('label_replace(x:y:5m, "topic", "all", "", "") > 1e-6 and up == 0') == {"x:y:5m", "up"}
    assert metric_names("-(a:z:5m + b) / 2") == {"a:z:5m", "b"}


def test_dashboard_is_up_to_date() -> None:
    assert DASHBOARD.read_text() == build_dashboard.text(), "run deploy/grafana/build_dashboard.py"


def test_dashboard_queries_only_known_metrics() -> None:
    recorded = recorded_names()
    allowed = set(contract.METRICS) | set(contract.PROMETHEUS_SYNTHETIC) | recorded
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    used = set()
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, (title, expr)
        assert not names - allowed, (title, names - allowed)
        used |= names
    # the panels the operators' guide describes are there
    for needed in ("refusal_guard:d_prime:5m", "refusal_guard:d_prime:1h", "refusal_guard:criterion:1h",
                   "refusal_guard:accuracy:1h", "refusal_guard:action_share:5m", "refusal_guard_drift_alarm",
                   "refusal_guard_probe_seconds_bucket", "refusal_guard_overhead_seconds_bucket",
                   "refusal_guard_probe_failures_total", "refusal_guard_policy_baseline"):
        assert needed in used, needed
    for label_query in [v["definition"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if "definition" in v]:
        inner = re.fullmatch(r"label_values\((.*), \w+\)", label_query).group(1)
        assert not metric_names(inner) - allowed, label_query


def test_dashboard_variables_and_panels() -> None:
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "job", "topic"} <= set(variables)
    assert variables["topic"]["multi"] and variables["topic"]["current"]["value"] == ["all"]
    titles = [p["title"] for p in board["panels"]]
    assert any("heatmap" in t for t in titles) and "Drift alarms" in titles
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    topic_panels = [e for _, e in dashboard_exprs() if 'topic=~"$topic"' in e]
    assert len(topic_panels) >= 8
    assert variables["model"]["multi"] and variables["model"]["includeAll"]
    assert "refusal_guard_requests_total" in variables["model"]["definition"]
    # Every query of a counter with the model label, and every per-model series, follows the model selector.
    by_model = re.compile(r"refusal_guard_(requests|outcomes|confidence_outcomes)_total|_by_model:")
    model_exprs = [e for _, e in dashboard_exprs() if by_model.search(e)]
    assert len(model_exprs) >= 7
    assert all('model=~"$model"' in e for e in model_exprs), [e for e in model_exprs if "$model" not in e]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
@pytest.mark.prometheus
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every query, with Grafana variables substituted, is valid PromQL (checked as recording rules)."""
    rules = []
    for i, (_, expr) in enumerate(dashboard_exprs()):
        concrete = expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$topic", ".*").replace("$model", ".*")
        rules.append({"record": f"dashboard:query_{i}:check", "expr": concrete})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, width=10_000))
    result = subprocess.run(["promtool", "check", "rules", "--lint=none", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    ds = datasources["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["uid"] == "prometheus"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "refusal-guard.yaml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts


def test_dashboard_is_honest_about_missing_data_and_modes() -> None:
    board = json.loads(DASHBOARD.read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert all(p["fieldConfig"]["defaults"]["noValue"] == "no data" for p in panels)
    by_title = {p["title"]: p for p in panels}
    flag = by_title["Window SDT defined per replica"]
    assert "refusal_guard_window_sdt_defined" in flag["targets"][0]["expr"]
    assert flag["fieldConfig"]["defaults"]["mappings"][0]["options"]["0"]["text"] == "SDT undefined"
    assert "refusal_guard_window_scored" in by_title["Window n per replica"]["targets"][0]["expr"]
    assert "refusal_guard_drift_last_alarm_timestamp_seconds" in by_title["Last drift alarm"]["targets"][0]["expr"]
    shares = [t["expr"] for p in panels for t in p["targets"] if "refusal_guard:action_share" in t["expr"]]
    assert sorted(shares) == sorted([
        'refusal_guard:action_share:5m{job=~"$job", mode!="shadow"}',
        'refusal_guard:action_share:5m{job=~"$job", mode="shadow"}'])
