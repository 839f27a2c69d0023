"""Admin token and inbound API keys.

* Admin endpoints are off (404) without ``admin_token``; with it they need exactly that bearer
  token (401 otherwise: missing, wrong scheme, prefix, suffix, other case), compared in constant time.
* Inbound ``api_keys``: chat and models answer 401 in the OpenAI shape (``invalid_api_key``, the
  SDK's ``AuthenticationError``) without a valid key and never call upstream; ``/healthz``,
  ``/readyz`` and ``/metrics`` stay open for probes and scrapers.
* With ``upstream_api_key`` the client's own key never reaches the upstream.
"""

from __future__ import annotations

import hmac
import json

import httpx
import openai
import pytest

import guard.app

ADMIN = "admin-token-0123456789"
KEYS = ("client-key-one", "client-key-two")


def test_admin_endpoint_is_off_without_a_token(start_proxy):
    proxy = start_proxy()
    for headers in ({}, {"authorization": "Bearer anything"}):
        r = httpx.post(proxy.url + "/admin/policy/reload", headers=headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "admin_disabled"


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", f"Basic {ADMIN}", f"Token {ADMIN}", f"Bearer {ADMIN[:-1]}", f"Bearer {ADMIN}x",
    f"Bearer {ADMIN.upper()}", f"Bearer {ADMIN[1:]}", "Bearer " + "a" * 10_000, f"Bearer {KEYS[0]}",
])
def test_admin_endpoint_needs_exactly_the_bearer_token(start_proxy, authorization):
    proxy = start_proxy(admin_token=ADMIN, api_keys=",".join(KEYS))
    headers = {} if authorization is None else {"authorization": authorization}
    r = httpx.post(proxy.url + "/admin/policy/reload", headers=headers)
    assert r.status_code == 401
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_admin_token"
    assert ADMIN not in r.text


def test_admin_endpoint_accepts_the_token_in_any_scheme_case(start_proxy):
    proxy = start_proxy(admin_token=ADMIN)
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = httpx.post(proxy.url + "/admin/policy/reload", headers={"authorization": f"{scheme} {ADMIN}"})
        assert r.status_code == 422  # authorised; no policy file configured, so nothing to reload
        assert r.json()["ok"] is False


def test_tokens_and_keys_are_compared_in_constant_time(start_proxy, monkeypatch):
    calls = []

    def spy(a, b):
        calls.append((type(a), type(b)))
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(guard.app.hmac, "compare_digest", spy)
    proxy = start_proxy(admin_token=ADMIN, api_keys=",".join(KEYS))
    httpx.post(proxy.url + "/admin/policy/reload", headers={"authorization": "Bearer nope"})
    httpx.get(proxy.url + "/v1/models", headers={"authorization": "Bearer nope"})
    assert len(calls) >= 1 + len(KEYS) and all(t == (bytes, bytes) for t in calls)


@pytest.mark.parametrize("authorization", [None, "Bearer", "Bearer wrong", f"Basic {KEYS[0]}", f"Bearer {KEYS[0]}x",
                                           f"Bearer {KEYS[0][:-1]}", f"Bearer {ADMIN}", f"Bearer {KEYS[0]},{KEYS[1]}"])
def test_api_keys_reject_missing_or_wrong_keys_in_openai_shape(start_proxy, script, authorization):
    proxy = start_proxy(api_keys=",".join(KEYS), admin_token=ADMIN)
    headers = {} if authorization is None else {"authorization": authorization}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for method, path, kwargs in (("POST", "/v1/chat/completions", {"json": body}), ("GET", "/v1/models", {})):
        r = httpx.request(method, proxy.url + path, headers=headers, **kwargs)
        assert r.status_code == 401, (path, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert script.calls["generation"] == 0 and script.calls["models"] == 0  # nothing went upstream


def test_api_keys_accept_each_key_and_leave_health_and_metrics_open(start_proxy, script):
    proxy = start_proxy(api_keys=",".join(KEYS))
    for key in KEYS:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
        answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content
        assert client.models.list().data
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=proxy.url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}])
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(proxy.url + path).status_code == 200, path
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'refusal_guard_requests_total{action="invalid"' in metrics
    assert not any(key in metrics for key in KEYS)


def test_upstream_api_key_replaces_the_clients_key(start_proxy, script):
    proxy = start_proxy(upstream_api_key="sk-upstream-secret", mode="sequential")
    httpx.post(proxy.url + "/v1/chat/completions", headers={"authorization": "Bearer sk-client-own-key"},
               json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    received = script.of("generation") + script.of("probe")
    assert len(received) == 2
    for r in received:
        assert r.headers["authorization"] == "Bearer sk-upstream-secret"
        assert "sk-client-own-key" not in str(r.headers)


@pytest.mark.parametrize("junk", [b"\xff\xfe{}", b"[" * 100_000])
def test_admin_reload_of_a_hostile_policy_file_is_a_422_and_keeps_the_policy(start_proxy, tmp_path, junk):
    from calibration.calibrate import calibrate
    from guard.probe.template import TEMPLATE_HASH, TEMPLATE_ID

    rows = [{"id": f"p{i}", "will_refuse": i % 2 == 0, "confidence": 5, "refused": i % 2 == 0, "harm_rating": 1,
             "topic": "other", "probe_template": TEMPLATE_ID} for i in range(200)]
    data = tmp_path / "dp.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    live = tmp_path / "policy.json"
    calibrate([data], target_accuracy=0.9, confidence=0.95, n_boot=50, probe_template=TEMPLATE_ID,
              probe_template_hash=TEMPLATE_HASH).policy.save(live)
    proxy = start_proxy(mode="sequential", policy=str(live), admin_token=ADMIN)
    version = httpx.post(proxy.url + "/admin/policy/reload", headers={"authorization": f"Bearer {ADMIN}"}).json()["version"]
    live.write_bytes(junk)
    r = httpx.post(proxy.url + "/admin/policy/reload", headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 422 and r.json()["ok"] is False and r.json()["version"] == version
    assert f'version="{version}"' in httpx.get(proxy.url + "/metrics").text
