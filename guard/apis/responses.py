"""``POST /v1/responses``: the Responses API.

The probe sees a chat-style view of the request: ``instructions`` as a system message, each
``input`` item as the chat message it stands for (messages, function calls and their outputs),
function tools in the chat shape. ``previous_response_id`` names context stored upstream that
the guard cannot see: it is recorded with the datapoint, not probed. The detector reads the
output messages' text (``output_text`` and ``refusal`` parts), whole or reassembled from the
event stream. A block is a completed response whose one output message is the refusal text.
"""

from __future__ import annotations

import json
import time
from typing import Any

from guard.apis.base import GuardedRequest, json_object, model_of, optional, parts_text
from guard.errors import bad_request
from guard.proxy.sse import ContentCollector, sse_event

_INPUT_TEXT = frozenset({"input_text", "output_text", "text", "refusal"})
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
        "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}, {"type": "null"}]},
        "tools": {"type": ["array", "null"]},
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
        items = optional(body, "input", (str, list), [])
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise bad_request(f"input[{i}] must be an object", param=f"input[{i}]")
            message = _as_chat_message(item)
            if message is not None:
                messages.append(message)
        if not messages:  # e.g. only previous_response_id: nothing the probe can read
            messages.append({"role": "user", "content": ""})
        tools = [_as_chat_tool(t) for t in optional(body, "tools", list, []) if isinstance(t, dict)]
        optional(body, "previous_response_id", str, None)
        context = {k: body[k] for k in ("previous_response_id", "conversation") if body.get(k) is not None}
        return GuardedRequest(self, raw, body, model_of(body), messages, tools,
                              stream=optional(body, "stream", bool, False), context=context)

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

    def block_events(self, request: GuardedRequest, *, request_id: str, message: str) -> list[bytes]:
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
        return [b"event: " + kind.encode() + b"\n" + sse_event({"type": kind, "sequence_number": n, **data})
                for n, (kind, data) in enumerate(events)]


def _as_chat_message(item: dict[str, Any]) -> dict[str, Any] | None:
    """The chat message an input item stands for; None for items with no text (reasoning...)."""
    kind = item.get("type", "message")
    if kind == "message" and isinstance(item.get("role"), str):
        role = item["role"]
        return {"role": _ROLES.get(role, role), "content": parts_text(item.get("content"), _INPUT_TEXT)}
    if kind == "function_call":
        call = {"name": str(item.get("name", "")), "arguments": str(item.get("arguments", ""))}
        return {"role": "assistant", "content": None,
                "tool_calls": [{"id": str(item.get("call_id", "")), "type": "function", "function": call}]}
    if kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else parts_text(output, _INPUT_TEXT)
        return {"role": "tool", "tool_call_id": str(item.get("call_id", "")), "content": text}
    return None


def _as_chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A Responses function tool (flat) in the chat shape; built-in tools keep their type only."""
    if tool.get("type") == "function":
        return {"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                                 if k in tool}}
    return {"type": str(tool.get("type"))}


def _message(request_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": f"msg_rg_{request_id}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _response(request: GuardedRequest, request_id: str, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    body = request.body
    return {
        "id": f"resp_rg_{request_id}", "object": "response", "created_at": int(time.time()), "status": status,
        "model": request.model or "refusal-guard", "output": output, "error": None, "incomplete_details": None,
        "instructions": body.get("instructions") if isinstance(body.get("instructions"), str) else None,
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
        "previous_response_id": request.context.get("previous_response_id"),
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "temperature": None, "top_p": None,
        "usage": {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0},
    }


RESPONSES = ResponsesApi()
