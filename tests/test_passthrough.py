"""The dumb pass-through of every unguarded route under /v1.

Against the recording upstream: any method, the query string as sent and the path in its normal form,
request bodies streamed upstream (chunked, no Content-Length) and response bodies streamed
back (binary intact), the upstream's status, headers and errors unchanged; counted under a
bounded route label, no datapoint; a dead upstream is a 502 that names no host or port.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from guard.app import create_app
from guard.settings import Settings
from tests.recording_upstream import BLOB, Recorder, Seen, build_recording_upstream
from tests.servers import ServerThread, free_port


def sent(recorder: Recorder) -> list[Seen]:
    """What the upstream received on a client's behalf (the guard's own ``GET /models`` calls, which
    refresh the model listing, carry no request id)."""
    with recorder.lock:
        return [r for r in recorder.requests if "x-refusal-guard-request-id" in r.headers]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def guard(recorder, tmp_path) -> Iterator[tuple[ServerThread, ServerThread]]:
    with ServerThread(build_recording_upstream(recorder)) as upstream:
        settings = Settings(upstream=upstream.url + "/v1", mode="sequential", datapoints=tmp_path / "dp.sqlite3",
                            upstream_check_interval=0, max_body_bytes=4096)
        with ServerThread(create_app(settings, registry=CollectorRegistry())) as proxy:
            yield proxy, upstream


def test_streams_a_chunked_upload_and_a_binary_download(guard, recorder):
    proxy, _ = guard
    upload = bytes(range(256)) * 2000  # 512 KB, far above max_body_bytes: forwarded routes stream, no limit

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(upload), 65536):
            yield upload[i : i + 65536]

    r = httpx.post(proxy.url + "/v1/audio/speech?format=mp3", content=chunks(),
                   headers={"content-type": "application/octet-stream", "x-custom": "1"})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg"
    seen = sent(recorder)[-1]
    assert seen.body == upload and seen.query == "format=mp3" and seen.headers["x-custom"] == "1"
    with httpx.stream("GET", proxy.url + "/v1/files/file-1/content") as download:
        assert download.headers["content-length"] == str(len(BLOB))
        assert b"".join(download.iter_bytes()) == BLOB


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "HEAD"])
def test_any_method_and_the_path_as_sent(guard, recorder, method):
    proxy, _ = guard
    r = httpx.request(method, proxy.url + "/v1/vector_stores/vs%5F1%20x/files/?limit=2&order=desc")
    assert r.status_code == 404  # the upstream's own answer...
    if method != "HEAD":
        assert r.json()["error"]["code"] == "unknown_url"  # ...and its own error body
    seen = sent(recorder)[-1]
    assert seen.method == method and seen.query == "limit=2&order=desc"
    assert seen.path == "/v1/vector_stores/vs_1 x/files"  # the normal form (guard.proxy.target), decoded upstream
    assert r.headers["x-request-id"].startswith("req_") and "x-refusal-guard-request-id" in r.headers


def test_counted_under_bounded_labels_without_datapoints(guard, recorder, tmp_path):
    proxy, _ = guard
    httpx.post(proxy.url + "/v1/embeddings", json={"model": "e", "input": "x"})
    for i in range(3):
        httpx.get(proxy.url + f"/v1/made-up-{i}/thing")
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'refusal_guard_http_requests_total{route="embeddings",status="200"} 1.0' in metrics
    assert 'refusal_guard_http_requests_total{route="v1_other",status="404"} 3.0' in metrics
    assert "made-up" not in metrics
    proxy.stop()
    con = sqlite3.connect(tmp_path / "dp.sqlite3")
    assert con.execute("SELECT COUNT(*) FROM datapoints").fetchone()[0] == 0


def test_api_keys_are_required_on_forwarded_routes(recorder):
    with ServerThread(build_recording_upstream(recorder)) as upstream:
        settings = Settings(upstream=upstream.url + "/v1", datapoints=None, upstream_check_interval=0,
                            api_keys="client-key")
        with ServerThread(create_app(settings, registry=CollectorRegistry())) as proxy:
            r = httpx.post(proxy.url + "/v1/embeddings", json={"input": "x"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert not sent(recorder)
            ok = httpx.post(proxy.url + "/v1/embeddings", json={"input": "x"},
                            headers={"authorization": "Bearer client-key"})
            assert ok.status_code == 200 and len(sent(recorder)) == 1


def test_dead_upstream_is_a_502_naming_no_internal_host():
    port = free_port()
    settings = Settings(upstream=f"http://127.0.0.1:{port}/v1", datapoints=None, upstream_check_interval=0)
    with ServerThread(create_app(settings, registry=CollectorRegistry())) as proxy:
        for r in (httpx.post(proxy.url + "/v1/embeddings", json={"input": "x"}),
                  httpx.post(proxy.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})):
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
            assert str(port) not in r.text and "127.0.0.1" not in r.text
        assert 'refusal_guard_upstream_errors_total{reason="connect"}' in httpx.get(proxy.url + "/metrics").text


def test_a_compressed_upload_and_a_compressed_answer_keep_their_coding(guard, recorder):
    import gzip

    proxy, _ = guard
    body = gzip.compress(b'{"model": "e", "input": "x"}')
    r = httpx.post(proxy.url + "/v1/moderations", content=body,
                   headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 404  # the recording upstream has no moderations: its own answer
    seen = sent(recorder)[-1]
    assert seen.body == body and seen.headers["content-encoding"] == "gzip"
    answer = httpx.get(proxy.url + "/v1/batches")
    assert answer.headers["content-encoding"] == "gzip" and answer.json() == {"object": "list", "data": []}


def test_forwarded_headers_as_for_chat_with_the_upstream_key(recorder):
    with ServerThread(build_recording_upstream(recorder)) as upstream:
        settings = Settings(upstream=upstream.url + "/v1", datapoints=None, upstream_check_interval=0,
                            upstream_api_key="sk-upstream")
        with ServerThread(create_app(settings, registry=CollectorRegistry())) as proxy:
            httpx.post(proxy.url + "/v1/embeddings", json={"input": "x"},
                       headers={"authorization": "Bearer client-key", "connection": "keep-alive",
                                "x-request-id": "client-1", "openai-organization": "org-1"})
    seen = sent(recorder)[-1].headers
    assert seen["authorization"] == "Bearer sk-upstream"  # the configured key replaces the client's
    assert seen["x-request-id"] == "client-1" and seen["openai-organization"] == "org-1"
    assert seen["x-refusal-guard-request-id"]
