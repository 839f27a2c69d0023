"""Running the probe against an upstream: timeout budget, cache, sharing, dialects, breaker.

* One budget (``timeout``) covers the whole probe, dialect fallbacks included.
* A TTL+LRU cache keyed by a hash of (model, probed content, template hash, topics);
  identical requests in flight share one probe call instead of racing.
* ``auto`` structured output tries ``json_schema`` (OpenAI, vLLM), then ``json_object`` with a
  schema (llama-cpp-python's server), then plain text, and remembers what the upstream took.
* A circuit breaker: after ``circuit_failures`` failures in a row the probe is skipped for
  ``circuit_cooldown`` seconds (one trial probe after that), so a broken probe path does not
  add its timeout to every request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cachetools import TTLCache

from guard.proxy.chat_request import ChatRequest
from guard.live.metrics import GuardMetrics
from guard.probe.template import (
    DIALECT_LADDER,
    TEMPLATE_HASH,
    Dialect,
    Prediction,
    ProbeParseError,
    build_probe_body,
    p_refuse_from_logprobs,
    parse_prediction,
    probed_content,
)
from guard.proxy.sse import completion_text
from guard.proxy.upstream import Upstream, UpstreamFailure

PROBE_HEADER = "x-refusal-guard-probe"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    status: str  # ok | cached | timeout | error | unparseable | skipped
    prediction: Prediction | None
    seconds: float
    failure: str | None = None  # timeout | error | unparseable | circuit_open (for metrics)

    @property
    def failed(self) -> bool:
        return self.prediction is None


class _ProbeFailed(Exception):
    def __init__(self, status: str) -> None:
        self.status = status


class Prober:
    def __init__(
        self,
        upstream: Upstream,
        metrics: GuardMetrics,
        *,
        topics: Sequence[str],
        timeout: float,
        max_tokens: int,
        structured_output: Literal["auto", "json_schema", "json_object", "none"],
        context: Literal["last_user", "conversation"],
        model: str | None,
        cache_size: int,
        cache_ttl: float,
        circuit_failures: int,
        circuit_cooldown: float,
        logprobs: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.metrics = metrics
        self.topics = tuple(topics)
        self.timeout = timeout
        self.max_tokens = max_tokens
        self.context = context
        self.model = model
        self.logprobs = logprobs
        self.clock = clock
        self._ladder: tuple[Dialect, ...] = DIALECT_LADDER if structured_output == "auto" else (structured_output,)
        self._rung = 0
        self._cache: TTLCache[str, Prediction] | None = (
            TTLCache(maxsize=cache_size, ttl=cache_ttl, timer=clock) if cache_size else None
        )
        self._in_flight: dict[str, asyncio.Future[ProbeResult]] = {}
        self._circuit_failures = circuit_failures
        self._circuit_cooldown = circuit_cooldown
        self._consecutive_failures = 0
        self._open_until: float | None = None
        self._trial_in_flight = False

    @property
    def dialect(self) -> Dialect:
        """The structured-output dialect the next probe will use."""
        return self._ladder[self._rung]

    def cache_key(self, model: str | None, content: Any) -> str:
        material = json.dumps([model, content, TEMPLATE_HASH, self.topics], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(material.encode()).hexdigest()

    async def predict(self, chat: ChatRequest, headers: Mapping[str, str]) -> ProbeResult:
        started = time.perf_counter()
        if self._circuit_is_open():
            self.metrics.probe_failures.labels("circuit_open").inc()
            return ProbeResult("skipped", None, 0.0, "circuit_open")
        model = self.model or chat.model
        content = probed_content(chat, self.context)
        key = self.cache_key(model, content)
        if self._cache is not None and (cached := self._cache.get(key)) is not None:
            self.metrics.probe_cache.labels("hit").inc()
            return ProbeResult("cached", cached, time.perf_counter() - started)
        if (shared := self._in_flight.get(key)) is not None:
            self.metrics.probe_cache.labels("shared").inc()
            result = await asyncio.shield(shared)
            return ProbeResult("cached" if result.prediction else result.status, result.prediction,
                               time.perf_counter() - started, result.failure)
        trial = self._open_until is not None  # half-open: this call is the one trial probe
        if trial:
            self._trial_in_flight = True
        self.metrics.probe_cache.labels("miss").inc()
        future: asyncio.Future[ProbeResult] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            result = await self._probe(model, content, headers, started)
        except BaseException:
            future.set_result(ProbeResult("error", None, time.perf_counter() - started, "error"))
            raise
        else:
            future.set_result(result)
        finally:
            self._in_flight.pop(key, None)
            if trial:
                self._trial_in_flight = False
        if result.prediction is not None and self._cache is not None:
            self._cache[key] = result.prediction
        return result

    async def _probe(self, model: str | None, content: Any, headers: Mapping[str, str], started: float) -> ProbeResult:
        probe_headers = {**headers, PROBE_HEADER: "1", "content-type": "application/json"}
        try:
            async with asyncio.timeout(self.timeout):
                prediction = await self._ask(model, content, probe_headers)
        except TimeoutError:
            return self._failed("timeout", started)
        except _ProbeFailed as failed:
            return self._failed(failed.status, started)
        seconds = time.perf_counter() - started
        self.metrics.probe_seconds.observe(seconds)
        self._consecutive_failures = 0
        self._open_until = None
        self.metrics.circuit_open.set(0)
        return ProbeResult("ok", prediction, seconds)

    async def _ask(self, model: str | None, content: Any, headers: Mapping[str, str]) -> Prediction:
        while True:
            dialect = self.dialect
            body = build_probe_body(content, model=model, topics=self.topics, dialect=dialect,
                                    max_tokens=self.max_tokens, logprobs=self.logprobs)
            try:
                answer = await self.upstream.request("POST", "/chat/completions", headers=headers,
                                                     content=json.dumps(body).encode(), timeout=self.timeout)
            except UpstreamFailure as failure:
                raise _ProbeFailed("timeout" if failure.reason == "timeout" else "error") from None
            if _rejects_dialect(answer.status, answer.body) and self._rung + 1 < len(self._ladder):
                self._rung += 1  # the upstream refused this dialect: remember and step down
                continue
            if answer.status != 200:
                raise _ProbeFailed("error")
            text = completion_text(answer.body)
            if text is None:
                raise _ProbeFailed("unparseable")
            try:
                prediction = parse_prediction(text, self.topics)
            except ProbeParseError:
                raise _ProbeFailed("unparseable") from None
            p_refuse = p_refuse_from_logprobs(_logprobs_of(answer.body))
            if p_refuse is not None:
                prediction = Prediction(prediction.will_refuse, prediction.confidence, prediction.harm_rating,
                                        prediction.topic, p_refuse)
            return prediction

    def _failed(self, status: str, started: float) -> ProbeResult:
        seconds = time.perf_counter() - started
        self.metrics.probe_seconds.observe(seconds)
        self.metrics.probe_failures.labels(status).inc()
        self._consecutive_failures += 1
        if self._consecutive_failures >= self._circuit_failures or self._open_until is not None:
            self._open_until = self.clock() + self._circuit_cooldown
            self._consecutive_failures = 0
            self.metrics.circuit_open.set(1)
        return ProbeResult(status, None, seconds, status)

    def _circuit_is_open(self) -> bool:
        """Open until the cool-down ends; then half-open: one trial probe at a time, the others
        still skip, and one failure re-opens it at once (a success closes it)."""
        if self._open_until is None:
            return False
        return self.clock() < self._open_until or self._trial_in_flight


def _rejects_dialect(status: int, body: bytes) -> bool:
    """400/422 (OpenAI, vLLM), or llama-cpp-python's 500 whose validation error names response_format."""
    return status in (400, 422) or (status >= 500 and b"response_format" in body)


def _logprobs_of(body: bytes) -> Any:
    try:
        return json.loads(body)["choices"][0].get("logprobs")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        return None
