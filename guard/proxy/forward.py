"""Sending a guarded request upstream and relaying the answer, streamed or whole.

``generate`` does the upstream half (it can run concurrently with the probe and be
cancelled); ``respond`` turns its result into the client's response. Both paths report
what happened through ``on_done(Exchange)`` once the client has the last byte, so
ground-truth labelling and datapoint recording never delay the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import httpx
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from guard.apis.base import Api, GuardedRequest
from guard.errors import upstream_protocol
from guard.proxy.headers import add_relayed_headers
from guard.sse import sse_event
from guard.truth.detector import excerpt
from guard.proxy.upstream import Upstream, UpstreamFailure, UpstreamResponse, response_headers


@dataclass(frozen=True, slots=True)
class Exchange:
    """The upstream side of one request, as the recorder needs it."""

    status: int
    text: str | None  # the assistant's answer; None if there was none or it was cut off
    seconds: float
    error: str | None = None  # connect|timeout|protocol|too_large|status_4xx|status_5xx|truncated
    request_id: str | None = None  # the upstream's x-request-id


OnDone = Callable[[Exchange], None]


@dataclass(slots=True)
class Generation:
    """An upstream answer: read whole, or a stream whose headers are in and body unread."""

    upstream: Upstream
    api: Api
    started: float
    whole: UpstreamResponse | None = None
    stream: httpx.Response | None = None

    async def discard(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


def _status_reason(status: int) -> str | None:
    if status >= 500:
        return "status_5xx"
    if status >= 400:
        return "status_4xx"
    return None


async def generate(upstream: Upstream, request: GuardedRequest, headers: Mapping[str, str],
                   query: bytes = b"") -> Generation:
    """Send ``request`` upstream byte for byte. Raises :class:`UpstreamFailure` on transport trouble."""
    started = time.perf_counter()
    api = request.api
    if not request.stream:
        whole = await upstream.request("POST", api.path, headers=headers, content=request.raw, query=query)
        return Generation(upstream, api, started, whole=whole)
    response = await upstream.open_stream(api.path, headers=headers, content=request.raw, query=query)
    if response.status_code < 300 and response.headers.get("content-type", "").startswith("text/event-stream"):
        return Generation(upstream, api, started, stream=response)
    # An error, or an upstream that ignored stream=true: read it whole and relay it as is.
    try:
        body = await response.aread()
    except httpx.HTTPError as exc:
        raise UpstreamFailure(upstream_protocol(type(exc).__name__), "protocol") from None
    finally:
        await response.aclose()
    return Generation(upstream, api, started, whole=UpstreamResponse(response.status_code, response_headers(response.headers), body))


def failed_exchange(failure: UpstreamFailure, started: float) -> Exchange:
    return Exchange(failure.status, None, time.perf_counter() - started, failure.reason)


def respond(generation: Generation, extra_headers: Mapping[str, str], on_done: OnDone) -> Response:
    """The client's response for ``generation``, with the guard's headers added.

    Only the detector's excerpt of the answer is kept for labelling (``guard.truth.detector.excerpt``:
    bounded whatever the answer's length), whole or streamed.
    """
    if generation.whole is not None:
        answer = generation.whole
        text = generation.api.answer_text(answer.body) if answer.status < 300 else None
        exchange = Exchange(
            answer.status,
            excerpt(text) if text is not None else None,
            time.perf_counter() - generation.started,
            _status_reason(answer.status),
            answer.headers.get("x-request-id"),
        )
        return add_relayed_headers(Response(answer.body, status_code=answer.status, headers=extra_headers,
                                            background=BackgroundTask(_report, on_done, exchange)), answer.headers)
    assert generation.stream is not None
    deadline = asyncio.get_running_loop().time() + generation.upstream.total_timeout
    response = StreamingResponse(_relay(generation, deadline, on_done),
                                 status_code=generation.stream.status_code, headers=extra_headers)
    return add_relayed_headers(response, response_headers(generation.stream.headers))


async def _report(on_done: OnDone, exchange: Exchange) -> None:
    """Run ``on_done`` on the event loop: Starlette sends a plain function to a thread pool, and
    scoring touches the recorder's asyncio queue and the live windows, which are loop-only."""
    on_done(exchange)


async def _relay(generation: Generation, deadline: float, on_done: OnDone) -> AsyncIterator[bytes]:
    assert generation.stream is not None
    collector = generation.api.collector()
    error: str | None = None
    events = _WholeEvents()
    try:
        async for chunk in generation.upstream.relay(generation.stream, deadline):
            collector.feed(chunk)
            if complete := events.feed(chunk):
                yield complete
        if rest := events.rest():
            yield rest
    except UpstreamFailure as failure:
        # Headers are already sent: report the failure in-band, as OpenAI does, after the last whole
        # event (a cut event in progress is dropped, so the error event parses).
        error = failure.reason
        with contextlib.suppress(Exception):
            yield sse_event({"error": {"message": failure.message, "type": failure.type, "param": None, "code": failure.code}})
    finally:
        if error is None and collector.error is not None:
            error = "status_5xx"
        elif error is None and not collector.saw_done:
            error = "truncated"  # the client went away, or the upstream ended without [DONE]
        exchange = Exchange(generation.stream.status_code if error is None else 502,
                            collector.text if error is None else None,
                            time.perf_counter() - generation.started, error,
                            generation.stream.headers.get("x-request-id"))
        # The response's end is sent once this generator returns; score after that, not before.
        try:
            asyncio.get_running_loop().call_soon(on_done, exchange)
        except RuntimeError:  # finalised outside the loop (interpreter shutdown): score now, lose nothing
            on_done(exchange)


class _WholeEvents:
    """Relays an SSE byte stream in whole events: each chunk up to its last event boundary (a blank
    line) goes out at once, the event still in progress waits for its end. Costs one search of each
    chunk (and the two bytes before it), never a copy of what is withheld."""

    def __init__(self) -> None:
        self._held: list[bytes] = []
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        window = self._tail + chunk
        ends = [i + len(mark) for mark in (b"\n\n", b"\n\r\n") if (i := window.rfind(mark)) >= 0]
        end = max(ends, default=0) - len(self._tail)  # where the last whole event ends, in ``chunk``
        self._tail = window[-2:]
        if end <= 0:  # no event ends in this chunk
            self._held.append(chunk)
            return b""
        out = b"".join([*self._held, chunk[:end]])
        self._held = [chunk[end:]] if end < len(chunk) else []
        return out

    def rest(self) -> bytes:
        out, self._held = b"".join(self._held), []
        return out
