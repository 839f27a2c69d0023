"""Bounded cost per request (issue 16, item 4), with real servers on loopback.

* ``max_response_bytes``: a never-ending SSE stream is cut with an in-band error event (the
  openai SDK raises it), a whole answer past the limit is a 502 ``upstream_response_too_large``;
  both are counted in ``refusal_guard_upstream_errors_total{reason="too_large"}``.
* No event-loop stall above 50 ms from one 5 MiB answer, whole or streamed. The stall is
  measured inside the proxy's event loop as the CPU time its thread spent between two ticks of
  a 2 ms watcher (CPU time, so a machine busy with other work does not inflate it). Labelling
  reads only the detector's fixed windows (``guard.truth.detector.excerpt``), so the answer's
  length costs the detector nothing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client import CollectorRegistry

from guard.app import create_app
from guard.settings import Settings
from tests.fault_upstream import metric_samples, metric_sum
from tests.hostile_upstream import Hostile, build_hostile, hostile, start_guard  # noqa: F401
from tests.servers import ServerThread, eventually

MIB = 1024 * 1024


def test_a_never_ending_stream_is_cut_in_band_and_counted(start_guard, hostile):
    hostile.stream_forever = True
    proxy = start_guard(mode="off", max_response_bytes=MIB)
    sdk = OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0, timeout=30)
    received = 0
    started = time.monotonic()
    with pytest.raises(openai.APIError, match="exceeds the limit"):
        for chunk in sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}], stream=True):
            received += len(chunk.choices[0].delta.content or "") if chunk.choices else 0
    assert received <= MIB and time.monotonic() - started < 20
    too_large = lambda: metric_sum(metric_samples(proxy.url), "refusal_guard_upstream_errors_total", reason="too_large")  # noqa: E731
    eventually(lambda: too_large() >= 1, what="the cut stream counted")
    assert too_large() == 1


def test_a_whole_answer_past_the_limit_is_a_502_and_counted(start_guard, hostile):
    hostile.reply_bytes = 2 * MIB
    proxy = start_guard(mode="off", max_response_bytes=MIB)
    r = httpx.post(proxy.url + "/v1/chat/completions", timeout=30,
                   json={"model": "m", "messages": [{"role": "user", "content": "big"}]})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_response_too_large"
    hostile.reply_bytes = MIB // 2
    r = httpx.post(proxy.url + "/v1/chat/completions", timeout=30,
                   json={"model": "m", "messages": [{"role": "user", "content": "fits"}]})
    assert r.status_code == 200 and len(r.json()["choices"][0]["message"]["content"]) == MIB // 2
    s = metric_samples(proxy.url)
    assert metric_sum(s, "refusal_guard_upstream_errors_total", reason="too_large") == 1
    assert metric_sum(s, "refusal_guard_requests_total", action="pass") == 2


class _LoopWatch:
    """An ASGI wrapper that finds the proxy's loop, and a watcher task run on it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ticks: list[float] = []
        self._stop = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.loop = self.loop or asyncio.get_running_loop()
        await self.app(scope, receive, send)

    async def _watch(self) -> None:
        last = time.thread_time()
        while not self._stop.is_set():
            await asyncio.sleep(0.002)
            now = time.thread_time()
            self.ticks.append(now - last)
            last = now

    def start(self) -> None:
        assert self.loop is not None
        self._future = asyncio.run_coroutine_threadsafe(self._watch(), self.loop)

    def stop(self) -> float:
        self._stop.set()
        self._future.result(timeout=10)
        return max(self.ticks)


def _longest_stall(stream: bool, **settings: Any) -> float:
    state = Hostile(reply_bytes=5 * MIB)
    with ServerThread(build_hostile(state)) as upstream:
        watch = _LoopWatch(create_app(Settings(upstream=upstream.url + "/v1", mode="off", datapoints=None,
                                               **settings), registry=CollectorRegistry()))
        with ServerThread(watch) as proxy:
            httpx.get(proxy.url + "/healthz")  # the loop is known from here on
            watch.start()
            body = {"model": "m", "messages": [{"role": "user", "content": "long answer please"}], "stream": stream}
            r = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200 and len(r.content) >= 5 * MIB
            assert r.headers["content-type"].startswith("text/event-stream" if stream else "application/json")
            deadline = time.monotonic() + 10  # the answer is labelled after the last byte: wait for the count
            while metric_sum(metric_samples(proxy.url), "refusal_guard_requests_total") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            return watch.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_5_mib_answer_stalls_the_loop_less_than_50_ms(stream):
    """Reading, relaying, parsing, labelling and recording a 5 MiB answer, default settings."""
    stall = _longest_stall(stream)
    assert stall < 0.050, f"the event loop was held for {stall * 1000:.0f} ms of CPU"
