"""``POST /v1/responses``: the Responses API.

The probe sees a chat-style view of the request: ``instructions`` as a system message, each
``input`` item as the chat message it stands for (messages with all their parts, function and
custom tool calls and their outputs, reasoning summaries), function tools in the chat shape, the
JSON schema of ``text.format`` and the string values of ``prompt.variables``. What the model reads
but the probe cannot is an unknown part of the view (counted; marked, skipped or failing the probe
per ``probe_unknown_parts``): image, file and audio parts, input items of other types
(``item_reference``, built-in tool calls...), and context stored upstream: a ``conversation``, a
stored ``prompt`` template, and ``previous_response_id`` unless its input items can be fetched
(``guard.probe.stored_context`` replaces the placeholder with them). Datapoints record the ids of
stored context only (``safe_id``), never client JSON. The detector reads the output messages' text
(``output_text`` and ``refusal`` parts), whole or reassembled from the event stream. A block is a
completed response whose one output message is the refusal text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from guard.apis.base import (
    MAX_INPUT_ITEMS,
    MAX_TOOLS,
    GuardedRequest,
    array_limit,
    fetchable_id,
    json_object,
    model_of,
    optional,
    parts_text,
    safe_id,
    schema_message,
    unreadable,
)
from guard.errors import bad_request
from guard.sse import ContentCollector, sse_event

_OUTPUT_TEXT = frozenset({"output_text", "refusal"})
_ROLES = {"developer": "system"}
_TEXT_DELTAS = frozenset({"response.output_text.delta", "response.refusal.delta"})
_ENDS = frozenset({"response.completed", "response.incomplete"})


class ResponsesText(ContentCollector):
    """Reassembles the answer from the Responses event stream (``response.output_text.delta``
    and ``response.refusal.delta`` events); it ends with ``response.completed``, not ``[DONE]``."""

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        try:
            event = json.loads(line[5:])
        except (ValueError, RecursionError):
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return
        kind = event["type"]
        if kind in _TEXT_DELTAS and isinstance(event.get("delta"), str):
            self._add(event["delta"])
        elif kind in _ENDS:
            self.saw_done = True
        elif kind in ("error", "response.failed"):
            error = event.get("error") or (event.get("response") or {}).get("error")
            self.error = error if isinstance(error, dict) else {"message": str(error)}


REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "model": {"type": ["string", "null"]},
        "instructions": {"type": ["string", "null"]},
        "input": {"anyOf": [{"type": "string"}, {"type": "array", "maxItems": MAX_INPUT_ITEMS, "items": {"type": "object"}},
                            {"type": "null"}]},
        "tools": {"type": ["array", "null"], "maxItems": MAX_TOOLS},
        "stream": {"type": ["boolean", "null"]},
        "previous_response_id": {"type": ["string", "null"]},
    },
}


class ResponsesApi:
    name = "responses"
    path = "/responses"
    request_schema = REQUEST_SCHEMA

    def parse(self, raw: bytes) -> GuardedRequest:
        body = json_object(raw)
        messages: list[dict[str, Any]] = []
        instructions = optional(body, "instructions", str, None)
        if instructions:
            messages.append({"role": "system", "content": instructions})
        text = body.get("text")
        if isinstance(text, dict) and isinstance(text.get("format"), dict) and (schema := schema_message(text["format"])):
            messages.append(schema)
        items = optional(body, "input", (str, list), [])
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        array_limit(items, MAX_INPUT_ITEMS, "input")
        array_limit(body.get("tools"), MAX_TOOLS, "tools")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise bad_request(f"input[{i}] must be an object", param=f"input[{i}]")
        previous = optional(body, "previous_response_id", str, None)
        context = {key: value for key, value in (("previous_response_id", safe_id(previous)),
                                                 ("conversation", _conversation_id(body.get("conversation"))),
                                                 ("prompt", _prompt_id(body.get("prompt"))))
                   if value is not None}
        # stored context comes before this request's items: a stored prompt, a conversation, the previous response
        prompt = body.get("prompt")
        if isinstance(prompt, dict):
            messages.append(_prompt_message(prompt))
        if body.get("conversation") is not None:
            messages.append(unreadable("stored_conversation"))
        stored_index = None
        if previous is not None:
            stored_index = len(messages)
            messages.append(unreadable("previous_response"))
        messages += self.input_messages(items)
        if not messages:
            messages.append({"role": "user", "content": ""})
        tools = [_as_chat_tool(t) for t in optional(body, "tools", list, []) if isinstance(t, dict)]
        return GuardedRequest(self, raw, body, model_of(body), messages, tools,
                              stream=optional(body, "stream", bool, False), context=context,
                              previous_response_id=fetchable_id(previous), stored_index=stored_index)

    def input_messages(self, items: list[Any]) -> list[dict[str, Any]]:
        """The chat-style messages ``input`` items (the request's, or stored ones) stand for."""
        return [message for item in items if isinstance(item, dict)
                for message in (_as_chat_message(item),) if message is not None]

    def answer_text(self, body: bytes) -> str | None:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("output"), list):
            return None
        texts = [parts_text(item.get("content"), _OUTPUT_TEXT) for item in data["output"]
                 if isinstance(item, dict) and item.get("type") == "message"]
        return "\n".join(texts) if texts else None

    def collector(self) -> ResponsesText:
        return ResponsesText()

    def block_body(self, request: GuardedRequest, *, request_id: str, message: str) -> dict[str, Any]:
        return _response(request, request_id, "completed", [_message(request_id, message, "completed")])

    def block_events(self, request: GuardedRequest, *, request_id: str, message: str) -> Iterator[bytes]:
        item_id = f"msg_rg_{request_id}"
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        part = {"type": "output_text", "text": message, "annotations": [], "logprobs": []}
        events = [
            ("response.created", {"response": _response(request, request_id, "in_progress", [])}),
            ("response.in_progress", {"response": _response(request, request_id, "in_progress", [])}),
            ("response.output_item.added", {"output_index": 0, "item": {**_message(request_id, "", "in_progress"),
                                                                        "content": []}}),
            ("response.content_part.added", {**where, "part": {**part, "text": ""}}),
            ("response.output_text.delta", {**where, "delta": message, "logprobs": []}),
            ("response.output_text.done", {**where, "text": message, "logprobs": []}),
            ("response.content_part.done", {**where, "part": part}),
            ("response.output_item.done", {"output_index": 0, "item": _message(request_id, message, "completed")}),
            ("response.completed", {"response": self.block_body(request, request_id=request_id, message=message)}),
        ]
        return (b"event: " + kind.encode() + b"\n" + sse_event({"type": kind, "sequence_number": n, **data})
                for n, (kind, data) in enumerate(events))


