"""Parsing and validating an incoming chat-completions body.

The proxy forwards the client's bytes unchanged; this module only decides whether the
body *is* a chat request (so a bad one gets a 400 here instead of a confusing upstream
error) and extracts the few fields the guard reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from guard.errors import bad_request


@dataclass(frozen=True, slots=True)
class ChatRequest:
    raw: bytes
    body: dict[str, Any]
    model: str | None
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Return the parsed request or raise a 400 :class:`~guard.errors.ProxyError`."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise bad_request(f"messages[{i}].content must be a string or an array", param=f"messages[{i}].content")
        if isinstance(content, list) and any(
            isinstance(part, dict) and part.get("type") == "text" and not isinstance(part.get("text"), str)
            for part in content
        ):
            raise bad_request(f"a text part of messages[{i}].content must have a string 'text'",
                              param=f"messages[{i}].content")
        _require_unicode(message["role"], message_text(message), where=f"messages[{i}]")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", param="model")
    _require_unicode(model or "", where="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    return ChatRequest(raw, body, model, messages, stream, include_usage)


def _require_unicode(*texts: str, where: str) -> None:
    """Unpaired surrogates (legal JSON escapes like "\\ud800", not Unicode) would break the
    hashing, probing and logging of the text further on: reject them here, as a 400."""
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{where} contains an unpaired surrogate (\\ud800-\\udfff escape)",
                          param=where, code="invalid_unicode") from None


def message_text(message: dict[str, Any]) -> str:
    """The text of one message; array content keeps only its text parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""
