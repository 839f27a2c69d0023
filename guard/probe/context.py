"""What the probe sees of a conversation: everything the model sees, as text, within a budget.

:func:`conversation_view` turns chat-style messages (and the tools offered to the model) into
the items the probe shows the model. Every piece of text that reaches the model reaches the
probe: every role's content, every text-bearing part (plain strings, ``text``,
``input_text``, ``output_text``, ``refusal``), ``name`` fields, an assistant's ``refusal``,
tool-call and legacy function-call names and arguments, and each tool's name, description
and parameter schema (whose descriptions are text the model reads too).

Parts of another type (images, audio, files...) carry no text the probe can read; they are
counted in :attr:`ProbeView.n_unknown_parts` and, per ``unknown_parts``, shown as a marker
(``"mark"``, the default: ``[image_url part]``) or left out (``"skip"``). The caller decides what
a count above zero means (the prober can treat it as a probe failure).

The budget keeps the last user turn whole and shortens from the middle: the start of the
conversation (system prompt, tool definitions) and its end are kept, the middle is cut and
replaced by one marker item saying how much was left out. Only a last user turn that is alone
larger than the budget is itself cut in its middle. Items are plain dicts of strings, so the
probe embeds them with ``json.dumps`` and no text can forge a turn boundary.

This module is shared by every API the guard fronts (chat, completions, responses): each
converts its input to chat-style messages and tools, then calls :func:`conversation_view`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

#: Part types whose text reaches the model, and the key that holds it.
TEXT_PARTS: Mapping[str, str] = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
UnknownParts = Literal["mark", "skip"]
#: Requests larger than this (bytes) are parsed, and their view built, in a worker thread, not on the event loop.
OFF_LOOP_BYTES = 256 * 1024
MARKER_ROLE = "omitted"


@dataclass(frozen=True, slots=True)
class ProbeView:
    """The probe's view: ``items`` in conversation order; :attr:`document` is what the probe embeds
    (the items, or with ``last_user_only`` the last user turn's text alone) and :attr:`text` its JSON."""

    items: tuple[dict[str, str], ...]
    n_unknown_parts: int
    truncated: bool
    last_user_only: bool = False

    @property
    def document(self) -> str | list[dict[str, str]]:
        if self.last_user_only:
            return self.last_user_text()
        return list(self.items)

    @property
    def text(self) -> str:
        return json.dumps(self.document, ensure_ascii=False)

    def last_user_text(self) -> str:
        """The content of the last user item (else of the last item, else ""): what datapoints hash."""
        for item in reversed(self.items):
            if item["role"] == "user":
                return item["content"]
        return self.items[-1]["content"] if self.items else ""


def conversation_view(
    messages: Sequence[Any],
    tools: Sequence[Any] | None = None,
    *,
    budget_chars: int,
    unknown_parts: UnknownParts = "mark",
    last_user_only: bool = False,
) -> ProbeView:
    """The probe's view of ``messages`` (chat-style dicts) and ``tools`` within ``budget_chars``.

    ``last_user_only`` keeps only the last user turn (the weaker ``probe_context=last_user``).
    Malformed entries are read as far as they go, never raised on: the request was validated
    (or is about to be refused) elsewhere, and the probe must see whatever the model would.
    """
    counter = _Counter()
    items: list[dict[str, str]] = []
    if not last_user_only:
        items += [item for tool in tools or () for item in _tool_items(tool)]
    last_user = None
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        role = _clean(message.get("role")) or "unknown"
        if role == "user":
            last_user = len(items)
        items += _message_items(message, role, counter, unknown_parts)
    if last_user_only:
        last = next((i for i in range(len(items)) if i >= (last_user or 0) and items[i]["role"] == "user"), None)
        items = [items[last]] if last is not None else items[-1:]
        last_user = 0 if items else None
    elif last_user is not None and (last_user >= len(items) or items[last_user]["role"] != "user"):
        last_user = None  # an empty user message contributed no item
    kept, truncated, cut_last_user = _fit(items, last_user, budget_chars)
    # A last user turn longer than the budget is shown cut in its middle: what the cut hides is text the
    # model reads and the probe does not, so it counts as an unknown part (``fail`` fails the probe).
    return ProbeView(tuple(kept), counter.n + cut_last_user, truncated, last_user_only)


def last_user_text(messages: Sequence[Any]) -> str:
    """All the text of the last user turn, uncut (what a datapoint's prompt hash is taken over): the
    same as the ``last_user_only`` view's, found from the end, so its cost is that turn's, not the
    conversation's (it runs on the event loop, for every request)."""
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return conversation_view([message], budget_chars=sys.maxsize, last_user_only=True).last_user_text()
    for message in reversed(messages):  # no user turn: the last item there is
        if isinstance(message, Mapping):
            items = list(_message_items(message, _clean(message.get("role")) or "unknown", _Counter(), "mark"))
            if items:
                return items[-1]["content"]
    return ""


class _Counter:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def _clean(value: Any) -> str:
    """A string with any unpaired surrogate replaced, so it can always be encoded and hashed."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if text.isascii():  # O(1) for CPython's compact strings: no surrogate, no copy of a large text
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _content_text(content: Any, counter: _Counter, unknown_parts: UnknownParts) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return _clean(content) if content is not None else ""
    pieces: list[str] = []
    for part in content:
        if isinstance(part, str):
            pieces.append(part)
            continue
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        key = TEXT_PARTS.get(kind) if isinstance(kind, str) else None
        if key is not None and isinstance(part.get(key), str):
            pieces.append(part[key])
            continue
        counter.n += 1  # not a text part the probe can read
        text = part.get("text")
        if isinstance(text, str):  # an unknown type that still carries text: the model may read it
            pieces.append(text)
        elif unknown_parts == "mark":
            pieces.append(f"[{_clean(kind) or 'untyped'} part]")
    return "\n".join(pieces)


def _message_items(message: Mapping[str, Any], role: str, counter: _Counter,
                   unknown_parts: UnknownParts) -> Iterable[dict[str, str]]:
    content = _clean(_content_text(message.get("content"), counter, unknown_parts))
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        content = f"{content}\n{refusal}" if content else refusal
    name = _clean(message.get("name"))
    if content or role == "user":
        item = {"role": role, "content": content}
        if name:
            item["name"] = name
        yield item
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            yield {"role": role, "tool_call": _clean(function.get("name")), "content": _clean(function.get("arguments"))}
    legacy = message.get("function_call")
    if isinstance(legacy, Mapping):
        yield {"role": role, "tool_call": _clean(legacy.get("name")), "content": _clean(legacy.get("arguments"))}


def _tool_items(tool: Any) -> Iterable[dict[str, str]]:
    if not isinstance(tool, Mapping):
        return
    # chat: {"type": "function", "function": {...}} or {"type": "custom", "custom": {...}}
    spec = next((tool[k] for k in ("function", "custom") if isinstance(tool.get(k), Mapping)), tool)
    parts = [_clean(spec.get("description"))]
    for schema in ("parameters", "format"):  # a function's JSON schema, a custom tool's grammar
        if spec.get(schema) is not None:
            parts.append(_clean(spec.get(schema)))
    yield {"role": "tool_definition", "name": _clean(spec.get("name") or tool.get("type")),
           "content": "\n".join(p for p in parts if p)}


def _size(item: Mapping[str, str]) -> int:
    return sum(len(v) for v in item.values())


def _cut_middle(text: str, keep: int) -> str:
    if len(text) <= keep:
        return text
    marker = f" [... {len(text) - keep} characters omitted ...] "
    head = max(0, keep // 2)
    return text[:head] + marker + text[len(text) - max(0, keep - head):]


def _fit(items: list[dict[str, str]], protected: int | None, budget: int) -> tuple[list[dict[str, str]], bool, bool]:
    """Keep ``items`` within ``budget`` characters: the protected item whole, the middle cut. Returns the
    items kept, whether anything was cut, and whether the protected item itself was cut."""
    if sum(_size(i) for i in items) <= budget:
        return items, False, False
    room = budget
    if protected is not None:
        whole = items[protected]
        if _size(whole) >= budget:  # the last user turn alone is too large: cut it in its middle
            item = dict(whole)
            item["content"] = _cut_middle(item["content"], max(0, budget - (_size(item) - len(item["content"]))))
            return [item], True, True
        room -= _size(whole)
    others = [(index, item) for index, item in enumerate(items) if index != protected]
    head_room, tail_room = room // 2, room - room // 2
    kept: list[tuple[float, dict[str, str]]] = []
    first_dropped = len(others)
    for position, (index, item) in enumerate(others):
        if _size(item) > head_room:
            if head_room > 0:
                kept.append((index, _shortened(item, head_room, keep="start")))
            first_dropped = position
            break
        kept.append((index, item))
        head_room -= _size(item)
    cut_at = others[first_dropped][0] if first_dropped < len(others) else len(items)
    for index, item in reversed(others[first_dropped + 1:] if kept and kept[-1][0] == cut_at else others[first_dropped:]):
        if _size(item) > tail_room:
            if tail_room > 0:
                kept.append((index, _shortened(item, tail_room, keep="end")))
            break
        kept.append((index, item))
        tail_room -= _size(item)
    omitted = sum(_size(i) for _, i in others) - sum(_size(i) for _, i in kept)
    kept.append((cut_at + 0.5, {"role": MARKER_ROLE, "content": f"[... {omitted} characters of the conversation omitted ...]"}))
    if protected is not None:
        kept.append((protected, items[protected]))
    kept.sort(key=lambda pair: pair[0])
    return [item for _, item in kept], True, False


def _shortened(item: dict[str, str], room: int, *, keep: Literal["start", "end"]) -> dict[str, str]:
    shortened = dict(item)
    content = item["content"]
    keep_chars = max(0, room - (_size(item) - len(content)))
    shortened["content"] = content[:keep_chars] if keep == "start" else content[len(content) - keep_chars:]
    return shortened
