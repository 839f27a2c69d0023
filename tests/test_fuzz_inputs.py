"""No guard-made 5xx from any client input (issue 16, item 5): numbers, header bytes, duplicate
keys and disconnects, against the real CLI (``python -m guard.cli serve``) on loopback.

* A 5,000-digit integer anywhere in the body used to escape the JSON parser as a ``ValueError``
  (a 500); any number the parser meets is now a 200 or a 400, never a 5xx.
* A key given twice in one object is a 400 (the guard and the upstream could read different
  ``messages``: Python keeps the last, other parsers the first).
* A non-ASCII (Latin-1) header value is forwarded and the request counted and logged like any
  other (it used to end in a 500 with no datapoint and no ``requests_total`` count).
* A client that disconnects mid-body is counted as 499 (client closed), never as a 500, and
  leaves no traceback in the log.
The proxy's log must hold no traceback and ``/metrics`` no 500 at the end of the module.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fault_upstream import ProxyProcess, metric_samples, metric_sum
from tests.scripted_upstream import Script, build_upstream
from tests.servers import ServerThread, eventually


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> Iterator[tuple[ProxyProcess, Script]]:
    script = Script()
    logs = tmp_path_factory.mktemp("fuzz-inputs")
    with ServerThread(build_upstream(script)) as upstream, ProxyProcess(
        upstream.url + "/v1", logs, "--mode", "sequential", "--datapoints", str(logs / "dp.sqlite3"),
        "--max-body-bytes", str(256 * 1024),
    ) as guard:
        guard.db = logs / "dp.sqlite3"
        yield guard, script
        samples = metric_samples(guard.url)
        output = guard.output()
    assert "Traceback" not in output, output[-3000:]
    assert metric_sum(samples, "refusal_guard_http_requests_total", status="500") == 0


def post(guard: ProxyProcess, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(guard.url + "/v1/chat/completions", content=body, timeout=30,
                      headers={"content-type": "application/json", **headers})


def raw_exchange(port: int, data: bytes, *, close_after_send: bool = False, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return b""
        if close_after_send:
            return b""
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and _complete(answer):
                    break
        except (TimeoutError, socket.timeout, ConnectionResetError):
            pass
        return answer


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


# --- numbers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["temperature", "model_list", "content_part", "extra", "max_tokens"])
def test_a_5000_digit_integer_anywhere_is_a_400(proxy, where):
    guard, _ = proxy
    big = "9" * 5000
    bodies = {
        "temperature": f'{{"messages": [{{"role": "user", "content": "hi"}}], "temperature": {big}}}',
        "model_list": f'{{"model": [{big}], "messages": [{{"role": "user", "content": "hi"}}]}}',
        "content_part": f'{{"messages": [{{"role": "user", "content": [{{"type": "x", "n": -{big}}}]}}]}}',
        "extra": f'{{"messages": [{{"role": "user", "content": "hi"}}], "extra": {{"deep": [[{big}]]}}}}',
        "max_tokens": f'{{"messages": [{{"role": "user", "content": "hi"}}], "max_tokens": {big}}}',
    }
    r = post(guard, bodies[where].encode())
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["code"] == "invalid_json"


NUMBER = st.one_of(
    st.integers().map(str),
    st.integers(min_value=4000, max_value=6000).map(lambda n: "1" * n),
    st.integers(min_value=1, max_value=99999).map(lambda e: f"1e{e}"),
    st.integers(min_value=1, max_value=99999).map(lambda e: f"-1.5E-{e}"),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "-0", "0.0000000000000000000000001", "1" * 300 + ".5"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
SLOT = st.sampled_from([
    '{{"messages": [{{"role": "user", "content": "hi"}}], "temperature": {n}}}',
    '{{"model": {n}, "messages": [{{"role": "user", "content": "hi"}}]}}',
    '{{"messages": [{{"role": "user", "content": "hi", "n": {n}}}], "stream": false}}',
    '{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": "a"}}, {n}]}}]}}',
    '{{"messages": [{{"role": "user", "content": "hi"}}], "tools": [{{"type": "function", "function": {{"name": {n}}}}}]}}',
    '{{"messages": [{{"role": "assistant", "tool_calls": [{{"function": {{"name": "f", "arguments": {n}}}}}]}}, '
    '{{"role": "user", "content": "x"}}]}}',
])


@settings(max_examples=60, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(number=NUMBER, slot=SLOT)
def test_numbers_anywhere_never_get_a_5xx(proxy, number, slot):
    guard, _ = proxy
    r = post(guard, slot.format(n=number).encode())
    assert r.status_code < 500, (slot.format(n=number)[:200], r.text[:300])
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# --- duplicate keys -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b'{"messages": [{"role": "user", "content": "HARMFUL"}], "messages": [{"role": "user", "content": "benign"}]}',
    b'{"model": "a", "model": "b", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"messages": [{"role": "user", "content": "a", "content": "b"}]}',
    b'{"messages": [{"role": "user", "role": "system", "content": "a"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "extra": {"k": 1, "k": 2}}',
])
def test_a_key_given_twice_is_a_400(proxy, body):
    guard, script = proxy
    before = script.calls["generation"]
    r = post(guard, body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "duplicate_key", r.text
    assert script.calls["generation"] == before  # nothing went upstream


@settings(max_examples=40, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(keys=st.lists(st.sampled_from(["model", "messages", "stream", "x", "role", "content"]), min_size=2, max_size=5),
       nested=st.booleans())
def test_duplicate_keys_never_get_a_5xx(proxy, keys, nested):
    guard, _ = proxy
    members = ", ".join(f'"{k}": {json.dumps([{"role": "user", "content": "q"}]) if k == "messages" else 1}'
                        for k in keys)
    body = (f'{{"messages": [{{"role": "user", {members}}}]}}' if nested
            else f'{{"messages": [{{"role": "user", "content": "q"}}], {members}}}')
    r = post(guard, body.encode())
    assert r.status_code < 500, (body, r.text[:300])
    if len(set(keys)) < len(keys) or (not nested and "messages" in keys) or (nested and {"role", "content"} & set(keys)):
        assert r.status_code == 400


# --- header bytes -------------------------------------------------------------------------------------------


def test_a_non_ascii_header_value_is_forwarded_counted_and_logged(proxy):
    guard, script = proxy
    before = metric_sum(metric_samples(guard.url), "refusal_guard_requests_total")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "latin-1 header"}]}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
               b"x-user-name: caf\xe9 \xff\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    answer = raw_exchange(guard.port, request)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert script.of("generation")[-1].headers["x-user-name"].encode("latin-1", "replace") in (
        b"caf\xe9 \xff", "café ÿ".encode("utf-8").decode("latin-1").encode("latin-1"))
    eventually(lambda: metric_sum(metric_samples(guard.url), "refusal_guard_requests_total") >= before + 1,
               what="the request counted")
    assert metric_sum(metric_samples(guard.url), "refusal_guard_requests_total") == before + 1


    def logged() -> int:  # the datapoint log is flushed in batches, after the count
        with sqlite3.connect(guard.db) as db:
            return db.execute("SELECT COUNT(*) FROM datapoints WHERE model = 'm'").fetchone()[0]

    eventually(logged, what="the datapoint logged")


HEADER_BYTES = st.binary(min_size=1, max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)


@settings(max_examples=60, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(value=HEADER_BYTES, name=st.sampled_from([b"x-custom", b"authorization", b"x-request-id", b"user-agent",
                                                  b"x-refusal-guard-probe", b"cookie", b"openai-organization"]))
def test_header_bytes_never_get_a_5xx(proxy, value, name):
    guard, _ = proxy
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hdr"}]}'
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" + name + b": "
               + value + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    answer = raw_exchange(guard.port, request)
    status = answer.split(b"\r\n", 1)[0]
    assert answer == b"" or status.startswith((b"HTTP/1.1 2", b"HTTP/1.1 4")), status


# --- disconnects --------------------------------------------------------------------------------------------


def test_a_client_that_disconnects_mid_body_is_a_client_close_not_a_500(proxy):
    guard, _ = proxy
    before = metric_samples(guard.url)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 50_000}]}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n")
    for cut in (0, 10, 20_000):
        raw_exchange(guard.port, head + body[:cut], close_after_send=True)
    time.sleep(1.0)
    after = metric_samples(guard.url)
    closed = (metric_sum(after, "refusal_guard_http_requests_total", status="499")
              - metric_sum(before, "refusal_guard_http_requests_total", status="499"))
    assert closed == 3
    assert metric_sum(after, "refusal_guard_http_requests_total", status="500") == 0
    invalid = (metric_sum(after, "refusal_guard_requests_total", action="invalid")
               - metric_sum(before, "refusal_guard_requests_total", action="invalid"))
    assert invalid == 3  # every request is accounted for
    assert "Traceback" not in guard.output()


@settings(max_examples=25, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(cut=st.integers(min_value=0, max_value=400), stream=st.booleans())
def test_disconnects_anywhere_never_get_a_500(proxy, cut, stream):
    guard, _ = proxy
    body = json.dumps({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "y" * 200}]}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: "
               + str(len(body)).encode() + b"\r\n\r\n" + body)
    raw_exchange(guard.port, request[:len(request) - cut], close_after_send=True)
    assert metric_sum(metric_samples(guard.url), "refusal_guard_http_requests_total", status="500") == 0
