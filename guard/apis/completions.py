"""``POST /v1/completions``: the legacy completions API (``prompt`` as a string or a batch)."""

from __future__ import annotations

import json
import time
from typing import Any

from guard.apis.base import GuardedRequest, choice_count, include_usage, json_object, model_of, optional
from guard.apis.chat import ZERO_USAGE
from guard.errors import bad_request
from guard.proxy.sse import ContentCollector, sse_event


class CompletionsText(ContentCollector):
    """The first choice's streamed ``text``."""

    @staticmethod
    def choice_text(choice: dict) -> object:
        return choice.get("text")


_TOKENS = {"type": "array", "minItems": 1, "items": {"type": "integer"}}
REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "model": {"type": ["string", "null"]},
        "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}},
                             _TOKENS, {"type": "array", "minItems": 1, "items": _TOKENS}]},
        "stream": {"type": ["boolean", "null"]},
        "stream_options": {"type": ["object", "null"]},
    },
}


class CompletionsApi:
    name = "completions"
    path = "/completions"
    request_schema = REQUEST_SCHEMA

    def parse(self, raw: bytes) -> GuardedRequest:
        body = json_object(raw)
        prompts = _prompts(body.get("prompt"))
        text = "\n\n".join(prompts)
        messages = [{"role": "user", "content": text}]
        return GuardedRequest(self, raw, body, model_of(body), messages, [],
                              stream=optional(body, "stream", bool, False), include_usage=include_usage(body),
                              choices=choice_count(body) * max(1, len(prompts)))

    def answer_text(self, body: bytes) -> str | None:
        try:
            text = json.loads(body)["choices"][0]["text"]
        except (ValueError, KeyError, IndexError, TypeError, RecursionError):
            return None
        return text if isinstance(text, str) else None

    def collector(self) -> CompletionsText:
        return CompletionsText()

    def block_body(self, request: GuardedRequest, *, request_id: str, message: str) -> dict[str, Any]:
        return {**_base(request, request_id), "choices": [_choice(i, message, "content_filter")
                                                          for i in range(request.choices)], "usage": ZERO_USAGE}

    def block_events(self, request: GuardedRequest, *, request_id: str, message: str) -> list[bytes]:
        base = _base(request, request_id)
        indexes = range(request.choices)
        events = [sse_event({**base, "choices": [_choice(i, message, None)]}) for i in indexes]
        events += [sse_event({**base, "choices": [_choice(i, "", "content_filter")]}) for i in indexes]
        if request.include_usage:
            events.append(sse_event({**base, "choices": [], "usage": ZERO_USAGE}))
        return [*events, sse_event("[DONE]")]


def _prompts(prompt: Any) -> list[str]:
    """The prompt texts of a request: a string, or a batch of strings. Token-id prompts have no
    text the guard can read (the probe sees an empty prompt for them)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if _token_ids(prompt):
            return [""]
        if all(_token_ids(p) for p in prompt):
            return [""] * len(prompt)
    raise bad_request("'prompt' must be a string, an array of strings, or token ids", param="prompt")


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _base(request: GuardedRequest, request_id: str) -> dict[str, Any]:
    return {"id": f"cmpl-rg-{request_id}", "object": "text_completion", "created": int(time.time()),
            "model": request.model or "refusal-guard"}


def _choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


COMPLETIONS = CompletionsApi()
