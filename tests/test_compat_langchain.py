"""langchain-openai through the guard, compared with the same calls made directly.

``ChatOpenAI`` (chat completions, whole and streamed, and ``use_responses_api``), ``OpenAI``
(legacy completions) and ``OpenAIEmbeddings`` against the recording upstream: the bodies that
arrive and the answers that come back must be the same direct and guarded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

langchain_openai = pytest.importorskip("langchain_openai", reason="install the compat extra to test langchain-openai")

from tests.recording_upstream import REPLY, Recorder, recording_guard  # noqa: E402
from tests.servers import ServerThread  # noqa: E402


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Recorder, ServerThread, ServerThread]]:
    with recording_guard() as running:
        yield running


def _text(message: Any) -> str:
    return message.text if isinstance(message.text, str) else message.text()


CALLS: dict[str, Callable[[str], Any]] = {
    "chat": lambda base: _text(langchain_openai.ChatOpenAI(base_url=base, api_key="sk-test", model="m",
                                                           max_retries=0).invoke("Capital of France?")),
    "chat_stream": lambda base: "".join(_text(c) for c in langchain_openai.ChatOpenAI(
        base_url=base, api_key="sk-test", model="m", max_retries=0).stream("Capital of France?")),
    "responses": lambda base: _text(langchain_openai.ChatOpenAI(
        base_url=base, api_key="sk-test", model="m", max_retries=0, use_responses_api=True).invoke("Capital?")),
    "completions": lambda base: langchain_openai.OpenAI(base_url=base, api_key="sk-test", model="m",
                                                        max_retries=0).invoke("The capital of France is"),
    "embeddings": lambda base: langchain_openai.OpenAIEmbeddings(
        base_url=base, api_key="sk-test", model="e", check_embedding_ctx_length=False).embed_documents(["a", "b"]),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_langchain_direct_and_guarded_agree(servers, name):
    recorder, upstream, guard = servers
    recorder.clear()
    direct = CALLS[name](upstream.url + "/v1")
    direct_bodies = [(s.method, s.path, s.body) for s in recorder.requests]
    recorder.clear()
    guarded = CALLS[name](guard.url + "/v1")
    guarded_bodies = [(s.method, s.path, s.body) for s in recorder.requests]
    assert guarded == direct and guarded_bodies == direct_bodies and len(direct_bodies) == 1
    assert direct == REPLY or direct == [[0.25, -0.5, 0.0], [0.25, -0.5, 1.0]]
