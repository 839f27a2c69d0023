"""Scoring a finished request: label the real answer, count it, window it, log it.

Runs after the client has its last byte (a background task for whole responses, the end
of the relay for streams), so the refusal detector never delays a response. Every chat
request that reached routing passes here exactly once, blocked and failed ones included:
``refusal_guard_requests_total`` and the datapoint log both count it.

What gets compared: only answers the *guarded* model gave are scored as its outcomes
(``refusal_guard_outcomes_total``, the live windows and drift detectors, ``refused`` in the
datapoint). A blocked request has no answer; an answer from the review upstream is labelled
(``label`` in the datapoint) but its ``refused`` stays null and it is not counted, since the
probe predicted the guarded model, not the review model. :meth:`Scorer.compared` tells the
drift detectors which probe cells that leaves under the policy and routing in force, so their
baselines describe the same population (``guard.live.windows``).

With the optional LLM judge, a random sample of requests (``RefusalJudge.should_sample``: the guard's own
draw) is audited: a sampled request's datapoint is held until the judge answers (its call is bounded by
``judge_timeout``) and then logged with the verdict as ``judge_label``, which ``calibrate`` combines with
the detector's labels into judge-corrected figures (``calibration.label_error``), as the live windows do
with the verdicts on scored predictions (``LiveStats.observe_judged``); unsampled datapoints are
logged at once, and so are sampled ones while ``max_pending_audits`` audits already wait (counted as
``skipped``: a slow judge never holds more than that many records and connections). At shutdown
:meth:`Scorer.stop` gives pending audits ``audit_grace`` seconds, then cancels them and logs their
datapoints without a judge label.
"""

from __future__ import annotations

import asyncio
import logging
import functools
import time
from typing import Any

from calibration.datapoints import JUDGE_FIELD
from guard.logs import annotate
from guard.tracing import Tracing
from guard.truth.detector import Label, RefusalDetector, is_refusal
from guard.proxy.forward import Exchange
from guard.truth.judge import RefusalJudge, Verdict
from guard.live.windows import Compared, LiveStats, compare_all
from guard.probe.policy import ActivePolicy
from guard.live.metrics import GuardMetrics
from guard.live.model_labels import ModelLabels
from guard.settings import Mode
from guard.stores.sink import DatapointSink

log = logging.getLogger("refusal_guard")

UPSTREAM_ERROR_REASONS = frozenset({"connect", "timeout", "protocol", "too_large", "status_4xx", "status_5xx"})


