"""Every unguarded route under ``/v1``: forwarded as it came, answered as the upstream answered.

Any method, the query string, the request body streamed upstream as it arrives (JSON,
multipart uploads, binary) and the response body streamed back (JSON, SSE, audio, file
contents), with the upstream's status, headers and errors unchanged. The path forwarded is the
one the guard routed on: the request middleware has already normalised it
(:mod:`guard.proxy.target`), so what the upstream resolves is what the guard saw. Headers are
treated as for the guarded routes (hop-by-hop dropped, the configured upstream key, request ids,
a ``Location`` naming the upstream rewritten). No probe, no datapoint: the request is counted in
``refusal_guard_http_requests_total`` under a bounded route label
(``guard.proxy.request_context.route_label``), and a failure to reach the upstream in
``refusal_guard_upstream_errors_total``; a client that leaves during its upload is a 499 (its
own doing), not an upstream error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse

from guard.errors import ProxyError
from guard.live.metrics import GuardMetrics
from guard.proxy.headers import add_relayed_headers
from guard.proxy.request_context import id_headers, request_id_of
from guard.proxy.upstream import Upstream, UpstreamFailure, response_headers

PREFIX = b"/v1"


async def forward(request: Request, upstream: Upstream, metrics: GuardMetrics) -> StreamingResponse:
    """Relay ``request`` (a path under /v1) to the same path under the upstream's base URL."""
    raw_path = request.scope.get("raw_path") or request.scope["path"].encode()
    path = raw_path[len(PREFIX):].decode("latin-1")  # the normal form, percent-encoded (guard.proxy.target)
    headers = upstream.forward_headers(request.headers, id_headers(request.headers, request_id_of(request.scope)))
    # The body is relayed as raw bytes, so its framing headers go with it: a declared length (no
    # chunked upload) and a content coding (a gzip-compressed upload stays a gzip-compressed upload).
    length = request.headers.get("content-length")
    headers.update({k: request.headers[k] for k in ("content-length", "content-encoding") if k in request.headers})
    has_body = length not in (None, "0") or "chunked" in request.headers.get("transfer-encoding", "").lower()
    upload = Upload(request) if has_body else None
    try:
        response = await upstream.open_stream(path, headers=headers, content=upload,
                                              method=request.method, query=request.scope.get("query_string", b""))
    except UpstreamFailure as failure:
        if upload is not None and upload.client_left:
            raise client_closed() from None  # the upload broke because the client left: not the upstream
        metrics.upstream_errors.labels(failure.reason).inc()
        raise
    # The body goes out as the upstream's raw bytes, so its framing headers go with it.
    framing = {k: response.headers[k] for k in ("content-length", "content-encoding") if k in response.headers}
    deadline = asyncio.get_running_loop().time() + upstream.total_timeout
    relayed = StreamingResponse(_body(upstream, response, deadline, metrics), status_code=response.status_code,
                                headers=framing)
    return add_relayed_headers(relayed, response_headers(response.headers))  # set-cookie kept apart


class Upload:
    """The client's request body as it arrives, remembering whether the client left mid-way (the
    HTTP client sending it upstream sees only a broken upload)."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.client_left = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.request.stream():
                yield chunk
        except ClientDisconnect:
            self.client_left = True
            raise


def client_closed() -> ProxyError:
    return ProxyError(499, "client closed the connection before the request body was complete",
                      code="client_closed_request")


async def _body(upstream: Upstream, response: httpx.Response, deadline: float,
                metrics: GuardMetrics) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.relay(response, deadline, capped=False):
            yield chunk
    except UpstreamFailure as failure:
        # The status is sent: dropping the connection is the only way left to say "incomplete".
        metrics.upstream_errors.labels(failure.reason).inc()
        raise
