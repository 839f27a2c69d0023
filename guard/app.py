"""The app factory and the request path, readable top to bottom.

``create_app`` takes its settings and collaborators as arguments, so tests build one app
per case with real parts. Everything that lives for the process (the pooled HTTP client,
the upstreams) is opened and closed in the lifespan and held on ``app.state.runtime``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from guard.chat_request import parse_chat_request
from guard.errors import ProxyError, error_body
from guard.forward import Exchange, forward_chat
from guard.metrics import GuardMetrics
from guard.request_context import RequestContext, request_id_of
from guard.settings import Settings
from guard.upstream import Upstream, UpstreamFailure

log = logging.getLogger("refusal_guard")


@dataclass
class Runtime:
    """What one running app holds: built in the lifespan, read by the handlers."""

    settings: Settings
    metrics: GuardMetrics
    upstream: Upstream
    draining: bool = field(default=False)


def build_http_client(settings: Settings) -> httpx.AsyncClient:
    """The process's one pooled client; limits and timeouts come from settings."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=settings.connect_timeout, read=settings.read_timeout, write=settings.read_timeout, pool=settings.connect_timeout
        ),
        limits=httpx.Limits(
            max_connections=settings.pool_max_connections, max_keepalive_connections=settings.pool_max_keepalive
        ),
        follow_redirects=False,
    )


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    http_client: httpx.AsyncClient | None = None,
) -> FastAPI:
    """Build the proxy. ``http_client`` is owned by the caller if given, else by the app."""
    metrics = GuardMetrics(registry or CollectorRegistry())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            client = http_client or await stack.enter_async_context(build_http_client(settings))
            upstream = Upstream(
                client, settings.upstream, api_key=settings.upstream_api_key, total_timeout=settings.total_timeout
            )
            app.state.runtime = Runtime(settings, metrics, upstream)
            yield

    app = FastAPI(title="refusal-guard", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(RequestContext, metrics=metrics)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Unknown routes and wrong methods, in the same error shape as everything else.
        return Response(error_body(str(exc.detail), type="invalid_request_error", code=f"http_{exc.status_code}"),
                        status_code=exc.status_code, media_type="application/json", headers=exc.headers)

    @app.exception_handler(ProxyError)
    async def _proxy_error(request: Request, exc: ProxyError) -> Response:
        if isinstance(exc, UpstreamFailure):
            metrics.upstream_errors.labels(exc.reason).inc()
        return Response(exc.body(), status_code=exc.status, media_type="application/json")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        runtime: Runtime = request.app.state.runtime
        raw = await read_body(request, runtime.settings.max_body_bytes)
        chat = parse_chat_request(raw)
        headers = runtime.upstream.forward_headers(
            request.headers, {"x-request-id": request_id_of(request.scope)}
        )

        def on_done(exchange: Exchange) -> None:
            if exchange.error in ("status_4xx", "status_5xx"):
                runtime.metrics.upstream_errors.labels(exchange.error).inc()

        return await forward_chat(runtime.upstream, chat, headers, response_headers_extra={}, on_done=on_done)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        runtime: Runtime = request.app.state.runtime
        headers = runtime.upstream.forward_headers(request.headers, {"x-request-id": request_id_of(request.scope)})
        answer = await runtime.upstream.request("GET", "/models", headers=headers, timeout=runtime.settings.read_timeout)
        return Response(answer.body, status_code=answer.status, headers=answer.headers)

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        runtime: Runtime = request.app.state.runtime
        if runtime.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        try:
            answer = await runtime.upstream.request(
                "GET", "/models", headers=runtime.upstream.forward_headers({}), timeout=runtime.settings.connect_timeout
            )
        except UpstreamFailure as failure:
            return JSONResponse({"status": "upstream unreachable", "reason": failure.reason}, status_code=503)
        if answer.status >= 500:
            return JSONResponse({"status": "upstream unhealthy", "upstream_status": answer.status}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> ProxyError:
    return ProxyError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")


def create_app_from_environment() -> FastAPI:
    """Factory for ``uvicorn --workers N``: settings arrive as JSON from the parent CLI."""
    import os

    from guard.cli import RESOLVED_SETTINGS_ENV

    return create_app(Settings.model_validate_json(os.environ[RESOLVED_SETTINGS_ENV]))
