"""Bounded work and bounded datapoints per request (issue 23, rows 4, 5 and 9), against real servers.

* Row 4: a blocked ``/v1/completions`` with 20,000 prompts and ``n=128`` built a 296 MB answer. Now
  prompts, ``n`` and prompts x ``n`` have limits (a 400 in the OpenAI shape naming the field, nothing
  sent upstream, counted as invalid), and the largest accepted block is streamed in bounded writes.
* Row 9: bodies under the size limit with a million messages, items or tools stalled ``/healthz`` for
  seconds. Messages, input items and tools have limits; large bodies are parsed and probed off the
  event loop (read correctly there: tested here; the latency is measured by
  ``benchmarks/healthz_under_load.py``, not by a test).
* Row 5: a Responses ``conversation`` object was stored whole in every datapoint. ``context`` holds
  sanitised ids now, and a row's text is capped (``ROW_MAX_CHARS``).
"""

from __future__ import annotations

import json
import sqlite3

import httpx
import openai
import pytest

from guard.apis.base import (
    MAX_BATCH_CHOICES,
    MAX_CHOICES,
    MAX_INPUT_ITEMS,
    MAX_JSON_OBJECTS,
    MAX_MESSAGES,
    MAX_PROMPTS,
    MAX_TOOLS,
    OFF_LOOP_BYTES,
)
from guard.stores.recorder import ROW_MAX_CHARS, export_jsonl
from tests.fault_upstream import metric_samples, metric_sum
from tests.servers import eventually

REFUSE = json.dumps({"will_refuse": True, "confidence": 5, "harm_rating": 5, "topic": "weapons"})
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def sdk(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0, timeout=60)


@pytest.fixture
def blocking(start_proxy, script):
    script.probe_reply = lambda body: REFUSE if "HARMFUL" in body["messages"][1]["content"] else json.dumps(
        {"will_refuse": False, "confidence": 5, "harm_rating": 1, "topic": "other"})
    return start_proxy(mode="sequential", refusal_message="Blocked.")


def upstream_calls(script) -> int:
    return script.calls["probe"] + script.calls["generation"]


def assert_limit_error(response: httpx.Response, param: str, code: str) -> None:
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), error


# --- row 4: prompts x n ---------------------------------------------------------------------------------


def test_the_row_4_attack_is_a_400_before_anything_goes_upstream(blocking, script):
    body = {"model": "m", "prompt": ["HARMFUL"] * 20_000, "n": 128, "stream": True}
    r = httpx.post(blocking.url + "/v1/completions", json=body, timeout=60)
    assert_limit_error(r, "prompt", "array_above_max_length")
    assert str(MAX_PROMPTS) in r.json()["error"]["message"]
    assert upstream_calls(script) == 0
    samples = metric_samples(blocking.url)
    assert metric_sum(samples, "refusal_guard_requests_total", action="invalid") == 1


