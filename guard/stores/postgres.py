"""The datapoint log in PostgreSQL: any number of replicas writing to one database.

Same contract as the SQLite recorder (``guard.stores.sink``): ``put`` never waits, batches are
written by one task off the request path, every lost datapoint is counted in
``refusal_guard_datapoints_dropped_total``. The driver is asyncpg (a pool of at most two
connections per process; batches go in with binary ``COPY``).

* The table is created or migrated at start (``calibration.postgres.postgres_ddl``) under an
  advisory lock, so replicas starting together do not race.
* Database down (refused, restarting, connection lost mid-batch): the batch is kept and tried
  again with a growing delay; meanwhile datapoints wait in the bounded queue and overflow is
  counted. The pool reconnects by itself. A batch whose commit reached the database before the
  connection dropped is not written twice: each batch carries an id, inserted in the same
  transaction into ``datapoint_batches`` (``ON CONFLICT DO NOTHING``).
* At shutdown the queue is written out; if the database stays unreachable for ``stop_timeout``
  seconds the rest is counted as dropped.
* Retention: rows older than ``max_age`` (by ``ts``) and beyond the newest ``max_rows`` (by
  ``seq``) are deleted every ``interval`` seconds, by one replica at a time (advisory lock).

The URL is a secret (it may hold a password): it is never logged. Any other error a batch
meets (a value the table rejects) drops that batch, counted, and the drain goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from datetime import datetime
from typing import Any, TextIO

from pydantic import SecretStr

from calibration.datapoints import FIELDS, OPTIONAL_FIELDS
from calibration.postgres import SCHEMA_LOCK_KEY, postgres_ddl, scrub
from guard.stores.recorder import COLUMNS, PromptHasher, _row, add_optional, load_hash_key
from guard.stores.sink import Counter, Retention, StoreUnavailable, drain_batches, offer

log = logging.getLogger("refusal_guard")
PRUNE_LOCK_KEY = SCHEMA_LOCK_KEY + 1
_TS = COLUMNS.index("ts")


def _pg_row(record: dict[str, Any]) -> tuple[Any, ...]:
    row = list(_row(record))
    if isinstance(row[_TS], str):
        row[_TS] = datetime.fromisoformat(row[_TS])
    return tuple(row)


class PostgresSink:
    def __init__(self, url: SecretStr, dropped: Counter, *, queue_size: int = 10_000, batch_size: int = 500,
                 flush_interval: float = 0.25, retention: Retention = Retention(), stop_timeout: float = 10.0,
                 connect_timeout: float = 5.0, hasher: PromptHasher | None = None) -> None:
        self.url = url
        #: Keyed hash of prompt text for the records' ``id`` and ``prompt_sha256`` (guard.stores.recorder).
        self.hash_prompt = hasher or PromptHasher(load_hash_key(None, None))
        self.dropped = dropped  # counts lost datapoints (refusal_guard_datapoints_dropped_total)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retention = retention
        self.stop_timeout = stop_timeout
        self.connect_timeout = connect_timeout
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=queue_size)
        self._pool: Any = None
        self._migrated = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._stop_at: float | None = None
        self._batch: tuple[list[dict[str, Any]], uuid.UUID] | None = None
        self.written = 0

    def put(self, record: dict[str, Any]) -> None:
        offer(self._queue, record, self.dropped)

    async def start(self) -> None:
        try:
            import asyncpg
        except ImportError:
            raise RuntimeError("a postgresql:// datapoints URL needs asyncpg: "
                               "pip install 'refusal-guard[postgres]'") from None

        self._pool = await asyncpg.create_pool(
            self.url.get_secret_value(), min_size=0, max_size=2, timeout=self.connect_timeout,
            command_timeout=60, max_inactive_connection_lifetime=60,
        )
        try:
            await self._migrate()
        except StoreUnavailable as exc:  # the guard serves anyway; the drain task retries
            log.warning("datapoint database unreachable at start (%s); datapoints queue until it answers", exc)
        self._task = asyncio.create_task(drain_batches(
            self._queue, self._write, dropped=self.dropped, closing=lambda: self._closing,
            batch_size=self.batch_size, flush_interval=self.flush_interval, drop_on=(Exception,),
            stop_deadline=lambda: self._stop_at, maintain=self.prune if self.retention.active else None,
            maintain_every=self.retention.interval,
        ))

    async def stop(self) -> None:
        """Write everything still queued (for up to ``stop_timeout`` if the database is down), then close."""
        if self._task is None:
            return
        self._closing = True
        self._stop_at = time.monotonic() + self.stop_timeout
        await self._task
        self._task = None
        await self._pool.close()

    async def _migrate(self) -> None:
        if self._migrated:
            return
        async with self._connection() as con:
            async with con.transaction():
                await con.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
                for statement in postgres_ddl():
                    await con.execute(statement)
        self._migrated = True

    def _connection(self) -> Any:
        return _Guarded(self._pool, self.connect_timeout, self.url.get_secret_value())

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        if self._batch is None or self._batch[0] is not batch:
            self._batch = (batch, uuid.uuid4())
        await self._migrate()
        rows = [_pg_row(r) for r in batch]  # a bad value raises here: the batch is dropped, counted
        async with self._connection() as con:
            async with con.transaction():
                fresh = await con.fetchval(
                    "INSERT INTO datapoint_batches (batch_id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true",
                    self._batch[1])
                if fresh:
                    await con.copy_records_to_table("datapoints", records=rows, columns=list(COLUMNS))
        self.written += len(batch)

    async def prune(self) -> int:
        """Apply the retention once (skipped while another replica prunes); return rows deleted."""
        await self._migrate()
        deleted = 0
        async with self._connection() as con:
            if not await con.fetchval("SELECT pg_try_advisory_lock($1)", PRUNE_LOCK_KEY):
                return 0
            try:
                if self.retention.max_age is not None:
                    status = await con.execute("DELETE FROM datapoints WHERE ts < now() - make_interval(secs => $1)",
                                               float(self.retention.max_age))
                    deleted += int(status.split()[-1])
                if self.retention.max_rows is not None:
                    status = await con.execute(
                        "DELETE FROM datapoints WHERE seq < (SELECT seq FROM datapoints ORDER BY seq DESC "
                        "OFFSET $1 LIMIT 1)", self.retention.max_rows - 1)
                    deleted += int(status.split()[-1])
                await con.execute("DELETE FROM datapoint_batches WHERE written_at < now() - interval '1 day'")
            finally:
                await con.execute("SELECT pg_advisory_unlock($1)", PRUNE_LOCK_KEY)
        return deleted


class _Guarded:
    """A pooled connection whose connection-level failures surface as :class:`StoreUnavailable`."""

    def __init__(self, pool: Any, timeout: float, url: str) -> None:
        self.pool = pool
        self.timeout = timeout
        self.url = url
        self.con: Any = None

    async def __aenter__(self) -> Any:
        try:
            self.con = await self.pool.acquire(timeout=self.timeout)
        except Exception as exc:
            if _is_unavailable(exc):
                raise StoreUnavailable(f"{type(exc).__name__}: {scrub(str(exc), self.url)}") from exc
            raise
        return self.con

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        try:
            await self.pool.release(self.con)
        except Exception:  # a broken connection: the pool replaces it
            pass
        if exc is not None and _is_unavailable(exc):
            raise StoreUnavailable(f"{type(exc).__name__}: {scrub(str(exc), self.url)}") from exc
        return False


def _is_unavailable(exc: BaseException) -> bool:
    import asyncpg

    if isinstance(exc, asyncpg.exceptions.DataError):
        return False
    return isinstance(exc, (OSError, TimeoutError, asyncpg.exceptions.PostgresConnectionError,
                            asyncpg.exceptions.InterfaceError, asyncpg.exceptions.CannotConnectNowError,
                            asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InternalClientError))


async def _export(url: str, out: TextIO) -> int:
    import asyncpg

    con = await asyncpg.connect(url, timeout=10)
    count = 0
    try:
        async with con.transaction(readonly=True, isolation="repeatable_read"):
            async for row in con.cursor(f"SELECT {', '.join(COLUMNS)} FROM datapoints ORDER BY seq", prefetch=5000):
                record = {k: row[k] for k in FIELDS}
                if record["ts"] is not None:
                    record["ts"] = record["ts"].isoformat(timespec="milliseconds")
                add_optional(record, row, OPTIONAL_FIELDS)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    finally:
        await con.close()
    return count


def export_postgres_jsonl(url: str, out: TextIO) -> int:
    """Write every datapoint in the database as one JSON line (as ``export_jsonl`` does for SQLite)."""
    return asyncio.run(_export(url, out))
