"""The answer a blocked request gets at once, without any upstream generation.

By default a normal 200 answer in the API's own shape (chat and completions: the refusal
message with ``finish_reason: "content_filter"``; responses: a completed response whose output
message is the refusal message), streamed as SSE if the client asked for a stream, so every
OpenAI client handles it unchanged. Optionally a 400 with code ``refusal_predicted``.
Never 5xx or 429: SDKs retry those, and a retried block is only more load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from starlette.responses import Response

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
        return Response(json.dumps(answer), media_type="application/json", headers=dict(headers))
    events = api.block_events(request, request_id=request_id, message=message)
    return Response(b"".join(events), media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
