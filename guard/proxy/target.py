"""One path rule: the request target is normalised once, before routing (issue 23).

The guard routes on a path and the upstream's HTTP stack resolves a path: if the two read a
target differently, a request can be pass-through here and a chat completion there
(``/v1/./chat/completions``), or leave ``/v1`` upstream (``/v1/../admin``). So the middleware
replaces the target with one normal form before anything reads it, and the pass-through
forwards exactly that form:

* percent-escapes are decoded once (``%2e`` is a dot, ``%63hat`` is ``chat``); the result must be
  UTF-8 without control characters;
* an encoded slash or backslash (``%2f``, ``%5c``) or a literal backslash is a 400: decoded or
  not, the two sides would disagree on the segments;
* empty segments (``//``, a trailing slash) and ``.`` segments are dropped, ``..`` removes the
  segment before it; a ``..`` that would remove ``v1`` itself, or climb above the root, is a 400
  that never reaches the upstream (nothing outside the upstream's ``/v1`` is the client's);
* a path that equals a guarded path ignoring case (``/v1/Chat/Completions``) is that guarded path:
  an upstream that matches routes case-insensitively must not get an unguarded generation;
* a target (path and query string) over ``max_bytes`` (8 KiB, the request-line limit of nginx's
  default buffers) is a 414.

The normal form is percent-encoded again for ``raw_path`` (a ``%`` the client encoded stays
encoded, so an upstream that decodes once sees the same segments the guard routed on).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

#: The longest request target (path and query string, as sent) the guard accepts.
MAX_TARGET_BYTES = 8 * 1024
PREFIX = "v1"
#: RFC 3986 ``pchar`` minus ``%``: what may stay unescaped in a forwarded path segment.
_SAFE = "/:@!$&'()*+,;=-._~"
#: A path already in normal form (no escapes, no empty or dot-led segment, no trailing slash):
#: the common case, returned as it is.
_PLAIN = re.compile(rb"/|(?:/[A-Za-z0-9:@!$&'()*+,;=\-_~][A-Za-z0-9:@!$&'()*+,;=\-_~.]*)+")


class BadTarget(Exception):
    """A request target the guard refuses: answered in the OpenAI error shape, never forwarded."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass(frozen=True, slots=True)
class Target:
    path: str  # decoded, for routing (``scope["path"]``)
    raw_path: bytes  # the same path percent-encoded, for forwarding (``scope["raw_path"]``)


def _invalid(message: str) -> BadTarget:
    return BadTarget(400, message, "invalid_path")


def normalise(raw_path: bytes, query: bytes = b"", *, guarded: Collection[str] = (),
              max_bytes: int = MAX_TARGET_BYTES) -> Target:
    """The one path a request target names, or :class:`BadTarget`."""
    if len(raw_path) + len(query) > max_bytes:
        raise BadTarget(414, f"request target (path and query string) exceeds the limit of {max_bytes} bytes",
                        "request_target_too_long")
    if _PLAIN.fullmatch(raw_path):
        path = raw_path.decode("ascii")
        spelled = path if path in guarded else _guarded_spelling(path, guarded)
        return Target(path, raw_path) if spelled == path else Target(spelled, spelled.encode("ascii"))
    lowered = raw_path.lower()
    if b"%2f" in lowered or b"%5c" in lowered or b"\\" in raw_path:
        raise _invalid("encoded slashes and backslashes are not allowed in the path")
    try:
        decoded = unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("the path is not UTF-8 once percent-decoded") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise _invalid("control characters are not allowed in the path")
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments or segments == [PREFIX]:
                raise _invalid("the path leaves /v1")
            segments.pop()
        else:
            segments.append(segment)
    path = _guarded_spelling("/" + "/".join(segments), guarded)
    return Target(path, quote(path, safe=_SAFE).encode("ascii"))


def _guarded_spelling(path: str, guarded: Collection[str]) -> str:
    """``path``, or the guarded path it equals ignoring case."""
    lowered = path.lower()
    return next((g for g in guarded if g.lower() == lowered), path)
