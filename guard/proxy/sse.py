"""Reading assistant text out of a relayed server-sent-event stream.

The relay yields the upstream's bytes untouched; this collector only watches them so
that, once the stream ends, the refusal detector can label the reassembled answer.
"""

from __future__ import annotations

import json


class ContentCollector:
    """Feed it raw SSE bytes in any chunking; ``text`` is the concatenated delta content, or its
    first ``max_chars`` characters (the rest is read for ``[DONE]`` and errors, not kept)."""

    def __init__(self, max_chars: int | None = None) -> None:
        self._pending = b""
        self._parts: list[str] = []
        self._room = max_chars
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
                self._keep(text)

    @staticmethod
    def choice_text(choice: dict) -> object:
        """The text one streamed choice adds (chat: ``delta.content``)."""
        delta = choice.get("delta")
        return delta.get("content") if isinstance(delta, dict) else None

    def _keep(self, text: str) -> None:
        if self._room is None:
            self._parts.append(text)
        elif self._room > 0:
            self._parts.append(text[:self._room])
            self._room -= min(len(text), self._room)

    @property
    def text(self) -> str:
        return "".join(self._parts)


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
