"""Parsing and validating an incoming chat-completions body.

The proxy forwards the client's bytes unchanged; this module only decides whether the
body *is* a chat request (so a bad one gets a 400 here instead of a confusing upstream
error) and extracts the few fields the guard reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from guard.errors import bad_request
from guard.probe.context import TEXT_PARTS


@dataclass(frozen=True, slots=True)
class ChatRequest:
    raw: bytes
    body: dict[str, Any]
    model: str | None
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    tools: list[Any] = field(default_factory=list)  # ``tools`` and legacy ``functions``: text the model reads


def load_json(raw: bytes) -> Any:
    """Parse a JSON body, or raise a 400 :class:`~guard.errors.ProxyError` naming why not.

    Stricter than :func:`json.loads` where leniency would let the guard and the upstream read
    different requests: a key given twice in one object is refused (Python keeps the last, other
    parsers the first, so the probe could assess one ``messages`` and the model answer another),
    and so are unpaired UTF-16 surrogate escapes (legal JSON, not Unicode). Integers past
    Python's digit limit and nesting past the parser's depth are a 400, not a 500.
    """
    try:
        data = json.loads(raw, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise bad_request(f"request body repeats the key {exc.key!r} in one object", code="duplicate_key") from None
    except RecursionError:
        raise bad_request("request body is nested too deeply", code="invalid_json") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and ints past sys.get_int_max_str_digits()
        raise bad_request(f"request body is not valid JSON: {_short(exc)}", code="invalid_json") from None
    if (b"\\u" in raw) and not _encodable(data):
        raise bad_request("request body contains an unpaired surrogate (\\ud800-\\udfff escape)", code="invalid_unicode")
    return data


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        self.key = key[:64]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return data


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def _encodable(value: Any) -> bool:
    """True if every string (keys included) in ``value`` is valid Unicode (no lone surrogate)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Return the parsed request or raise a 400 :class:`~guard.errors.ProxyError`."""
    body = load_json(raw)
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
            isinstance(part, dict) and isinstance(part.get("type"), str) and part["type"] in TEXT_PARTS
            and not isinstance(part.get(TEXT_PARTS[part["type"]]), str)
            for part in content
        ):
            raise bad_request(f"a text part of messages[{i}].content must have a string text",
                              param=f"messages[{i}].content")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    tools = [t for key in ("tools", "functions") if isinstance(body.get(key), list) for t in body[key]]
    return ChatRequest(raw, body, model, messages, stream, include_usage, tools)
