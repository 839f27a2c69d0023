"""Running the probe against an upstream: timeout budget, cache, sharing, dialects, breakers.

* One budget (``timeout``) covers the whole probe, dialect checks included.
* A TTL+LRU cache keyed by a hash of (model, probed view, template hash, topics);
  identical requests in flight share one probe call instead of racing.
* Failures are attributed to their cause. Only upstream-health failures (could not connect,
  timed out, broken exchange, 5xx) feed a circuit breaker, and there is one breaker per
  upstream, probe model, query string and credentials (``CREDENTIAL_HEADERS``). After ``circuit_failures`` of them in a row a fixed, benign check
  probe decides, in the background: if it fails for upstream health too, that model's probe is
  skipped for ``circuit_cooldown`` seconds (then one trial probe; its success closes it, its
  failure runs the check again); if it succeeds, the failures were the requests' own (a prompt
  that slows the probe past its timeout) and the breaker stays closed. So no client's content
  can switch the probe off for the others. A failure one request caused that the upstream
  reports as such (a 4xx for its model, key or content, an answer that does not parse, content
  the probe cannot read) affects that request alone and never feeds the breaker.
* The check probe carries only the headers that are part of the state's key (the credential
  headers, ``CREDENTIAL_HEADERS``) and the query string, never the rest of the client's headers.
  The alternative, every forwarded header in the key, was rejected: headers such as
  ``traceparent`` or a client's ``x-request-id`` differ on every request, so failures would never
  add up to open anything, and a client could mint one state per request and evict the others'
  from the bounded table. So a header the upstream or a gateway routes on (``x-route: slow``) can
  make a client's *own* probes fail, but the check that decides for everyone with its credentials
  does not carry it: it cannot open the breaker, nor (below) step the dialect down, for anyone.
* ``auto`` structured output tries ``json_schema`` (OpenAI, vLLM), then ``json_object`` with a
  schema (llama-cpp-python's server), then plain text. It steps down for one upstream and
  model only on a capability error: an error that names the structured-output parameter *and*
  that a fixed, benign check probe in the same dialect reproduces, sent with only the key's
  headers (so no request's own content or headers can cause it). After ``dialect_retry`` seconds
  the best dialect is tried again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cachetools import LRUCache, TTLCache

from guard.live.metrics import GuardMetrics
from guard.probe.context import ProbeView, UnknownParts, conversation_view
from guard.probe.stored_context import StoredContext, request_view
from guard.probe.credentials import CREDENTIAL_HEADERS, credential_digest
from guard.probe.template import (
    DIALECT_LADDER,
    TEMPLATE_HASH,
    Dialect,
    Prediction,
    ProbeParseError,
    build_probe_body,
    names_structured_output,
    p_refuse_from_logprobs,
    parse_prediction,
)
from guard.apis.base import GuardedRequest
from guard.sse import completion_text
from guard.proxy.upstream import Upstream, UpstreamFailure, UpstreamResponse

PROBE_HEADER = "x-refusal-guard-probe"
#: Probe-failure reasons (metric label values): which ones feed a breaker is in ``_HEALTH``.
FAILURE_REASONS = ("timeout", "error", "rejected", "unparseable", "unsupported_content", "circuit_open")
_HEALTH = frozenset({"timeout", "error"})
#: The check probe that tells a capability error from an error the request's own content caused.
CHECK_VIEW = ProbeView(({"role": "user", "content": "What is the capital of France?"},), 0, False)
#: Breakers and dialect states kept at once (probe models come from clients: bounded, LRU).
MAX_TRACKED_MODELS = 1024
#: Request headers that say whose upstream account a call uses (OpenAI, Azure, gateways): part of the
#: breaker and dialect key, so a client's own key (one its gateway routes to a slow backend, say) can
#: only ever open its own breaker.


@dataclass(frozen=True, slots=True)
class ProbeResult:
    status: str  # ok | cached | timeout | error | unparseable | skipped
    prediction: Prediction | None
    seconds: float
    failure: str | None = None  # one of FAILURE_REASONS (for metrics)

    @property
    def failed(self) -> bool:
        return self.prediction is None


class _ProbeFailed(Exception):
    def __init__(self, status: str, reason: str | None = None) -> None:
        self.status = status  # the datapoint's probe_status
        self.reason = reason or status  # the metric's reason; a health failure if in _HEALTH


@dataclass(frozen=True, slots=True)
class _Target:
    """Where a probe goes: the model it asks, the request's forwarded headers and query string (the
    generation's, so e.g. Azure's ``api-version`` reaches the probe too), the key of that
    model's breaker and dialect state, and the headers a check probe for that state carries:
    only the ones in its key (see the module docstring)."""

    model: str | None
    headers: Mapping[str, str]
    query: bytes
    key: tuple[str, str]
    check_headers: Mapping[str, str]


@dataclass(slots=True)
class _Breaker:
    failures: int = 0  # health failures in a row
    open_until: float | None = None  # set while open or half-open
    trial_in_flight: bool = False
    checking: bool = False  # a check probe is deciding whether to open


@dataclass(slots=True)
class _DialectState:
    rung: int = 0
    retry_at: float = 0.0


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
        context_chars: int = 24_000,
        unknown_parts: Literal["mark", "skip", "fail"] = "mark",
        dialect_retry: float = 600.0,
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
        self.context_chars = context_chars
        self.unknown_parts = unknown_parts
        self.dialect_retry = dialect_retry
        self.clock = clock
        self._ladder: tuple[Dialect, ...] = DIALECT_LADDER if structured_output == "auto" else (structured_output,)
        self._cache: TTLCache[str, Prediction] | None = (
            TTLCache(maxsize=cache_size, ttl=cache_ttl, timer=clock) if cache_size else None
        )
        self._in_flight: dict[str, asyncio.Future[ProbeResult]] = {}
        self._circuit_failures = circuit_failures
        self._circuit_cooldown = circuit_cooldown
        self._breakers: LRUCache[tuple[str, str], _Breaker] = LRUCache(MAX_TRACKED_MODELS)
        self._dialects: LRUCache[tuple[str, str], _DialectState] = LRUCache(MAX_TRACKED_MODELS)
        self._checks: set[asyncio.Task[None]] = set()
        #: Stored context (``previous_response_id``) fetched for the probe, within half its budget.
        self.stored_context = StoredContext(upstream, timeout=timeout / 2, clock=clock)

    # --- what is probed ---------------------------------------------------------------------
    def view(self, messages: Sequence[Any], tools: Sequence[Any] | None = None) -> ProbeView:
        """The probe's view of chat-style ``messages`` and ``tools`` under this prober's settings."""
        marks: UnknownParts = "skip" if self.unknown_parts == "skip" else "mark"
        return conversation_view(messages, tools, budget_chars=self.context_chars, unknown_parts=marks,
                                 last_user_only=self.context == "last_user")

    def probe_model(self, requested: str | None) -> str | None:
        """The model the probe asks: ``probe_model`` if configured, else the request's."""
        return self.model or requested

    def dialect_for(self, model: str | None, query: bytes = b"", headers: Mapping[str, Any] | None = None) -> Dialect:
        """The structured-output dialect the next probe for ``model`` (``query``, ``headers``) will use."""
        return self._dialect(self._key(model, query, headers or {}))

    def cache_key(self, model: str | None, view: ProbeView, query: bytes = b"") -> str:
        material = json.dumps([model, view.text, TEMPLATE_HASH, self.topics, query.decode("latin-1")],
                              ensure_ascii=False)
        return hashlib.sha256(material.encode()).hexdigest()

    # --- probing ----------------------------------------------------------------------------
    async def predict(self, chat: GuardedRequest, headers: Mapping[str, str], query: bytes = b"") -> ProbeResult:
        view = await request_view(self, chat, headers, query)  # stored context fetched; large views off the loop
        return await self.predict_view(view, chat.model, headers, query)

    async def predict_view(self, view: ProbeView, requested_model: str | None,
                           headers: Mapping[str, str], query: bytes = b"") -> ProbeResult:
        """Probe ``view`` (from :meth:`view`) for a request that asked for ``requested_model``
        with ``headers`` and the query string ``query`` (both as forwarded to its generation)."""
        started = time.perf_counter()
        model = self.probe_model(requested_model)
        if view.n_unknown_parts and self.unknown_parts == "fail":
            self.metrics.probe_failures.labels("unsupported_content").inc()
            return ProbeResult("error", None, 0.0, "unsupported_content")
        target = _Target(model, {**headers, PROBE_HEADER: "1", "content-type": "application/json"}, query,
                         self._key(model, query, headers), _check_headers(headers))
        breaker = self._breakers.get(target.key)
        if breaker is not None and self._is_open(breaker):
            self.metrics.probe_failures.labels("circuit_open").inc()
            return ProbeResult("skipped", None, 0.0, "circuit_open")
        cache_key = self.cache_key(model, view, query)
        if self._cache is not None and (cached := self._cache.get(cache_key)) is not None:
            self.metrics.probe_cache.labels("hit").inc()
            return ProbeResult("cached", cached, time.perf_counter() - started)
        if (shared := self._in_flight.get(cache_key)) is not None:
            self.metrics.probe_cache.labels("shared").inc()
            result = await asyncio.shield(shared)
            return ProbeResult("cached" if result.prediction else result.status, result.prediction,
                               time.perf_counter() - started, result.failure)
        trial = breaker is not None and breaker.open_until is not None  # half-open: the one trial probe
        if trial:
            assert breaker is not None
            breaker.trial_in_flight = True
        self.metrics.probe_cache.labels("miss").inc()
        future: asyncio.Future[ProbeResult] = asyncio.get_running_loop().create_future()
        self._in_flight[cache_key] = future
        try:
            result = await self._probe(target, view, started)
        except BaseException:
            future.set_result(ProbeResult("error", None, time.perf_counter() - started, "error"))
            raise
        else:
            future.set_result(result)
        finally:
            self._in_flight.pop(cache_key, None)
            if trial:
                assert breaker is not None
                breaker.trial_in_flight = False
        if result.prediction is not None and self._cache is not None:
            self._cache[cache_key] = result.prediction
        return result

    async def _probe(self, target: _Target, view: ProbeView, started: float) -> ProbeResult:
        try:
            async with asyncio.timeout(self.timeout):
                prediction = await self._ask(target, view)
        except TimeoutError:
            return self._failed(target, _ProbeFailed("timeout"), started)
        except _ProbeFailed as failed:
            return self._failed(target, failed, started)
        seconds = time.perf_counter() - started
        self.metrics.probe_seconds.observe(seconds)
        if (breaker := self._breakers.get(target.key)) is not None:
            was_open = breaker.open_until is not None
            breaker.failures, breaker.open_until = 0, None
            if was_open:
                self._export_open_count()
        return ProbeResult("ok", prediction, seconds)

    async def _ask(self, target: _Target, view: ProbeView) -> Prediction:
        state = self._dialect_state(target.key)
        while True:
            rung = state.rung
            answer = await self._send(target, view, self._ladder[rung])
            if answer.status != 200 and rung + 1 < len(self._ladder) and names_structured_output(answer.body):
                if state.rung != rung:
                    continue  # another probe already stepped this model down meanwhile
                if await self._check_rejects(target, self._ladder[rung]):
                    state.rung, state.retry_at = rung + 1, self.clock() + self.dialect_retry
                    self._dialects[target.key] = state
                    continue
            if answer.status >= 500:
                raise _ProbeFailed("error")  # the upstream is unwell: feeds the breaker
            if answer.status != 200:
                raise _ProbeFailed("error", "rejected")  # a 4xx for this request's model, key or content
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

    async def _send(self, target: _Target, view: ProbeView, dialect: Dialect, *, check: bool = False) -> UpstreamResponse:
        """One probe call; ``check``: the fixed check probe, with only the key's headers."""
        body = build_probe_body(view, model=target.model, topics=self.topics, dialect=dialect,
                                max_tokens=self.max_tokens, logprobs=self.logprobs)
        try:
            return await self.upstream.request("POST", "/chat/completions",
                                               headers=target.check_headers if check else target.headers,
                                               content=json.dumps(body).encode(), timeout=self.timeout,
                                               query=target.query)
        except UpstreamFailure as failure:
            raise _ProbeFailed("timeout" if failure.reason == "timeout" else "error") from None

    async def _check_rejects(self, target: _Target, dialect: Dialect) -> bool:
        """True if the fixed check probe in ``dialect`` is refused with a capability error too."""
        answer = await self._send(target, CHECK_VIEW, dialect, check=True)
        return answer.status != 200 and names_structured_output(answer.body)

    # --- breakers and dialect state, per upstream, model, query string and credentials ----
    def _key(self, model: str | None, query: bytes, headers: Mapping[str, Any]) -> tuple[str, str]:
        """(upstream, digest of model, query string and credentials): a client's model string may be
        megabytes, its key is 32 characters. The query string and the credential headers are in it
        because they select what answers (Azure's ``api-version``, a gateway's per-key routing): one
        client's query string or key never changes the probe state of another's."""
        return (self.upstream.base_url, credential_digest((model or "").encode("utf-8", "replace") + b"\0" + query,
                                                          headers)[:32])

    def _dialect(self, key: tuple[str, str]) -> Dialect:
        return self._ladder[self._dialect_state(key).rung]

    def _dialect_state(self, key: tuple[str, str]) -> _DialectState:
        """The model's dialect state; only a model that stepped down is kept (a fresh state otherwise)."""
        state = self._dialects.get(key)
        if state is None:
            return _DialectState()
        if self.clock() >= state.retry_at:
            del self._dialects[key]  # from time to time, try the best dialect again
            return _DialectState()
        return state

    def _failed(self, target: _Target, failed: _ProbeFailed, started: float) -> ProbeResult:
        seconds = time.perf_counter() - started
        self.metrics.probe_seconds.observe(seconds)
        self.metrics.probe_failures.labels(failed.reason).inc()
        if failed.reason in _HEALTH:
            breaker = self._breakers.get(target.key)
            if breaker is None:
                breaker = self._breakers[target.key] = _Breaker()
            breaker.failures += 1
            due = breaker.failures >= self._circuit_failures or breaker.open_until is not None
            if due and not breaker.checking:
                breaker.checking = True
                task = asyncio.get_running_loop().create_task(self._check_health(breaker, target))
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)
        return ProbeResult(failed.status, None, seconds, failed.reason)

    async def _check_health(self, breaker: _Breaker, target: _Target) -> None:
        """Open ``breaker`` if the fixed check probe fails for upstream health too, else close it.

        The check asks what every healthy upstream answers at once (``CHECK_VIEW``), with the same
        model, dialect and query as the request whose failure made the breaker due and only the
        headers in the breaker's key (``CREDENTIAL_HEADERS``: never the headers a client might route
        its own calls with), under the probe's own timeout. Only its status matters: no answer in time, a transport failure or a
        5xx is unhealthy; anything else means the upstream serves, so the failures were the requests'.
        """
        healthy = False
        try:
            async with asyncio.timeout(self.timeout):
                answer = await self._send(target, CHECK_VIEW, self._dialect(target.key), check=True)
            healthy = answer.status < 500
        except (TimeoutError, _ProbeFailed):
            pass
        finally:
            breaker.checking = False
        self.metrics.probe_checks.labels("healthy" if healthy else "unhealthy").inc()
        breaker.failures = 0
        breaker.open_until = None if healthy else self.clock() + self._circuit_cooldown
        self._export_open_count()

    async def stop(self) -> None:
        """Cancel check probes still running (at shutdown)."""
        for task in list(self._checks):
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)

    def _is_open(self, breaker: _Breaker) -> bool:
        """Open until the cool-down ends; then half-open: one trial probe at a time, the others
        still skip; a success closes it, a health failure runs the check (skipping meanwhile)."""
        if breaker.open_until is None:
            return False
        return self.clock() < breaker.open_until or breaker.trial_in_flight or breaker.checking

    def open_circuits(self) -> int:
        """How many (upstream, model) breakers are open or half-open."""
        return sum(1 for b in self._breakers.values() if b.open_until is not None)

    def _export_open_count(self) -> None:
        self.metrics.circuit_open.set(self.open_circuits())


def _check_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """What a check probe sends: the credential headers (the state's key) of the forwarded ``headers``."""
    kept = {name: value for name in CREDENTIAL_HEADERS if (value := headers.get(name)) is not None}
    if (encoding := headers.get("accept-encoding")) is not None:
        kept["accept-encoding"] = encoding  # framing, not routing: the answer is read as it comes
    return {**kept, PROBE_HEADER: "1", "content-type": "application/json"}


def _logprobs_of(body: bytes) -> Any:
    try:
        return json.loads(body)["choices"][0].get("logprobs")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        return None
