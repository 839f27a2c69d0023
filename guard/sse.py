"""The SSE codec shared by the APIs, the relay and the probe: reading assistant text out of a relayed
server-sent-event stream, and writing events (below ``guard.proxy`` and ``guard.apis``, importing neither).

The relay yields the upstream's bytes untouched; this collector only watches them so
that, once the stream ends, the refusal detector can label the answer. It keeps only what the
detector reads (``guard.truth.detector.excerpt``): the first ``LENGTH_CAP`` and the last
``TAIL_CHARS`` characters of the content, so its memory is bounded whatever the answer's length
(plus at most one unfinished SSE line).
"""

from __future__ import annotations

import json

from guard.truth.detector import LENGTH_CAP, TAIL_CHARS


class ContentCollector:
    """Feed it raw SSE bytes in any chunking; ``text`` is the detector's excerpt of the delta content
    (the whole content when it is at most ``LENGTH_CAP + TAIL_CHARS`` characters), ``length`` the full
    content's length in characters."""

    def __init__(self) -> None:
        self._pending = b""
        self._head: list[str] = []
        self._head_chars = 0
        self._tail = ""
        self.length = 0
        self.saw_done = False
        self.error: dict | None = None

    def feed(self, chunk: bytes) -> None:
        data = self._pending + chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            self._line(line.rstrip(b"\r"))

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.saw_done = True
            return
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):
            return
        if not isinstance(event, dict):
            return
        if isinstance(event.get("error"), dict):
            self.error = event["error"]
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            text = self.choice_text(choice)
            if isinstance(text, str):
                self._add(text)

    @staticmethod
    def choice_text(choice: dict) -> object:
        """The text one streamed choice adds (chat: ``delta.content``)."""
        delta = choice.get("delta")
        return delta.get("content") if isinstance(delta, dict) else None

    def _add(self, content: str) -> None:
        self.length += len(content)
        room = LENGTH_CAP - self._head_chars
        if room > 0:
            self._head.append(content[:room])
            self._head_chars += min(room, len(content))
            content = content[room:]
        if content:
            self._tail = (self._tail[-TAIL_CHARS:] + content[-TAIL_CHARS:])[-TAIL_CHARS:]

    @property
    def text(self) -> str:
        return "".join(self._head) + self._tail


def completion_text(body: bytes) -> str | None:
    """The first choice's message content of a non-streamed completion, if there is one."""
    try:
        data = json.loads(body)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        return None
    return content if isinstance(content, str) else None


def sse_event(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return b"data: " + data.encode() + b"\n\n"
