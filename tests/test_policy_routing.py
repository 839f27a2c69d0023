"""Calibrated policies in the proxy: thresholds, template-hash check, hot reload, admin auth."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from calibration.calibrate import calibrate
from guard.probe.template import TEMPLATE_HASH, TEMPLATE_ID

MESSAGES = [{"role": "user", "content": "Tell me about locks."}]


def write_datapoints(path: Path) -> Path:
    """A model whose confidence-5 predictions are always right and confidence-1 ones a coin flip."""
    rows = []
    for i in range(600):
        will_refuse = i % 2 == 0
        confidence = 5 if i % 3 else 1
        refused = will_refuse if confidence == 5 else (i % 4 < 2)
        rows.append({"id": f"p{i}", "will_refuse": will_refuse, "confidence": confidence, "refused": refused,
                     "harm_rating": 4 if will_refuse else 1, "topic": "hacking" if i % 5 == 0 else "other",
                     "probe_template": TEMPLATE_ID})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("policies")
    data = write_datapoints(tmp / "dp.jsonl")
    out = {}
    for name, template_hash in (("enforced", TEMPLATE_HASH), ("foreign", "0000000000000000")):
        result = calibrate([data], target_accuracy=0.9, confidence=0.95, n_boot=200, probe_template=TEMPLATE_ID,
                           probe_template_hash=template_hash)
        result.policy.save(tmp / f"{name}.json")
        out[name] = tmp / f"{name}.json"
    return out


def probe_says(will_refuse: bool, confidence: int, harm: int) -> str:
    return json.dumps({"will_refuse": will_refuse, "confidence": confidence, "harm_rating": harm, "topic": "other"})


def headers_for(proxy, script, will_refuse, confidence, harm, content="x"):
    script.probe_reply = probe_says(will_refuse, confidence, harm)
    sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    return sdk.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": content}]).headers


def test_calibrated_thresholds_route_requests(start_proxy, script, policies):
    proxy = start_proxy(mode="sequential", policy=str(policies["enforced"]))
    confident_refuse = headers_for(proxy, script, True, 5, 4, "a")
    assert confident_refuse["x-refusal-guard-action"] == "block"
    assert float(confident_refuse["x-refusal-guard-p-correct"]) > 0.9
    coin_flip = headers_for(proxy, script, False, 1, 1, "b")
    assert coin_flip["x-refusal-guard-action"] == "review"
    assert float(coin_flip["x-refusal-guard-p-correct"]) < 0.8
    info = httpx.get(proxy.url + "/metrics").text
    assert 'enforced="true"' in info and "refusal_guard_policy_baseline" in info


def test_policy_for_another_probe_template_runs_in_shadow(start_proxy, script, policies):
    proxy = start_proxy(mode="sequential", policy=str(policies["foreign"]))
    headers = headers_for(proxy, script, True, 5, 4)
    assert headers["x-refusal-guard-mode"] == "shadow"
    assert script.calls["generation"] == 1  # not blocked
    assert 'enforced="false"' in httpx.get(proxy.url + "/metrics").text


def test_admin_reload_needs_the_token_and_keeps_the_old_policy_on_error(start_proxy, script, policies, tmp_path):
    live = tmp_path / "policy.json"
    live.write_text(policies["enforced"].read_text())
    proxy = start_proxy(mode="sequential", policy=str(live), admin_token="s3cret")
    url = proxy.url + "/admin/policy/reload"
    assert httpx.post(url).status_code == 401
    assert httpx.post(url, headers={"authorization": "Bearer wrong"}).status_code == 401
    live.write_text("{ not json")
    bad = httpx.post(url, headers={"authorization": "Bearer s3cret"})
    assert bad.status_code == 422 and "not valid JSON" in bad.json()["message"]
    assert headers_for(proxy, script, True, 5, 4, "c")["x-refusal-guard-action"] == "block"  # old policy kept
    live.write_text(policies["foreign"].read_text())
    good = httpx.post(url, headers={"authorization": "Bearer s3cret"})
    assert good.status_code == 200 and good.json()["ok"]
    assert headers_for(proxy, script, True, 5, 4, "d")["x-refusal-guard-mode"] == "shadow"


def test_admin_endpoints_are_off_without_a_token(start_proxy):
    r = httpx.post(start_proxy().url + "/admin/policy/reload", headers={"authorization": "Bearer anything"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "admin_disabled"


def test_unreadable_policy_at_start_is_an_error(tmp_path):
    from prometheus_client import CollectorRegistry

    from calibration.policy import PolicyError
    from guard.live.metrics import GuardMetrics
    from guard.probe.policy import PolicyStore

    with pytest.raises(PolicyError):
        PolicyStore(tmp_path / "missing.json", TEMPLATE_HASH, GuardMetrics(CollectorRegistry()))


def test_an_empty_admin_token_means_disabled_not_an_empty_password(start_proxy):
    r = httpx.post(start_proxy(admin_token="").url + "/admin/policy/reload")
    assert r.status_code == 404


def test_policy_from_the_proxys_own_log_is_enforced_without_flags(start_proxy, script, tmp_path):
    """Datapoints carry "<template id>:<hash>", so calibrate needs no --probe-template-hash."""
    db = tmp_path / "dp.sqlite3"
    proxy = start_proxy(mode="sequential", datapoints=str(db))
    sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    for i in range(4):
        script.probe_reply = probe_says(False, 4, 1)
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": f"log {i}"}])
    proxy.stop()
    result = calibrate([db], target_accuracy=0.9, confidence=0.9, n_boot=50)
    assert (result.policy.probe_template, result.policy.probe_template_hash) == (TEMPLATE_ID, TEMPLATE_HASH)
    policy_file = tmp_path / "policy.json"
    result.policy.save(policy_file)
    enforced = start_proxy(mode="sequential", policy=str(policy_file))
    assert 'enforced="true"' in httpx.get(enforced.url + "/metrics").text


def _logprobs_saying(p_true: float) -> list:
    import math

    alts = [{"token": "true", "logprob": math.log(p_true)}, {"token": "false", "logprob": math.log(1 - p_true)}]
    return [{"token": '{"will_refuse": ', "logprob": 0.0, "top_logprobs": []},
            {"token": "true", "logprob": math.log(p_true), "top_logprobs": alts}]


def test_the_probe_logprob_moves_p_correct_and_the_action(start_proxy, script, policies, tmp_path):
    """A schema-2 policy with a logprob adjustment: the same verbal answer is blocked when the token
    probability backs it and sent to review when it does not; headers keep their meaning."""
    from calibration.policy import Policy

    data = json.loads(policies["enforced"].read_text())
    assert data["schema_version"] == 2
    data["calibrator"]["logprob"] = [[0.0, 0.0], [0.0, 1.5]]   # predicted refuse: slope 1.5 on logit(q)
    pol = Policy.model_validate(data)
    cut = pol.thresholds("other").block
    assert cut is not None
    live = tmp_path / "policy.json"
    pol.save(live)
    proxy = start_proxy(mode="sequential", policy=str(live))
    sure, unsure = 0.999, 0.3
    assert pol.p_correct("other", True, 5, 4, sure) >= cut > pol.p_correct("other", True, 5, 4, unsure)
    script.probe_logprobs = _logprobs_saying(sure)
    backed = headers_for(proxy, script, True, 5, 4, "lp-a")
    assert backed["x-refusal-guard-action"] == "block"
    assert float(backed["x-refusal-guard-p-correct"]) == pytest.approx(pol.p_correct("other", True, 5, 4, sure), abs=1e-3)
    script.probe_logprobs = _logprobs_saying(unsure)
    doubted = headers_for(proxy, script, True, 5, 4, "lp-b")
    assert doubted["x-refusal-guard-action"] == "review"
    assert float(doubted["x-refusal-guard-p-correct"]) == pytest.approx(pol.p_correct("other", True, 5, 4, unsure), abs=1e-3)
    script.probe_logprobs = None
    plain = headers_for(proxy, script, True, 5, 4, "lp-c")
    assert float(plain["x-refusal-guard-p-correct"]) == pytest.approx(pol.p_correct("other", True, 5, 4), abs=1e-3)


def test_a_schema_1_policy_file_is_refused_at_start(tmp_path, policies):
    from prometheus_client import CollectorRegistry

    from calibration.policy import PolicyError
    from guard.live.metrics import GuardMetrics
    from guard.probe.policy import PolicyStore

    data = json.loads(policies["enforced"].read_text())
    data["schema_version"] = 1
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    with pytest.raises(PolicyError, match="schema_version 1 is not supported.*calibrate` again"):
        PolicyStore(old, TEMPLATE_HASH, GuardMetrics(CollectorRegistry()))
