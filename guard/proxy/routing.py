"""One guarded request (chat, completions or responses: ``guard.apis``), top to bottom:
probe, decide, act, then score off the path. The path does not know which API it serves.

Modes (``Settings.mode``):

* ``sequential``: probe, then act. A blocked request never reaches upstream generation.
* ``parallel``: probe and generation start together; a block cancels the generation, so
  latency is about max(probe, generation).
* ``shadow``: like parallel, but the decision is only recorded, never applied: the client
  gets the upstream's answer unchanged. The action recorded and sent in
  ``x-refusal-guard-action`` is what the policy *would* have done (``x-refusal-guard-mode``
  says ``shadow``). A policy fitted with another probe template also runs in shadow.
* ``off``: no probe; the request is still forwarded, counted and recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from starlette.responses import Response

from guard.apis.base import GuardedRequest
from guard.proxy.blocked import blocked_response
from guard.proxy.forward import Exchange, Generation, failed_exchange, generate, respond
from guard.probe.policy import Decision, PolicyStore
from guard.probe.context import last_user_text
from guard.probe.template import TEMPLATE_REF
from guard.probe.prober import Prober, ProbeResult
from guard.stores.recorder import clean_model
from guard.stores.review import ReviewSink
from guard.truth.scoring import Scorer
from guard.settings import Mode, Settings
from guard.tracing import Tracing
from guard.proxy.request_context import id_headers
from guard.proxy.upstream import Upstream, UpstreamFailure


@dataclass
class Router:
    settings: Settings
    upstream: Upstream
    review_upstream: Upstream | None
    prober: Prober
    policies: PolicyStore
    reviews: ReviewSink
    scorer: Scorer
    tracing: Tracing = field(default_factory=Tracing)

    def effective_mode(self) -> Mode:
        mode = self.settings.mode
        if mode.enforcing and not self.policies.current.enforced:
            return Mode.SHADOW
        return mode

    async def handle(self, request: GuardedRequest, incoming: Mapping[str, str], request_id: str,
                     query: bytes = b"", *, client: str | None = None) -> Response:
        """``client``: who sent it, for the datapoint (``guard.proxy.attribution``; never a key)."""
        started = time.perf_counter()
        mode = self.effective_mode()
        ids = id_headers(incoming, request_id)
        headers = self.upstream.forward_headers(incoming, ids)
        pending: asyncio.Task[Generation] | None = None
        if mode in (Mode.PARALLEL, Mode.SHADOW):
            pending = asyncio.create_task(self._generate(self.upstream, request, headers, query))
        try:
            if mode is Mode.OFF:
                probe = ProbeResult("skipped", None, 0.0)
            else:
                with self.tracing.span("probe") as span:
                    probe = await self.prober.predict(request, self.tracing.inject(headers), query)
                    if span is not None:
                        span.set_attribute("refusal_guard.probe_status", probe.status)
            decision = self._decide(probe)
            applied = mode.applied(decision.action)
            prompt, prompt_sha = self._prompt(request)
            record = self._record(request, request_id, mode, probe, decision, prompt, prompt_sha, client)
            guard_headers = _guard_headers(mode, probe, decision)
            if applied == "block":
                await _cancel(pending)
                self.scorer.submit(record, None, started)
                return blocked_response(request, request_id=request_id, message=self.settings.refusal_message,
                                        style=self.settings.block_response, headers=guard_headers)
            target = self.upstream
            if applied == "review":
                self.reviews.emit(self._review_event(record))
                if self.review_upstream is not None:
                    target = self.review_upstream
                    await _cancel(pending)
                    pending = None
                    headers = target.forward_headers(incoming, ids)
            try:
                generation = await pending if pending is not None else await self._generate(target, request, headers, query)
            except UpstreamFailure as failure:
                self.scorer.submit(record, failed_exchange(failure, started), started)
                raise
            pending = None

            def on_done(exchange: Exchange) -> None:
                self.scorer.submit(record, exchange, started, prompt)  # the detector reads the prompt too

            return respond(generation, guard_headers, on_done)
        finally:
            await _cancel(pending)  # the client left, or an error: never leave a generation running

    async def _generate(self, target: Upstream, request: GuardedRequest, headers: Mapping[str, str],
                        query: bytes) -> Generation:
        """The upstream call in its own span (to the response head; a stream goes on after it)."""
        with self.tracing.span("generation"):
            return await generate(target, request, self.tracing.inject(headers), query)

    def _decide(self, probe: ProbeResult) -> Decision:
        if probe.prediction is not None:
            return self.policies.current.decide(probe.prediction)
        if probe.failure is None:
            return Decision("pass", None)  # no probe was asked for (mode off)
        return Decision(self.settings.on_probe_failure.value, None)

    def _prompt(self, request: GuardedRequest) -> tuple[str, str]:
        """The last user turn's text and its keyed hash (HMAC: see ``guard.stores.recorder``)."""
        if request.prompt is not None:  # read and hashed off the event loop (a large body)
            return request.prompt
        content = last_user_text(request.messages)
        return content, self.scorer.recorder.hash_prompt(content)

    def _record(self, request: GuardedRequest, request_id: str, mode: Mode, probe: ProbeResult,
                decision: Decision, content: str, prompt_sha: str, client: str | None = None) -> dict[str, Any]:
        """The datapoint fields known before the answer (schema: ``calibration.datapoints``)."""
        p = probe.prediction
        record: dict[str, Any] = {
            "id": prompt_sha,
            "request_id": request_id,
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "model": clean_model(request.model),
            "topic": p.topic if p else None,
            "harm_level": None,
            "will_refuse": p.will_refuse if p else None,
            "confidence": p.confidence if p else None,
            "harm_rating": p.harm_rating if p else None,
            "p_refuse_logprob": p.p_refuse_logprob if p else None,
            "p_correct": decision.p_correct,
            "action": decision.action,
            "mode": mode.value,
            "probe_status": probe.status,
            "probe_ms": round(probe.seconds * 1000, 3),
            "policy_version": self.policies.current.version,
            "probe_template": TEMPLATE_REF,
            "prompt_sha256": prompt_sha,
            "route": request.api.name,
            "context": request.context or None,
            "client": client,
        }
        if self.settings.log_prompts:
            record["prompt"] = content
        return record

    def _review_event(self, record: Mapping[str, Any]) -> dict[str, Any]:
        keys = ("request_id", "ts", "route", "model", "topic", "will_refuse", "confidence", "harm_rating", "p_correct",
                "probe_status", "policy_version", "prompt_sha256")
        event = {k: record.get(k) for k in keys}
        if "prompt" in record:
            event["prompt"] = record["prompt"]
        return event


def _guard_headers(mode: Mode, probe: ProbeResult, decision: Decision) -> dict[str, str]:
    p = probe.prediction
    return {
        "x-refusal-guard-action": decision.action,
        "x-refusal-guard-mode": mode.value,
        "x-refusal-guard-prediction": ("refuse" if p.will_refuse else "comply") if p else "unknown",
        "x-refusal-guard-confidence": str(p.confidence) if p else "unknown",
        "x-refusal-guard-topic": p.topic if p else "unknown",
        "x-refusal-guard-p-correct": f"{decision.p_correct:.4f}" if decision.p_correct is not None else "unknown",
    }


async def _cancel(task: asyncio.Task[Generation] | None) -> None:
    """Cancel an upstream generation, or close it if it already produced a stream."""
    if task is None:
        return
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        generation = await task
        await generation.discard()
