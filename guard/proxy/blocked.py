"""The answer a blocked request gets at once, without any upstream generation.

By default a normal 200 answer in the API's own shape (chat and completions: the refusal
message with ``finish_reason: "content_filter"``; responses: a completed response whose output
message is the refusal message), streamed as SSE if the client asked for a stream, so every
OpenAI client handles it unchanged. Optionally a 400 with code ``refusal_predicted``.
Never 5xx or 429: SDKs retry those, and a retried block is only more load.

Memory is bounded: the request's limits (``guard.apis.base``: at most 2,048 choices) bound a whole
answer, and a streamed block is written from the API's event generator in batches of about
:data:`BATCH_BYTES`, never built as one string.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping

from starlette.responses import Response, StreamingResponse

from guard.apis.base import GuardedRequest
from guard.errors import error_body


def blocked_response(
    request: GuardedRequest, *, request_id: str, message: str, style: str, headers: Mapping[str, str]
) -> Response:
    if style == "error":
        body = error_body("The request was blocked: the model predicts it would refuse it.",
                          type="invalid_request_error", code="refusal_predicted")
        return Response(body, status_code=400, media_type="application/json", headers=dict(headers))
    api = request.api
    if not request.stream:
        answer = api.block_body(request, request_id=request_id, message=message)
        choices = answer.get("choices")
        if isinstance(choices, list) and len(choices) > BATCH_CHOICES:  # written in pieces, between them the loop runs
            return StreamingResponse(_json_pieces(answer, choices), media_type="application/json", headers=dict(headers))
        return Response(json.dumps(answer), media_type="application/json", headers=dict(headers))
    events = api.block_events(request, request_id=request_id, message=message)
    return StreamingResponse(_batched(events), media_type="text/event-stream",
                             headers={**headers, "cache-control": "no-cache"})


#: A streamed block is sent in writes of about this many bytes.
BATCH_BYTES = 64 * 1024


#: A whole block answer with more choices than this is written a batch of choices at a time.
BATCH_CHOICES = 64


async def _json_pieces(answer: dict, choices: list) -> AsyncIterator[bytes]:
    """``json.dumps(answer)``, the same JSON, written :data:`BATCH_CHOICES` choices at a time."""
    head, tail = json.dumps({**answer, "choices": []}).split('"choices": []', 1)
    yield (head + '"choices": [').encode()
    for start in range(0, len(choices), BATCH_CHOICES):
        batch = json.dumps(choices[start:start + BATCH_CHOICES])[1:-1]
        yield ((", " if start else "") + batch).encode()
    yield ("]" + tail).encode()


async def _batched(events: Iterable[bytes]) -> AsyncIterator[bytes]:
    """Whole SSE events joined into writes of about :data:`BATCH_BYTES` (each write yields the loop)."""
    batch: list[bytes] = []
    size = 0
    for event in events:
        batch.append(event)
        size += len(event)
        if size >= BATCH_BYTES:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)
