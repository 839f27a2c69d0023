"""One path rule, and the transport rows of issue 23 (1, 2, 11, 12, 13, 14), on real servers on loopback.

Targets are sent as raw bytes (``http.client`` or a socket): an SDK or httpx would tidy
``/v1/./chat/completions`` before it left the client, and the attack is precisely a client that
does not. Each test asserts what the upstream saw (or that it saw nothing), whether the probe ran
and whether the datapoint was written.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from guard.app import create_app
from guard.cli import uvicorn_options
from guard.proxy.headers import client_location
from guard.proxy.target import BadTarget, normalise
from guard.settings import Settings
from tests.fault_upstream import ProxyProcess, datapoint_rows, metric_samples, metric_sum
from tests.recording_upstream import Recorder, build_recording_upstream
from tests.servers import ServerThread, eventually

BODIES = {
    "chat": {"model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    "completions": {"model": "m", "prompt": "The capital of France is"},
    "responses": {"model": "m", "input": "What is the capital of France?"},
}
UPSTREAM_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses"}


def raw(port: int, method: str, target: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with ``target`` sent byte for byte (``http.client`` does not normalise it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


def sent(recorder: Recorder) -> list:
    """What the upstream received on a client's behalf (the guard's own ``GET /models`` calls carry no
    request id)."""
    with recorder.lock:
        return [r for r in recorder.requests if "x-refusal-guard-request-id" in r.headers]


def counted(url: str, route: str) -> dict | None:
    """The guard's metrics once a request of ``route`` is counted (it is counted after the answer went out)."""
    samples = metric_samples(url)
    return samples if metric_sum(samples, "refusal_guard_http_requests_total", route=route) else None