@pytest.mark.parametrize("prompts, n, param, code", [
    (MAX_PROMPTS, 2, "n", "invalid_value"),  # each within its limit, the product not
    (MAX_BATCH_CHOICES // MAX_CHOICES + 1, MAX_CHOICES, "n", "invalid_value"),
    (1, MAX_CHOICES + 1, "n", "integer_above_max_value"),
    (1, 0, "n", "integer_below_min_value"),
])
def test_prompts_times_n_past_the_limits_is_a_400_through_the_sdk(blocking, script, prompts, n, param, code):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(blocking).completions.create(model="m", prompt=["HARMFUL"] * prompts, n=n)
    assert (caught.value.status_code, caught.value.param, caught.value.code) == (400, param, code)
    assert upstream_calls(script) == 0


def test_chat_n_past_128_is_a_400(blocking, script):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(blocking).chat.completions.create(model="m", messages=[{"role": "user", "content": "HARMFUL"}], n=129)
    assert (caught.value.param, caught.value.code) == ("n", "integer_above_max_value")
    assert upstream_calls(script) == 0


def test_the_largest_accepted_blocked_batch_is_whole_and_streamed_in_bounded_writes(blocking, script):
    prompts, n = MAX_BATCH_CHOICES // MAX_CHOICES, MAX_CHOICES  # 16 x 128 = 2048 choices
    client = sdk(blocking)
    raw = client.completions.with_raw_response.create(model="m", prompt=["HARMFUL"] * prompts, n=n)
    assert raw.headers["x-refusal-guard-action"] == "block"
    completion = raw.parse()
    assert sorted(c.index for c in completion.choices) == list(range(MAX_BATCH_CHOICES))
    assert {c.finish_reason for c in completion.choices} == {"content_filter"}
    assert len(raw.http_response.content) < 400 * MAX_BATCH_CHOICES  # a few hundred bytes a choice
    # streamed: the same choices, as a chunked stream (no content-length: not built as one string)
    with httpx.stream("POST", blocking.url + "/v1/completions", timeout=60, json={
            "model": "m", "prompt": ["HARMFUL"] * prompts, "n": n, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["x-refusal-guard-action"] == "block"
        assert "content-length" not in r.headers and r.headers["transfer-encoding"] == "chunked"
        writes = [len(chunk) for chunk in r.iter_raw()]
    assert sum(writes) < 500 * 2 * MAX_BATCH_CHOICES
    stream = client.completions.create(model="m", prompt=["HARMFUL"] * prompts, n=n, stream=True)
    finished = sorted(c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason)
    assert finished == list(range(MAX_BATCH_CHOICES))
    assert script.calls["generation"] == 0


# --- row 9: messages, items, tools --------------------------------------------------------------------------


def limit_cases():
    user = {"role": "user", "content": "hi"}
    return [
        ("/v1/chat/completions", {"messages": [user] * (MAX_MESSAGES + 1)}, "messages"),
        ("/v1/chat/completions", {"messages": [user], "tools": [TOOL] * (MAX_TOOLS + 1)}, "tools"),
        ("/v1/chat/completions", {"messages": [user], "functions": [TOOL["function"]] * (MAX_TOOLS + 1)}, "functions"),
        ("/v1/responses", {"input": [user] * (MAX_INPUT_ITEMS + 1)}, "input"),
        ("/v1/responses", {"input": "hi", "tools": [{"type": "function", "name": "f"}] * (MAX_TOOLS + 1)}, "tools"),
        ("/v1/completions", {"prompt": ["hi"] * (MAX_PROMPTS + 1)}, "prompt"),
    ]


@pytest.mark.parametrize("path, body, param", limit_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_arrays_past_their_limit_are_a_400_naming_the_field(blocking, script, path, body, param):
    r = httpx.post(blocking.url + path, json={"model": "m", **body}, timeout=60)
    assert_limit_error(r, param, "array_above_max_length")
    assert upstream_calls(script) == 0


def test_a_hundred_thousand_messages_under_the_size_limit_is_a_400(blocking, script):
    body = b'{"model":"m","messages":[' + b",".join([b'{"role":"user","content":"x"}'] * 100_000) + b"]}"
    assert OFF_LOOP_BYTES < len(body) < 32 * 1024 * 1024  # parsed in a worker thread
    r = httpx.post(blocking.url + "/v1/chat/completions", content=body, timeout=120,
                   headers={"content-type": "application/json"})
    assert_limit_error(r, "messages", "array_above_max_length")
    assert httpx.get(blocking.url + "/healthz").status_code == 200
    assert upstream_calls(script) == 0


@pytest.mark.parametrize("where", ["content_parts", "unknown_field"])
def test_a_body_of_more_json_objects_than_the_limit_is_a_400(blocking, script, where):
    """Arrays the guard has no limit for (content parts, fields it forwards unread) are bounded too: the
    parse stops at MAX_JSON_OBJECTS objects."""
    many = [{"type": "text", "text": "w"}] * (MAX_JSON_OBJECTS + 1)
    message = {"role": "user", "content": many if where == "content_parts" else "hi"}
    body = {"model": "m", "messages": [message], **({"extra": many} if where == "unknown_field" else {})}
    r = httpx.post(blocking.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_objects", r.text[:300]
    assert upstream_calls(script) == 0
    few = {"model": "m", "messages": [{"role": "user", "content": many[:MAX_JSON_OBJECTS - 10]}]}
    assert httpx.post(blocking.url + "/v1/chat/completions", json=few, timeout=120).status_code == 200


def test_arrays_at_their_limit_are_accepted_and_probed(blocking, script):
    """Exactly at each limit the request is served; a large body (parsed and probed in a worker thread)
    is read whole: the harmful first message of 2,048 is seen and blocked."""
    filler = [{"role": "user" if i % 2 else "assistant", "content": "x" * 200} for i in range(MAX_MESSAGES - 1)]
    body = {"model": "m", "messages": [{"role": "system", "content": "HARMFUL"}, *filler],
            "tools": [TOOL] * MAX_TOOLS}
    assert len(json.dumps(body)) > OFF_LOOP_BYTES
    raw = sdk(blocking).chat.completions.with_raw_response.create(**body)
    assert raw.headers["x-refusal-guard-action"] == "block" and script.calls["probe"] == 1
    items = [{"role": "user", "content": "y" * 30} for _ in range(MAX_INPUT_ITEMS)]
    answer = sdk(blocking).responses.with_raw_response.create(model="m", input=items)
    assert answer.headers["x-refusal-guard-action"] == "pass" and script.calls["generation"] == 1


def test_a_large_body_that_is_not_json_is_still_a_400(blocking, script):
    body = b'{"model": "m", "messages": [' + b'{"role": "user", "content": "x"},' * 20_000 + b"oops"
    assert len(body) > OFF_LOOP_BYTES
    r = httpx.post(blocking.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert upstream_calls(script) == 0


# --- row 5: datapoints --------------------------------------------------------------------------------------


def rows(db) -> list[dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM datapoints ORDER BY seq")]
    finally:
        con.close()


def row_chars(row: dict) -> int:
    return sum(len(v) for v in row.values() if isinstance(v, str))


def test_a_conversation_object_is_stored_as_its_id_only(start_proxy, script, tmp_path):
    db = tmp_path / "dp.sqlite3"
    proxy = start_proxy(mode="sequential", datapoints=str(db))
    client = sdk(proxy)
    junk = "J" * 3_000_000
    for conversation in ({"id": "conv_abc123", "junk": junk}, "conv_../../etc/passwd\n<script>" + "z" * 500,
                         {"nested": {"junk": junk}}):
        client.responses.create(model="m", input="hi", conversation=conversation, previous_response_id="resp_1\x7f",
                                prompt={"id": "pmpt_" + "p" * 1000, "variables": {"v": junk}})
    proxy.stop()
    stored = rows(db)
    assert len(stored) == 3
    contexts = [json.loads(r["context"]) for r in stored]
    assert contexts[0]["conversation"] == "conv_abc123"
    assert contexts[1]["conversation"] == ("conv_.._.._etc_passwd__script_" + "z" * 500)[:127] + "~"
    assert contexts[2]["conversation"] == "(object)"
    assert {c["previous_response_id"] for c in contexts} == {"resp_1_"}
    assert {len(c["prompt"]) for c in contexts} == {128}
    assert all(row_chars(r) < 2_000 for r in stored), [row_chars(r) for r in stored]
    out = tmp_path / "export.jsonl"
    with out.open("w") as handle:
        assert export_jsonl(db, handle) == 3
    assert out.stat().st_size < 10_000


def test_a_row_is_capped_even_with_prompt_logging(start_proxy, script, tmp_path):
    db = tmp_path / "dp.sqlite3"
    proxy = start_proxy(mode="sequential", datapoints=str(db), log_prompts=True)
    prompt = "A" * 200_000 + "Z" * 200_000
    sdk(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}])
    sdk(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": "short"}])
    eventually(lambda: db.exists() and len(rows(db)) == 2, what="two datapoints")
    big, small = rows(db)
    assert row_chars(big) <= ROW_MAX_CHARS
    assert big["prompt"].startswith("A" * 1000) and big["prompt"].endswith("Z" * 1000) and "characters cut" in big["prompt"]
    assert small["prompt"] == "short"


def test_large_requests_read_off_the_loop_hash_and_record_as_small_ones_do(start_proxy, script, tmp_path):
    """A large body's last user turn is read and hashed in a worker thread: the datapoint's keyed hash is
    the same as for the text hashed directly (a long string, and a turn of 2,000 parts)."""
    from guard.stores.recorder import PromptHasher, load_hash_key

    db = tmp_path / "dp.sqlite3"
    proxy = start_proxy(mode="sequential", datapoints=str(db))
    long_text = "q" * (OFF_LOOP_BYTES + 10)
    parts = [{"type": "text", "text": f"p{i}"} for i in range(2000)]
    client = sdk(proxy)
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": long_text}])
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": parts},
                                                        {"role": "assistant", "content": "x" * OFF_LOOP_BYTES}])
    proxy.stop()
    hasher = PromptHasher(load_hash_key(None, db.with_name(db.name + ".key")))
    first, second = rows(db)
    assert first["id"] == first["prompt_sha256"] == hasher(long_text)
    assert second["id"] == hasher("\n".join(f"p{i}" for i in range(2000)))
    assert [r["probe_status"] for r in (first, second)] == ["ok", "ok"]


def test_a_large_body_of_numbers_is_parsed_a_number_at_a_time_and_bounded(monkeypatch):
    """Token-id prompts: a C-only scan of millions of integers holds the GIL for a second, so a large
    body's numbers go through a Python call each (the event loop can run between them) and are capped."""
    from guard.apis import base
    from guard.apis.base import MAX_JSON_NUMBERS, load_json
    from guard.errors import ProxyError

    calls = []
    integer = base._ObjectCounter.integer
    monkeypatch.setattr(base._ObjectCounter, "integer", lambda self, text: calls.append(1) or integer(self, text))
    accepted = json.dumps({"model": "m", "prompt": list(range(MAX_JSON_NUMBERS - 8)), "temperature": 0.5}).encode()
    data = load_json(accepted)
    assert len(data["prompt"]) == MAX_JSON_NUMBERS - 8 and data["prompt"][-1] == MAX_JSON_NUMBERS - 9
    assert len(calls) == MAX_JSON_NUMBERS - 8  # one Python call per integer: the scan lets go of the GIL
    assert load_json(b'{"model": "m", "prompt": [1, 2, 3]}')["prompt"] == [1, 2, 3] and len(calls) == MAX_JSON_NUMBERS - 8
    refused = json.dumps({"model": "m", "prompt": list(range(MAX_JSON_NUMBERS + 1))}).encode()
    with pytest.raises(ProxyError) as error:
        load_json(refused)
    assert error.value.status == 400 and b"too_many_numbers" in error.value.body()


@pytest.mark.parametrize("strings", ["long", "short"])  # the Python scanner (long strings) and the C one
def test_a_large_body_parses_as_json_loads_does_with_the_same_refusals(strings):
    from guard.apis.base import DECODE_STEP, LONG_STRING_BYTES, load_json
    from guard.errors import ProxyError

    size = 4_000 if strings == "long" else 8
    count = DECODE_STEP // size + 16
    body = {"model": "m", "prompt": ["a\u00e9\\\"\u2028" + "x" * size for _ in range(count)], "n": 1, "t": 0.5,
            "flags": [True, False, None], "nested": {"k": [1.5e3, -2]}}
    raw = json.dumps(body).encode()
    assert len(raw) > DECODE_STEP and (len(raw) >= LONG_STRING_BYTES * raw.count(b'"')) == (strings == "long")
    assert load_json(raw) == json.loads(raw) == body
    for bad, code in ((raw[:-1] + b', "Prompt": []}', "duplicate_key"), (raw[:-1] + b', "x": "\\ud800"}', "invalid_unicode"),
                      (raw[:-1], "invalid_json")):
        with pytest.raises(ProxyError) as error:
            load_json(bad)
        assert error.value.status == 400 and code.encode() in error.value.body()
