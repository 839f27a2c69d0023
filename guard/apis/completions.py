"""``POST /v1/completions``: the legacy completions API (``prompt`` as a string or a batch).

The probe reads the prompts' text and the ``suffix`` (text the model reads too); a token-id prompt
has no text the guard can read, so it is an unknown part (``probe_unknown_parts``: marked, skipped
or failing the probe). A batch holds at most ``MAX_PROMPTS`` prompts and prompts x ``n`` at most
``MAX_BATCH_CHOICES`` choices, so a block answer stays small whatever the request asks for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from guard.apis.base import (
    MAX_BATCH_CHOICES,
    MAX_PROMPTS,
    N_SCHEMA,
    GuardedRequest,
    array_limit,
    choice_count,
    include_usage,
    json_object,
    model_of,
    optional,
    unreadable,
)
from guard.apis.chat import ZERO_USAGE
from guard.errors import bad_request
from guard.sse import ContentCollector, sse_event

#: The unknown part a token-id prompt stands as in the probe's view.
TOKEN_IDS = "token_ids"


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
        "prompt": {"anyOf": [{"type": "string"},
                             {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": {"type": "string"}},
                             _TOKENS, {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": _TOKENS}]},
        "n": N_SCHEMA,
        "suffix": {"type": ["string", "null"]},
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
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not _token_ids(prompt):  # a batch (one token-id prompt is not)
            array_limit(prompt, MAX_PROMPTS, "prompt")
        prompts = _prompts(prompt)
        n = choice_count(body)
        if n * len(prompts) > MAX_BATCH_CHOICES:
            raise bad_request(f"Invalid 'n': {len(prompts)} prompts x n={n} asks for {n * len(prompts)} choices; "
                              f"at most {MAX_BATCH_CHOICES} per request (prompts x n).", param="n",
                              code="invalid_value")
        texts = [p for p in prompts if p is not None]
        unknown = len(prompts) - len(texts)
        if texts:
            messages: list[dict[str, Any]] = [{"role": "user", "content": "\n\n".join(texts)}]
            if unknown:
                messages.append(unreadable(TOKEN_IDS, "user"))
        else:
            messages = [{"role": "user", "content": [{"type": TOKEN_IDS}] * unknown}]
        suffix = optional(body, "suffix", str, None)
        if suffix:
            messages.append({"role": "suffix", "content": suffix})
        return GuardedRequest(self, raw, body, model_of(body), messages, [],
                              stream=optional(body, "stream", bool, False), include_usage=include_usage(body),
                              choices=n * len(prompts))

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

    def block_events(self, request: GuardedRequest, *, request_id: str, message: str) -> Iterator[bytes]:
        """The block as SSE events, one at a time (a generator: memory is one event, whatever the batch)."""
        base = _base(request, request_id)
        for i in range(request.choices):
            yield sse_event({**base, "choices": [_choice(i, message, None)]})
        for i in range(request.choices):
            yield sse_event({**base, "choices": [_choice(i, "", "content_filter")]})
        if request.include_usage:
            yield sse_event({**base, "choices": [], "usage": ZERO_USAGE})
        yield sse_event("[DONE]")


def _prompts(prompt: Any) -> list[str | None]:
    """The prompts of a request: a string, or a batch of strings; a token-id prompt (one list of
    integers, or a batch of them) is None: it has no text the guard can read."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if _token_ids(prompt):
            return [None]
        if all(_token_ids(p) for p in prompt):
            return [None] * len(prompt)
    raise bad_request("'prompt' must be a string, an array of strings, or token ids", param="prompt")


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _base(request: GuardedRequest, request_id: str) -> dict[str, Any]:
    return {"id": f"cmpl-rg-{request_id}", "object": "text_completion", "created": int(time.time()),
            "model": request.model or "refusal-guard"}


def _choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


COMPLETIONS = CompletionsApi()
