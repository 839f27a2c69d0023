"""A scripted OpenAI-compatible upstream, written with the same stack as the proxy.

Tests set ``Script`` fields to make it answer, stream, fail, stall or reset, and read its
counters and the requests it received. Probe calls are told apart by the
``X-Refusal-Guard-Probe: 1`` header and answered from ``probe_reply``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests import openai_shapes


@dataclass
class Received:
    kind: str  # "generation" | "probe" | "models"
    body: bytes
    headers: dict[str, str]
    path: str = "/v1/chat/completions"
    query: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Script:
    reply: str = "Paris is the capital of France."
    status: int = 200
    error: dict | None = None  # body for a non-200 status
    stall: float = 0.0  # seconds before the generation answers
    chunk_delay: float = 0.0  # seconds between streamed chunks
    chunk_size: int = 5  # characters per streamed delta
    break_stream_after: int | None = None  # drop the connection after this many chunks
    probe_reply: str | Callable[[dict], str] = json.dumps(
        {"will_refuse": False, "confidence": 4, "harm_rating": 1, "topic": "other"}
    )
    probe_stall: float | Callable[[dict, dict], float] = 0.0  # seconds before the probe answers, or f(body, headers)
    probe_status: int = 200
    probe_logprobs: list | None = None
    reject_response_format: set[str] = field(default_factory=set)  # e.g. {"json_schema"}
    models_status: int = 200
    models: list[str] = field(default_factory=lambda: ["scripted"])  # the ids GET /v1/models lists
    upstream_request_id: str | None = None  # sent as x-request-id with every generation if set
    calls: Counter = field(default_factory=Counter)
    received: list[Received] = field(default_factory=list)
    cancelled: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, kind: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.kind == kind]


def _completion(content: str, model: str, usage: bool = True) -> dict:
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": len(content.split()), "total_tokens": 7 + len(content.split())},
    }


def build_upstream(script: Script) -> Starlette:
    async def chat(request: Request) -> Response:
        body = await request.body()
        kind = "probe" if request.headers.get("x-refusal-guard-probe") == "1" else "generation"
        with script.lock:
            script.calls[kind] += 1
            script.received.append(Received(kind, body, dict(request.headers), query=request.url.query))
        data = json.loads(body)
        model = data.get("model") or "scripted"
        if kind == "probe":
            return await _probe(data, model, dict(request.headers))
        if script.stall and await _stalled_until_gone(request, script.stall):
            script.cancelled[kind] += 1  # the proxy dropped the generation call
            return Response(status_code=499)
        if script.status != 200:
            return JSONResponse(script.error or {"error": {"message": "scripted failure", "type": "server_error",
                                                           "param": None, "code": None}}, status_code=script.status)
        ids = {"x-request-id": script.upstream_request_id} if script.upstream_request_id else None
        if data.get("stream"):
            usage = bool((data.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(model, usage), media_type="text/event-stream", headers=ids)
        return JSONResponse(_completion(script.reply, model), headers=ids)

    async def _stalled_until_gone(request: Request, seconds: float) -> bool:
        """Wait ``seconds``; True if the caller disconnected meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                return True
            await asyncio.sleep(0.02)
        return False

    async def _probe(data: dict, model: str, headers: dict) -> Response:
        rf = (data.get("response_format") or {}).get("type")
        if rf in script.reject_response_format:
            return JSONResponse({"error": {"message": f"response_format {rf} not supported", "type": "invalid_request_error",
                                           "param": "response_format", "code": None}}, status_code=400)
        try:
            stall = script.probe_stall(data, headers) if callable(script.probe_stall) else script.probe_stall
            if stall:
                await asyncio.sleep(stall)
        except asyncio.CancelledError:
            script.cancelled["probe"] += 1
            raise
        if script.probe_status != 200:
            return JSONResponse({"error": {"message": "probe failure", "type": "server_error", "param": None,
                                           "code": None}}, status_code=script.probe_status)
        reply = script.probe_reply(data) if callable(script.probe_reply) else script.probe_reply
        answer = _completion(reply, model)
        if script.probe_logprobs is not None:
            answer["choices"][0]["logprobs"] = {"content": script.probe_logprobs}
        return JSONResponse(answer)

    async def _stream(model: str, usage: bool):
        text = script.reply
        pieces = [text[i : i + script.chunk_size] for i in range(0, len(text), script.chunk_size)]
        base = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        try:
            first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
            yield f"data: {json.dumps(first)}\n\n"
            for n, piece in enumerate(pieces):
                if script.break_stream_after is not None and n >= script.break_stream_after:
                    raise ConnectionResetError("scripted stream break")
                if script.chunk_delay:
                    await asyncio.sleep(script.chunk_delay)
                chunk = {**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield f"data: {json.dumps(last)}\n\n"
            if usage:
                tokens = len(text.split())
                yield "data: " + json.dumps({**base, "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": tokens,
                                                                           "total_tokens": 7 + tokens}}) + "\n\n"
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            script.cancelled["generation"] += 1
            raise

    async def models(request: Request) -> Response:
        with script.lock:
            script.calls["models"] += 1
        if script.models_status != 200:
            return JSONResponse({"error": {"message": "down", "type": "server_error"}}, status_code=script.models_status)
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "tests"}
                                                        for m in script.models]})

    async def other_api(request: Request) -> Response:
        """Legacy completions and the Responses API (generations only)."""
        body = await request.body()
        with script.lock:
            script.calls["generation"] += 1
            script.received.append(Received("generation", body, dict(request.headers), request.url.path))
        data = json.loads(body)
        model = data.get("model") or "scripted"
        headers = {"x-request-id": script.upstream_request_id} if script.upstream_request_id else None
        if script.status != 200:
            return JSONResponse(script.error or {"error": {"message": "scripted failure", "type": "server_error",
                                                           "param": None, "code": None}}, status_code=script.status)
        text = script.reply
        pieces = [text[i : i + script.chunk_size] for i in range(0, len(text), script.chunk_size)]
        legacy = request.url.path.endswith("/completions")
        if data.get("stream"):
            events = (openai_shapes.text_completion_events if legacy else openai_shapes.response_events)(pieces, model)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        answer = (openai_shapes.text_completion if legacy else openai_shapes.response)(text, model)
        return JSONResponse(answer, headers=headers)

    return Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", other_api, methods=["POST"]),
        Route("/v1/responses", other_api, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
    ])
