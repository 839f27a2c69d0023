"""``POST /v1/chat/completions``: the chat API's reading of requests and answers, and its block."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from guard.apis.base import (
    MAX_MESSAGES,
    MAX_TOOLS,
    N_SCHEMA,
    GuardedRequest,
    array_limit,
    choice_count,
    include_usage,
    json_object,
    model_of,
    optional,
    parts_text,
    schema_message,
)
from guard.errors import bad_request
from guard.probe.context import TEXT_PARTS
from guard.sse import ContentCollector, completion_text, sse_event

_TEXT = frozenset({"text"})
ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def message_text(message: dict[str, Any]) -> str:
    """The text of one message; array content keeps only its text parts."""
    return parts_text(message.get("content"), _TEXT)


REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "model": {"type": ["string", "null"]},
        "messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "items": {
            "type": "object",
            "required": ["role"],
            "properties": {
                "role": {"type": "string", "examples": ["system", "user", "assistant", "tool"]},
                "content": {"anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"allOf": [  # text-bearing parts need string text; others pass
                        {"if": {"type": "object", "required": ["type"], "properties": {"type": {"enum": list(kinds)}}},
                         "then": {"required": [key], "properties": {key: {"type": "string"}}}}
                        for key, kinds in (("text", ("text", "input_text", "output_text")), ("refusal", ("refusal",)))
                    ]}},
                    {"type": "null"},
                ]},
            },
        }},
        "stream": {"type": ["boolean", "null"]},
        "stream_options": {"type": ["object", "null"], "examples": [{"include_usage": True}]},
        "tools": {"type": ["array", "null"], "maxItems": MAX_TOOLS},
        "functions": {"type": ["array", "null"], "maxItems": MAX_TOOLS},
        "n": N_SCHEMA,
    },
}


class ChatApi:
    name = "chat"
    path = "/chat/completions"
    request_schema = REQUEST_SCHEMA

    def parse(self, raw: bytes) -> GuardedRequest:
        """The parsed request, or a 400 :class:`~guard.errors.ProxyError` (no stricter than OpenAI)."""
        body = json_object(raw)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' must be a non-empty array", param="messages")
        array_limit(messages, MAX_MESSAGES, "messages")
        array_limit(body.get("tools"), MAX_TOOLS, "tools")
        array_limit(body.get("functions"), MAX_TOOLS, "functions")
        choices = choice_count(body)
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise bad_request(f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
            content = message.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise bad_request(f"messages[{i}].content must be a string or an array", param=f"messages[{i}].content")
            if isinstance(content, list) and any(
                isinstance(part, dict) and isinstance(part.get("type"), str) and part["type"] in TEXT_PARTS
                and not isinstance(part.get(TEXT_PARTS[part["type"]]), str)
                for part in content
            ):  # every text-bearing part type the probe reads needs its string text
                raise bad_request(f"a text part of messages[{i}].content must have a string text",
                                  param=f"messages[{i}].content")
        # ``tools`` and the legacy ``functions``: text the model reads, so the probe reads it too
        tools = optional(body, "tools", list, []) + optional(body, "functions", list, [])
        return GuardedRequest(self, raw, body, model_of(body), _probed_messages(body, messages),
                              [t for t in tools if isinstance(t, dict)], stream=optional(body, "stream", bool, False),
                              include_usage=include_usage(body), choices=choices)

    def answer_text(self, body: bytes) -> str | None:
        return completion_text(body)

    def collector(self) -> ContentCollector:
        return ContentCollector()

    def block_body(self, request: GuardedRequest, *, request_id: str, message: str) -> dict[str, Any]:
        return {
            **_base(request, request_id), "object": "chat.completion",
            "choices": [{"index": i, "message": {"role": "assistant", "content": message}, "logprobs": None,
                         "finish_reason": "content_filter"} for i in range(request.choices)],
            "usage": ZERO_USAGE,
        }

    def block_events(self, request: GuardedRequest, *, request_id: str, message: str) -> Iterator[bytes]:
        """The block as SSE events, one at a time (a generator: memory is one event, whatever ``n``)."""
        chunk = {**_base(request, request_id), "object": "chat.completion.chunk"}
        for i in range(request.choices):
            yield sse_event({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": message},
                                                   "finish_reason": None}]})
        for i in range(request.choices):
            yield sse_event({**chunk, "choices": [{"index": i, "delta": {}, "finish_reason": "content_filter"}]})
        if request.include_usage:
            yield sse_event({**chunk, "choices": [], "usage": ZERO_USAGE})
        yield sse_event("[DONE]")


def _probed_messages(body: dict[str, Any], messages: list[Any]) -> list[Any]:
    """``messages`` and the other text the model reads: a JSON schema's name, description and schema
    (``response_format``) first, a predicted output (``prediction.content``) last."""
    response_format = body.get("response_format")
    schema = schema_message(response_format.get("json_schema")) if isinstance(response_format, dict) else None
    prediction = body.get("prediction")
    predicted = prediction.get("content") if isinstance(prediction, dict) else None
    if schema is None and predicted is None:
        return messages
    return [*([schema] if schema else []), *messages,
            *([{"role": "prediction", "content": predicted}] if predicted is not None else [])]


def _base(request: GuardedRequest, request_id: str) -> dict[str, Any]:
    return {"id": f"chatcmpl-rg-{request_id}", "created": int(time.time()), "model": request.model or "refusal-guard"}


CHAT = ChatApi()
