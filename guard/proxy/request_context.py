"""A pure ASGI middleware: request ids, HTTP metrics, and a last-resort error shape.

Pure ASGI (not ``BaseHTTPMiddleware``) so streamed bodies pass through untouched and the
cost per request stays a few dict operations.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.errors import error_body
from guard.logs import AccessLog
from guard.tracing import Tracing
from guard.live.metrics import GuardMetrics

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
ROUTES = {"/v1/chat/completions": "chat", "/v1/models": "models", "/metrics": "metrics",
          "/healthz": "healthz", "/readyz": "readyz", "/admin/policy/reload": "admin"}

log = logging.getLogger("refusal_guard")


def request_id_of(scope: Scope) -> str:
    return scope["state"]["request_id"]


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: GuardMetrics, max_header_bytes: int | None = None,
                 access_log: AccessLog | None = None, tracing: Tracing | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.max_header_bytes = max_header_bytes
        self.access_log = access_log
        self.tracing = tracing or Tracing()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _CLIENT_ID.match(incoming) else str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        route = ROUTES.get(scope["path"], "other")
        status = 500
        response_started = False
        access = self.access_log.begin() if self.access_log is not None else None
        if self.max_header_bytes is not None and _head_size(scope) > self.max_header_bytes:
            # uvicorn's h11 limit only bounds a head that arrives in several reads; this holds for any head.
            body = error_body(f"request line and headers exceed the limit of {self.max_header_bytes} bytes",
                              type="invalid_request_error", code="request_header_too_large")
            await _send_json(send, 431, body, request_id)
            self.metrics.http_requests.labels(route, "431").inc()
            if self.access_log is not None:
                self.access_log.end(access, request_id=request_id, method=scope["method"], route=route, status=431,
                                    seconds=time.perf_counter() - started)
            return

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [
                    *[(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"],
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            parent = _trace_headers(scope) if self.tracing.enabled else None
            with self.tracing.span(f"{scope['method']} {route}", server=True, parent=parent,
                                   **{"http.route": route, "http.request.method": scope["method"],
                                      "refusal_guard.request_id": request_id}) as span:
                await self.app(scope, receive, send_with_id)
                if span is not None:
                    span.set_attribute("http.response.status_code", status)
        except ClientDisconnect as exc:
            # The client went away before its request was read: its own doing, counted as 499
            # (client closed request), never a 500 with a traceback.
            log.debug("client closed the connection on %s (request %s): %s", route, request_id, type(exc).__name__)
            if not response_started:
                status = 499
        except Exception:
            log.exception("unhandled error on %s (request %s)", route, request_id)
            if not response_started:
                await _send_internal_error(send_with_id)
            status = 500
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.http_requests.labels(route, str(status)).inc()
            self.metrics.http_seconds.labels(route).observe(elapsed)
            if self.access_log is not None:
                self.access_log.end(access, request_id=request_id, method=scope["method"], route=route,
                                    status=status, seconds=elapsed)


def _trace_headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
            if k.lower() in (b"traceparent", b"tracestate")}


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _head_size(scope: Scope) -> int:
    """Bytes of the request line and headers, about as they came over the wire."""
    size = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string", b"")) + 16
    return size + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))


async def _send_json(send: Any, status: int, body: bytes, request_id: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), (b"x-request-id", request_id.encode())]})
    await send({"type": "http.response.body", "body": body})


async def _send_internal_error(send: Any) -> None:
    body = error_body("internal error in refusal-guard", type="server_error", code="internal_error")
    await send({"type": "http.response.start", "status": 500,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
