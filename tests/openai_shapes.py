"""Canned OpenAI-shaped answers for the test upstreams (legacy completions and the Responses API),
written from the API reference, independently of ``guard.apis`` (the code under test)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

CREATED = 1_700_000_000  # fixed, so answers are byte-identical across calls


def text_completion(text: str, model: str) -> dict[str, Any]:
    return {"id": "cmpl-scripted", "object": "text_completion", "created": CREATED, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def text_completion_events(pieces: list[str], model: str) -> Iterator[str]:
    base = {"id": "cmpl-scripted", "object": "text_completion", "created": CREATED, "model": model}
    for piece in pieces:
        yield "data: " + json.dumps({**base, "choices": [{"index": 0, "text": piece, "logprobs": None,
                                                          "finish_reason": None}]}) + "\n\n"
    yield "data: " + json.dumps({**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                      "finish_reason": "stop"}]}) + "\n\n"
    yield "data: [DONE]\n\n"


def _message(text: str) -> dict[str, Any]:
    return {"type": "message", "id": "msg_scripted", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def response(text: str, model: str, status: str = "completed") -> dict[str, Any]:
    return {"id": "resp_scripted", "object": "response", "created_at": CREATED, "status": status, "model": model,
            "output": [_message(text)] if status == "completed" else [], "error": None, "incomplete_details": None,
            "instructions": None, "metadata": {}, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5,
                      "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}


def response_events(pieces: list[str], model: str) -> Iterator[str]:
    text = "".join(pieces)
    where = {"item_id": "msg_scripted", "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": response("", model, "in_progress")},
        {"type": "response.in_progress", "response": response("", model, "in_progress")},
        {"type": "response.output_item.added", "output_index": 0, "item": {**_message(""), "status": "in_progress",
                                                                           "content": []}},
        {"type": "response.content_part.added", **where, "part": {"type": "output_text", "text": "", "annotations": []}},
        *({"type": "response.output_text.delta", **where, "delta": piece} for piece in pieces),
        {"type": "response.output_text.done", **where, "text": text},
        {"type": "response.content_part.done", **where, "part": {"type": "output_text", "text": text, "annotations": []}},
        {"type": "response.output_item.done", "output_index": 0, "item": _message(text)},
        {"type": "response.completed", "response": response(text, model)},
    ]
    for n, event in enumerate(events):
        yield f"event: {event['type']}\ndata: {json.dumps({**event, 'sequence_number': n})}\n\n"
