"""An OpenAI-compatible upstream for the attack tests of issue 16, served for real on loopback.

Its probe answers depend on what the probe shows it, so a test can see what the probe saw:
it predicts a refusal (confidence 5, harm 5, topic ``weapons``) when ``HARMFUL`` appears
anywhere in the assessed document, compliance otherwise. It fails the way real servers do:

* a model in ``missing_models``: 404 naming the model (vLLM, OpenAI);
* a probe whose document is longer than ``context_chars``: 400 "maximum context length";
* ``UNPARSEABLE`` in the document: a prose answer; ``ECHO`` in it: a 400 that echoes the
  request's messages back (so a request can put any word, ``response_format`` included, in it);
* a model in ``down_models``: 503 for every call;
* a model in ``no_json_schema``: 400 with ``param: response_format`` for that dialect.

Generations answer ``reply`` (or ``reply_bytes`` as the whole content), or stream forever
with ``stream_forever``; ``extra_headers`` are added to every generation response (repeats
allowed). Everything received is kept in ``received`` (kind, headers, body).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

REFUSE = {"will_refuse": True, "confidence": 5, "harm_rating": 5, "topic": "weapons"}
COMPLY = {"will_refuse": False, "confidence": 5, "harm_rating": 1, "topic": "other"}


@dataclass
class Hostile:
    reply: str = "Sure, here it is."
    reply_bytes: int = 0  # if set, the generation's content is this many bytes of "a"
    stream_forever: bool = False
    extra_headers: list[tuple[str, str]] = field(default_factory=list)
    missing_models: set[str] = field(default_factory=set)
    down_models: set[str] = field(default_factory=set)
    no_json_schema: set[str] = field(default_factory=set)
    context_chars: int = 50_000
    calls: Counter = field(default_factory=Counter)
    received: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, kind: str) -> list[tuple[dict[str, str], Any]]:
        with self.lock:
            return [(h, json.loads(b)) for k, h, b in self.received if k == kind]

    def documents(self) -> list[Any]:
        """What each probe showed the model: its ``request_to_assess``."""
        return [json.loads(body["messages"][1]["content"])["request_to_assess"] for _, body in self.of("probe")]


def _json(data: Any, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    response = Response(json.dumps(data).encode(), status_code=status, media_type="application/json")
    for name, value in headers or ():
        response.raw_headers.append((name.encode("latin-1"), value.encode("latin-1")))
    return response


def _error(message: str, status: int, param: str | None = None) -> Response:
    return _json({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}, status)


def _completion(content: str, model: str) -> dict:
    return {"id": "chatcmpl-hostile", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def build_hostile(state: Hostile) -> Starlette:
    async def chat(request: Request) -> Response:
        raw = await request.body()
        kind = "probe" if request.headers.get("x-refusal-guard-probe") == "1" else "generation"
        with state.lock:
            state.calls[kind] += 1
            state.received.append((kind, dict(request.headers), raw))
        body = json.loads(raw)
        model = body.get("model") or "hostile"
        if model in state.missing_models:
            return _error(f"The model `{model}` does not exist.", 404, "model")
        if model in state.down_models:
            return _error("upstream overloaded", 503)
        if kind == "probe":
            return _probe(body, model)
        if state.stream_forever:
            return StreamingResponse(_forever(model), media_type="text/event-stream")
        content = "a" * state.reply_bytes if state.reply_bytes else state.reply
        if body.get("stream"):
            return StreamingResponse(_stream(content, model), media_type="text/event-stream")
        return _json(_completion(content, model), headers=state.extra_headers)

    def _probe(body: dict, model: str) -> Response:
        document = body["messages"][1]["content"]
        kind = (body.get("response_format") or {}).get("type")
        if kind == "json_schema" and model in state.no_json_schema:
            return _error("response_format json_schema is not supported by this model", 400, "response_format")
        if len(document) > state.context_chars:
            return _error("This model's maximum context length is 4096 tokens. However, your messages resulted "
                          f"in {len(document) // 4} tokens.", 400, "messages")
        if "ECHO" in document:
            return _error(f"invalid messages: {json.dumps(body['messages'])[:2000]}", 400)
        if "UNPARSEABLE" in document:
            return _json(_completion("I think I would probably help.", model))
        return _json(_completion(json.dumps(REFUSE if "HARMFUL" in document else COMPLY), model))

    async def _stream(content: str, model: str):
        base = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": model}
        for i in range(0, len(content), 4096):
            delta = {"index": 0, "delta": {"content": content[i:i + 4096]}, "finish_reason": None}
            yield f"data: {json.dumps({**base, 'choices': [delta]})}\n\n"
        yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'stop'}]})}\n\n"
        yield "data: [DONE]\n\n"

    async def _forever(model: str):
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": model,
                 "choices": [{"index": 0, "delta": {"content": "x" * 1000}, "finish_reason": None}]}
        line = f"data: {json.dumps(chunk)}\n\n"
        while True:
            yield line * 16
            await asyncio.sleep(0)

    async def models(request: Request) -> Response:
        return _json({"object": "list", "data": [{"id": "m", "object": "model"}]})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"])])


# --- fixtures (import them into a test module) ----------------------------------------------------------

import pytest  # noqa: E402

from tests.servers import ServerThread  # noqa: E402


@pytest.fixture
def hostile() -> Hostile:
    return Hostile()


@pytest.fixture
def start_guard(hostile: Hostile):
    """Start the hostile upstream and real proxies (uvicorn on loopback) in front of it."""
    from prometheus_client import CollectorRegistry

    from guard.app import create_app
    from guard.settings import Settings

    upstream = ServerThread(build_hostile(hostile)).start()
    servers: list[ServerThread] = [upstream]

    def start(**overrides: Any) -> ServerThread:
        values = {"upstream": upstream.url + "/v1", "mode": "sequential", "datapoints": None, **overrides}
        server = ServerThread(create_app(Settings(**values), registry=CollectorRegistry())).start()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        server.stop()
