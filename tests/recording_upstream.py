"""A recording OpenAI-compatible upstream for the compatibility suite.

It answers every route a production stack uses (chat, completions, responses, embeddings,
models, files with multipart upload and binary download, audio speech, deletes), each answer
a deterministic function of the request (fixed timestamps, ``x-request-id`` derived from the
body), so a direct call and the same call through the guard can be compared byte for byte.
Every request is recorded (method, path, query, headers, body); probe calls (header
``x-refusal-guard-probe: 1``) are answered "comply" and recorded apart; the guard's own ``GET /models``
(marked the same way) is answered a one-model list and not recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from guard.app import create_app
from guard.settings import Settings
from tests import openai_shapes
from tests.servers import ServerThread

COMPLY = json.dumps({"will_refuse": False, "confidence": 4, "harm_rating": 1, "topic": "other"})
REPLY = "Paris is the capital of France."
BLOB = bytes(range(256)) * 4096  # 1 MiB of every byte value: a binary download


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Recorder:
    requests: list[Seen] = field(default_factory=list)
    probes: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()
            self.probes.clear()


def _id(body: bytes) -> str:
    return "req_" + hashlib.sha256(body).hexdigest()[:12]


def _chat(data: dict[str, Any]) -> dict[str, Any]:
    n = data.get("n") or 1
    return {"id": "chatcmpl-rec", "object": "chat.completion", "created": openai_shapes.CREATED,
            "model": data.get("model") or "rec", "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": REPLY, "refusal": None},
                         "logprobs": None, "finish_reason": "stop"} for i in range(n)],
            "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}}


def _chat_events(data: dict[str, Any]):
    base = {"id": "chatcmpl-rec", "object": "chat.completion.chunk", "created": openai_shapes.CREATED,
            "model": data.get("model") or "rec"}
    yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                      "finish_reason": None}]}) + "\n\n"
    for piece in (REPLY[:9], REPLY[9:]):
        yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"content": piece},
                                                          "finish_reason": None}]}) + "\n\n"
    yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + "\n\n"
    if (data.get("stream_options") or {}).get("include_usage"):
        yield "data: " + json.dumps({**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 6,
                                                                      "total_tokens": 9}}) + "\n\n"
    yield "data: [DONE]\n\n"


def build_recording_upstream(recorder: Recorder) -> Starlette:
    async def any_route(request: Request) -> Response:
        body = await request.body()
        seen = Seen(request.method, request.url.path, request.url.query, dict(request.headers), body)
        probe = request.headers.get("x-refusal-guard-probe") == "1"
        if probe and request.method == "GET":  # the guard's own model listing (its label slots): not a probe
            return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})
        with recorder.lock:
            (recorder.probes if probe else recorder.requests).append(seen)
        ids = {"x-request-id": _id(body), "x-ratelimit-remaining-requests": "99"}
        path, method = request.url.path, request.method
        if probe:
            answer = _chat({"model": json.loads(body).get("model")})
            answer["choices"][0]["message"]["content"] = COMPLY
            return JSONResponse(answer)
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
            data = json.loads(body)
            model = data.get("model") or "rec"
            pieces = [REPLY[:9], REPLY[9:]]
            if data.get("stream"):
                events = {"/v1/chat/completions": lambda: _chat_events(data),
                          "/v1/completions": lambda: openai_shapes.text_completion_events(pieces, model),
                          "/v1/responses": lambda: openai_shapes.response_events(pieces, model)}[path]()
                return StreamingResponse(events, media_type="text/event-stream", headers=ids)
            answer = {"/v1/chat/completions": lambda: _chat(data),
                      "/v1/completions": lambda: openai_shapes.text_completion(REPLY, model),
                      "/v1/responses": lambda: openai_shapes.response(REPLY, model)}[path]()
            return JSONResponse(answer, headers=ids)
        if method == "POST" and path == "/v1/embeddings":
            data = json.loads(body)
            inputs = data["input"] if isinstance(data["input"], list) else [data["input"]]
            return JSONResponse({"object": "list", "model": data.get("model"), "usage": {"prompt_tokens": 2, "total_tokens": 2},
                                 "data": [{"object": "embedding", "index": i, "embedding": [0.25, -0.5, float(i)]}
                                          for i in range(len(inputs))]}, headers=ids)
        if method == "GET" and path == "/v1/models":
            return JSONResponse({"object": "list", "data": [{"id": "rec", "object": "model", "created": 0,
                                                             "owned_by": "tests"}]}, headers=ids)
        if method == "GET" and path.startswith("/v1/models/"):
            return JSONResponse({"id": path.rsplit("/", 1)[1], "object": "model", "created": 0, "owned_by": "tests"},
                                headers=ids)
        if method == "POST" and path == "/v1/files":
            form = await _form_fields(request, body)
            return JSONResponse({"id": "file-" + hashlib.sha256(form["file"]).hexdigest()[:12], "object": "file",
                                 "bytes": len(form["file"]), "created_at": 0, "filename": form["filename"],
                                 "purpose": form["purpose"].decode(), "status": "processed"}, headers=ids)
        if method == "GET" and path.startswith("/v1/files/") and path.endswith("/content"):
            return Response(BLOB, media_type="application/octet-stream", headers=ids)
        if method == "DELETE" and path.startswith("/v1/files/"):
            return JSONResponse({"id": path.rsplit("/", 1)[1], "object": "file", "deleted": True}, headers=ids)
        if method == "GET" and path == "/v1/batches":  # an upstream that compresses whatever it was asked
            import gzip
            return Response(gzip.compress(b'{"object": "list", "data": []}'), media_type="application/json",
                            headers={**ids, "content-encoding": "gzip"})
        if method == "POST" and path == "/v1/audio/speech":
            return Response(b"ID3" + hashlib.sha256(body).digest() * 1000, media_type="audio/mpeg", headers=ids)
        return JSONResponse({"error": {"message": f"no route {method} {path}", "type": "invalid_request_error",
                                       "param": None, "code": "unknown_url"}}, status_code=404, headers=ids)

    return Starlette(routes=[Route("/{path:path}", any_route, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])])


async def _form_fields(request: Request, body: bytes) -> dict[str, Any]:
    """Parse the multipart body already read (Starlette's parser reads the stream itself)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(
        b"content-type: " + request.headers["content-type"].encode() + b"\r\n\r\n" + body)
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = part.get_payload(decode=True)
        if name == "file":
            fields["filename"] = part.get_filename()
    return fields


@contextlib.contextmanager
def recording_guard() -> Iterator[tuple["Recorder", ServerThread, ServerThread]]:
    """A recording upstream and a sequential guard in front of it: (recorder, upstream, guard)."""
    recorder = Recorder()
    with ServerThread(build_recording_upstream(recorder)) as upstream:
        settings = Settings(upstream=upstream.url + "/v1", mode="sequential", datapoints=None, upstream_check_interval=0)
        with ServerThread(create_app(settings, registry=CollectorRegistry())) as guard:
            yield recorder, upstream, guard
