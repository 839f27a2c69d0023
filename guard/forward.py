"""Forwarding one chat request upstream and relaying the answer, streamed or whole.

Both paths report what happened through ``on_done(Exchange)`` once the client has the
last byte, so ground-truth labelling and datapoint recording never delay the response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from guard.chat_request import ChatRequest
from guard.errors import ProxyError
from guard.sse import ContentCollector, completion_text, sse_event
from guard.upstream import Upstream, UpstreamFailure, response_headers

CHAT_PATH = "/chat/completions"


@dataclass(frozen=True, slots=True)
class Exchange:
    """The upstream side of one request, as the recorder needs it."""

    status: int
    text: str | None  # the assistant's answer, None if there was none
    seconds: float
    error: str | None = None  # upstream failure reason: connect|timeout|protocol|status_4xx|status_5xx


OnDone = Callable[[Exchange], None]


def _status_reason(status: int) -> str | None:
    if status >= 500:
        return "status_5xx"
    if status >= 400:
        return "status_4xx"
    return None


async def forward_chat(
    upstream: Upstream,
    chat: ChatRequest,
    headers: Mapping[str, str],
    *,
    response_headers_extra: Mapping[str, str],
    on_done: OnDone,
) -> Response:
    """Send ``chat`` upstream unchanged and return the client's response."""
    if chat.stream:
        return await _forward_stream(upstream, chat, headers, response_headers_extra, on_done)
    started = time.perf_counter()
    try:
        answer = await upstream.request("POST", CHAT_PATH, headers=headers, content=chat.raw)
    except UpstreamFailure as failure:
        on_done(Exchange(failure.status, None, time.perf_counter() - started, failure.reason))
        raise
    exchange = Exchange(
        answer.status,
        completion_text(answer.body) if answer.status < 300 else None,
        time.perf_counter() - started,
        _status_reason(answer.status),
    )
    return Response(
        answer.body,
        status_code=answer.status,
        headers={**answer.headers, **response_headers_extra},
        background=BackgroundTask(on_done, exchange),
    )


async def _forward_stream(
    upstream: Upstream,
    chat: ChatRequest,
    headers: Mapping[str, str],
    extra: Mapping[str, str],
    on_done: OnDone,
) -> Response:
    started = time.perf_counter()
    try:
        response = await upstream.open_stream(CHAT_PATH, headers=headers, content=chat.raw)
    except UpstreamFailure as failure:
        on_done(Exchange(failure.status, None, time.perf_counter() - started, failure.reason))
        raise
    relayed = response_headers(response.headers)
    if response.status_code >= 300 or not response.headers.get("content-type", "").startswith("text/event-stream"):
        # An error (or an upstream that ignored stream=true): relay it whole, with its status.
        try:
            body = await response.aread()
        except Exception as exc:  # noqa: BLE001 - transport errors while reading the body
            raise ProxyError(502, f"upstream connection failed: {type(exc).__name__}", type="upstream_error",
                             code="upstream_protocol_error") from None
        finally:
            await response.aclose()
        exchange = Exchange(response.status_code, completion_text(body) if response.status_code < 300 else None,
                            time.perf_counter() - started, _status_reason(response.status_code))
        return Response(body, status_code=response.status_code, headers={**relayed, **extra},
                        background=BackgroundTask(on_done, exchange))
    deadline = asyncio.get_running_loop().time() + upstream.total_timeout
    return StreamingResponse(
        _relay(upstream, response, deadline, started, on_done),
        status_code=response.status_code,
        headers={**relayed, **extra},
    )


async def _relay(
    upstream: Upstream, response, deadline: float, started: float, on_done: OnDone
) -> AsyncIterator[bytes]:
    collector = ContentCollector()
    error: str | None = None
    try:
        async for chunk in upstream.relay(response, deadline):
            collector.feed(chunk)
            yield chunk
    except UpstreamFailure as failure:
        # Headers are already sent: report the failure in-band, as OpenAI does.
        error = failure.reason
        yield sse_event({"error": {"message": failure.message, "type": failure.type, "param": None,
                                   "code": failure.code}})
    finally:
        status = response.status_code if error is None and collector.error is None else 502
        text = collector.text if error is None and collector.saw_done else None
        if error is None and not collector.saw_done and collector.error is None:
            error = "client_disconnect_or_truncated"
        on_done(Exchange(status, text, time.perf_counter() - started, error))
