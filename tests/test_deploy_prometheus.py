"""deploy/prometheus: recording/alert rules, their promtool unit tests, the A-S approximation.

promtool tests skip only when the binary is absent (scripts/test.sh installs Debian's prometheus
package, which ships it).
"""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import norm

REPO = Path(__file__).resolve().parent.parent
PROM = REPO / "deploy" / "prometheus"
RULES = PROM / "rules"
RULE_FILES = [RULES / "refusal_guard_recording.yml", RULES / "refusal_guard_alerts.yml"]
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


promsdt = load(PROM / "promsdt.py", "promsdt")
generate = load(PROM / "tests" / "generate.py", "refusal_guard_promtool_generate")
build_rules = load(RULES / "build_rules.py", "refusal_guard_build_rules")
render_config = load(PROM / "render_config.py", "refusal_guard_render_config")
contract = load(REPO / "deploy" / "metrics_contract.py", "refusal_guard_metrics_contract")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def all_rules() -> list[dict]:
    return [r for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


# ------------------------------------------------------------------ the approximation
def test_abramowitz_stegun_within_stated_error_of_scipy() -> None:
    p = np.concatenate([np.logspace(-12, -1, 3000), np.linspace(0.1, 0.9, 3001), 1 - np.logspace(-12, -1, 3000)])
    approx = np.array([promsdt.as_ppf(float(x)) for x in p])
    error = np.abs(approx - norm.ppf(p))
    assert error.max() < promsdt.AS_MAX_ABS_ERROR == 4.5e-4
    assert promsdt.as_ppf(0.5) == 0.0
    for x in (1e-6, 0.01, 0.2, 0.4):  # symmetric: z(1-p) = -z(p)
        assert promsdt.as_ppf(1 - x) == pytest.approx(-promsdt.as_ppf(x), abs=1e-9)


def test_sdt_through_the_approximation_matches_calibration_sdt() -> None:
    """d' and c from the rules' arithmetic stay within 2*eps and eps of calibration.sdt."""
    sdt = pytest.importorskip("calibration.sdt")
    rng = np.random.default_rng(7)
    for h, m, fa, cr in rng.integers(0, 400, size=(300, 4)).tolist() + [[0, 0, 0, 0], [500, 0, 0, 500], [0, 9, 9, 0]]:
        exact = sdt.sdt_from_counts(h, m, fa, cr)
        hr, far = (h + 0.5) / (h + m + 1), (fa + 0.5) / (fa + cr + 1)
        zh, zf = promsdt.as_ppf(hr), promsdt.as_ppf(far)
        assert exact.hit_rate == pytest.approx(hr) and exact.false_alarm_rate == pytest.approx(far)
        assert abs((zh - zf) - exact.d_prime) <= 2 * promsdt.AS_MAX_ABS_ERROR
        assert abs(-(zh + zf) / 2 - exact.criterion) <= promsdt.AS_MAX_ABS_ERROR


def test_promql_text_is_the_python_arithmetic() -> None:
    """Evaluate the emitted PromQL z-expression as Python (same operators) and compare."""
    for p in (0.001, 0.17, 0.5, 0.62, 0.999):
        t = eval(promsdt.promql_tail_t("p").replace("ln(", "math.log(").replace("sqrt(", "math.sqrt("),
                 {"math": math, "p": p, "abs": abs})
        z = eval(promsdt.promql_z("p", "t"), {"p": p, "t": t, "sgn": promsdt._sgn})
        assert z == promsdt.as_ppf(p)


# ------------------------------------------------------------------ generated files are current
def test_generated_rule_files_are_up_to_date() -> None:
    for path, text in build_rules.outputs().items():
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run {RULES / 'build_rules.py'}"


def test_checked_in_promtool_tests_are_up_to_date(tmp_path: Path) -> None:
    checked_in = PROM / "tests" / generate.OUTPUT
    fresh = generate.write(tmp_path, "../rules")
    assert fresh.read_text() == checked_in.read_text(), "run deploy/prometheus/tests/generate.py"


# ------------------------------------------------------------------ rule contents
RECORD_NAME = re.compile(r"^refusal_guard:[a-z_]+:(5m|1h)$")
EXPECTED_RECORDS = {f"refusal_guard:{name}:{w}" for w in ("5m", "1h") for name in (
    "outcomes", "hits", "misses", "false_alarms", "correct_rejections", "scored", "hit_rate", "false_alarm_rate",
    "hit_rate_t", "false_alarm_rate_t", "z_hit_rate", "z_false_alarm_rate", "d_prime", "criterion", "accuracy",
    "accuracy_by_confidence", "requests", "action_share", "probe_failure_ratio", "upstream_error_ratio", "sdt_defined")} | {
    f"refusal_guard:{name}:{w}" for w in ("5m", "1h") for name in (
        "judged", "judged_scored", "judged_refused_share", "judged_refused_share_pooled", "strata",
        "strata_refused")} | {
    f"refusal_guard:{name}_corrected:{w}" for w in ("5m", "1h") for name in (
        "hits", "misses", "false_alarms", "correct_rejections", "scored", "hit_rate", "false_alarm_rate",
        "hit_rate_t", "false_alarm_rate_t", "z_hit_rate", "z_false_alarm_rate", "d_prime", "criterion", "accuracy",
        "sdt_defined")} | {
    f"refusal_guard:{name}_by_model:{w}" for w in ("5m", "1h") for name in (
        "requests", "outcomes", "hits", "misses", "false_alarms", "correct_rejections", "scored", "hit_rate",
        "false_alarm_rate", "hit_rate_t", "false_alarm_rate_t", "z_hit_rate", "z_false_alarm_rate", "d_prime",
        "criterion", "accuracy", "sdt_defined")}


def test_recording_rule_names() -> None:
    doc = yaml.safe_load(RULE_FILES[0].read_text())
    names = [r["record"] for g in doc["groups"] for r in g["rules"]]
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED_RECORDS
    assert all(RECORD_NAME.match(n) for n in names)


def test_fleet_rules_sum_the_model_label_away() -> None:
    """Only the *_by_model series keep ``model``; every other aggregation of the counters drops it."""
    counters = ("refusal_guard_requests_total", "refusal_guard_outcomes_total", "refusal_guard_confidence_outcomes_total")
    reading = [r for r in all_rules() if any(c in r["expr"] for c in counters)]
    assert len(reading) == 2 * 5  # per window: outcomes, accuracy_by_confidence, requests and the two by model
    for r in reading:
        groupings = re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", r["expr"])
        keeps_model = any("model" in (g.strip() for g in grouping.split(",")) for grouping in groupings)
        assert keeps_model == ("_by_model:" in r.get("record", "")), (r.get("record") or r.get("alert"))


def test_rules_read_only_contract_metrics_and_recorded_series() -> None:
    from tests.test_deploy_grafana import metric_names

    recorded = {r["record"] for r in all_rules() if "record" in r}
    allowed = set(contract.METRICS) | set(contract.PROMETHEUS_SYNTHETIC) | recorded
    for r in all_rules():
        unknown = metric_names(r["expr"]) - allowed
        assert not unknown, (r.get("record") or r.get("alert"), unknown)


def test_alerts_have_for_severity_and_runbooks() -> None:
    docs = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", docs, flags=re.M)}
    alerts = [r for r in all_rules() if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "RefusalGuardDPrimeBelowBaseline", "RefusalGuardCriterionShifted", "RefusalGuardDriftAlarm",
        "RefusalGuardProbeFailureRatioHigh", "RefusalGuardBlockRateSpike", "RefusalGuardShadowBlockRateSpike",
        "RefusalGuardUpstreamErrors"}
    for a in alerts:
        assert re.fullmatch(r"\d+[smh]", a.get("for", "")), a["alert"]
        assert a["labels"]["severity"] in {"critical", "warning", "info"}
        assert {"summary", "description", "runbook_url"} <= set(a["annotations"])
        url = a["annotations"]["runbook_url"]
        assert url == f"docs/operations.md#{a['alert'].lower()}" and a["alert"].lower() in anchors, url
    baseline_alerts = [a for a in alerts if a["alert"] in ("RefusalGuardDPrimeBelowBaseline", "RefusalGuardCriterionShifted")]
    assert all("refusal_guard_policy_baseline" in a["expr"] for a in baseline_alerts)


def test_every_alert_fires_in_a_promtool_test_and_the_quiet_fleet_fires_none() -> None:
    doc = yaml.safe_load((PROM / "tests" / generate.OUTPUT).read_text())
    alerts = {r["alert"] for r in all_rules() if "alert" in r}
    troubled, quiet = doc["tests"]
    fired = {case["alertname"] for case in troubled["alert_rule_test"] if case["exp_alerts"]}
    assert fired == alerts
    assert {case["alertname"] for case in quiet["alert_rule_test"]} == alerts
    assert not any(case["exp_alerts"] for case in quiet["alert_rule_test"])


def test_block_rate_rules_keep_modes_apart() -> None:
    rules = {r.get("record") or r.get("alert"): r for r in all_rules()}
    for w in ("5m", "1h"):
        assert "mode" in rules[f"refusal_guard:requests:{w}"]["expr"].split("(")[1]
        assert "on (job, mode)" in rules[f"refusal_guard:action_share:{w}"]["expr"]
    assert 'mode!="shadow"' in rules["RefusalGuardBlockRateSpike"]["expr"]
    assert 'mode="shadow"' in rules["RefusalGuardShadowBlockRateSpike"]["expr"]
    assert rules["RefusalGuardShadowBlockRateSpike"]["labels"]["severity"] == "info"


def test_sdt_figures_need_both_classes() -> None:
    rules = {r.get("record"): r for r in all_rules() if "record" in r}
    for w in ("5m", "1h"):
        for name in ("hit_rate", "false_alarm_rate"):
            assert f"refusal_guard:sdt_defined:{w} == 1" in rules[f"refusal_guard:{name}:{w}"]["expr"]


def test_every_recording_rule_is_documented() -> None:
    docs = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    for name in EXPECTED_RECORDS:
        stem = name.rsplit(":", 1)[0]
        assert f"`{stem}:<w>`" in docs or f"`{name}`" in docs, name


# ------------------------------------------------------------------ promtool
@needs_promtool
@pytest.mark.prometheus
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
@pytest.mark.prometheus
def test_promtool_test_rules_regenerated(tmp_path: Path) -> None:
    """Regenerate the unit tests (expected values from Python) into tmp and run them."""
    path = generate.write(tmp_path, str(RULES))
    text = path.read_text()
    assert "round(refusal_guard:d_prime:5m" in text and "RefusalGuardDPrimeBelowBaseline" in text
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.prometheus
def test_promtool_catches_a_wrong_expected_d_prime(tmp_path: Path) -> None:
    """The unit tests have teeth: a d' off by 1e-3 (the approximation's scale) fails."""
    path = generate.write(tmp_path, str(RULES))
    doc = yaml.safe_load(path.read_text())
    case = next(c for c in doc["tests"][0]["promql_expr_test"] if c["expr"].startswith("round(refusal_guard:d_prime:1h"))
    case["exp_samples"][0]["value"] += 1e-3
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=10_000))
    result = promtool("test", "rules", str(path))
    assert result.returncode != 0


@needs_promtool
@pytest.mark.prometheus
def test_checked_in_promtool_tests_pass() -> None:
    result = promtool("test", "rules", generate.OUTPUT, cwd=PROM / "tests")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.prometheus
def test_compose_prometheus_config_is_valid(tmp_path: Path) -> None:
    text = (PROM / "prometheus.yml").read_text().replace("/etc/prometheus/rules", str(RULES))
    (tmp_path / "prometheus.yml").write_text(text)
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.prometheus
def test_config_template_renders_a_valid_config(tmp_path: Path) -> None:
    text = render_config.render(["127.0.0.1:18080", "127.0.0.1:18081"], scrape_interval="1s")
    config = yaml.safe_load(text)
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:18080", "127.0.0.1:18081"]
    assert config["global"]["scrape_interval"] == "1s" and config["scrape_configs"][0]["job_name"] == "refusal-guard"
    (tmp_path / "prometheus.yml").write_text(text)
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    with pytest.raises(ValueError):
        render_config.render(["not a target"])
