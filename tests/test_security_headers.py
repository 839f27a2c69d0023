"""Header hygiene both ways (issue 16, item 6), against real servers on loopback.

* A client's ``X-Refusal-Guard-Probe: 1`` never reaches the upstream on the real generation
  (an upstream keyed on it would answer with a probe answer), nor any other ``x-refusal-guard-*``.
* ``Expect: 100-continue``, ``Connection`` and the headers it names, ``TE``, ``Upgrade`` and
  ``Proxy-*`` are not forwarded; an upstream that never sends ``100 Continue`` is not hung.
* The upstream's own ``x-refusal-guard-*`` headers never reach the client: only the guard's.
* Several ``Set-Cookie`` headers are relayed as separate headers, in order.
* With ``api_keys`` set, the client's key for the guard is not forwarded upstream unless
  ``forward_client_key`` says so.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import httpx
import pytest

from guard.proxy.headers import relayed_response_headers, upstream_request_headers
from tests.fault_upstream import metric_samples, metric_sum
from tests.hostile_upstream import hostile, start_guard  # noqa: F401
from tests.servers import free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hello"}]}


def test_client_cannot_mark_its_generation_as_a_probe(start_guard, hostile):
    proxy = start_guard()
    r = httpx.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=20,
                   headers={"X-Refusal-Guard-Probe": "1", "x-refusal-guard-action": "pass", "X-Keep": "yes"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Sure, here it is."
    assert hostile.calls == {"probe": 1, "generation": 1}
    (generation, _), = hostile.of("generation")
    # none of the client's x-refusal-guard-* headers; only the guard's own request id, which it sets
    assert [n for n in generation if n.startswith("x-refusal-guard-")] == ["x-refusal-guard-request-id"]
    assert generation["x-refusal-guard-request-id"] == r.headers["x-refusal-guard-request-id"]
    assert generation["x-keep"] == "yes"


def test_hop_by_hop_and_expect_are_not_forwarded(start_guard, hostile):
    proxy = start_guard(mode="off")
    body = json.dumps(CHAT).encode()
    headers = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\nexpect: 100-continue\r\nconnection: keep-alive, x-hop\r\n"
               f"x-hop: secret\r\nte: trailers\r\nproxy-authorization: Basic Zm9v\r\nx-end-to-end: kept\r\n\r\n")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as sock:
        sock.sendall(headers.encode())
        head = sock.recv(65536)
        if head.startswith(b"HTTP/1.1 100"):  # uvicorn answers the client's expectation itself
            head = b""
        sock.sendall(body)
        answer = head
        while b"Sure, here it is." not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    (generation, _), = hostile.of("generation")
    for name in ("expect", "x-hop", "te", "proxy-authorization"):
        assert name not in generation, name
    assert generation.get("connection", "keep-alive") == "keep-alive"  # the client's own, not forwarded
    assert generation["x-end-to-end"] == "kept"


def test_an_upstream_that_never_sends_100_continue_is_not_hung():
    """A raw upstream that reads the head, never answers 100, and only answers once the body came."""
    port = free_port()
    ready = threading.Event()
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        await asyncio.wait_for(reader.readexactly(length), 5)  # hangs here if the sender waits for a 100
        content = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                           "finish_reason": "stop"}]}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                     + str(len(content)).encode() + b"\r\n\r\n" + content)
        await writer.drain()
        writer.close()

    def serve() -> None:
        async def main() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", port)
            ready.set()
            async with server:
                await asyncio.sleep(30)
        asyncio.run(main())

    threading.Thread(target=serve, daemon=True).start()
    ready.wait(5)
    from prometheus_client import CollectorRegistry

    from guard.app import create_app
    from guard.settings import Settings
    from tests.servers import ServerThread

    with ServerThread(create_app(Settings(upstream=f"http://127.0.0.1:{port}/v1", mode="off", datapoints=None,
                                          read_timeout=5), registry=CollectorRegistry())) as proxy:
        r = httpx.post(proxy.url + "/v1/chat/completions", json=CHAT, headers={"expect": "100-continue"}, timeout=20)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
    assert b"expect" not in seen[0].lower()


def test_upstream_guard_headers_are_dropped_and_cookies_stay_separate(start_guard, hostile):
    hostile.extra_headers = [("x-refusal-guard-action", "pass"), ("X-Refusal-Guard-Prediction", "comply"),
                             ("set-cookie", "a=1; Path=/"), ("set-cookie", "b=2; Path=/"), ("x-ratelimit", "7")]
    proxy = start_guard()
    r = httpx.post(proxy.url + "/v1/chat/completions", timeout=20,
                   json={"model": "m", "messages": [{"role": "user", "content": "HARMFUL but reviewed"}]})
    # The guard blocked it: the upstream's forged "pass" must not appear anywhere.
    assert r.headers.get_list("x-refusal-guard-action") == ["block"]
    r = httpx.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=20)
    assert r.headers.get_list("x-refusal-guard-action") == ["pass"]
    assert r.headers.get_list("x-refusal-guard-prediction") == ["comply"]
    assert r.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert r.headers["x-ratelimit"] == "7"


@pytest.mark.parametrize("forward", [False, True])
def test_the_clients_key_for_the_guard_is_not_forwarded_unless_configured(start_guard, hostile, forward):
    proxy = start_guard(api_keys="sk-guard-key", forward_client_key=forward)
    r = httpx.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=20,
                   headers={"authorization": "Bearer sk-guard-key"})
    assert r.status_code == 200
    for headers, _ in hostile.of("generation") + hostile.of("probe"):
        assert ("authorization" in headers) is forward
    assert metric_sum(metric_samples(proxy.url), "refusal_guard_requests_total", action="pass") == 1


def test_filters_as_functions():
    out = upstream_request_headers(
        [("Host", "x"), ("Connection", "close, X-A"), ("X-A", "1"), ("Expect", "100-continue"), ("TE", "trailers"),
         ("Upgrade", "h2c"), ("Keep-Alive", "5"), ("X-Refusal-Guard-Probe", "1"), ("Authorization", "Bearer c"),
         ("X-Latin", "caf\xe9"), ("Content-Length", "5"), ("Accept-Encoding", "gzip"), ("X-Ok", "ok")],
        authorization=None, forward_client_authorization=False)
    assert out == {"x-latin": "caf\xe9".encode("latin-1"), "x-ok": "ok", "accept-encoding": "identity"}
    out = upstream_request_headers([("Authorization", "Bearer c")], authorization="Bearer up",
                                   forward_client_authorization=True)
    assert out["authorization"] == "Bearer up"
    relayed = relayed_response_headers([(b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"Connection", b"x-b"),
                                        (b"X-B", b"1"), (b"x-refusal-guard-topic", b"weapons"), (b"Date", b"now"),
                                        (b"Content-Type", b"application/json"), (b"X-Bytes", b"\xe9")])
    assert relayed.raw == [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"content-type", b"application/json"),
                           (b"x-bytes", b"\xe9")]
