"""The answer a blocked request gets at once, without any upstream generation.

By default a normal 200 chat completion with the configured refusal message and
``finish_reason: "content_filter"`` (streamed as SSE if the client asked for a stream), so
every OpenAI client handles it unchanged. Optionally a 400 with code ``refusal_predicted``.
Never 5xx or 429: SDKs retry those, and a retried block is only more load.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

from starlette.responses import Response

from guard.proxy.chat_request import ChatRequest
from guard.errors import error_body
from guard.proxy.sse import sse_event


def blocked_response(
    chat: ChatRequest, *, request_id: str, message: str, style: str, headers: Mapping[str, str]
) -> Response:
    if style == "error":
        body = error_body("The request was blocked: the model predicts it would refuse it.",
                          type="invalid_request_error", code="refusal_predicted")
        return Response(body, status_code=400, media_type="application/json", headers=dict(headers))
    base = {"id": f"chatcmpl-rg-{request_id}", "created": int(time.time()), "model": chat.model or "refusal-guard"}
    if not chat.stream:
        completion = {
            **base,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": message}, "finish_reason": "content_filter"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
        return Response(json.dumps(completion), media_type="application/json", headers=dict(headers))
    chunk = {**base, "object": "chat.completion.chunk"}
    events = [
        sse_event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": message}, "finish_reason": None}]}),
        sse_event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]}),
    ]
    if chat.include_usage:
        events.append(sse_event({**chunk, "choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}))
    events.append(sse_event("[DONE]"))
    return Response(b"".join(events), media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
