"""The app factory and the request path, readable top to bottom.

``create_app`` takes its settings and collaborators as arguments, so tests build one app
per case with real parts. Everything that lives for the process (the pooled HTTP client,
the upstreams) is opened and closed in the lifespan and held on ``app.state.runtime``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hmac
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from guard.apis import GUARDED_APIS, Api
from guard.apis.base import OFF_LOOP_BYTES, GuardedRequest
from guard.probe.context import last_user_text
from guard.proxy import passthrough
from guard.truth.detector import RefusalDetector
from guard.errors import ProxyError, error_body
from guard.logs import AccessLog, configure_logging
from guard.tracing import Tracing, tracing_for
from guard.truth.judge import RefusalJudge
from guard.live.windows import LiveStats
from guard.live.metrics import GuardMetrics
from guard.live.model_labels import OTHER, ModelLabels
from guard.probe.policy import PolicyStore, ReloadResult
from guard.probe.template import TEMPLATE_HASH
from guard.probe.prober import PROBE_HEADER, Prober
from guard.stores.recorder import PromptHasher, default_key_file, load_hash_key
from guard.stores.sink import Retention, open_sink
from guard.proxy.attribution import ClientHasher
from guard.proxy.request_context import RequestContext, request_id_of
from guard.stores.review import ReviewSink
from guard.proxy.routing import Router
from guard.truth.scoring import Scorer
from guard.settings import Settings
from guard.proxy.transport import pooled_client
from guard.proxy.upstream import Upstream, UpstreamFailure

log = logging.getLogger("refusal_guard")

# OpenAPI descriptions of what the handlers check themselves: the guarded handlers read the raw
# body (it is forwarded byte for byte), so each API's schema (``api.request_schema``) is given here,
# exactly as strict as its ``parse`` and no stricter (unknown fields are forwarded).
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "Error in the OpenAI shape",
                     "content": {"application/json": {"schema": _ERROR_SCHEMA}}} for s in statuses}


def api_openapi(api: Api) -> dict[str, Any]:
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": api.request_schema}}},
        "responses": {
            "200": {"description": "The upstream's answer (or the guard's block answer), whole or as SSE",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **_errors(400, 401, 413, 502, 504),
        },
    }


MODELS_OPENAPI: dict[str, Any] = {
    "responses": {"200": {"description": "The upstream's model list, forwarded unchanged",
                          "content": {"application/json": {"schema": {"type": "object"}}}},
                  **_errors(401, 502, 504)},
}
ADMIN_OPENAPI: dict[str, Any] = {
    "responses": {"200": {"description": "Policy reloaded", "content": {"application/json": {"schema": {"type": "object"}}}},
                  "422": {"description": "Policy kept: the new file is invalid",
                          "content": {"application/json": {"schema": {"type": "object"}}}},
                  **_errors(401, 404)},
}
METRICS_OPENAPI: dict[str, Any] = {
    "responses": {"200": {"description": "Prometheus text format",
                          "content": {"text/plain": {"schema": {"type": "string"}}}}},
}
READYZ_OPENAPI: dict[str, Any] = {
    "parameters": [{"name": "upstream", "in": "query", "required": False, "schema": {"type": "string", "enum": ["1"]},
                    "description": "Also ask the upstream (GET /models); 503 if it is unreachable or unhealthy"}],
    "responses": {"503": {"description": "Not ready: draining (or, with upstream=1, the upstream is down)",
                          "content": {"application/json": {"schema": {"type": "object"}}}}},
}
FORWARD_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@dataclass
class Runtime:
    """What one running app holds: built in the lifespan, read by the handlers."""

    settings: Settings
    metrics: GuardMetrics
    upstream: Upstream
    router: Router
    policies: PolicyStore
    clients: ClientHasher  # the datapoint's client id of a credential (guard.proxy.attribution)
    draining: bool = field(default=False)
    background: set[asyncio.Task[None]] = field(default_factory=set)  # model-listing fetches


def build_http_client(settings: Settings) -> httpx.AsyncClient:
    """The process's one pooled client; limits and timeouts come from settings."""
    return pooled_client(
        timeout=httpx.Timeout(
            connect=settings.connect_timeout, read=settings.read_timeout, write=settings.read_timeout, pool=settings.connect_timeout
        ),
        max_connections=settings.pool_max_connections,
        keepalive_expiry=settings.pool_keepalive_expiry,
    )


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    http_client: httpx.AsyncClient | None = None,
    tracing: Tracing | None = None,
) -> FastAPI:
    """Build the proxy. ``http_client`` is owned by the caller if given, else by the app; so is
    ``tracing`` (default: from ``otlp_endpoint``, shut down with the app)."""
    metrics = GuardMetrics(registry or CollectorRegistry())
    owned_tracing = tracing is None
    tracing = tracing or tracing_for(settings.otlp_endpoint, settings.otel_service_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            client = http_client or await stack.enter_async_context(build_http_client(settings))
            runtime = build_runtime(settings, metrics, client, tracing)
            if owned_tracing:
                stack.push_async_callback(asyncio.to_thread, tracing.shutdown)  # runs last: spans of the drain too
            await runtime.router.scorer.recorder.start()
            stack.push_async_callback(runtime.router.scorer.recorder.stop)
            await runtime.router.reviews.start()
            stack.push_async_callback(runtime.router.reviews.stop)
            stack.push_async_callback(runtime.router.scorer.stop)  # before the sink's stop: audits log their records
            stack.push_async_callback(runtime.router.prober.stop)  # check probes still running
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                # Only possible in the main thread (not when a test serves the app from a thread).
                loop = asyncio.get_running_loop()
                loop.add_signal_handler(signal.SIGHUP, reload_policy, runtime)
                stack.callback(loop.remove_signal_handler, signal.SIGHUP)
            for signum in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(ValueError):  # main thread only (not a test's server thread)
                    previous = chain_drain_signal(signum, runtime)
                    if previous is not None:
                        stack.callback(signal.signal, signum, previous)
            app.state.runtime = runtime
            runtime.router.scorer.models.refresh = lambda: in_background(runtime, check_upstream(runtime))
            stack.push_async_callback(cancel_background, runtime)
            if settings.upstream_check_interval > 0:  # its first check (at once) fetches the model listing too
                watcher = asyncio.create_task(watch_upstream(runtime, settings.upstream_check_interval))
                stack.push_async_callback(cancel_task, watcher)
            freeze_startup_heap()
            yield
            runtime.draining = True

    app = FastAPI(title="refusal-guard", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.router.redirect_slashes = False  # RequestContext trims a trailing slash: same route, no redirect
    app.add_middleware(RequestContext, metrics=metrics, max_header_bytes=settings.max_header_bytes,
                       access_log=AccessLog() if settings.log_format == "json" else None, tracing=tracing,
                       refused_routes=settings.refused_routes)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Unknown routes and wrong methods, in the same error shape as everything else.
        return Response(error_body(str(exc.detail), type="invalid_request_error", code=f"http_{exc.status_code}"),
                        status_code=exc.status_code, media_type="application/json", headers=exc.headers)

    @app.exception_handler(ProxyError)
    async def _proxy_error(request: Request, exc: ProxyError) -> Response:
        return Response(exc.body(), status_code=exc.status, media_type="application/json")

    for api in GUARDED_APIS:
        app.add_api_route("/v1" + api.path, guarded_handler(api), methods=["POST"], name=api.name,
                          openapi_extra=api_openapi(api))

    @app.post("/admin/policy/reload", openapi_extra=ADMIN_OPENAPI)
    async def admin_reload(request: Request) -> Response:
        runtime: Runtime = request.app.state.runtime
        check_admin_token(request, runtime.settings)
        result = reload_policy(runtime)
        return JSONResponse({"ok": result.ok, "message": result.message, "version": result.version},
                            status_code=200 if result.ok else 422)

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", openapi_extra=READYZ_OPENAPI)
    async def readyz(request: Request) -> Response:
        """The guard's own readiness (started, policy loaded, not draining): an upstream outage must
        not take every replica out of a Service at once (clients would get connection errors instead
        of the guard's 502). ``?upstream=1`` also asks the upstream."""
        runtime: Runtime = request.app.state.runtime
        if runtime.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        ready = {"status": "ready", "policy_version": runtime.policies.current.version}
        if request.query_params.get("upstream") not in ("1", "true"):
            return JSONResponse(ready)
        health = await check_upstream(runtime)
        if runtime.draining:  # SIGTERM arrived while the upstream was being asked
            return JSONResponse({"status": "draining"}, status_code=503)
        if health["upstream"] != "ok":
            return JSONResponse({**health, "status": f"upstream {health['upstream']}"}, status_code=503)
        return JSONResponse({**ready, **health})

    @app.get("/metrics", openapi_extra=METRICS_OPENAPI)
    async def prometheus_metrics(request: Request) -> Response:
        runtime: Runtime = request.app.state.runtime
        runtime.router.scorer.live.flush()  # this worker's window gauges, exact at scrape time
        body, content_type = metrics.render()
        runtime.router.scorer.models.scraped()  # models seen since the last scrape were scraped at zero
        return Response(body, media_type=content_type)

    async def forwarded(request: Request) -> Response:
        runtime: Runtime = request.app.state.runtime
        check_api_key(request, runtime.settings)
        return await passthrough.forward(request, runtime.upstream, runtime.metrics)

    app.add_api_route("/v1/models", forwarded, methods=["GET"], openapi_extra=MODELS_OPENAPI)  # documented
    app.add_api_route("/v1/{path:path}", forwarded, methods=FORWARD_METHODS, include_in_schema=False)

    return app


def guarded_handler(api: Api) -> Any:
    """The handler of one guarded API: authenticate, read and parse the body, then the request path."""

    async def handle(request: Request) -> Response:
        runtime: Runtime = request.app.state.runtime
        try:
            key_name = check_api_key(request, runtime.settings)
            raw = await read_body(request, runtime.settings.max_body_bytes)
            # a large body is parsed (and its prompt hashed) in a worker thread: not on the event loop
            parsed = (await asyncio.to_thread(parse_off_loop, api, raw, runtime.router.scorer.recorder.hash_prompt)
                      if len(raw) > OFF_LOOP_BYTES else api.parse(raw))
        except ProxyError:
            runtime.metrics.requests.labels("invalid", runtime.router.effective_mode().value, OTHER).inc()
            raise
        # who sent it (the datapoint's client): the inbound key's name, else a keyed hash of the credential
        client = key_name if key_name is not None else runtime.clients(request.headers)
        return await runtime.router.handle(parsed, request.headers, request_id_of(request.scope),
                                           request.scope.get("query_string", b""), client=client)

    return handle


def parse_off_loop(api: Api, raw: bytes, hash_prompt: Callable[[str], str]) -> GuardedRequest:
    """``api.parse(raw)`` with its last user turn read and hashed, for a worker thread: a turn of a
    million parts takes a second to read, and 32 MiB to hash, which the event loop must never wait for."""
    parsed = api.parse(raw)
    text = last_user_text(parsed.messages)
    return dataclasses.replace(parsed, prompt=(text, hash_prompt(text)))


async def check_upstream(runtime: Runtime) -> dict[str, Any]:
    """Ask the upstream for ``/models`` with the guard's own credentials (never a client's), marked as the
    guard's own call (``x-refusal-guard-probe``); set ``refusal_guard_upstream_up`` and the listing the
    ``model`` label slots admit from (``guard.live.model_labels``). The answer names no host."""
    headers = {**runtime.upstream.forward_headers({}), PROBE_HEADER: "1"}
    try:
        answer = await runtime.upstream.request("GET", "/models", headers=headers, timeout=runtime.settings.connect_timeout)
    except UpstreamFailure as failure:
        runtime.metrics.upstream_up.set(0)
        return {"upstream": "unreachable", "reason": failure.reason}
    healthy = answer.status < 500 and answer.status != 404
    runtime.metrics.upstream_up.set(1 if healthy else 0)
    if answer.status == 200:
        runtime.router.scorer.models.listed(model_ids(answer.body))
    health: dict[str, Any] = {"upstream": "ok" if healthy else "unhealthy", "upstream_status": answer.status}
    if answer.status == 404:
        health["hint"] = "the upstream has no /models: does the upstream URL end in /v1?"
    return health


def model_ids(body: bytes) -> list[str]:
    """The ids in an OpenAI-shape model list (``{"data": [{"id": ...}, ...]}``); [] if it is not one."""
    try:
        data = json.loads(body).get("data")
    except (ValueError, AttributeError, RecursionError):
        return []
    if not isinstance(data, list):
        return []
    return [item["id"] for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)]


def in_background(runtime: Runtime, work: Any) -> None:
    """Run the coroutine ``work`` as a task the runtime keeps (and cancels at shutdown); not once the
    runtime drains (scoring that ends during shutdown must not start work nobody will wait for)."""
    if runtime.draining:
        work.close()
        return
    task = asyncio.get_running_loop().create_task(work)
    runtime.background.add(task)
    task.add_done_callback(runtime.background.discard)


async def cancel_background(runtime: Runtime) -> None:
    for task in list(runtime.background):
        task.cancel()
    await asyncio.gather(*runtime.background, return_exceptions=True)


async def cancel_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def watch_upstream(runtime: Runtime, interval: float) -> None:
    """Keep ``refusal_guard_upstream_up`` current while the process runs."""
    while True:
        await check_upstream(runtime)
        await asyncio.sleep(interval)


def build_runtime(settings: Settings, metrics: GuardMetrics, client: httpx.AsyncClient,
                  tracing: Tracing | None = None) -> Runtime:
    """Wire the collaborators of one process from settings."""
    judging = bool(settings.judge_url and settings.judge_model and settings.judge_fraction > 0)
    metrics.initialise(settings.topics, tuple(dict.fromkeys((settings.mode.value, "shadow"))), judging=judging)
    # With api_keys set, the client's Authorization is its key for the guard: not the upstream's business.
    forward_client_key = not settings.api_keys or settings.forward_client_key
    upstream = Upstream(client, settings.upstream, api_key=settings.upstream_api_key, total_timeout=settings.total_timeout,
                        forward_client_authorization=forward_client_key, max_response_bytes=settings.max_response_bytes)
    review_upstream = (
        Upstream(client, settings.review_upstream, api_key=settings.review_upstream_api_key,
                 total_timeout=settings.total_timeout, forward_client_authorization=forward_client_key,
                 max_response_bytes=settings.max_response_bytes)
        if settings.review_upstream else None
    )
    prober = Prober(
        upstream, metrics, topics=settings.topics, timeout=settings.probe_timeout, max_tokens=settings.probe_max_tokens,
        structured_output=settings.probe_structured_output, context=settings.probe_context, model=settings.probe_model,
        cache_size=settings.probe_cache_size, cache_ttl=settings.probe_cache_ttl,
        circuit_failures=settings.circuit_failures, circuit_cooldown=settings.circuit_cooldown,
        context_chars=settings.probe_context_chars, unknown_parts=settings.probe_unknown_parts,
        dialect_retry=settings.probe_dialect_retry,
    )
    policies = PolicyStore(settings.policy, TEMPLATE_HASH, metrics)
    live = LiveStats(metrics, window_size=settings.window_size, drift_alpha=settings.drift_alpha,
                     drift_horizon=settings.drift_horizon)
    judge = None
    if judging:
        key = settings.judge_api_key.get_secret_value() if settings.judge_api_key else None
        judge = RefusalJudge(client, settings.judge_url, settings.judge_model, key, sample_rate=settings.judge_fraction,
                             timeout=settings.judge_timeout)
    hash_key = prompt_hash_key(settings)  # prompt hashes and client ids, one deployment secret
    scorer = Scorer(
        RefusalDetector(), live,
        open_sink(settings.datapoints, metrics.datapoints_dropped, queue_size=settings.datapoint_queue_size,
                  retention=Retention(settings.datapoint_max_age, settings.datapoint_max_rows),
                  hasher=PromptHasher(hash_key)),
        metrics, ModelLabels(settings.metric_models, settings.metric_models_seen, metrics.initialise_model),
        topics=settings.topics, strict=settings.strict_refusal, judge=judge, tracing=tracing,
        review_upstream=review_upstream is not None, max_pending_audits=settings.judge_max_pending,
    )
    router = Router(settings, upstream, review_upstream, prober, policies,
                    ReviewSink(client, settings.review_webhook, metrics.review_events), scorer, tracing or Tracing())
    runtime = Runtime(settings, metrics, upstream, router, policies, ClientHasher(hash_key))
    rebaseline_drift(runtime)
    return runtime


def rebaseline_drift(runtime: Runtime) -> None:
    """Point the drift detectors at the policy in force, comparing only what its routing scores."""
    scorer = runtime.router.scorer
    scorer.live.set_policy(runtime.policies.current.policy,
                           scorer.compared(runtime.policies.current, runtime.router.effective_mode().value))


def prompt_hash_key(settings: Settings) -> bytes:
    """The datapoints' prompt-hash key: configured, or generated once and kept beside the log."""
    configured = settings.prompt_hash_key.get_secret_value() if settings.prompt_hash_key else None
    key_file = settings.prompt_hash_key_file or default_key_file(settings.datapoints)
    if configured is None and key_file is None and isinstance(settings.datapoints, SecretStr):
        log.warning("datapoints go to a database but prompt_hash_key is not set: this replica hashes prompts "
                    "and client credentials under its own key, so calibration cannot group a prompt's repeats, "
                    "nor one client's rows (--max-client-share, --exclude-client), across replicas and restarts")
    return load_hash_key(configured, key_file)


def freeze_startup_heap() -> None:
    """Move everything alive at startup out of the cyclic garbage collector's reach.

    The imported libraries (FastAPI, pydantic, numpy, scipy...) leave ~100k long-lived objects
    that every full collection would otherwise traverse: 67-84 ms per full collection here, a
    pause every request in flight waits out. Full collections are rare (none in a 12 s level at
    200 req/s), but a long-running worker whose caches fill does trigger them. Frozen, those
    objects are never scanned; objects made later are collected as usual.
    """
    gc.collect()
    gc.freeze()


def chain_drain_signal(signum: int, runtime: Runtime) -> Any:
    """Mark the runtime as draining on ``signum``, then run the handler that was there before.

    uvicorn installs its own SIGTERM/SIGINT handlers (stop accepting, finish in-flight requests
    within ``timeout_graceful_shutdown``, then run the lifespan shutdown, which flushes the
    datapoint queue) before the lifespan starts. Wrapping them here makes ``/readyz`` answer
    503 from the moment the signal arrives. Returns the previous handler, for restoring it.
    """
    previous = signal.getsignal(signum)

    def on_signal(sig: int, frame: object) -> None:
        if not runtime.draining:
            runtime.draining = True
            log.info("received %s: draining (readyz answers 503; in-flight requests finish)", signal.Signals(sig).name)
        if callable(previous):
            previous(sig, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    signal.signal(signum, on_signal)
    return previous


def reload_policy(runtime: Runtime) -> ReloadResult:
    """Hot-swap the policy (SIGHUP or the admin endpoint); the drift tests follow it."""
    result = runtime.policies.reload()
    if result.ok:
        rebaseline_drift(runtime)
    return result


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    return value[7:].strip() if value[:7].lower() == "bearer " else None


def check_api_key(request: Request, settings: Settings) -> str | None:
    """If inbound API keys are configured, the client must present one (constant-time compare, every
    key compared); returns that key's name (``Settings.api_key_name``), None without ``api_keys``."""
    if not settings.api_keys:
        return None
    token = (_bearer(request) or "").encode()
    matches = [hmac.compare_digest(token, key.get_secret_value().encode()) for key in settings.api_keys]
    if not any(matches):
        raise ProxyError(401, "missing or invalid API key for refusal-guard", code="invalid_api_key")
    return settings.api_key_name(matches.index(True))


def check_admin_token(request: Request, settings: Settings) -> None:
    """Admin endpoints are off without a token, and need it as a bearer token otherwise."""
    if settings.admin_token is None:
        raise ProxyError(404, "admin endpoints are disabled (no admin_token configured)", code="admin_disabled")
    token = (_bearer(request) or "").encode()
    if not hmac.compare_digest(token, settings.admin_token.get_secret_value().encode()):
        raise ProxyError(401, "missing or invalid admin token", code="invalid_admin_token")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        # The client left before its body was complete: its own doing, counted as 499, no traceback.
        raise ProxyError(499, "client closed the connection before the request body was complete",
                         code="client_closed_request") from None
    if size > OFF_LOOP_BYTES:  # bytes.join releases the GIL for large joins, in a worker thread
        return await asyncio.to_thread(b"".join, chunks)
    return b"".join(chunks)


def _too_large(limit: int) -> ProxyError:
    return ProxyError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")


def create_app_from_environment() -> FastAPI:
    """Factory for ``uvicorn --workers N``: settings arrive as JSON from the parent CLI."""
    import os

    from guard.cli import RESOLVED_SETTINGS_ENV

    settings = Settings.model_validate_json(os.environ[RESOLVED_SETTINGS_ENV])
    configure_logging(settings.log_format, settings.log_level)  # a fresh worker process
    return create_app(settings)
