"""Process logs: text or JSON lines, a level, and one access-log line per request.

``configure_logging`` sets up the root logger once per process (the CLI, and each uvicorn
worker); uvicorn's own loggers propagate to it, so everything comes out in one format. With
``log_format: json`` every record is one JSON object on one line (``ts``, ``level``,
``logger``, ``message``, plus ``exc`` for a traceback) and :class:`AccessLog` writes one line
per HTTP request on the ``refusal_guard.access`` logger with only these fields: request id,
method, route (a fixed name such as ``chat``, never the path), status, duration, and for chat
requests the action, mode, probe status and the probe/upstream latencies. Never prompt text,
headers, paths or client addresses.

The fields of a chat request are known deep in the request path (the scorer); they reach the
access line through :func:`annotate`, which writes into the current request's field dict (a
context variable set by the middleware for the duration of one request, so concurrent
requests never see each other's fields).

No line prints a query string (it can carry a key: ``/v1/realtime?api-key=...``) or a client
address: uvicorn's own access log is off (``guard.cli``), its WebSocket handshake lines (``127.0.0.1:
5000 - "WebSocket /v1/realtime?api-key=..." 403``, access lines under another logger's name) are
dropped, and :class:`RedactQueryStrings`, on the one handler, replaces the query of any path or URL in
any other record (a library's URL in an error) with ``?[redacted]``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

ACCESS_LOGGER = "refusal_guard.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_fields: ContextVar[dict[str, Any] | None] = ContextVar("refusal_guard_access_fields", default=None)

#: What a chat request may add to its access line (anything else is ignored).
ANNOTATIONS = frozenset({"action", "mode", "probe_status", "probe_ms", "upstream_ms"})
#: A path (or URL) followed by a query string: ``/v1/realtime?api-key=sk-...``.
_QUERY = re.compile(r"(/[^\s\"'?]*)\?[^\s\"']+")


class RedactQueryStrings(logging.Filter):
    """Replace the query string of every path or URL in a record's message (and traceback) with
    ``?[redacted]``; drop uvicorn's WebSocket access lines (client address, path and query)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("uvicorn") and str(record.msg).startswith('%s - "WebSocket '):
            return False  # uvicorn's access line of a WebSocket handshake: the guard writes its own
        message = record.getMessage()
        redacted = _QUERY.sub(r"\1?[redacted]", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _QUERY.sub(r"\1?[redacted]", record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line; ``record.access`` (a dict) is merged in for access lines."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update(access)
        if record.exc_info:
            out["exc"] = record.exc_text or self.formatException(record.exc_info)  # exc_text: redacted
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(log_format: str = "text", log_level: str = "info") -> None:
    """Replace the root logger's handlers with one stderr handler in ``log_format`` at ``log_level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactQueryStrings())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise, and carries URLs


def annotate(**fields: Any) -> None:
    """Add chat-request fields (see :data:`ANNOTATIONS`) to the current request's access line."""
    current = _fields.get()
    if current is not None:
        current.update((k, v) for k, v in fields.items() if k in ANNOTATIONS)


class AccessLog:
    """Collects one request's fields and writes its access line (used by the request middleware)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    def begin(self) -> Any:
        return _fields.set({})

    def end(self, token: Any, *, request_id: str, method: str, route: str, status: int, seconds: float) -> None:
        fields = _fields.get() or {}
        _fields.reset(token)
        if not self.logger.isEnabledFor(logging.INFO):
            return
        line = {"request_id": request_id, "method": method, "route": route, "status": status,
                "duration_ms": round(seconds * 1000, 3), **fields}
        self.logger.info("%s %s %d %.1fms", method, route, status, seconds * 1000, extra={"access": line})
