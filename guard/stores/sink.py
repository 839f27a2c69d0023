"""What every datapoint store shares: the sink interface and the batching drain loop.

A sink takes finished datapoints with ``put`` (never blocks, never raises: a full queue drops
the datapoint and counts it in ``refusal_guard_datapoints_dropped_total``), writes them in
batches off the request path, and on ``stop`` writes what is still queued. The SQLite recorder
(``guard.stores.recorder``) and the PostgreSQL sink (``guard.stores.postgres``) both run
:func:`drain_batches`; :func:`open_sink` picks one from the ``datapoints`` setting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import SecretStr

if TYPE_CHECKING:
    from guard.stores.recorder import PromptHasher

log = logging.getLogger("refusal_guard")


class Counter(Protocol):
    """What a sink counts lost datapoints with: ``refusal_guard_datapoints_dropped_total`` in the app
    (``GuardMetrics.datapoints_dropped``), passed in, so the stores know nothing of the metrics module."""

    def inc(self, amount: float = 1) -> None: ...


class DatapointSink(Protocol):
    hash_prompt: Callable[[str], str]

    def put(self, record: dict[str, Any]) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class StoreUnavailable(Exception):
    """The store cannot be reached right now: the same batch is tried again later."""


@dataclass(frozen=True)
class Retention:
    """Prune rows older than ``max_age`` seconds and all but the newest ``max_rows`` (None = keep)."""

    max_age: float | None = None
    max_rows: int | None = None
    interval: float = 60.0

    @property
    def active(self) -> bool:
        return self.max_age is not None or self.max_rows is not None


def offer(queue: asyncio.Queue[dict[str, Any]], record: dict[str, Any], dropped: Counter) -> None:
    """Queue ``record`` without waiting; a full queue drops it and counts the loss in ``dropped``."""
    try:
        queue.put_nowait(record)
    except asyncio.QueueFull:
        dropped.inc()


async def drain_batches(
    queue: asyncio.Queue[dict[str, Any]],
    write: Callable[[list[dict[str, Any]]], Awaitable[None]],
    *,
    dropped: Counter,
    closing: Callable[[], bool],
    batch_size: int,
    flush_interval: float,
    drop_on: tuple[type[BaseException], ...],
    retry_delay: float = 0.5,
    retry_max_delay: float = 5.0,
    stop_deadline: Callable[[], float | None] = lambda: None,
    maintain: Callable[[], Awaitable[None]] | None = None,
    maintain_every: float = 60.0,
) -> None:
    """Move queued datapoints into the store until ``closing()`` and the queue is empty.

    A batch gathers for ``flush_interval`` (or up to ``batch_size``). ``write`` raising one of
    ``drop_on`` (a value the store rejects) drops the batch and counts it (in ``dropped``); raising
    :class:`StoreUnavailable` keeps the batch and tries it again after a growing delay (new
    datapoints meanwhile wait in the bounded queue, where overflow is counted). Once closing,
    retries stop at ``stop_deadline()`` (a ``time.monotonic`` value) and what is left is
    counted as dropped. ``maintain`` (pruning) runs every ``maintain_every`` seconds.
    """
    next_maintenance = time.monotonic()
    while True:
        if maintain is not None and time.monotonic() >= next_maintenance:
            next_maintenance = time.monotonic() + maintain_every
            try:
                await maintain()
            except StoreUnavailable:
                pass
            except Exception as exc:  # pruning must never end the drain task
                log.error("datapoint retention failed: %s", exc)
        if queue.empty():
            if closing():
                return
            try:
                async with asyncio.timeout(flush_interval):
                    batch = [await queue.get()]
            except TimeoutError:
                continue
            if not closing():
                await asyncio.sleep(flush_interval)  # let a batch gather
        else:
            batch = []
        while len(batch) < batch_size and not queue.empty():
            batch.append(queue.get_nowait())
        delay = retry_delay
        while True:
            try:
                await write(batch)
                break
            except StoreUnavailable as exc:
                deadline = stop_deadline() if closing() else None
                if deadline is not None and time.monotonic() + delay > deadline:
                    lost = len(batch) + queue.qsize()
                    log.error("datapoint store unreachable at shutdown (%s): %d datapoints dropped", exc, lost)
                    dropped.inc(lost)
                    while not queue.empty():
                        queue.get_nowait()
                    return
                log.warning("datapoint store unreachable (%s): retrying %d datapoints in %.1f s", exc, len(batch), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, retry_max_delay)
            except drop_on as exc:  # a bad value must not end the drain task
                log.error("could not write %d datapoints: %s", len(batch), exc)
                dropped.inc(len(batch))
                break


def open_sink(target: Path | SecretStr | None, dropped: Counter, *, queue_size: int,
              retention: Retention, hasher: "PromptHasher") -> DatapointSink:
    """The sink for the ``datapoints`` setting: a PostgreSQL URL (a secret), a SQLite file, or none.

    ``hasher`` is the deployment's keyed prompt hash; the sink carries it as ``hash_prompt`` for
    the request path (one key per log, so repeats of a prompt group together in calibration).
    ``dropped`` counts lost datapoints (``GuardMetrics.datapoints_dropped``).
    """
    if isinstance(target, SecretStr):
        from guard.stores.postgres import PostgresSink

        return PostgresSink(target, dropped, queue_size=queue_size, retention=retention, hasher=hasher)
    from guard.stores.recorder import DatapointRecorder

    return DatapointRecorder(target, dropped, queue_size=queue_size, retention=retention, hasher=hasher)
