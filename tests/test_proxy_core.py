"""The pass-through proxy, driven with the official openai SDK against a scripted upstream."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.servers import ServerThread, free_port

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def client(proxy: ServerThread, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=kw.pop("api_key", "sk-client"), max_retries=0, **kw)


def test_non_streaming_completion_is_relayed(start_proxy, script):
    proxy = start_proxy()
    answer = client(proxy).chat.completions.create(model="m", messages=MESSAGES)
    assert answer.choices[0].message.content == script.reply
    assert script.calls["generation"] == 1


def test_request_body_goes_upstream_unchanged(start_proxy, script):
    proxy = start_proxy()
    body = json.dumps({"model": "m", "messages": MESSAGES, "x_vendor_field": {"keep": [1, 2]}, "top_k": 3}).encode()
    r = httpx.post(proxy.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert script.of("generation")[0].body == body


def test_streaming_reassembles_to_the_upstream_reply(start_proxy, script):
    script.reply = "Streaming works one small piece at a time, in order."
    proxy = start_proxy()
    stream = client(proxy).chat.completions.create(model="m", messages=MESSAGES, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == script.reply


def test_stream_is_relayed_as_it_arrives_not_buffered(start_proxy, script):
    script.reply = "a" * 40
    script.chunk_size = 10
    script.chunk_delay = 0.4  # four pieces: the whole stream takes >= 1.6 s upstream
    proxy = start_proxy()
    started = time.monotonic()
    arrivals = []
    stream = client(proxy).chat.completions.create(model="m", messages=MESSAGES, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 4
    assert arrivals[0] < 1.0 < arrivals[-1], arrivals


def test_include_usage_chunk_arrives(start_proxy, script):
    proxy = start_proxy()
    stream = client(proxy).chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert chunks[-1].choices == []


def test_request_id_echoed_or_generated(start_proxy, script):
    proxy = start_proxy()
    raw = client(proxy).chat.completions.with_raw_response.create(
        model="m", messages=MESSAGES, extra_headers={"x-request-id": "req-abc.123"}
    )
    assert raw.headers["x-request-id"] == "req-abc.123"
    assert script.of("generation")[0].headers["x-request-id"] == "req-abc.123"
    other = httpx.get(proxy.url + "/healthz")
    assert len(other.headers["x-request-id"]) == 36  # a dashed UUID: llama.cpp's server rejects other forms


def test_authorization_passes_through_unless_upstream_key_set(start_proxy, script):
    client(start_proxy(), api_key="sk-from-client").chat.completions.create(model="m", messages=MESSAGES)
    assert script.of("generation")[0].headers["authorization"] == "Bearer sk-from-client"
    client(start_proxy(upstream_api_key="sk-configured"), api_key="sk-from-client").chat.completions.create(
        model="m", messages=MESSAGES
    )
    assert script.of("generation")[1].headers["authorization"] == "Bearer sk-configured"


def test_invalid_json_gets_400_in_openai_shape(start_proxy):
    proxy = start_proxy()
    r = httpx.post(proxy.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_json"


@pytest.mark.parametrize("body", [{"model": "m"}, {"model": "m", "messages": []}, {"model": 3, "messages": MESSAGES},
                                  {"messages": [{"content": "no role"}]}, [1, 2]])
def test_non_chat_bodies_get_400_from_the_sdk(start_proxy, script, body):
    proxy = start_proxy()
    r = httpx.post(proxy.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400 and "error" in r.json()
    assert script.calls["generation"] == 0


def test_sdk_raises_bad_request_for_400(start_proxy):
    with pytest.raises(openai.BadRequestError) as info:
        client(start_proxy()).chat.completions.create(model="m", messages=[{"role": "user", "content": {"x": 1}}])
    assert info.value.status_code == 400


def test_oversized_body_gets_413(start_proxy, script):
    proxy = start_proxy(max_body_bytes=2048)
    with pytest.raises(openai.APIStatusError) as info:
        client(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 5000}])
    assert info.value.status_code == 413
    assert info.value.body["code"] == "request_too_large"
    assert script.calls["generation"] == 0


def test_unreachable_upstream_gets_502(start_proxy):
    proxy = start_proxy(upstream=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(openai.InternalServerError) as info:
        client(proxy).chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_unreachable"


def test_stalled_upstream_gets_504(start_proxy, script):
    script.stall = 3
    proxy = start_proxy(total_timeout=0.5)
    with pytest.raises(openai.APIStatusError) as info:
        client(proxy).chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.status_code == 504
    assert info.value.body["code"] == "upstream_timeout"


def test_upstream_error_passes_through_with_its_status(start_proxy, script):
    script.status = 429
    script.error = {"error": {"message": "slow down", "type": "rate_limit", "param": None, "code": "rl"}}
    with pytest.raises(openai.RateLimitError) as info:
        client(start_proxy()).chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.body == script.error["error"]


def test_upstream_error_on_a_stream_request_passes_through(start_proxy, script):
    script.status = 503
    with pytest.raises(openai.InternalServerError) as info:
        list(client(start_proxy()).chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert info.value.status_code == 503


def test_stream_broken_midway_reports_an_error_event(start_proxy, script):
    script.reply = "x" * 50
    script.break_stream_after = 2
    with pytest.raises(openai.APIError):
        list(client(start_proxy()).chat.completions.create(model="m", messages=MESSAGES, stream=True))


def test_models_health_ready_and_metrics(start_proxy, script):
    proxy = start_proxy()
    models = client(proxy).models.list()
    assert [m.id for m in models.data] == ["scripted"]
    assert httpx.get(proxy.url + "/healthz").status_code == 200
    assert httpx.get(proxy.url + "/readyz").status_code == 200
    script.models_status = 500
    assert httpx.get(proxy.url + "/readyz").status_code == 200  # the guard itself can still serve
    r = httpx.get(proxy.url + "/readyz?upstream=1")
    assert r.status_code == 503 and r.json()["upstream_status"] == 500
    client(proxy).chat.completions.create(model="m", messages=MESSAGES)
    text = httpx.get(proxy.url + "/metrics").text
    assert 'refusal_guard_http_requests_total{route="chat",status="200"} 1.0' in text
    assert 'refusal_guard_http_request_seconds_count{route="chat"} 1.0' in text


def test_readyz_upstream_check_fails_when_upstream_is_down(start_proxy):
    port = free_port()
    proxy = start_proxy(upstream=f"http://127.0.0.1:{port}/v1")
    assert httpx.get(proxy.url + "/readyz").status_code == 200
    r = httpx.get(proxy.url + "/readyz?upstream=1")
    assert r.status_code == 503 and r.json()["reason"] == "connect" and str(port) not in r.text
    assert "refusal_guard_upstream_up 0.0" in httpx.get(proxy.url + "/metrics").text


def test_unknown_route_gets_openai_shaped_404(start_proxy):
    r = httpx.get(start_proxy().url + "/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "http_404"
