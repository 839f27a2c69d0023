"""The datapoint log: a bounded queue drained in batches into SQLite (WAL) by one task.

``put`` never blocks the request path: a full queue drops the datapoint and counts it
(``refusal_guard_datapoints_dropped_total``), never silently. Writes run in a worker
thread in batches; ``stop`` flushes everything queued before the process exits. Several
workers may share one file: SQLite's WAL mode and a busy timeout serialise their batches.
The schema is ``calibration.datapoints``' so ``calibrate`` reads this file directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any, TextIO

from calibration.datapoints import FIELDS, OPTIONAL_FIELDS, SQLITE_DDL
from guard.live.metrics import GuardMetrics

COLUMNS = FIELDS + OPTIONAL_FIELDS
log = logging.getLogger("refusal_guard")
_INSERT = f"INSERT INTO datapoints ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def open_database(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SQLITE_DDL)
    present = {r[1] for r in db.execute("PRAGMA table_info(datapoints)")}
    for name in OPTIONAL_FIELDS:  # a file from an older version: add the columns it lacks
        if name not in present:
            db.execute(f"ALTER TABLE datapoints ADD COLUMN {name} TEXT")
    return db


def _row(record: dict[str, Any]) -> tuple[Any, ...]:
    values = []
    for name in COLUMNS:
        value = record.get(name)
        if isinstance(value, (list, dict)):
            value = json.dumps(value, ensure_ascii=False)
        values.append(value)
    return tuple(values)


class DatapointRecorder:
    def __init__(self, path: Path | None, metrics: GuardMetrics, *, queue_size: int = 10_000,
                 batch_size: int = 500, flush_interval: float = 0.25) -> None:
        self.path = path
        self.metrics = metrics
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=queue_size)
        self._db: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.written = 0

    def put(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.metrics.datapoints_dropped.inc()

    async def start(self) -> None:
        if self.path is None:
            return
        self._db = await asyncio.to_thread(open_database, self.path)
        self._task = asyncio.create_task(self._drain())

    async def stop(self) -> None:
        """Write everything still queued, then close the database."""
        if self._task is None or self._db is None:
            return
        self._closing = True
        await self._task
        await asyncio.to_thread(self._db.close)
        self._db = None

    async def _drain(self) -> None:
        while True:
            if self._queue.empty():
                if self._closing:
                    return
                try:
                    async with asyncio.timeout(self.flush_interval):
                        batch = [await self._queue.get()]
                except TimeoutError:
                    continue
                if not self._closing:
                    await asyncio.sleep(self.flush_interval)  # let a batch gather
            else:
                batch = []
            while len(batch) < self.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await asyncio.to_thread(self._write, batch)
            except (sqlite3.Error, ValueError, TypeError) as exc:  # a bad value must not end the drain task
                log.error("could not write %d datapoints: %s", len(batch), exc)
                self.metrics.datapoints_dropped.inc(len(batch))

    def _write(self, batch: list[dict[str, Any]]) -> None:
        assert self._db is not None
        with self._db:
            self._db.executemany(_INSERT, [_row(r) for r in batch])
        self.written += len(batch)


def export_jsonl(database: Path, out: TextIO) -> int:
    """Write every datapoint as one JSON line (schema ``calibration.datapoints``); return the count."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    count = 0
    try:
        present = {r[1] for r in db.execute("PRAGMA table_info(datapoints)")}
        optional = [k for k in OPTIONAL_FIELDS if k in present]
        for row in db.execute(f"SELECT {', '.join(FIELDS + tuple(optional))} FROM datapoints ORDER BY seq"):
            record = {k: row[k] for k in FIELDS}
            for k in ("will_refuse", "refused"):
                if record[k] is not None:
                    record[k] = bool(record[k])
            record.update({k: row[k] for k in optional if row[k] is not None})
            if isinstance(record.get("context"), str):
                record["context"] = json.loads(record["context"])
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    finally:
        db.close()
    return count
