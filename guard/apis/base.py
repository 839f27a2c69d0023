"""What the request path needs to know about one guarded OpenAI API, and nothing more.

An :class:`Api` reads a request body into a :class:`GuardedRequest` (whose ``messages`` and
``tools`` are a chat-style view of what the model will see: the probe reads that), reads the
text of an answer (whole, or reassembled from its event stream: the detector labels that) and
writes a block in the API's own shape. ``guard.proxy.routing`` drives any of them the same way.

Bounded work per request: every array whose length multiplies what the guard does (choices a block
must write, messages and items the probe reads, tools) has a limit, OpenAI's own where it has one,
and a longer one is a 400 in the OpenAI shape naming the field (``param``) before anything else
happens; a body of more than ``MAX_JSON_OBJECTS`` objects stops the parse (400). Bodies over :data:`OFF_LOOP_BYTES` are parsed, and their probe view built, in a worker
thread, so one large request cannot stall the event loop (``/healthz``, every other request).
"""

from __future__ import annotations

import codecs
import contextlib
import gc
import json
import json.scanner
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from guard.errors import bad_request
from guard.probe.context import OFF_LOOP_BYTES  # noqa: F401  (re-exported: the app parses larger bodies off the loop)


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

    def block_events(self, request: GuardedRequest, *, request_id: str, message: str) -> Iterator[bytes]: ...


#: ``n``: the choices of one answer (OpenAI's maximum).
MAX_CHOICES = 128
#: Completions: the prompts of one batch (OpenAI's maximum).
MAX_PROMPTS = 2048
#: Completions: prompts x n, the choices one block answer holds (a 16-prompt batch at n=128; 2048 at n=1).
MAX_BATCH_CHOICES = 2048
#: Chat: messages of one request (OpenAI's maximum).
MAX_MESSAGES = 2048
#: Responses: ``input`` items of one request (generous: agent loops carry many tool calls and outputs).
MAX_INPUT_ITEMS = 10_000
#: Tools (and chat's legacy ``functions``) offered in one request (OpenAI's maximum).
MAX_TOOLS = 128
#: ``n`` in the request schemas: 1 to MAX_CHOICES if an integer (anything else is the upstream's to judge).
N_SCHEMA: dict[str, Any] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_CHOICES},
                                      {"not": {"type": "integer"}}]}
#: JSON objects one guarded body may hold, wherever they are (10,000 Responses items of a few parts use a
#: fraction): bounds the arrays without a limit of their own (content parts, fields forwarded unread).
MAX_JSON_OBJECTS = 200_000
#: Numbers a large body (over 1 MiB) may hold: token-id prompts of 2M tokens, past any model's context.
MAX_JSON_NUMBERS = 2 * 1024 * 1024


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
    context: dict[str, str] = field(default_factory=dict)  # ids of stored context, recorded (see safe_id)
    previous_response_id: str | None = None  # fetchable stored context (responses); see guard.probe.stored_context
    stored_index: int | None = None  # where in ``messages`` the stored context's placeholder stands
    #: The last user turn's text and its keyed hash, when they were read off the event loop (large bodies:
    #: ``guard.app.parse_off_loop``); None: the request path reads them itself.
    prompt: tuple[str, str] | None = None


def array_limit(value: Any, limit: int, param: str) -> None:
    """A 400 (OpenAI's wording and code) if the array ``value`` is longer than ``limit``."""
    if isinstance(value, list) and len(value) > limit:
        raise bad_request(f"Invalid '{param}': array too long. Expected an array with maximum length {limit}, "
                          f"but got an array with length {len(value)} instead.", param=param,
                          code="array_above_max_length")


#: What an id stored in a datapoint may hold (ids of stored responses, conversations, prompts).
ID_MAX_CHARS = 128
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.:\-]")


def safe_id(value: Any) -> str | None:
    """A client-given id as a datapoint may store it: a string of at most :data:`ID_MAX_CHARS`
    characters of ``[A-Za-z0-9_.:-]`` (anything else ``_``, a cut one ends in ``~``); None if not a string."""
    if not isinstance(value, str):
        return None
    cut = value[:ID_MAX_CHARS + 1]
    cleaned = _ID_UNSAFE.sub("_", cut)
    return cleaned[:ID_MAX_CHARS - 1] + "~" if len(cut) > ID_MAX_CHARS else cleaned


