"""The official openai SDK, sync and async, direct to a recording upstream vs through the guard.

For chat, completions, responses (guarded), embeddings, models and files (forwarded), whole and
streamed: what reaches the upstream (method, path, query string, body bytes, the SDK's headers)
and what the SDK hands back (parsed objects, ``_request_id``) must be the same both ways. The
guard runs in sequential mode with a probe that says "comply", so the guarded path is taken.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from tests.recording_upstream import BLOB, Recorder, recording_guard
from tests.servers import ServerThread

EXTRA = dict(extra_query={"api-version": "2024-10-21"}, extra_headers={"x-tenant": "t1"})
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
SKIPPED_HEADERS = {"host", "content-length", "x-refusal-guard-request-id", "x-request-id", "accept-encoding",
                   "connection", "x-stainless-retry-count", "x-stainless-read-timeout"}


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Recorder, ServerThread, ServerThread]]:
    with recording_guard() as running:
        yield running


def dump(value: Any) -> Any:
    if isinstance(value, openai.BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [dump(v) for v in value]
    return value


SYNC: dict[str, Callable[[openai.OpenAI], Any]] = {
    "chat": lambda c: c.chat.completions.create(model="m", messages=MESSAGES, n=2, **EXTRA),
    "chat_stream": lambda c: list(c.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                                            stream_options={"include_usage": True}, **EXTRA)),
    "completions": lambda c: c.completions.create(model="m", prompt="The capital of France is", **EXTRA),
    "completions_stream": lambda c: list(c.completions.create(model="m", prompt=["a", "b"], stream=True, **EXTRA)),
    "responses": lambda c: c.responses.create(model="m", input="Capital of France?", instructions="Be brief.",
                                              **EXTRA),
    "responses_stream": lambda c: list(c.responses.create(
        model="m", stream=True, **EXTRA,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Capital of France?"}]}])),
    "embeddings": lambda c: c.embeddings.create(model="e", input=["a", "b"], **EXTRA),
    "models": lambda c: c.models.list(**EXTRA).data,
    "model": lambda c: c.models.retrieve("rec-7b", **EXTRA),
    "file_upload": lambda c: c.files.create(file=("notes.jsonl", b'{"a": 1}\n' * 5000), purpose="batch", **EXTRA),
    "file_content": lambda c: c.files.content("file-abc", **EXTRA).content,
    "file_delete": lambda c: c.files.delete("file-abc", **EXTRA),
    "speech": lambda c: c.audio.speech.create(model="tts", voice="alloy", input="hi", **EXTRA).content,
}


async def _collect(stream: Any) -> list[Any]:
    return [event async for event in await stream]


ASYNC: dict[str, Callable[[openai.AsyncOpenAI], Any]] = {
    "chat": lambda c: c.chat.completions.create(model="m", messages=MESSAGES, **EXTRA),
    "chat_stream": lambda c: _collect(c.chat.completions.create(model="m", messages=MESSAGES, stream=True, **EXTRA)),
    "completions": lambda c: c.completions.create(model="m", prompt="The capital of France is", **EXTRA),
    "completions_stream": lambda c: _collect(c.completions.create(model="m", prompt="x", stream=True, **EXTRA)),
    "responses": lambda c: c.responses.create(model="m", input="Capital of France?", **EXTRA),
    "responses_stream": lambda c: _collect(c.responses.create(model="m", input="Capital?", stream=True, **EXTRA)),
    "embeddings": lambda c: c.embeddings.create(model="e", input="a", **EXTRA),
    "model": lambda c: c.models.retrieve("rec-7b", **EXTRA),
}


def _arrived(recorder: Recorder) -> list[tuple[Any, ...]]:
    with recorder.lock:
        return [_comparable(s.method, s.path, s.query, s.body, s.headers) for s in recorder.requests]


def _comparable(method: str, path: str, query: str, body: bytes, headers: dict[str, str]) -> tuple[Any, ...]:
    """The request as compared: the SDK draws a fresh multipart boundary per call, so it is named."""
    headers = {k: v for k, v in headers.items() if k not in SKIPPED_HEADERS}
    kind = headers.get("content-type", "")
    if kind.startswith("multipart/form-data; boundary="):
        boundary = kind.split("boundary=", 1)[1]
        body = body.replace(boundary.encode(), b"BOUNDARY")
        headers["content-type"] = kind.replace(boundary, "BOUNDARY")
    return method, path, query, body, headers


def _compare(recorder: Recorder, run: Callable[[str], Any], upstream: ServerThread, guard: ServerThread) -> None:
    recorder.clear()
    direct = dump(run(upstream.url + "/v1"))
    direct_arrived = _arrived(recorder)
    recorder.clear()
    guarded = dump(run(guard.url + "/v1"))
    guarded_arrived = _arrived(recorder)
    assert guarded == direct
    assert len(guarded_arrived) == len(direct_arrived) == 1
    assert guarded_arrived == direct_arrived
    assert guarded_arrived[0][2] == "api-version=2024-10-21"  # the query string reached the upstream
    assert guarded_arrived[0][4]["x-tenant"] == "t1"


@pytest.mark.parametrize("name", list(SYNC))
def test_sync_sdk_direct_and_guarded_agree(servers, name):
    recorder, upstream, guard = servers
    _compare(recorder, lambda url: SYNC[name](openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)),
             upstream, guard)


@pytest.mark.parametrize("name", list(ASYNC))
def test_async_sdk_direct_and_guarded_agree(servers, name):
    recorder, upstream, guard = servers

    def run(url: str) -> Any:
        async def main() -> Any:
            async with openai.AsyncOpenAI(base_url=url, api_key="sk-test", max_retries=0) as client:
                return await ASYNC[name](client)
        return asyncio.run(main())

    _compare(recorder, run, upstream, guard)


def test_guarded_routes_were_probed_with_what_the_model_sees(servers):
    recorder, _, guard = servers
    recorder.clear()
    client = openai.OpenAI(base_url=guard.url + "/v1", api_key="sk-test", max_retries=0)
    client.responses.create(model="m", instructions="Answer in French.", input="Capital of Italy?")
    client.completions.create(model="m", prompt="Capital of Spain is")
    probed = [json.loads(p.body)["messages"][1]["content"] for p in recorder.probes]
    assert any("Capital of Italy?" in text for text in probed) and any("Capital of Spain is" in t for t in probed)


def test_request_ids_upstream_id_reaches_the_sdk(servers):
    _, upstream, guard = servers
    client = openai.OpenAI(base_url=guard.url + "/v1", api_key="sk-test", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    assert raw.headers["x-request-id"].startswith("req_")  # the upstream's, unchanged
    assert raw.headers["x-refusal-guard-request-id"] != raw.headers["x-request-id"]
    assert raw.parse()._request_id == raw.headers["x-request-id"]
    assert client.files.content("file-abc").content == BLOB
