"""OpenTelemetry: spans for the request, the probe, the generation and the scoring, the W3C
``traceparent`` the upstream receives, and export over OTLP/HTTP to a loopback receiver.

Spans are read with the SDK's in-memory exporter, and (end to end) decoded from the protobuf
an OTLP/HTTP receiver on loopback gets. Without an endpoint the client's ``traceparent`` goes
upstream untouched, as before.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from guard.app import create_app
from guard.settings import Settings
from guard.tracing import Tracing
from tests.servers import ServerThread, eventually

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"
PROMPT = "tracing-canary-prompt"


def chat(url: str, stream: bool = False) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=30, headers={"traceparent": CLIENT_PARENT},
                      json={"model": "m", "stream": stream, "messages": [{"role": "user", "content": PROMPT}]})


def upstream_traceparents(script) -> dict[str, str]:
    return {r.kind: r.headers.get("traceparent") for r in script.received if r.kind in ("probe", "generation")}


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_spans_nest_under_the_clients_trace_and_go_upstream(upstream, script, mode):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings(upstream=upstream.url + "/v1", mode=mode, datapoints=None)
    with ServerThread(create_app(settings, registry=CollectorRegistry(), tracing=Tracing(provider))) as proxy:
        answer = chat(proxy.url)
        assert answer.status_code == 200
        eventually(lambda: any(s.name == "scoring" for s in exporter.get_finished_spans()),  # after the last byte
                   what="the scoring span")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"POST chat", "probe", "generation", "scoring"} <= set(spans)
    request = spans["POST chat"]
    assert all(format(s.context.trace_id, "032x") == CLIENT_TRACE for s in spans.values())
    assert format(request.parent.span_id, "016x") == "00f067aa0ba902b7"             # the client's span
    for name in ("probe", "generation", "scoring"):
        assert spans[name].parent.span_id == request.context.span_id, name
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["refusal_guard.request_id"] == answer.headers["x-request-id"]
    assert spans["scoring"].attributes["refusal_guard.action"] == "pass"
    sent = upstream_traceparents(script)
    for kind in ("probe", "generation"):      # the upstream sees the guard's span, in the client's trace
        assert sent[kind] == f"00-{CLIENT_TRACE}-{spans[kind].context.span_id:016x}-01", kind
    for span in spans.values():
        assert PROMPT not in str(dict(span.attributes or {}))


def test_without_an_endpoint_the_clients_traceparent_passes_untouched(upstream, script):
    settings = Settings(upstream=upstream.url + "/v1", mode="sequential", datapoints=None)
    assert not Tracing().enabled
    with ServerThread(create_app(settings, registry=CollectorRegistry())) as proxy:
        assert chat(proxy.url).status_code == 200
    assert upstream_traceparents(script) == {"probe": CLIENT_PARENT, "generation": CLIENT_PARENT}


def test_spans_are_exported_over_otlp_http(upstream, script):
    received: list[ExportTraceServiceRequest] = []
    got = threading.Event()

    async def traces(request: Request) -> Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.body())
        received.append(message)
        got.set()
        return Response(b"", media_type="application/x-protobuf")

    with ServerThread(Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])) as receiver:
        settings = Settings(upstream=upstream.url + "/v1", mode="sequential", datapoints=None,
                            otlp_endpoint=receiver.url + "/v1/traces", otel_service_name="guard-under-test")
        with ServerThread(create_app(settings, registry=CollectorRegistry())) as proxy:
            assert chat(proxy.url, stream=True).status_code == 200
            time.sleep(0.3)
        assert got.wait(10)                   # the app's shutdown flushed the batch
    spans = [(resource.resource, span) for message in received for resource in message.resource_spans
             for scope in resource.scope_spans for span in scope.spans]
    names = {span.name for _, span in spans}
    assert {"POST chat", "probe", "generation", "scoring"} <= names
    service = {a.value.string_value for resource, _ in spans for a in resource.attributes if a.key == "service.name"}
    assert service == {"guard-under-test"}
    assert {span.trace_id.hex() for _, span in spans} == {CLIENT_TRACE}


def test_otlp_endpoint_must_be_http():
    with pytest.raises(ValueError):
        Settings(upstream="http://x/v1", otlp_endpoint="grpc://collector:4317")
