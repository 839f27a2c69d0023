"""The datapoint log: a bounded queue drained in batches into SQLite (WAL) by one task.

``put`` never blocks the request path: a full queue drops the datapoint and counts it
(``refusal_guard_datapoints_dropped_total``), never silently. Writes run in a worker
thread in batches; ``stop`` flushes everything queued before the process exits. Several
workers may share one file: SQLite's WAL mode and a busy timeout serialise their batches.
The schema is ``calibration.datapoints``' so ``calibrate`` reads this file directly.

What a datapoint may hold about the client is limited here too:

* A row holds at most :data:`ROW_MAX_CHARS` characters of text (:func:`_bounded`), and ``context``
  holds ids of stored context (``guard.apis.base.safe_id``), never the client's JSON.
* :func:`clean_model` caps the client's ``model`` string at :data:`MODEL_MAX_CHARS` and replaces
  anything outside a plain model-name alphabet, so no client can store megabytes or control
  characters in the log, the review events or a log line.
* :class:`PromptHasher` keys the prompt hash (``id`` and ``prompt_sha256``): HMAC-SHA256 with a
  deployment secret, so a guessed prompt cannot be confirmed from the log by hashing it. The
  same prompt still gets the same hash under the same key, which is all calibration needs: it
  groups repeats by ``id`` (the bootstrap's resampling unit), and repeats share it as long as
  the key does. :func:`load_hash_key` reads ``prompt_hash_key`` or, when none is configured,
  generates one and keeps it beside the datapoint log (``<datapoints>.key``, mode 0600), so a
  restart or another worker on the same log keeps grouping repeats. Replicas writing different
  logs need one ``prompt_hash_key`` in their settings to share groups; a new key starts new groups.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO

from calibration.datapoints import FIELDS, OPTIONAL_FIELDS, SQLITE_DDL
from guard.stores.sink import Counter, Retention, drain_batches, offer

COLUMNS = FIELDS + OPTIONAL_FIELDS
log = logging.getLogger("refusal_guard")
_INSERT = f"INSERT INTO datapoints ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


MODEL_MAX_CHARS = 128
_MODEL_UNSAFE = re.compile(r"[^A-Za-z0-9._:/@+\-]")
KEY_BYTES = 32


def clean_model(model: str | None) -> str | None:
    """The client's model string as it may be stored: at most :data:`MODEL_MAX_CHARS` characters
    of ``[A-Za-z0-9._:/@+-]``, anything else replaced by ``_``; a cut one ends in ``~``."""
    if model is None:
        return None
    cut = model[:MODEL_MAX_CHARS + 1]
    cleaned = _MODEL_UNSAFE.sub("_", cut)
    return cleaned[:MODEL_MAX_CHARS - 1] + "~" if len(cut) > MODEL_MAX_CHARS else cleaned


class PromptHasher:
    """HMAC-SHA256 of prompt text under a deployment key (hex), for ``id``/``prompt_sha256``."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the prompt hash key must be at least 16 bytes")
        self._key = key

    def __call__(self, text: str) -> str:
        return hmac.new(self._key, text.encode("utf-8", "replace"), hashlib.sha256).hexdigest()

    def __repr__(self) -> str:  # never show the key
        return "PromptHasher(<key>)"