def fetchable_id(value: Any) -> str | None:
    """``value`` if it can go into an upstream path as it is (an id, nothing a path could read as a
    separator or a dot segment), else None."""
    if isinstance(value, str) and 0 < len(value) <= ID_MAX_CHARS and not _ID_UNSAFE.search(value) \
            and value.strip(".") and ":" not in value:
        return value
    return None


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
    Python's digit limit and nesting past the parser's depth are a 400, not a 500. A body of more
    than :data:`MAX_JSON_OBJECTS` objects is a 400 as soon as the parser gets there, wherever they
    are (content parts, unknown fields forwarded as they are): the parse's work is bounded too.
    """
    objects = _ObjectCounter()
    large = len(raw) > DECODE_STEP
    try:
        with _no_gc_pauses(large):
            data = _large_decoder(raw, objects).decode(_text(raw)) if large else json.loads(raw, object_pairs_hook=objects)
    except _DuplicateKey as exc:
        raise bad_request(f"request body repeats the key {exc.key!r} in one object (spellings of a field that differ "
                          "only in case count as repeats)", code="duplicate_key") from None
    except _TooManyObjects:
        raise bad_request(f"request body holds more than {MAX_JSON_OBJECTS} JSON objects",
                          code="too_many_objects") from None
    except _TooManyNumbers:
        raise bad_request(f"request body holds more than {MAX_JSON_NUMBERS} numbers", code="too_many_numbers") from None
    except RecursionError:
        raise bad_request("request body is nested too deeply", code="invalid_json") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and ints past sys.get_int_max_str_digits()
        raise bad_request(f"request body is not valid JSON: {_short(exc)}", code="invalid_json") from None
    if (b"\\u" in raw) and not _encodable(data):
        raise bad_request("request body contains an unpaired surrogate (\\ud800-\\udfff escape)", code="invalid_unicode")
    return data


def _large_decoder(raw: bytes, objects: _ObjectCounter) -> json.JSONDecoder:
    """The parser of a body over :data:`DECODE_STEP`. The C scanner parses a whole body in one hold of
    the GIL (30-60 ms for 32 MiB of long strings, a second for 4M integers), so whichever thread runs it
    the event loop waits. Here every number goes through a Python call (``parse_int``/``parse_float``: a
    release point, and a bound); and where the strings are long (at least :data:`LONG_STRING_BYTES` bytes
    per quote on average) the scanner is the standard library's Python one, which still scans each string
    in C but lets the GIL go between values (measured: 2,048 strings of 16 KB, longest hold 7 ms against
    28 ms, and faster overall). A dense body keeps the C scanner, whose object hook releases the GIL."""
    decoder = json.JSONDecoder(object_pairs_hook=objects, parse_int=objects.integer, parse_float=objects.real)
    if len(raw) >= LONG_STRING_BYTES * max(1, raw.count(b'"')):
        decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    return decoder


#: Bytes per quote character from which a large body's strings count as long (see :func:`_decoder`).
LONG_STRING_BYTES = 64
#: Large bodies are decoded this many bytes at a time (each step a short hold of the GIL).
DECODE_STEP = 1024 * 1024


def _text(raw: bytes) -> bytes | str:
    """``raw`` as :func:`json.loads` decodes it (its encoding detected, ``surrogatepass``), in steps of
    :data:`DECODE_STEP` when large: one 32 MiB decode holds the GIL, and so stalls the event loop
    even from a worker thread, for as long as it takes."""
    if len(raw) <= DECODE_STEP:
        return raw
    decoder = codecs.getincrementaldecoder(json.detect_encoding(raw))("surrogatepass")
    view = memoryview(raw)
    parts = [decoder.decode(view[i:i + DECODE_STEP]) for i in range(0, len(raw), DECODE_STEP)]
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts)


_gc_lock = threading.Lock()
_gc_holders = 0


@contextlib.contextmanager
def _no_gc_pauses(active: bool) -> Iterator[None]:
    """No cyclic garbage collection while a large body is parsed (JSON makes no cycles): a million
    new objects otherwise trigger full collections that hold the GIL, and so stall the event loop,
    for hundreds of milliseconds. Re-entrant across threads; the collector's state is restored."""
    global _gc_holders
    if not active:
        yield
        return
    with _gc_lock:
        _gc_holders += 1
        if _gc_holders == 1:
            _no_gc_pauses.was_enabled = gc.isenabled()  # type: ignore[attr-defined]
            gc.disable()
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holders -= 1
            if _gc_holders == 0 and _no_gc_pauses.was_enabled:  # type: ignore[attr-defined]
                gc.enable()


