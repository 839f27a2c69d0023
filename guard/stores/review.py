"""Review events: a bounded queue drained by one task that posts to a webhook, with retries.

Events carry the prediction and the request id, never the prompt (unless prompt logging
is on), so a webhook receiver sees what it needs to pull the request from its own logs.
Without a webhook the event is a log line. A full queue drops the event and counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import httpx

from typing import Protocol

log = logging.getLogger("refusal_guard.review")


class _Inc(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class LabelledCounter(Protocol):
    """``refusal_guard_review_events_total`` (``GuardMetrics.review_events``), passed in: the stores
    know nothing of the metrics module."""

    def labels(self, *values: str) -> _Inc: ...


class ReviewSink:
    def __init__(self, client: httpx.AsyncClient, webhook: str | None, events: LabelledCounter,
                 *, queue_size: int = 1000, attempts: int = 3, backoff: float = 0.5) -> None:
        """``events`` counts review events by result (logged, dropped, delivered, failed)."""
        self.client = client
        self.webhook = webhook
        self.events = events
        self.attempts = attempts
        self.backoff = backoff
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task[None] | None = None

    def emit(self, event: dict[str, Any]) -> None:
        if self.webhook is None:
            log.info("review %s", json.dumps(event, sort_keys=True))
            self.events.labels("logged").inc()
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.events.labels("dropped").inc()

    async def start(self) -> None:
        if self.webhook is not None:
            self._task = asyncio.create_task(self._drain())

    async def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (within ``timeout``), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _drain(self) -> None:
        assert self.webhook is not None
        while True:
            event = await self._queue.get()
            try:
                self.events.labels("delivered" if await self._post(event) else "failed").inc()
            finally:
                self._queue.task_done()

    async def _post(self, event: dict[str, Any]) -> bool:
        for attempt in range(self.attempts):
            try:
                response = await self.client.post(self.webhook, json=event, timeout=5.0)  # type: ignore[arg-type]
                if response.status_code < 500 and response.status_code != 429:
                    return response.status_code < 300
            except httpx.HTTPError:
                pass
            await asyncio.sleep(self.backoff * 2**attempt)
        return False