def load_hash_key(configured: str | None, key_file: Path | None) -> bytes:
    """The prompt-hash key: ``configured`` if given; else the one kept in ``key_file``, made on
    first use (atomically: concurrent workers all end up with the first one written); else, with
    no file to keep it in, a fresh key for this process."""
    if configured:
        return configured.encode("utf-8")
    if key_file is None:
        return secrets.token_bytes(KEY_BYTES)
    try:
        return _read_key(key_file)
    except FileNotFoundError:
        pass
    temporary = key_file.with_name(f".{key_file.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(KEY_BYTES) + "\n")
    try:
        os.link(temporary, key_file)  # fails if another worker made it first: then use theirs
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    return _read_key(key_file)


def _read_key(path: Path) -> bytes:
    text = path.read_text(encoding="utf-8").strip()
    if len(text) < 32:
        raise ValueError(f"prompt hash key file {path} holds fewer than 32 characters")
    return text.encode("utf-8")


def default_key_file(datapoints: Any) -> Path | None:
    """Where a generated key is kept: beside a SQLite datapoint log. None without a local file (no
    log, or a database URL): then a fresh key per process, so replicas writing one database need a
    shared ``prompt_hash_key`` for repeats of a prompt to group in calibration."""
    return datapoints.with_name(datapoints.name + ".key") if isinstance(datapoints, Path) else None


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


#: The text one datapoint row may hold, all fields together (characters; at most 4 bytes each in UTF-8).
ROW_MAX_CHARS = 64 * 1024
#: What a ``context`` too large for its row becomes (it stays valid JSON: exports parse it).
CONTEXT_CUT = '{"truncated": true}'


def _row(record: dict[str, Any]) -> tuple[Any, ...]:
    values = []
    for name in COLUMNS:
        value = record.get(name)
        if isinstance(value, (list, dict)):
            value = json.dumps(value, ensure_ascii=False)
        values.append(value)
    return tuple(_bounded(values))


def _bounded(values: list[Any]) -> list[Any]:
    """The row's values within :data:`ROW_MAX_CHARS`: the longest text fields are cut first (in their
    middle, marked; a ``context`` becomes :data:`CONTEXT_CUT`). The request path stores ids, not client
    JSON (``guard.apis``); this is the last line, whatever a field holds (``prompt`` with ``log_prompts``)."""
    size = sum(len(v) for v in values if isinstance(v, str))
    if size <= ROW_MAX_CHARS:
        return values
    for i in sorted((i for i, v in enumerate(values) if isinstance(v, str)), key=lambda i: -len(values[i])):
        excess = size - ROW_MAX_CHARS
        if excess <= 0:
            break
        value = values[i]
        if COLUMNS[i] == "context":
            cut = CONTEXT_CUT
        else:
            keep = max(0, len(value) - excess - 48)  # room for the marker
            marker = f" [... {len(value) - keep} characters cut ...] "
            cut = value[:keep // 2] + marker + value[len(value) - (keep - keep // 2):]
        size += len(cut) - len(value)
        values[i] = cut
    return values


class DatapointRecorder:
    def __init__(self, path: Path | None, dropped: Counter, *, queue_size: int = 10_000,
                 batch_size: int = 500, flush_interval: float = 0.25, retention: Retention = Retention(),
                 hasher: PromptHasher | None = None) -> None:
        self.path = path
        self.retention = retention
        #: Keyed hash of prompt text for the records' ``id`` and ``prompt_sha256``.
        self.hash_prompt = hasher or PromptHasher(load_hash_key(None, None))
        self.dropped = dropped  # counts lost datapoints (refusal_guard_datapoints_dropped_total)
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
        offer(self._queue, record, self.dropped)

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
        await drain_batches(
            self._queue, lambda batch: asyncio.to_thread(self._write, batch), dropped=self.dropped,
            closing=lambda: self._closing, batch_size=self.batch_size, flush_interval=self.flush_interval,
            drop_on=(sqlite3.Error, ValueError, TypeError),
            maintain=(lambda: asyncio.to_thread(self._prune)) if self.retention.active else None,
            maintain_every=self.retention.interval,
        )

    def _write(self, batch: list[dict[str, Any]]) -> None:
        assert self._db is not None
        with self._db:
            self._db.executemany(_INSERT, [_row(r) for r in batch])
        self.written += len(batch)

    def _prune(self) -> int:
        """Delete rows past the retention (oldest first, by ``seq``); return how many went."""
        assert self._db is not None
        return prune_sqlite(self._db, self.retention)


def prune_sqlite(db: sqlite3.Connection, retention: Retention) -> int:
    """Apply ``retention`` to an open datapoint database; ``seq`` order is write order."""
    cut = 0
    if retention.max_age is not None:
        cutoff = (datetime.now(timezone.utc) - timedelta(seconds=retention.max_age)).isoformat(timespec="milliseconds")
        first_kept = db.execute("SELECT seq FROM datapoints WHERE ts >= ? ORDER BY seq LIMIT 1", (cutoff,)).fetchone()
        last = db.execute("SELECT max(seq) FROM datapoints").fetchone()[0]
        cut = first_kept[0] if first_kept else (last + 1 if last is not None else 0)
    if retention.max_rows is not None:
        row = db.execute("SELECT seq FROM datapoints ORDER BY seq DESC LIMIT 1 OFFSET ?", (retention.max_rows,)).fetchone()
        if row is not None:
            cut = max(cut, row[0] + 1)
    if not cut:
        return 0
    with db:
        return db.execute("DELETE FROM datapoints WHERE seq < ?", (cut,)).rowcount


def add_optional(record: dict[str, Any], row: Any, names: Any) -> None:
    """Add the optional fields ``names`` that ``row`` holds (not null) to an exported ``record``."""
    record.update({k: row[k] for k in names if row[k] is not None})
    if isinstance(record.get("context"), str):
        record["context"] = json.loads(record["context"])


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
            add_optional(record, row, optional)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    finally:
        db.close()
    return count