class _TooManyObjects(Exception):
    pass


class _ObjectCounter:
    """The parser's ``object_pairs_hook``: :func:`_unique_keys`, and a count that stops the parse early."""

    __slots__ = ("n", "numbers")

    def __init__(self) -> None:
        self.n = 0
        self.numbers = 0

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        self.n += 1
        if self.n > MAX_JSON_OBJECTS:
            raise _TooManyObjects
        return _unique_keys(pairs)

    def integer(self, text: str) -> int:
        self.numbers += 1
        if self.numbers > MAX_JSON_NUMBERS:
            raise _TooManyNumbers
        return int(text)

    def real(self, text: str) -> float:
        self.numbers += 1
        if self.numbers > MAX_JSON_NUMBERS:
            raise _TooManyNumbers
        return float(text)


class _TooManyNumbers(Exception):
    pass


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        self.key = key[:64]


#: Field names the guard reads (casefolded). Two keys of one object that differ only in case (or by
#: Unicode folding: ``ſ`` and ``s``, the Kelvin sign and ``k``) where one of them is such a field are
#: refused: a server that matches field names case-insensitively (Go's ``encoding/json``, as in Ollama,
#: takes the last match) would generate from the one the probe did not read.
READ_FIELDS = frozenset({
    "model", "messages", "role", "content", "text", "input", "input_text", "prompt", "instructions", "tools",
    "function", "functions", "name", "description", "arguments", "parameters", "type", "suffix", "output",
    "previous_response_id", "conversation", "variables", "prediction", "response_format", "format", "schema",
    "n", "stream", "refusal", "tool_calls", "audio", "image_url", "file", "custom",
})


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    if len(data) > 1 and not all(key.isascii() and key.islower() for key in data):
        folded: dict[str, str] = {}
        for key in data:
            other = folded.setdefault(key.casefold(), key)
            if other != key and key.casefold() in READ_FIELDS:
                raise _DuplicateKey(key)
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
    """``n`` (1 to :data:`MAX_CHOICES`, else a 400 as OpenAI's); a value that is not an integer is left
    for the upstream to judge (a block then answers once)."""
    n = body.get("n")
    if not isinstance(n, int) or isinstance(n, bool):
        return 1
    if n > MAX_CHOICES:
        raise bad_request(f"Invalid 'n': integer above maximum value. Expected a value <= {MAX_CHOICES}, "
                          f"but got {n} instead.", param="n", code="integer_above_max_value")
    if n < 1:
        raise bad_request(f"Invalid 'n': integer below minimum value. Expected a value >= 1, but got {n} instead.",
                          param="n", code="integer_below_min_value")
    return n


def include_usage(body: dict[str, Any]) -> bool:
    options = optional(body, "stream_options", dict, None)
    return bool(options and options.get("include_usage"))


def schema_message(spec: Any) -> dict[str, Any] | None:
    """The text a JSON-schema output format puts before the model (its name, description and schema,
    whose ``description`` fields the model reads) as a chat-style message for the probe; None if ``spec``
    is not such a format (chat's ``response_format.json_schema``, Responses' flat ``text.format``)."""
    if not isinstance(spec, dict):
        return None
    texts = [spec["description"]] if isinstance(spec.get("description"), str) else []
    if spec.get("schema") is not None:
        texts.append(json.dumps(spec["schema"], ensure_ascii=False, default=str))
    message: dict[str, Any] = {"role": "response_format", "content": "\n".join(texts)}
    if isinstance(spec.get("name"), str):
        message["name"] = spec["name"]
    return message if texts or "name" in message else None


def unreadable(kind: str, role: str = "context") -> dict[str, Any]:
    """A chat-style message for something the model reads that the probe cannot (stored context, token
    ids): one part of an unknown type, so the probe view counts it (``probe_unknown_parts``)."""
    return {"role": role, "content": [{"type": kind}]}


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