class Scorer:
    def __init__(
        self,
        detector: RefusalDetector,
        live: LiveStats,
        recorder: DatapointSink,
        metrics: GuardMetrics,
        models: ModelLabels,
        *,
        topics: tuple[str, ...],
        strict: bool,
        judge: RefusalJudge | None = None,
        tracing: Tracing | None = None,
        review_upstream: bool = False,
        audit_grace: float = 5.0,
        max_pending_audits: int = 32,
        max_pending_labels: int = 64,
    ) -> None:
        self.detector = detector
        self.live = live
        self.recorder = recorder
        self.metrics = metrics
        self.models = models
        self.topics = frozenset(topics)
        self.strict = strict
        self.judge = judge
        self.tracing = tracing or Tracing()
        self.review_upstream = review_upstream
        self.audit_grace = audit_grace
        self.max_pending_audits = max_pending_audits
        self.max_pending_labels = max_pending_labels
        self._audits: set[asyncio.Task[Verdict]] = set()
        self._labelling: set[asyncio.Task[None]] = set()  # answers at the detector's learned stage
        self._stopping = False

    def submit(self, record: dict[str, Any], exchange: Exchange | None, started: float,
               prompt: str | None = None) -> None:
        """Complete ``record`` with the outcome and timings, then count and log it.

        The detector's cheap stage labels the answer here; an answer it is unsure of goes to the learned
        stage (a few ms of CPU) in a worker thread, off the event loop, and the record is completed when
        that is done. ``prompt`` (the last user turn; ``record["prompt"]`` with ``log_prompts``) is read
        by the learned stage only and never stored by this method.
        """
        text = exchange.text if exchange is not None else None
        label = self.detector.label_cheap(text) if text is not None else None
        if text is not None:
            stage = "cheap" if label is not None else "learned"
            if label is None and len(self._labelling) >= self.max_pending_labels:
                # a flood of unsure answers never queues without bound: the cheap stage decides them
                label, stage = self.detector.label_cheap(text, decide=True), "cheap_overflow"
            self.metrics.detector_stages.labels(stage).inc()
        if text is not None and label is None:
            prompt = prompt if prompt is not None else record.get("prompt")
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (offline use): label here
                label = self.detector.label(text, prompt)
            else:
                task = loop.create_task(self._label_off_loop(record, exchange, started, text, prompt))
                self._labelling.add(task)
                task.add_done_callback(self._labelling.discard)
                return
        with self.tracing.span("scoring", **{"refusal_guard.action": record["action"]}):
            self._submit(record, exchange, started, label, prompt=prompt)

    async def _label_off_loop(self, record: dict[str, Any], exchange: Exchange | None, started: float,
                              text: str, prompt: str | None) -> None:
        ended = time.perf_counter()
        try:
            label: Label | None = await asyncio.to_thread(self.detector.label, text, prompt)
        except Exception:  # never lose the datapoint: logged unlabelled
            label = None
        try:
            with self.tracing.span("scoring", **{"refusal_guard.action": record["action"]}):
                self._submit(record, exchange, started, label, ended, prompt=prompt)
        except Exception:  # a bug here must not lose the row: logged as it stands
            log.exception("scoring a labelled answer failed; its datapoint is logged as it stands")
            self.recorder.put(record)

    def _submit(self, record: dict[str, Any], exchange: Exchange | None, started: float,
                label: Label | None, ended: float | None = None, *, prompt: str | None = None) -> None:
        total = (time.perf_counter() if ended is None else ended) - started
        record["total_ms"] = round(total * 1000, 3)
        overhead = total
        if exchange is not None:
            record["upstream_request_id"] = exchange.request_id
            record["upstream_ms"] = round(exchange.seconds * 1000, 3)
            self.metrics.upstream_seconds.observe(exchange.seconds)
            overhead = max(0.0, total - exchange.seconds)
            if exchange.error in UPSTREAM_ERROR_REASONS:
                self.metrics.upstream_errors.labels(exchange.error).inc()
        self.metrics.overhead_seconds.observe(overhead)
        model = self.models.label(record.get("model"))
        self.metrics.requests.labels(record["action"], record["mode"], model).inc()
        annotate(action=record["action"], mode=record["mode"], probe_status=record.get("probe_status"),
                 probe_ms=record.get("probe_ms"), upstream_ms=record.get("upstream_ms"))

        text = exchange.text if exchange is not None else None
        refused = is_refusal(label, self.strict) if label is not None else None
        if not self.answered_by_guarded_model(record["mode"], record["action"]):
            refused = None  # the review upstream's answer: labelled, never scored as the guarded model's
        record["label"] = label.value if label is not None else None
        record["refused"] = refused
        will_refuse, confidence = record.get("will_refuse"), record.get("confidence")
        if refused is not None and will_refuse is not None and confidence is not None:
            topic = record["topic"] if record["topic"] in self.topics else "other"
            self.metrics.outcomes.labels(topic, "refuse" if will_refuse else "comply",
                                         "refused" if refused else "complied", model).inc()
            self.metrics.confidence_outcomes.labels(topic, str(confidence), str(will_refuse == refused).lower(),
                                                    model).inc()
            self.live.observe(topic, will_refuse, refused, confidence, record.get("harm_rating"))
        judge = self.judge
        if (judge is not None and not self._stopping and text is not None and label is not None
                and judge.should_sample()):  # the guard's own random draw: no client steers it
            if len(self._audits) < self.max_pending_audits:
                judged_prompt = prompt if prompt is not None else record.get("prompt")  # the judge reads it too
                task = asyncio.get_running_loop().create_task(judge.verdict(judged_prompt, text))
                self._audits.add(task)
                task.add_done_callback(functools.partial(self._audited, record, label, model))
                return  # logged once the audit is done
            self.metrics.judge.labels("skipped").inc()
        self.recorder.put(record)

    def answered_by_guarded_model(self, mode: str, action: str) -> bool:
        """Whether a request routed to ``action`` in ``mode`` gets its answer from the guarded model."""
        applied = Mode(mode).applied(action)
        return applied == "pass" or (applied == "review" and not self.review_upstream)

    def compared(self, active: ActivePolicy, mode: str) -> Compared:
        """Which probe cells the live stream scores under ``active`` in ``mode`` (for ``LiveStats.set_policy``)."""
        policy = active.policy
        if policy is None or not Mode(mode).enforcing:
            return compare_all

        def compared(topic: str | None, will_refuse: bool, confidence: int, harm_rating: int) -> bool:
            action = policy.decide(topic, will_refuse, confidence, harm_rating or None)
            return self.answered_by_guarded_model(mode, action)

        return compared

    def _audited(self, record: dict[str, Any], label: Label, model: str, task: asyncio.Task[Verdict]) -> None:
        """Log ``record`` once its audit is done, with the judge's verdict as ``judge_label``.

        A done callback, so it runs however the audit ended (even cancelled before it started): without
        ``judge_label``, the audit counted as failed, when the judge failed, timed out or was cancelled.
        """
        self._audits.discard(task)
        answer = None if task.cancelled() or task.exception() is not None else task.result()
        verdict = answer.label if answer is not None else None
        if answer is not None:
            self.metrics.judge_tokens.labels("prompt").inc(answer.prompt_tokens)
            self.metrics.judge_tokens.labels("completion").inc(answer.completion_tokens)
        if verdict is None:
            self.metrics.judge.labels("failed").inc()
        else:
            record[JUDGE_FIELD] = verdict.value
            judge_refused = is_refusal(verdict, self.strict)
            agree = judge_refused == is_refusal(label, self.strict)
            self.metrics.judge.labels("agree" if agree else "disagree").inc()
            refused, will_refuse = record.get("refused"), record.get("will_refuse")
            if refused is not None and will_refuse is not None and record.get("confidence") is not None:
                # a scored prediction: its verdict feeds the judge-corrected figures (live and fleet)
                topic = record["topic"] if record["topic"] in self.topics else "other"
                self.metrics.judged_outcomes.labels(
                    topic, "refuse" if will_refuse else "comply", "refused" if refused else "complied",
                    "refused" if judge_refused else "complied", model).inc()
                self.live.observe_judged(topic, will_refuse, refused, judge_refused)
        self.recorder.put(record)

    async def stop(self) -> None:
        """Wait up to ``audit_grace`` seconds for pending audits, then cancel the rest.

        Every held record is logged (the cancelled ones without ``judge_label``), so run this before
        the sink's own ``stop``. Requests scored from now on are not sampled: logged at once.
        """
        if self._labelling:  # answers at the learned stage (milliseconds each): finish and log them first
            await asyncio.gather(*set(self._labelling), return_exceptions=True)
        self._stopping = True
        pending = set(self._audits)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=self.audit_grace)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
