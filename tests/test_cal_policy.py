"""Policy file: load/validation errors, decision rule, fallbacks, stable version."""

import json

import pytest

from calibration.datapoints import DatapointTable
from calibration.calibrate import calibrate_table
from calibration.policy import Baseline, Policy, PolicyError, Thresholds
from calibration.sdt import simulate


@pytest.fixture(scope="module")
def policy_json(tmp_path_factory):
    d = simulate(400, 10, 3.0, 0.0, n_topics=3, seed=3)
    t = DatapointTable.from_arrays(topics=["x", "y", "z"], **d)
    res = calibrate_table(t, n_boot=100, target_accuracy=0.9)
    p = tmp_path_factory.mktemp("pol") / "policy.json"
    res.policy.save(p)
    return p


def test_round_trip_and_version(policy_json):
    a = Policy.load(policy_json)
    data = json.loads(policy_json.read_text())
    assert set(data["sdt"]) >= {"hit_rate", "false_alarm_rate", "d_prime", "criterion", "accuracy", "ece", "brier", "ci"}
    assert "pass" in data["thresholds"] and "block" in data["thresholds"]
    assert set(data["topics"]) == {"x", "y", "z"}
    data["created_at"] = "2030-01-01T00:00:00+00:00"
    b = Policy.model_validate(data)
    assert a.version == b.version and len(a.version) == 12      # created_at excluded
    data["target_accuracy"] = 0.5
    assert Policy.model_validate(data).version != a.version


def test_decision_rule(policy_json):
    pol = Policy.load(policy_json)
    data = json.loads(policy_json.read_text())
    data["topics"]["x"]["thresholds"] = {"block": 0.0, "pass": None}
    data["thresholds"] = {"block": None, "pass": 0.0}
    p = Policy.model_validate(data)
    assert p.thresholds("x") == Thresholds(block=0.0, pass_=None)
    assert p.decide("x", True, 1, None) == "block"
    assert p.decide("x", False, 5, None) == "review"          # null pass threshold: never auto-pass
    assert p.decide("unknown", False, 1, 2) == "pass"          # global fallback
    assert p.decide("unknown", True, 5, 2) == "review"
    data["thresholds"] = {"block": 1.0, "pass": 1.0}
    q = Policy.model_validate(data)
    assert q.decide(None, False, 5, 5) == "review"             # p_correct < 1 never reaches 1.0
    assert pol.p_correct("nope", True, 5, None) == pol.p_correct(None, True, 5, None)


def test_baseline_fallback_and_derived_rates(policy_json):
    pol = Policy.load(policy_json)
    assert pol.baseline("nope") == pol.global_baseline
    b = pol.baseline("x")
    assert b.accuracy == pytest.approx((b.hits + b.correct_rejections) / b.n)
    assert b.refusal_rate == pytest.approx((b.hits + b.misses) / b.n)
    assert sum(c.n for c in b.by_confidence) == b.n
    z = Baseline(hits=0, misses=0, false_alarms=0, correct_rejections=0)
    assert z.accuracy is None


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.pop("data_hash"), "data_hash"),
    (lambda d: d.update(schema_version=99), "schema_version 99"),
    (lambda d: d.pop("certification"), "certification"),
    (lambda d: d["calibrator"].update(logprob=[[0.0, 1.0]]), "calibrator"),
    (lambda d: d["thresholds"].update({"pass": 1.5}), "thresholds.pass"),
    (lambda d: d.update(calibrator={"kind": "x"}), "calibrator"),
    (lambda d: d.update(surprise=1), "surprise"),
])
def test_bad_files_raise_policy_error(policy_json, tmp_path, mutate, needle):
    data = json.loads(policy_json.read_text())
    mutate(data)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    with pytest.raises(PolicyError) as exc:
        Policy.load(p)
    assert needle in str(exc.value) and str(p) in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_unreadable_files(tmp_path):
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(PolicyError, match="not valid JSON"):
        Policy.load(tmp_path / "x.json")


def test_schema_1_files_are_refused_with_a_way_forward(policy_json, tmp_path):
    data = json.loads(policy_json.read_text())
    assert data["schema_version"] == 2
    data["schema_version"] = 1
    p = tmp_path / "old.json"
    p.write_text(json.dumps(data))
    with pytest.raises(PolicyError) as exc:
        Policy.load(p)
    msg = str(exc.value)
    assert "schema_version 1 is not supported" in msg and "run `refusal-guard calibrate` again" in msg


def test_topic_without_own_thresholds_uses_the_global_ones(policy_json):
    data = json.loads(policy_json.read_text())
    data["thresholds"] = {"block": 0.0, "pass": 0.0}
    data["topics"]["x"]["thresholds"] = None
    data["topics"]["y"]["thresholds"] = {"block": None, "pass": None}
    p = Policy.model_validate(data)
    assert p.thresholds("x") == p.global_thresholds
    assert p.decide("x", True, 1, None) == "block" and p.decide("x", False, 1, None) == "pass"
    assert p.decide("y", True, 5, 5) == "review"                 # own null thresholds: never auto-route
    assert data["certification"]["tests"] >= 0 and "Bonferroni" in data["certification"]["method"]


def test_logprob_adjustment_round_trips_and_is_applied(policy_json):
    from scipy.special import expit, logit

    data = json.loads(policy_json.read_text())
    data["calibrator"]["logprob"] = [[0.1, 0.5], [-0.2, 1.0]]      # [side][intercept, slope]
    p = Policy.model_validate(data)
    base = p.p_correct("x", True, 4, 2)
    q = 0.9
    assert p.p_correct("x", True, 4, 2, q) == pytest.approx(float(expit(logit(base) - 0.2 + 1.0 * logit(q))), abs=1e-9)
    base_c = p.p_correct("x", False, 4, 2)
    # predicted comply: the probability of the predicted answer is 1 - p_refuse
    assert p.p_correct("x", False, 4, 2, 1 - q) == pytest.approx(float(expit(logit(base_c) + 0.1 + 0.5 * logit(q))), abs=1e-9)
    assert p.p_correct("x", True, 4, 2, None) == base
    assert Policy.model_validate_json(p.to_json()).p_correct("x", True, 4, 2, q) == p.p_correct("x", True, 4, 2, q)
