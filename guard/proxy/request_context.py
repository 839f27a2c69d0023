"""A pure ASGI middleware: request ids, HTTP metrics, and a last-resort error shape.

Request ids: the guard's own id (the client's ``x-request-id`` if it is a plain token, else a
UUID) goes back in ``x-refusal-guard-request-id``, and in ``x-request-id`` only when the answer
has none of its own: the upstream's ``x-request-id`` reaches the client unchanged, so an SDK's
``_request_id`` is the provider's. A trailing slash is served by the route without it (never a
redirect built from the client's Host header).

Pure ASGI (not ``BaseHTTPMiddleware``) so streamed bodies pass through untouched and the
cost per request stays a few dict operations.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.apis import GUARDED_APIS
from guard.errors import error_body
from guard.logs import AccessLog
from guard.proxy.target import MAX_TARGET_BYTES, BadTarget, normalise
from guard.tracing import Tracing
from guard.live.metrics import GuardMetrics

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
GUARD_ID_HEADER = "x-refusal-guard-request-id"
GUARDED_PATHS = frozenset("/v1" + api.path for api in GUARDED_APIS)
#: Guarded paths where OpenAI also answers a bodyless GET (the listing of stored chat completions).
LISTED_PATHS = frozenset({"/v1/chat/completions"})
WEBSOCKET_REFUSED = "WebSocket connections are not supported by refusal-guard (the Realtime API cannot be guarded)"
ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses",
          "/metrics": "metrics", "/healthz": "healthz", "/readyz": "readyz", "/admin/policy/reload": "admin"}
#: Forwarded paths are counted by their first segment under /v1 when it is one of these, else ``v1_other``:
#: a client cannot grow the label set.
FORWARDED = frozenset({"models", "embeddings", "moderations", "files", "images", "audio", "batches", "uploads",
                       "fine_tuning", "vector_stores", "assistants", "threads", "conversations", "containers",
                       "evals", "realtime", "rerank", "tokenize", "detokenize"})

log = logging.getLogger("refusal_guard")


def request_id_of(scope: Scope) -> str:
    return scope["state"]["request_id"]


def route_label(path: str) -> str:
    """A bounded metrics label for a (normalised) path."""
    if (label := ROUTES.get(path)) is not None:
        return label
    if path.startswith("/v1/"):
        segment = path[4:].split("/", 1)[0]
        return segment if segment in FORWARDED else "v1_other"
    return "other"


def id_headers(incoming: Mapping[str, str], request_id: str) -> dict[str, str]:
    """Ids sent upstream: the guard's own, and ``x-request-id`` only if the client sent none
    (a client's own ``x-request-id`` is forwarded as it came)."""
    ids = {GUARD_ID_HEADER: request_id}
    if "x-request-id" not in incoming:
        ids["x-request-id"] = request_id
    return ids


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: GuardMetrics, max_header_bytes: int | None = None,
                 access_log: AccessLog | None = None, tracing: Tracing | None = None,
                 guarded_paths: frozenset[str] = GUARDED_PATHS, max_target_bytes: int = MAX_TARGET_BYTES,
                 refused_routes: tuple[str, ...] = ()) -> None:
        """``refused_routes``: path prefixes where a POST is refused (``Settings.refused_routes``)."""
        self.app = app
        self.metrics = metrics
        self.max_header_bytes = max_header_bytes
        self.access_log = access_log
        self.tracing = tracing or Tracing()
        self.guarded_paths = guarded_paths
        self.max_target_bytes = max_target_bytes
        self.refused_routes = refused_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._refuse_websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _CLIENT_ID.match(incoming) else str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        access = self.access_log.begin() if self.access_log is not None else None

        async def refuse(route: str, status: int, message: str, code: str, extra: tuple = ()) -> None:
            body = error_body(message, type="invalid_request_error", code=code)
            await _send_json(send, status, body, request_id, extra)
            self.metrics.http_requests.labels(route, str(status)).inc()
            if self.access_log is not None:
                self.access_log.end(access, request_id=request_id, method=scope["method"], route=route, status=status,
                                    seconds=time.perf_counter() - started)

        try:
            target = normalise(_raw_path(scope), scope.get("query_string", b""), guarded=self.guarded_paths,
                               max_bytes=self.max_target_bytes)
        except BadTarget as bad:
            await refuse("other", bad.status, bad.message, bad.code)
            return
        scope["path"], scope["raw_path"] = target.path, target.raw_path  # one path for routing and forwarding
        route = route_label(target.path)
        if self.max_header_bytes is not None and _head_size(scope) > self.max_header_bytes:
            # uvicorn's h11 limit only bounds a head that arrives in several reads; this holds for any head.
            await refuse(route, 431, f"request line and headers exceed the limit of {self.max_header_bytes} bytes",
                         "request_header_too_large")
            return
        if (_header(scope, b"upgrade") or "").lower() == "websocket":  # a server without a WebSocket library
            await refuse(route, 403, WEBSOCKET_REFUSED, "websocket_not_supported")
            return
        if target.path in self.guarded_paths and scope["method"] != "POST" and not _listing(scope, target.path):
            allow = "GET, POST" if target.path in LISTED_PATHS else "POST"
            await refuse(route, 405, f"{scope['method']} is not allowed on {target.path}: use {allow}",
                         "method_not_allowed", ((b"allow", allow.encode()),))
            return
        if scope["method"] == "POST" and any(target.path == r or target.path.startswith(r + "/") for r in self.refused_routes):
            await refuse(route, 403, f"POST {target.path} would make the upstream generate from input the guard "
                         "cannot probe: refused (setting refused_routes)", "route_not_guarded")
            return
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != GUARD_ID_HEADER.encode()]
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", request_id.encode()))
                headers.append((GUARD_ID_HEADER.encode(), request_id.encode()))
                message["headers"] = headers
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

    async def _refuse_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """No WebSocket route is guarded or forwarded (the Realtime API cannot be probed): refuse it in
        the OpenAI error shape where the server can send an HTTP denial, else close with 1008."""
        started = time.perf_counter()
        try:
            route = route_label(normalise(_raw_path(scope), scope.get("query_string", b""),
                                          max_bytes=self.max_target_bytes).path)
        except BadTarget:
            route = "other"
        access = self.access_log.begin() if self.access_log is not None else None
        status = 403 if (await receive())["type"] == "websocket.connect" else 499  # 499: the client left first
        if status == 403:
            await self._deny_websocket(scope, send)
        self.metrics.http_requests.labels(route, str(status)).inc()
        if self.access_log is not None:
            self.access_log.end(access, request_id=str(uuid.uuid4()), method="GET", route=route, status=status,
                                seconds=time.perf_counter() - started)

    @staticmethod
    async def _deny_websocket(scope: Scope, send: Send) -> None:
        if "websocket.http.response" in scope.get("extensions", {}):
            body = error_body(WEBSOCKET_REFUSED, type="invalid_request_error", code="websocket_not_supported")
            await send({"type": "websocket.http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": WEBSOCKET_REFUSED})


def _raw_path(scope: Scope) -> bytes:
    return scope.get("raw_path") or scope["path"].encode("utf-8")


def _trace_headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
            if k.lower() in (b"traceparent", b"tracestate")}


def _listing(scope: Scope, path: str) -> bool:
    """A bodyless GET on a guarded path that OpenAI also lists on (``LISTED_PATHS``): it generates
    nothing, so it is forwarded; with a body it could be read as a generation, so it is a 405."""
    if scope["method"] != "GET" or path not in LISTED_PATHS:
        return False
    length = _header(scope, b"content-length")
    return _header(scope, b"transfer-encoding") is None and length in (None, "0")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _head_size(scope: Scope) -> int:
    """Bytes of the request line and headers, about as they came over the wire."""
    size = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string", b"")) + 16
    return size + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))


async def _send_json(send: Any, status: int, body: bytes, request_id: str, extra: tuple = ()) -> None:
    # The request's body is not read: the connection is closed after the answer.
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), (b"x-request-id", request_id.encode()),
                            (GUARD_ID_HEADER.encode(), request_id.encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


async def _send_internal_error(send: Any) -> None:
    body = error_body("internal error in refusal-guard", type="server_error", code="internal_error")
    await send({"type": "http.response.start", "status": 500,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
