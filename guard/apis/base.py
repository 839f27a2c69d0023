"""What the request path needs to know about one guarded OpenAI API, and nothing more.

An :class:`Api` reads a request body into a :class:`GuardedRequest` (whose ``messages`` and
``tools`` are a chat-style view of what the model will see: the probe reads that), reads the
text of an answer (whole, or reassembled from its event stream: the detector labels that) and
writes a block in the API's own shape. ``guard.proxy.routing`` drives any of them the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from guard.errors import bad_request


class StreamText(Protocol):
    """Watches a relayed event stream; once it ends, ``text`` is the reassembled answer."""

    saw_done: bool  # the stream's own end marker arrived ([DONE], response.completed...)
    error: dict | None  # an in-band error event

    def feed(self, chunk: bytes) -> None: ...

    @property
    def text(self) -> str: ...


class Api(Protocol):
    name: str  # the route label in datapoints and metrics: chat | completions | responses
    path: str  # under the upstream's base URL (and under /v1 on the guard)
    request_schema: dict[str, Any]  # JSON schema of what ``parse`` accepts (the OpenAPI document's)

    def parse(self, raw: bytes) -> GuardedRequest: ...

    def answer_text(self, body: bytes) -> str | None: ...

    def collector(self) -> StreamText: ...

    def block_body(self, request: GuardedRequest, *, request_id: str, message: str) -> dict[str, Any]: ...

    def block_events(self, request: GuardedRequest, *, request_id: str, message: str) -> list[bytes]: ...


@dataclass(frozen=True, slots=True)
class GuardedRequest:
    """One parsed request of any guarded API; the client's bytes are forwarded unchanged."""

    api: Api
    raw: bytes
    body: dict[str, Any]
    model: str | None
    messages: list[dict[str, Any]]  # chat-style: what the model will see, for the probe
    tools: list[dict[str, Any]]  # chat-style function tools
    stream: bool
    include_usage: bool = False
    choices: int = 1  # how many answers a block must return (n, times the prompts of a batch)
    context: dict[str, Any] = field(default_factory=dict)  # recorded, never probed (previous_response_id)


def json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object (:func:`load_json`), or a 400."""
    body = load_json(raw)
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body


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


def optional(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    """``body[name]`` if it has type ``kind``; ``default`` if absent or null (as OpenAI accepts); else a 400."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise bad_request(f"'{name}' must be {_KIND_NAMES.get(names, names)}", param=name)
    return value


_KIND_NAMES = {"bool": "a boolean", "str": "a string", "int": "an integer", "dict": "an object", "list": "an array"}


def model_of(body: dict[str, Any]) -> str | None:
    return optional(body, "model", str, None)


def choice_count(body: dict[str, Any]) -> int:
    """``n``; an out-of-range value is left for the upstream to judge (a block then answers once)."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128 else 1


def include_usage(body: dict[str, Any]) -> bool:
    options = optional(body, "stream_options", dict, None)
    return bool(options and options.get("include_usage"))


def parts_text(content: Any, kinds: frozenset[str]) -> str:
    """The text of a string, or of the parts of an array whose ``type`` is in ``kinds``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("type"), str) and part["type"] in kinds:
                text = part.get("text", part.get("refusal"))
                texts.append(text if isinstance(text, str) else "")
        return "\n".join(texts)
    return ""
