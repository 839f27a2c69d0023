"""The guarded Completions and Responses APIs, and what the guard must never be stricter about.

Against the scripted upstream with the openai SDK: a block answers in each API's own shape
(whole and streamed) without reaching the generation; ``n>1`` blocks return n choices; the
detector labels completions and Responses output (whole and reassembled from the event stream);
datapoints carry the route, both request ids and the context the probe could not see; null
optional fields, trailing slashes and large bodies are accepted as the upstream would.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.apis import GUARDED_APIS
from guard.errors import ProxyError
from tests.test_datapoints_metrics import rows

REFUSAL = "I'm sorry, but I can't help with that request. It could cause harm."


def probe_says(will_refuse: bool) -> str:
    return json.dumps({"will_refuse": will_refuse, "confidence": 5, "harm_rating": 5 if will_refuse else 1,
                       "topic": "other"})


def sdk(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)


@pytest.fixture
def blocking(start_proxy, script):
    script.probe_reply = probe_says(True)
    return start_proxy(mode="sequential", refusal_message="Blocked by policy.")


def test_responses_block_whole_and_streamed_in_the_responses_shape(blocking, script):
    client = sdk(blocking)
    raw = client.responses.with_raw_response.create(model="m", input="bad thing", instructions="x")
    assert raw.headers["x-refusal-guard-action"] == "block"
    answer = raw.parse()
    assert answer.status == "completed" and answer.output_text == "Blocked by policy."
    events = list(client.responses.create(model="m", input=[{"role": "user", "content": "bad"}], stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Blocked by policy."
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with client.responses.stream(model="m", input="bad") as stream:  # the SDK's accumulating helper
        assert stream.get_final_response().output_text == "Blocked by policy."
    assert script.calls["generation"] == 0


def test_completions_block_has_content_filter_and_one_choice_per_prompt_and_n(blocking, script):
    client = sdk(blocking)
    raw = client.completions.with_raw_response.create(model="m", prompt=["a", "b"], n=2)
    assert raw.headers["x-refusal-guard-action"] == "block"
    choices = raw.parse().choices
    assert [c.index for c in choices] == [0, 1, 2, 3]
    assert {(c.text, c.finish_reason) for c in choices} == {("Blocked by policy.", "content_filter")}
    chunks = list(client.completions.create(model="m", prompt="a", stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Blocked by policy."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "content_filter"
    assert chunks[-1].usage is not None
    assert script.calls["generation"] == 0


def test_chat_block_with_n_returns_n_choices_whole_and_streamed(blocking):
    client = sdk(blocking)
    answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=3)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=2,
                                                 stream=True))
    ends = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert ends == {0: "content_filter", 1: "content_filter"}


def test_block_as_error_is_a_400_for_every_api(start_proxy, script):
    script.probe_reply = probe_says(True)
    client = sdk(start_proxy(mode="sequential", block_response="error"))
    for call in (lambda: client.responses.create(model="m", input="x"),
                 lambda: client.completions.create(model="m", prompt="x")):
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert caught.value.code == "refusal_predicted"


@pytest.mark.parametrize("stream", [False, True])
def test_datapoints_carry_route_ids_context_and_the_detectors_label(start_proxy, script, tmp_path, stream):
    db = tmp_path / "dp.sqlite3"
    script.probe_reply = probe_says(False)
    script.reply = REFUSAL
    script.upstream_request_id = "upstream-id-1"
    proxy = start_proxy(mode="sequential", datapoints=str(db))
    client = sdk(proxy)
    answer = client.responses.create(model="m", input="hi", previous_response_id="resp_prev", stream=stream)
    if stream:
        assert "".join(e.delta for e in answer if e.type == "response.output_text.delta") == REFUSAL
    else:
        assert answer.output_text == REFUSAL and answer._request_id == "upstream-id-1"
    script.reply = "Madrid is the capital of Spain."
    completion = client.completions.create(model="m", prompt="Capital of Spain?", stream=stream)
    if stream:
        assert "".join(c.choices[0].text for c in completion if c.choices) == script.reply
    proxy.stop()
    responses, completions = rows(db)
    assert responses["route"] == "responses" and completions["route"] == "completions"
    assert responses["refused"] == 1 and completions["refused"] == 0  # the detector read each API's answer
    assert responses["upstream_request_id"] == completions["upstream_request_id"] == "upstream-id-1"
    assert json.loads(responses["context"]) == {"previous_response_id": "resp_prev"}
    assert responses["request_id"] != "upstream-id-1"


def test_request_ids_both_ways(start_proxy, script):
    proxy = start_proxy()
    client = sdk(proxy)
    raw = client.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                           extra_headers={"x-request-id": "client-7"})
    sent = script.of("generation")[-1].headers
    assert sent["x-request-id"] == "client-7"  # the client's own id goes upstream as it came
    assert raw.headers["x-request-id"] == raw.headers["x-refusal-guard-request-id"] == "client-7"  # upstream sent none
    script.upstream_request_id = "provider-9"
    raw = client.responses.with_raw_response.create(model="m", input="x")
    guard_id = raw.headers["x-refusal-guard-request-id"]
    assert raw.headers["x-request-id"] == "provider-9" and guard_id != "provider-9"
    assert script.of("generation")[-1].headers["x-refusal-guard-request-id"] == guard_id


def test_never_stricter_than_the_upstream(start_proxy, script):
    proxy = start_proxy()
    body = {"model": None, "messages": [{"role": "user", "content": "x"}], "stream": None, "stream_options": None,
            "n": None}
    assert httpx.post(proxy.url + "/v1/chat/completions", json=body).status_code == 200
    assert httpx.post(proxy.url + "/v1/responses", json={"input": "x", "stream": None, "instructions": None}).status_code == 200
    # A trailing slash is the same route: no redirect (whose Location would come from the Host header).
    r = httpx.post(proxy.url + "/v1/chat/completions/", json=body, headers={"host": "evil.example"})
    assert r.status_code == 200 and "location" not in r.headers
    assert httpx.post(proxy.url + "/v1/completions/", json={"prompt": "x"}).status_code == 200
    nulls = {"prompt": "x", "model": None, "stream": None, "stream_options": None, "n": None}
    assert httpx.post(proxy.url + "/v1/completions", json=nulls).status_code == 200
    # A 5 MiB base64 image fits the default body limit.
    image = "data:image/png;base64," + "A" * (5 * 1024 * 1024)
    big = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                                                   {"type": "image_url", "image_url": {"url": image}}]}]}
    assert httpx.post(proxy.url + "/v1/chat/completions", json=big, timeout=30).status_code == 200
    assert len(script.of("generation")[-1].body) > 5 * 1024 * 1024


@pytest.mark.parametrize("path, body, param", [
    ("/v1/responses", {"input": 5}, "input"),
    ("/v1/responses", {"input": ["not an item"]}, "input[0]"),
    ("/v1/responses", {"input": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": "m"}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": "\ud800"}, None),  # refused by the body parser, wherever it stands
    ("/v1/responses", {"input": "x", "metadata": {"k": "\udfff"}}, None),
])
def test_bad_input_is_a_400_in_the_openai_shape(start_proxy, script, path, body, param):
    proxy = start_proxy()
    r = httpx.post(proxy.url + path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert script.calls["generation"] == 0


def test_probe_sees_responses_instructions_items_and_tools(start_proxy, script):
    seen: list[dict] = []

    def reply(body: dict) -> str:
        seen.append(body)
        return probe_says(False)

    script.probe_reply = reply
    proxy = start_proxy(mode="sequential", probe_context="conversation")
    sdk(proxy).responses.create(model="m", instructions="Be terse.", input=[
        {"role": "developer", "content": "Dev note."},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
        {"role": "user", "content": [{"type": "input_text", "text": "And the capital of Peru?"}]},
    ])
    shown = json.loads(seen[0]["messages"][1]["content"])["request_to_assess"]
    assert [m["role"] for m in shown] == ["system", "system", "assistant", "tool", "user"]
    assert shown[0]["content"] == "Be terse." and shown[-1]["content"] == "And the capital of Peru?"
    assert shown[3]["content"] == "42"


KEYS = ["type", "role", "content", "text", "input", "prompt", "instructions", "messages", "tools", "stream", "output",
        "delta", "choices", "n", "model", "name", "output_text", "refusal", "call_id", "arguments", "stream_options"]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.sampled_from(KEYS), children, max_size=5), max_leaves=25)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(body=st.dictionaries(st.sampled_from(KEYS), JSON, max_size=6))
def test_every_api_parses_any_json_into_a_request_or_a_400(body):
    raw = json.dumps(body).encode()
    for api in GUARDED_APIS:
        try:
            request = api.parse(raw)
        except ProxyError as error:
            assert error.status == 400
            continue
        json.dumps(request.messages, ensure_ascii=False).encode()  # the probe can serialise what it reads
        assert request.messages and request.choices >= 1


@settings(max_examples=300, deadline=None, derandomize=True)
@given(events=st.lists(JSON, max_size=6), cut=st.integers(min_value=1, max_value=7))
def test_every_api_reads_any_answer_or_stream_without_raising(events, cut):
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    for api in GUARDED_APIS:
        collector = api.collector()
        for i in range(0, len(stream), cut):
            collector.feed(stream[i : i + cut])
        assert isinstance(collector.text, str)
        for event in events:
            text = api.answer_text(json.dumps(event).encode())
            assert text is None or isinstance(text, str)


def test_upstream_health_is_a_metric_and_not_the_guards_readiness(start_proxy, script):
    proxy = start_proxy(upstream_check_interval=0.2)

    def upstream_up() -> str | None:
        for line in httpx.get(proxy.url + "/metrics").text.splitlines():
            if line.startswith("refusal_guard_upstream_up "):
                return line.split()[1]
        return None

    def eventually(value: str) -> bool:
        deadline = time.monotonic() + 10
        while upstream_up() != value:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    assert eventually("1.0")
    script.models_status = 503
    assert eventually("0.0")
    assert httpx.get(proxy.url + "/readyz").status_code == 200
    r = httpx.get(proxy.url + "/readyz?upstream=1")
    assert r.status_code == 503 and r.json()["status"] == "upstream unhealthy"
    script.models_status = 200
    assert eventually("1.0") and httpx.get(proxy.url + "/readyz?upstream=1").status_code == 200