def _as_chat_message(item: dict[str, Any]) -> dict[str, Any] | None:
    """The chat message an input item stands for. A message keeps all its parts (the probe view reads
    the text ones and counts the others); an item of a type with no text the probe can read (an
    ``item_reference``, a built-in tool's call or output...) is an unknown part; an item with nothing
    for the model to read (a message without a role: the upstream refuses it) is None."""
    kind = item.get("type", "message")
    if kind == "message":
        if not isinstance(item.get("role"), str):
            return None
        role = item["role"]
        return {"role": _ROLES.get(role, role), "content": item.get("content")}
    if kind in ("function_call", "custom_tool_call"):
        arguments = item.get("arguments", item.get("input", ""))
        call = {"name": str(item.get("name", "")), "arguments": arguments}  # a non-string is read as its JSON
        return {"role": "assistant", "content": None,
                "tool_calls": [{"id": str(item.get("call_id", "")), "type": "function", "function": call}]}
    if kind in ("function_call_output", "custom_tool_call_output"):
        output = item.get("output")
        return {"role": "tool", "tool_call_id": str(item.get("call_id", "")), "content": output}
    if kind == "reasoning":  # the summary is text; ``encrypted_content`` is the provider's own, sealed
        parts = [p for key in ("summary", "content") if isinstance(item.get(key), list) for p in item[key]
                 if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return {"role": "assistant", "content": "\n".join(p["text"] for p in parts)} if parts else None
    return unreadable(str(kind) if isinstance(kind, str) else "untyped_item")


def _conversation_id(conversation: Any) -> str | None:
    if isinstance(conversation, dict):
        return safe_id(conversation.get("id")) or "(object)"
    return safe_id(conversation) if conversation is not None else None


def _prompt_id(prompt: Any) -> str | None:
    return (safe_id(prompt.get("id")) or "(object)") if isinstance(prompt, dict) else None


def _prompt_message(prompt: dict[str, Any]) -> dict[str, Any]:
    """A stored prompt template (unknown to the probe) and its variables: string values are text,
    ``input_text``/``input_image``/``input_file`` values are parts like a message's."""
    parts: list[Any] = [{"type": "stored_prompt"}]
    variables = prompt.get("variables")
    for name, value in variables.items() if isinstance(variables, dict) else ():
        if isinstance(value, str):
            parts.append(f"{name}: {value}")
        elif isinstance(value, dict):
            parts.append(value)
    return {"role": "context", "content": parts}


def _as_chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A Responses function or custom tool (flat) in the chat shape; built-in tools keep their type only."""
    kind = tool.get("type")
    if kind in ("function", "custom"):
        return {"type": kind, kind: {k: tool[k] for k in ("name", "description", "parameters", "format") if k in tool}}
    return {"type": str(kind)}


#: A block echoes the request's ``instructions`` and ``metadata`` only up to this size (OpenAI caps
#: metadata far below it): a block answer stays small whatever the request holds.
ECHO_MAX_CHARS = 64 * 1024


def _echo(value: Any, kind: type, default: Any) -> Any:
    if not isinstance(value, kind):
        return default
    if isinstance(value, dict):  # metadata: string keys and values (OpenAI's shape), else not echoed
        if len(value) > 64 or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return default
        size = sum(len(k) + len(v) for k, v in value.items())
    else:
        size = len(value)
    return value if size <= ECHO_MAX_CHARS else default


def _message(request_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": f"msg_rg_{request_id}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _response(request: GuardedRequest, request_id: str, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    body = request.body
    return {
        "id": f"resp_rg_{request_id}", "object": "response", "created_at": int(time.time()), "status": status,
        "model": request.model or "refusal-guard", "output": output, "error": None, "incomplete_details": None,
        "instructions": _echo(body.get("instructions"), str, None),
        "metadata": _echo(body.get("metadata"), dict, {}),
        "previous_response_id": request.context.get("previous_response_id"),  # the id, as stored
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "temperature": None, "top_p": None,
        "usage": {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0},
    }


RESPONSES = ResponsesApi()