def openai_error(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def guard(recorder, tmp_path) -> Iterator[ServerThread]:
    """The recording upstream (probes answer "comply") and a sequential guard writing datapoints."""
    with ServerThread(build_recording_upstream(recorder)) as upstream:
        settings = Settings(upstream=upstream.url + "/v1", mode="sequential", datapoints=tmp_path / "dp.sqlite3",
                            upstream_check_interval=0, upstream_api_key="sk-guard-own")
        with ServerThread(create_app(settings, registry=CollectorRegistry())) as proxy:
            yield proxy


# --- row 1: a guarded route is guarded however it is spelled ------------------------------------

SPELLINGS = [
    ("chat", "/v1/./chat/completions"), ("chat", "/v1/x/../chat/completions"), ("chat", "/v1/chat/completions/."),
    ("chat", "/v1/%2e/chat/completions"), ("chat", "//v1//chat/completions"), ("chat", "/v1/chat/completions/"),
    ("chat", "/v1/%63hat/completions"), ("chat", "/v1/Chat/Completions"), ("chat", "/v1/chat/x/%2E%2E/completions"),
    ("completions", "/v1/./completions"), ("completions", "/v1/completions/."), ("completions", "//v1/completions//"),
    ("responses", "/v1/responses/."), ("responses", "/v1/x/../responses"), ("responses", "/v1/%72esponses"),
]


@pytest.mark.parametrize(("api", "target"), SPELLINGS)
def test_a_guarded_route_is_guarded_however_it_is_spelled(guard, recorder, tmp_path, api, target):
    status, headers, body = raw(guard.port, "POST", target, json.dumps(BODIES[api]).encode(),
                                {"content-type": "application/json"})
    assert status == 200, body
    assert headers["x-refusal-guard-action"] == "pass" and headers["x-refusal-guard-prediction"] == "comply"
    assert len(recorder.probes) == 1  # the probe ran
    (seen,) = sent(recorder)
    assert seen.method == "POST" and seen.path == UPSTREAM_PATHS[api]  # the generation, at the normal path
    request_id = headers["x-refusal-guard-request-id"]
    rows = eventually(lambda: [r for r in datapoint_rows(tmp_path / "dp.sqlite3") if r["request_id"] == request_id],
                      what="the datapoint")
    assert rows[0]["route"] == api and rows[0]["probe_status"] == "ok"
    samples = metric_samples(guard.url)
    assert metric_sum(samples, "refusal_guard_http_requests_total", route=api, status="200") == 1
    assert metric_sum(samples, "refusal_guard_http_requests_total", route="v1_other") == 0


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD", "OPTIONS"])
@pytest.mark.parametrize(("target", "route"), [("/v1/chat/completions", "chat"), ("/v1/./completions", "completions"),
                                               ("/v1/responses/", "responses")])
def test_another_method_on_a_guarded_route_is_405_never_forwarded(guard, recorder, method, target, route):
    if method == "GET" and route == "chat":  # a bodyless GET there is OpenAI's listing: forwarded (below)
        method, body = "GET", b'{"model": "m", "messages": []}'
    else:
        body = None
    status, headers, answer = raw(guard.port, method, target, body)
    assert status == 405 and headers["allow"] == ("GET, POST" if route == "chat" else "POST")
    if method != "HEAD":
        assert openai_error(answer)["code"] == "method_not_allowed"
    assert not sent(recorder) and not recorder.probes
    assert metric_sum(metric_samples(guard.url), "refusal_guard_http_requests_total", route=route, status="405") == 1


@pytest.mark.parametrize(("method", "target", "upstream_path"), [
    ("GET", "/v1/responses/resp_1", "/v1/responses/resp_1"),
    ("DELETE", "/v1/responses/resp_1", "/v1/responses/resp_1"),
    ("POST", "/v1/responses/resp_1/cancel", "/v1/responses/resp_1/cancel"),
    ("GET", "/v1/responses/resp_1/input_items?limit=5", "/v1/responses/resp_1/input_items"),
    ("GET", "/v1/chat/completions/chatcmpl-1", "/v1/chat/completions/chatcmpl-1"),
    ("POST", "/v1/chat/completions/chatcmpl-1", "/v1/chat/completions/chatcmpl-1"),
    ("GET", "/v1/chat/completions/chatcmpl-1/messages", "/v1/chat/completions/chatcmpl-1/messages"),
    ("GET", "/v1/chat/completions?limit=2", "/v1/chat/completions"),  # OpenAI's listing of stored completions
    ("GET", "/v1/files/a%252e", "/v1/files/a%2e"),  # decoded once here, once upstream: never a dot segment
    ("GET", "/v1/files/file%20x", "/v1/files/file x"),
])
def test_stored_objects_under_guarded_paths_are_still_forwarded(guard, recorder, method, target, upstream_path):
    body = b"{}" if method == "POST" else None
    status, _, _ = raw(guard.port, method, target, body, {"content-type": "application/json"} if body else None)
    assert not recorder.probes
    if upstream_path is None:
        assert status == 405 and not sent(recorder)
        return
    assert status == 404  # the recording upstream's own answer: it has none of these
    (seen,) = sent(recorder)
    assert (seen.method, seen.path) == (method, upstream_path)
    assert seen.query == (target.split("?", 1)[1] if "?" in target else "")


# --- row 2: nothing outside /v1 reaches the upstream -----------------------------------------------

@pytest.mark.parametrize(("method", "target"), [
    ("GET", "/v1/../admin/keys"), ("GET", "/v1/%2e%2e/stats"), ("GET", "/v1/x/../../etc"),
    ("GET", "/v1/..%2f..%2fetc"), ("GET", "/v1/files%2Fx"), ("GET", "/v1/a%5cb"), ("GET", "/v1/a\\..\\..\\b"),
    ("GET", "/v1/%ff"), ("GET", "/v1/a%00b"), ("GET", "/.."), ("POST", "/v1/%2E%2E/v1/chat/completions"),
    ("DELETE", "/v1/./../v1/files/f1"),
])
def test_a_target_that_leaves_v1_or_hides_a_slash_is_400_never_forwarded(guard, recorder, method, target):
    status, _, body = raw(guard.port, method, target, b"{}" if method == "POST" else None)
    assert status == 400 and openai_error(body)["code"] == "invalid_path"
    assert not sent(recorder) and not recorder.probes
    assert metric_sum(metric_samples(guard.url), "refusal_guard_http_requests_total", route="other", status="400") == 1


@pytest.mark.parametrize("target", ["/v1/messages", "/v1/./messages", "/v1/engines/m/chat/completions",
                                    "/v1/openai/deployments/m/chat/completions", "/v1/batches",
                                    "/v1/threads/thread_1/runs", "/v1/Messages"])
def test_a_post_that_generates_unprobed_is_refused_not_forwarded(guard, recorder, target):
    body = json.dumps({"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, _, answer = raw(guard.port, "POST", target, body, {"content-type": "application/json"})
    if target == "/v1/Messages":  # not the refused path (only guarded paths fold case): forwarded, the upstream's 404
        assert status == 404 and len(sent(recorder)) == 1
        return
    assert status == 403 and openai_error(answer)["code"] == "route_not_guarded"
    assert not sent(recorder) and not recorder.probes
    # reading stays open: a GET under a refused prefix is forwarded
    status, _, _ = raw(guard.port, "GET", "/v1/batches?limit=1")
    assert status == 200 and [s.path for s in sent(recorder)] == ["/v1/batches"]


def test_refused_routes_can_be_opened(recorder, tmp_path):
    with ServerThread(build_recording_upstream(recorder)) as upstream:
        settings = Settings(upstream=upstream.url + "/v1", datapoints=None, upstream_check_interval=0, refused_routes="")
        with ServerThread(create_app(settings, registry=CollectorRegistry())) as proxy:
            status, _, _ = raw(proxy.port, "POST", "/v1/messages", b"{}", {"content-type": "application/json"})
    assert status == 404 and [s.path for s in sent(recorder)] == ["/v1/messages"]  # forwarded, unguarded
    with pytest.raises(ValueError, match="not a normal path under /v1"):
        Settings(upstream="http://127.0.0.1:1/v1", refused_routes="/v1/messages/")


def test_the_normal_form():
    guarded = ("/v1/chat/completions",)
    assert normalise(b"//v1/./x/../chat//completions/", guarded=guarded).path == "/v1/chat/completions"
    assert normalise(b"/v1/CHAT/completions", guarded=guarded).raw_path == b"/v1/chat/completions"
    assert normalise(b"/v1/files/%C3%A9t%C3%A9%2520").raw_path == b"/v1/files/%C3%A9t%C3%A9%2520"
    assert normalise(b"/").path == "/"
    for bad in (b"/v1/..", b"/v1/%2f", b"/v1/%80", b"/v1/\x01"):
        with pytest.raises(BadTarget):
            normalise(bad)


# --- row 12: disconnects mid-upload are 499, over-long targets 414 ------------------------------------

def test_a_client_that_leaves_mid_upload_is_a_499_not_an_upstream_error(tmp_path):
    started = threading.Event()

    async def slow_reader(request: Request) -> Response:
        started.set()
        await request.body()
        return JSONResponse({"ok": True})

    upstream_app = Starlette(routes=[Route("/v1/{path:path}", slow_reader, methods=["POST"])])
    with ServerThread(upstream_app) as upstream:
        settings = Settings(upstream=upstream.url + "/v1", datapoints=None, upstream_check_interval=0)
        with ServerThread(create_app(settings, registry=CollectorRegistry())) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
                sock.sendall(b"POST /v1/files HTTP/1.1\r\nhost: guard\r\ncontent-type: application/octet-stream\r\n"
                             b"content-length: 1000000\r\n\r\n" + b"a" * 20000)
                assert started.wait(10)  # the upload is under way upstream
            samples = eventually(lambda: counted(proxy.url, "files"), what="the request counted")
            assert metric_sum(samples, "refusal_guard_http_requests_total", route="files", status="499") == 1
            assert metric_sum(samples, "refusal_guard_http_requests_total", status="502") == 0
            assert metric_sum(samples, "refusal_guard_upstream_errors_total") == 0


@pytest.mark.parametrize("query_bytes", [8300, 65_000])
def test_an_over_long_target_is_414_never_forwarded(guard, recorder, query_bytes):
    status, _, body = raw(guard.port, "GET", "/v1/models?after=" + "a" * query_bytes)
    assert status == 414 and openai_error(body)["code"] == "request_target_too_long"
    assert not sent(recorder)
    assert metric_sum(metric_samples(guard.url), "refusal_guard_http_requests_total", route="other", status="414") == 1
    status, _, _ = raw(guard.port, "GET", "/v1/models?after=" + "a" * 8000)  # under the cap: forwarded
    assert status == 200 and len(sent(recorder)[-1].query) == len("after=") + 8000


# --- row 13: a Location never names the upstream; /v1/models/ is /v1/models --------------------------

def build_redirecting_upstream() -> Starlette:
    async def redirect(request: Request) -> Response:
        own = f"http://127.0.0.1:{request.url.port}"
        location = {"same-origin": own + "/v1/files/f1/content?x=1", "outside": own + "/internal/admin",
                    "root-path": "/v1/files/f1/content", "root-outside": "/internal", "relative": "f1/content",
                    "cdn": "https://cdn.example.com/f1", "scheme-relative": f"//127.0.0.1:{request.url.port}/v1/f"}[
            request.path_params["kind"]]
        return Response(status_code=307, headers={"location": location, "content-location": location})

    async def content(request: Request) -> Response:
        return Response(b"file bytes", media_type="application/octet-stream")

    # Starlette's router redirects "/x/" to its own absolute URL "http://<host:port>/x", as the upstream did.
    return Starlette(routes=[Route("/v1/files/f1/content", content), Route("/v1/redirect/{kind}", redirect)])


@pytest.mark.parametrize(("kind", "relayed"), [
    ("same-origin", "/v1/files/f1/content?x=1"), ("outside", None), ("root-path", "/v1/files/f1/content"),
    ("root-outside", None), ("relative", "f1/content"), ("cdn", "https://cdn.example.com/f1"),
    ("scheme-relative", "/v1/f"),
])
def test_relayed_locations_never_name_the_upstream(kind, relayed):
    with ServerThread(build_redirecting_upstream()) as upstream:
        settings = Settings(upstream=upstream.url + "/v1", datapoints=None, upstream_check_interval=0)
        with ServerThread(create_app(settings, registry=CollectorRegistry())) as proxy:
            status, headers, _ = raw(proxy.port, "GET", f"/v1/redirect/{kind}")
            assert status == 307
            assert headers.get("location") == relayed and headers.get("content-location") == relayed
            assert str(upstream.port) not in json.dumps(headers)
            if kind == "same-origin":  # following it through the guard reaches the same upstream object
                with httpx.Client(base_url=proxy.url, follow_redirects=True) as client:
                    assert client.get("/v1/redirect/same-origin").content == b"file bytes"


def test_a_location_under_a_longer_base_path():
    base = "http://10.0.0.5:8000/openai/v1"
    assert client_location("http://10.0.0.5:8000/openai/v1/models/m", base) == "/v1/models/m"
    assert client_location("HTTP://10.0.0.5:8000/openai/v1", base) == "/v1"
    assert client_location("http://10.0.0.5:8000/v1/models", base) is None
    assert client_location("http://10.0.0.5:80/openai/v1/models", base) == "http://10.0.0.5:80/openai/v1/models"
    assert client_location("http://10.0.0.5:99999/x", base) is None


def test_models_with_a_trailing_slash_is_models(guard, recorder):
    status, headers, body = raw(guard.port, "GET", "/v1/models/")
    assert status == 200 and json.loads(body)["object"] == "list" and "location" not in headers
    assert sent(recorder)[-1].path == "/v1/models"


def test_an_upstream_that_redirects_slashes_is_never_asked_with_one():
    with ServerThread(build_redirecting_upstream()) as upstream:  # Starlette: /x/ -> 307 to its own absolute URL
        settings = Settings(upstream=upstream.url + "/v1", datapoints=None, upstream_check_interval=0)
        with ServerThread(create_app(settings, registry=CollectorRegistry())) as proxy:
            status, headers, body = raw(proxy.port, "GET", "/v1/files/f1/content/")
            assert status == 200 and body == b"file bytes" and "location" not in headers


# --- row 11: WebSockets are refused and counted; no log line prints a query string --------------------

def websocket_handshake(port: int, target: str) -> bytes:
    """A WebSocket opening handshake on a raw socket; the whole answer, until the server closes or goes quiet."""
    head = (f"GET {target} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and b"}}" in answer:
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return answer


@pytest.mark.parametrize("ws", ["auto", "none"])  # a WebSocket library installed (tests) or not (the image)
def test_a_websocket_is_refused_in_the_openai_shape_and_counted(recorder, ws):
    with ServerThread(build_recording_upstream(recorder)) as upstream:
        settings = Settings(upstream=upstream.url + "/v1", datapoints=None, upstream_check_interval=0)
        with ServerThread(create_app(settings, registry=CollectorRegistry()), ws=ws) as proxy:
            answer = websocket_handshake(proxy.port, "/v1/realtime?model=m&api-key=sk-ws-canary")
            assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
            assert openai_error(answer.split(b"\r\n\r\n", 1)[1])["code"] == "websocket_not_supported"
            assert not sent(recorder)
            samples = eventually(lambda: counted(proxy.url, "realtime"), what="the WebSocket counted")
            assert metric_sum(samples, "refusal_guard_http_requests_total", route="realtime", status="403") == 1


@pytest.fixture(scope="module")
def cli_guard(tmp_path_factory) -> Iterator[tuple[ProxyProcess, Recorder]]:
    """``refusal-guard serve`` as deployed (JSON logs at info level, default keep-alive)."""
    recorder = Recorder()
    logs = tmp_path_factory.mktemp("paths-cli")
    with ServerThread(build_recording_upstream(recorder)) as upstream, ProxyProcess(
        upstream.url + "/v1", logs, "--log-format", "json", "--log-level", "info", "--datapoints",
        str(logs / "dp.sqlite3"),
    ) as proxy:
        yield proxy, recorder


def test_no_log_line_prints_a_query_string(cli_guard):
    proxy, recorder = cli_guard
    canaries = [f"sk-query-canary-{i}" for i in range(4)]
    answer = websocket_handshake(proxy.port, f"/v1/realtime?model=m&api-key={canaries[0]}")
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert raw(proxy.port, "GET", f"/v1/models?api-key={canaries[1]}")[0] == 200
    assert raw(proxy.port, "GET", f"/v1/../x?api-key={canaries[2]}")[0] == 400
    assert raw(proxy.port, "POST", f"/v1/./chat/completions?api-key={canaries[3]}",
               json.dumps(BODIES["chat"]).encode(), {"content-type": "application/json"})[0] == 200
    assert sent(recorder)[-1].query == f"api-key={canaries[3]}"  # forwarded as sent: only the logs are quiet
    lines = eventually(lambda: [json.loads(line) for line in proxy.output().splitlines()
                                if '"route": "chat"' in line], what="the access line of the chat request")
    assert lines[0]["status"] == 200
    output = proxy.output()
    assert '"route": "realtime"' in output and '"status": 403' in output  # the WebSocket's own access line
    assert "WebSocket /v1/realtime" not in output  # uvicorn's own access line (address, path, query) is dropped
    for canary in canaries:
        assert canary not in output, output[-2000:]


def test_the_default_keep_alive_outlives_load_balancers(cli_guard):
    options = uvicorn_options(Settings(upstream="http://upstream/v1"))
    assert options["timeout_keep_alive"] > 60 and options["access_log"] is False  # AWS ALB and nginx: 60 s
    proxy, _ = cli_guard
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b'{"status":"ok"}'
        sock = conn.sock
        # Idle past the old 5 s default (an SDK pool's expiry: httpx's is 5 s). The idle time is what is tested.
        time.sleep(6)
        conn.request("GET", "/healthz")  # on the same connection: the guard has not closed it
        assert conn.getresponse().status == 200 and conn.sock is sock
    finally:
        conn.close()
