"""The datapoint schema and columnar readers for JSONL files, the proxy's SQLite log and PostgreSQL.

One datapoint = one chat request: what the probe predicted (``will_refuse``, ``confidence``,
``harm_rating``, ``topic``), what the policy did (``action``) and how the real response was
labelled (``label``, ``refused``).  :data:`FIELDS` is the contract shared with the proxy's
recorder (which executes :data:`SQLITE_DDL`) and with ``collect``.

Reading is columnar: lines are parsed in chunks, each needed field is pulled out as one Python
list per chunk, validated with per-column type checks (the per-row slow path only runs to name the
offending line) and stored as numpy arrays.  Nothing is dropped silently: rows that cannot be used
for calibration (probe failed, request blocked so the response was never seen, ...) are counted per
reason in :attr:`DatapointTable.skipped`, and invalid rows raise :class:`DatapointError` naming the
file and line (or are counted as skipped with ``on_error="skip"``).  Validated: the fields calibration
uses (id, prompt_sha256, topic, harm_level, will_refuse, confidence, harm_rating, refused, model,
probe_template, probe_status) and the enums ``label`` and ``action``; timing and other fields that
calibration never reads are not type-checked (keeps 1M-row logs fast).  Unknown keys are reported
in :attr:`DatapointTable.unknown_fields`.

Sources may be mixed: files, globs and ``postgresql://`` URLs (aggregated in the database by
``calibration.postgres``; rows never reach Python, only counts per prompt cluster and cell).
A row seen twice -- the same file given twice, a SQLite log and its own JSONL export, a file
and the database it was exported from -- is used once: rows are keyed by ``(request_id, ts)``
(request ids alone may be chosen by clients, so two requests can share one; the same row read
twice shares both) and repeats are counted as skipped ``duplicate request_id+ts``. Rows
without a ``request_id`` are never treated as duplicates.
"""

from __future__ import annotations

import gc
import glob
import hashlib
import json
import sqlite3
from collections import Counter
from operator import itemgetter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np

__all__ = [
    "FIELDS",
    "OPTIONAL_FIELDS",
    "SQLITE_DDL",
    "LABELS",
    "PROBE_STATUSES",
    "ACTIONS",
    "DatapointError",
    "DatapointTable",
    "read_datapoints",
]

FIELDS: tuple[str, ...] = (
    "id", "request_id", "ts", "model", "topic", "harm_level", "will_refuse", "confidence",
    "harm_rating", "p_refuse_logprob", "p_correct", "action", "mode", "probe_status", "label",
    "refused", "probe_ms", "upstream_ms", "total_ms", "policy_version", "probe_template",
    "prompt_sha256",
)
#: Optional: an LLM judge's label for the row (a random sample of rows). Where present ``refused`` is the
#: judge's (what the thresholds use) and ``DatapointTable.detector_refused`` keeps the detector's own; the SDT
#: figures combine the two through ``calibration.label_error`` (judge-corrected).
JUDGE_FIELD = "judge_label"
#: ``prompt`` is present only when prompt logging is on; the proxy adds the route (chat, completions,
#: responses), the upstream's own request id, the context the probe could not see (JSON, e.g.
#: ``{"previous_response_id": ...}``) and, on requests the optional judge audited, its label
#: (:data:`JUDGE_FIELD`); files written by ``collect`` or before these existed lack them. ``collect``
#: adds the prompt file's own topic (``prompt_topic``), for the record only: ``topic`` is always the
#: probe's predicted topic, the one the proxy looks thresholds and drift baselines up by. The proxy
#: also records which client sent the request (:data:`CLIENT_FIELD`: the name of the inbound key it
#: used, else a keyed hash of its credential, never a key; null without one), which ``calibrate``
#: reports, caps (``--max-client-share``) and excludes (``--exclude-client``) by.
CLIENT_FIELD = "client"
OPTIONAL_FIELDS: tuple[str, ...] = ("prompt", "route", "upstream_request_id", "context", JUDGE_FIELD, "prompt_topic",
                                    CLIENT_FIELD)

LABELS = frozenset({"full_refusal", "partial_refusal", "partial_compliance", "full_compliance"})
PROBE_STATUSES = frozenset({"ok", "cached", "timeout", "error", "unparseable", "skipped"})
ACTIONS = frozenset({"pass", "block", "review"})

REFUSAL_LABELS = frozenset({"full_refusal", "partial_refusal"})

_BOOL_FIELDS = frozenset({"will_refuse", "refused"})
_INT_FIELDS = frozenset({"harm_level", "confidence", "harm_rating"})
_FLOAT_FIELDS = frozenset({"p_refuse_logprob", "p_correct", "probe_ms", "upstream_ms", "total_ms"})
_ENUMS: dict[str, frozenset[str]] = {"label": LABELS, "probe_status": PROBE_STATUSES, "action": ACTIONS,
                                     JUDGE_FIELD: LABELS}
_ONE_TO_FIVE = frozenset({"confidence", "harm_rating"})


def _sql_type(name: str) -> str:
    if name in _BOOL_FIELDS or name in _INT_FIELDS:
        return "INTEGER"
    if name in _FLOAT_FIELDS:
        return "REAL"
    return "TEXT"


SQLITE_DDL: str = (
    "CREATE TABLE IF NOT EXISTS datapoints (\n    seq INTEGER PRIMARY KEY,\n"
    + ",\n".join(f"    {name} {_sql_type(name)}" for name in FIELDS + OPTIONAL_FIELDS)
    + "\n);\nCREATE INDEX IF NOT EXISTS datapoints_topic_seq ON datapoints (topic, seq);\n"
)

#: Fields the reader keeps (the rest are validated but not stored).
_USED = ("id", "prompt_sha256", "topic", "harm_level", "will_refuse", "confidence", "harm_rating",
         "refused", "model", "probe_template", "probe_status", "p_refuse_logprob", "request_id", "ts")
DUPLICATE = "duplicate request_id+ts"
#: Not stored but validated (unknown labels/statuses/actions are errors, not silent); the client is
#: kept (:attr:`DatapointTable.client`). Pulled only where a chunk has them (older files lack them).
_CHECKED = frozenset({"label", "action", JUDGE_FIELD, CLIENT_FIELD})
#: How rows without a client are named in reports and by ``--exclude-client``: no key name (letters,
#: digits and ``._@+-``) and no hashed id (hex) can look like it.
NO_CLIENT = "(none)"
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
_CHUNK = 50_000


class DatapointError(ValueError):
    """A datapoint file is unreadable or a row is invalid; the message names file and line."""


@dataclass(frozen=True)
class DatapointTable:
    """Usable datapoints as columnar numpy arrays (one entry per usable row).

    ``prompt`` indexes ``prompt_ids`` (the resampling unit of the bootstrap: repeats and
    paraphrases sharing an ``id`` are one cluster); ``topic`` indexes ``topics`` with -1 for a
    missing topic; ``harm_level`` is -1 and ``harm_rating`` 0 when missing.
    """

    prompt: np.ndarray          # int32 codes into prompt_ids
    prompt_ids: tuple[str, ...]
    topic: np.ndarray           # int32 codes into topics, -1 = missing
    topics: tuple[str, ...]
    harm_level: np.ndarray      # int16, -1 = missing
    will_refuse: np.ndarray     # bool
    confidence: np.ndarray      # int8, 1..5
    harm_rating: np.ndarray     # int8, 0 = missing, else 1..5
    refused: np.ndarray         # bool
    p_refuse_logprob: np.ndarray | None = None   # float64, nan = missing; None = no row has one
    models: tuple[str, ...] = ()
    probe_templates: tuple[str, ...] = ()
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    unknown_fields: tuple[str, ...] = ()
    n_read: int = 0
    judged: np.ndarray | None = None            # bool: the row carries a judge label (refused = judge's)
    detector_refused: np.ndarray | None = None  # bool: the detector's refused, judged or not
    client: np.ndarray | None = None            # int32 codes into clients, -1 = no client; None = none at all
    clients: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        return int(self.refused.shape[0])

    @property
    def n_skipped(self) -> int:
        return int(sum(self.skipped.values()))

    @property
    def correct(self) -> np.ndarray:
        """Whether the probe's prediction matched the outcome (the 'accuracy' event)."""
        return self.will_refuse == self.refused

    def client_codes(self) -> np.ndarray:
        """Each row's client code (-1: no client), also for a table without any."""
        return self.client if self.client is not None else np.full(self.n, -1, np.int32)

    def client_name(self, code: int) -> str:
        return self.clients[code] if code >= 0 else NO_CLIENT

    def subset(self, rows: np.ndarray) -> "DatapointTable":
        """The rows where the boolean mask ``rows`` is True (codes and names kept as they are; the
        caller accounts for the rows left out)."""
        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[rows]

        lp = take(self.p_refuse_logprob)
        return replace(
            self, prompt=self.prompt[rows], topic=self.topic[rows], harm_level=self.harm_level[rows],
            will_refuse=self.will_refuse[rows], confidence=self.confidence[rows], harm_rating=self.harm_rating[rows],
            refused=self.refused[rows], p_refuse_logprob=lp if lp is not None and np.isfinite(lp).any() else None,
            judged=take(self.judged), detector_refused=take(self.detector_refused), client=take(self.client))

    @classmethod
    def from_arrays(cls, *, prompt: Any, will_refuse: Any, confidence: Any, refused: Any,
                    topic: Any | None = None, topics: Iterable[str] = (), harm_level: Any | None = None,
                    harm_rating: Any | None = None, p_refuse_logprob: Any | None = None,
                    client: Any | None = None, clients: Iterable[str] = ()) -> "DatapointTable":
        """Build a table from arrays (simulations, tests): ``prompt``, ``topic`` and ``client`` are
        int codes (topic and client -1 = missing); missing harm columns default to "missing"."""
        prompt = np.asarray(prompt, dtype=np.int32)
        n = prompt.shape[0]
        n_prompts = int(prompt.max()) + 1 if n else 0
        return cls(
            prompt=prompt, prompt_ids=tuple(f"p{i}" for i in range(n_prompts)),
            topic=np.full(n, -1, np.int32) if topic is None else np.asarray(topic, dtype=np.int32),
            topics=tuple(topics),
            harm_level=np.full(n, -1, np.int16) if harm_level is None else np.asarray(harm_level, np.int16),
            will_refuse=np.asarray(will_refuse, dtype=bool), confidence=np.asarray(confidence, np.int8),
            harm_rating=np.zeros(n, np.int8) if harm_rating is None else np.asarray(harm_rating, np.int8),
            refused=np.asarray(refused, dtype=bool), n_read=n,
            p_refuse_logprob=None if p_refuse_logprob is None else np.asarray(p_refuse_logprob, np.float64),
            client=None if client is None else np.asarray(client, np.int32), clients=tuple(clients),
        )

    def data_hash(self) -> str:
        """sha256 of the usable content (ids, topics, predictions, outcomes).

        Independent of the source format and of row order: codes are replaced by the ranks of
        their names and rows are sorted, so a database's aggregated rows hash like its export.
        """
        def ranks(names: tuple[str, ...]) -> np.ndarray:
            order = np.argsort(np.array(names, dtype=object), kind="stable") if names else np.zeros(0, np.int64)
            out = np.empty(len(names) + 1, dtype=np.int64)
            out[order] = np.arange(len(names))
            out[-1] = -1  # code -1 (missing) indexes the last slot
            return out

        cols = [ranks(self.prompt_ids)[self.prompt], ranks(self.topics)[self.topic],
                self.harm_level.astype(np.int64), self.will_refuse.astype(np.int64),
                self.confidence.astype(np.int64), self.harm_rating.astype(np.int64), self.refused.astype(np.int64)]
        order = np.lexsort(cols[::-1])
        h = hashlib.sha256()
        for arr in cols:
            h.update(np.ascontiguousarray(arr[order]).tobytes())
        h.update("\x1f".join(sorted(self.prompt_ids)).encode())
        h.update("\x1e".join(sorted(self.topics)).encode())
        if self.p_refuse_logprob is not None:
            h.update(np.ascontiguousarray(self.p_refuse_logprob[order]).tobytes())
        return h.hexdigest()

    def skipped_summary(self) -> str:
        """A one-paragraph human summary of skipped rows (empty string if none)."""
        if not self.skipped:
            return ""
        parts = []
        for reason, count in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            ex = self.skipped_examples.get(reason, [])
            parts.append(f"{count} {reason}" + (f" (e.g. {', '.join(ex)})" if ex else ""))
        return f"skipped {self.n_skipped} of {self.n_read} rows: " + "; ".join(parts)


class _Where:
    """Row locations (``file:line`` or ``file: row seq=N``), formatted only when a message needs one."""

    __slots__ = ("fmt", "nums")

    def __init__(self, fmt: str, nums: Any) -> None:
        self.fmt, self.nums = fmt, nums

    def __len__(self) -> int:
        return len(self.nums)

    def __getitem__(self, i: int) -> str:
        return self.fmt.format(self.nums[i])

    def take(self, idx: Any) -> "_Where":
        return _Where(self.fmt, [self.nums[i] for i in idx])


class _Builder:
    """Accumulates validated columns chunk by chunk, with shared factorisation dicts."""

    def __init__(self, on_error: str, since: datetime | None = None, model: str | None = None,
                 keep_keys: bool = False) -> None:
        self.on_error = on_error
        self.since = since
        self.model = model
        self.seen: set[int] = set()             # hash((request_id, ts)) of every row read
        self.keys: list[tuple[str, datetime]] | None = [] if keep_keys else None  # for a database to skip
        self.ids: dict[str, int] = {}
        self.topics: dict[str, int] = {}
        self.models: set[str] = set()
        self.templates: set[str] = set()
        self.clients: dict[str, int] = {}
        self.cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                                  ("prompt", "topic", "harm_level", "will_refuse",
                                                   "confidence", "harm_rating", "refused", "p_refuse_logprob",
                                                   "judged", "detector_refused", "client")}
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.unknown: set[str] = set()
        self.n_read = 0

    def skip(self, reason: str, where: str, count: int = 1) -> None:
        self.skipped[reason] += count
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(where)

    def add_chunk(self, cols: dict[str, list[Any]], where: _Where, bool_as_int: bool) -> None:
        """Validate one chunk of columns (lists of equal length) and append the usable rows."""
        cols, where = self._select(cols, where)
        n = len(where)
        if n == 0:
            return
        self.n_read += n
        bad = np.zeros(n, dtype=bool)
        for name, values in cols.items():
            bad |= self._check(name, values, where, bool_as_int)
        if bad.any():  # only reachable with on_error="skip"
            keep_idx = np.flatnonzero(~bad)
            cols = {k: [v[i] for i in keep_idx] for k, v in cols.items()}
            where = where.take(keep_idx)
            n = len(where)
        if n == 0:
            return

        wr, conf, ref = cols["will_refuse"], cols["confidence"], cols["refused"]
        if None in wr or None in conf or None in ref:
            missing = {name: np.fromiter((v is None for v in col), bool, n)
                       for name, col in (("will_refuse", wr), ("confidence", conf), ("refused", ref))}
            unusable = missing["will_refuse"] | missing["confidence"] | missing["refused"]
            status = cols.get("probe_status") or [None] * n
            for i in np.flatnonzero(unusable):
                lacking = [k for k in ("will_refuse", "confidence", "refused") if missing[k][i]]
                reason = "missing " + "+".join(lacking)
                if status[i] not in (None, "ok", "cached"):
                    reason += f" (probe_status={status[i]})"
                self.skip(reason, where[i])
            keep = np.flatnonzero(~unusable)
            cols = {k: [v[i] for i in keep] for k, v in cols.items()}
            where = where.take(keep)
            n = len(where)
            if n == 0:
                return

        ids, sha = cols["id"], cols["prompt_sha256"]
        if None in ids:
            key = [i if i is not None else (s if s is not None else f"row:{where[j]}")
                   for j, (i, s) in enumerate(zip(ids, sha))]
        else:
            key = ids
        self.cols["prompt"].append(_factorise(key, self.ids, n))
        self.cols["topic"].append(_factorise(cols["topic"], self.topics, n))
        self.cols["harm_level"].append(_ints(cols["harm_level"], -1, np.int16))
        self.cols["harm_rating"].append(_ints(cols["harm_rating"], 0, np.int8))
        self.cols["will_refuse"].append(np.array(cols["will_refuse"], dtype=bool))
        detector = np.array(cols["refused"], dtype=bool)
        judge = cols.get(JUDGE_FIELD) or [None] * n
        judged = np.fromiter((v is not None for v in judge), bool, n)
        self.cols["judged"].append(judged)
        self.cols["detector_refused"].append(detector)
        self.cols["refused"].append(np.where(judged, np.fromiter((v in REFUSAL_LABELS for v in judge), bool, n),
                                             detector))
        self.cols["confidence"].append(np.array(cols["confidence"], dtype=np.int8))
        self.cols["client"].append(_factorise(cols.get(CLIENT_FIELD) or [None] * n, self.clients, n))
        lp = cols["p_refuse_logprob"]
        self.cols["p_refuse_logprob"].append(np.array([np.nan if v is None else v for v in lp], np.float64)
                                             if None in lp else np.array(lp, np.float64))
        self.models.update(m for m in set(cols["model"]) if m is not None)
        self.templates.update(t for t in set(cols["probe_template"]) if t is not None)

    def _select(self, cols: dict[str, list[Any]], where: _Where) -> tuple[dict[str, list[Any]], _Where]:
        """Drop rows outside ``--since``/``--model`` (not counted as read) and repeated rows (counted)."""
        n = len(where)
        keep = np.ones(n, dtype=bool)
        rid, ts = cols["request_id"], cols["ts"]
        if self.model is not None:
            keep &= np.fromiter((m == self.model for m in cols["model"]), bool, n)
        if self.since is not None:
            keep &= np.fromiter((_after(t, self.since) for t in ts), bool, n)
        for i in np.flatnonzero(keep):
            if rid[i] is None:
                continue
            key = hash((rid[i], ts[i]))
            if key in self.seen:
                keep[i] = False
                self.n_read += 1
                self.skip(DUPLICATE, where[i])
                continue
            self.seen.add(key)
            if self.keys is not None and isinstance(ts[i], str):
                with_tz = _parse_ts(ts[i])
                if with_tz is not None:
                    self.keys.append((str(rid[i]), with_tz))
        if keep.all():
            return cols, where
        idx = np.flatnonzero(keep)
        return {k: [v[i] for i in idx] for k, v in cols.items()}, where.take(idx)

    def add_groups(self, source: str, found: Any) -> None:
        """Expand a database's aggregated counts (``calibration.postgres.PostgresGroups``)."""
        for u in found.unusable:
            n, where = int(u["n"]), f"{source}: row seq={u['first']}"
            self.n_read += n
            if u["dup"]:
                reason = DUPLICATE
            elif u["invalid"] is not None:
                if self.on_error == "raise":
                    raise DatapointError(f"{where}: {u['invalid']} (and {n - 1} more rows like it)")
                reason = u["invalid"]
            else:
                lacking = [k for k, flag in (("will_refuse", "no_wr"), ("confidence", "no_conf"),
                                             ("refused", "no_ref")) if u[flag]]
                reason = "missing " + "+".join(lacking)
                if u["probe_status"] not in (None, "ok", "cached"):
                    reason += f" (probe_status={u['probe_status']})"
            self.skip(reason, where, n)
        self.unknown.update(found.unknown_fields)
        g = found.groups
        if not g:
            return
        counts = np.fromiter((r["n"] for r in g), np.int64, len(g))
        self.n_read += int(counts.sum())

        def col(name: str) -> list[Any]:
            return [r[name] for r in g]

        def rep(values: np.ndarray) -> np.ndarray:
            return np.repeat(values, counts)

        self.cols["prompt"].append(rep(_factorise(col("cluster"), self.ids, len(g))))
        self.cols["topic"].append(rep(_factorise(col("topic"), self.topics, len(g))))
        self.cols["harm_level"].append(rep(_ints(col("harm_level"), -1, np.int16)))
        self.cols["harm_rating"].append(rep(_ints(col("harm_rating"), 0, np.int8)))
        self.cols["will_refuse"].append(rep(np.array(col("will_refuse"), dtype=bool)))
        detector = rep(np.array(col("refused"), dtype=bool))
        judge = col("judge_refused")  # null, or whether the judge's label is a refusal label
        judged = rep(np.fromiter((v is not None for v in judge), bool, len(g)))
        self.cols["judged"].append(judged)
        self.cols["detector_refused"].append(detector)
        self.cols["refused"].append(np.where(judged, rep(np.fromiter((v is True for v in judge), bool, len(g))),
                                             detector))
        self.cols["confidence"].append(rep(np.array(col("confidence"), dtype=np.int8)))
        self.cols["client"].append(rep(_factorise([r.get("client_of") for r in g], self.clients, len(g))))
        self.cols["p_refuse_logprob"].append(rep(np.array([np.nan if v is None else v for v in col("p_refuse_logprob")],
                                                          np.float64)))
        self.models.update(m for m in set(col("model")) if m is not None)
        self.templates.update(t for t in set(col("probe_template")) if t is not None)

    def _check(self, name: str, values: list[Any], where: _Where, bool_as_int: bool) -> np.ndarray:
        """Fast per-column type check; the slow per-row path only runs when something is wrong."""
        n = len(values)
        types = set(map(type, values))
        if name in _BOOL_FIELDS:
            ok_types = {bool, type(None)} | ({int} if bool_as_int else set())
            fine = types <= ok_types and (not bool_as_int or set(values) <= {0, 1, None})
            problem = lambda v: (type(v) not in ok_types or (bool_as_int and v not in (0, 1))) and v is not None  # noqa: E731
            expect = "true/false or null" if not bool_as_int else "0/1 or NULL"
        elif name in _INT_FIELDS:
            fine = types <= {int, type(None)}
            if fine and name in _ONE_TO_FIVE:
                fine = set(values) <= {1, 2, 3, 4, 5, None}
            lo_hi = name in _ONE_TO_FIVE
            problem = lambda v: v is not None and (type(v) is not int or (lo_hi and not 1 <= v <= 5))  # noqa: E731
            expect = "an integer 1-5 or null" if lo_hi else "an integer or null"
        elif name in _FLOAT_FIELDS:
            fine = types <= {int, float, type(None)}
            problem = lambda v: v is not None and type(v) not in (int, float)  # noqa: E731
            expect = "a number or null"
        elif name in _ENUMS:
            allowed = _ENUMS[name]
            fine = types <= {str, type(None)} and set(values) - {None} <= allowed
            problem = lambda v: v is not None and v not in allowed  # noqa: E731
            expect = f"one of {sorted(allowed)} or null"
        else:  # text fields
            fine = types <= {str, type(None)}
            problem = lambda v: v is not None and type(v) is not str  # noqa: E731
            expect = "a string or null"
        bad = np.zeros(n, dtype=bool)
        if fine:
            return bad
        for i, v in enumerate(values):
            if problem(v):
                msg = f"{where[i]}: field {name!r} has {v!r}, expected {expect}"
                if self.on_error == "raise":
                    raise DatapointError(msg)
                self.skip(f"invalid {name}", where[i])
                bad[i] = True
        return bad

    def build(self) -> DatapointTable:
        def cat(name: str, dtype: Any) -> np.ndarray:
            parts = self.cols[name]
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        return DatapointTable(
            prompt=cat("prompt", np.int32), prompt_ids=tuple(self.ids), topic=cat("topic", np.int32),
            topics=tuple(self.topics), harm_level=cat("harm_level", np.int16),
            will_refuse=cat("will_refuse", bool), confidence=cat("confidence", np.int8),
            harm_rating=cat("harm_rating", np.int8), refused=cat("refused", bool),
            p_refuse_logprob=lp if np.isfinite(lp := cat("p_refuse_logprob", np.float64)).any() else None,
            models=tuple(sorted(self.models)), probe_templates=tuple(sorted(self.templates)),
            skipped=dict(self.skipped), skipped_examples=dict(self.examples),
            unknown_fields=tuple(sorted(self.unknown)), n_read=self.n_read,
            judged=cat("judged", bool), detector_refused=cat("detector_refused", bool),
            client=cl if ((cl := cat("client", np.int32)) >= 0).any() else None, clients=tuple(self.clients),
        )


def _factorise(values: list[Any], mapping: dict[str, int], n: int) -> np.ndarray:
    """Integer codes of ``values`` in first-seen order, extending ``mapping``; None -> -1.

    Loops in Python only over the distinct values; the per-row work is C-level ``map``.
    """
    for v in dict.fromkeys(values):
        if v is not None and v not in mapping:
            mapping[v] = len(mapping)
    lookup = {None: -1, **mapping} if None in values else mapping
    return np.fromiter(map(lookup.__getitem__, values), np.int32, n)


def _ints(values: list[Any], missing: int, dtype: Any) -> np.ndarray:
    if None in values:
        return np.array([missing if v is None else v for v in values], dtype=dtype)
    return np.array(values, dtype=dtype)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str | float) -> float:
    """Seconds in ``"90s"``, ``"15m"``, ``"12h"``, ``"7d"``, ``"2w"`` or a bare number of seconds."""
    value = str(text).strip().lower()
    number, unit = (value[:-1], value[-1]) if value[-1:] in _UNITS else (value, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 12h, 7d or 2w") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"duration {text!r} must be positive")
    return seconds


def _parse_ts(value: str) -> datetime | None:
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=timezone.utc)


def _after(value: Any, since: datetime) -> bool:
    ts = _parse_ts(value) if isinstance(value, str) else None
    return ts is not None and ts >= since


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(16) == _SQLITE_MAGIC


def _read_jsonl(path: Path, b: _Builder) -> None:
    known = set(FIELDS) | set(OPTIONAL_FIELDS)
    with open(path, "rb") as fh:
        lineno = 0
        while True:
            raw = fh.readlines(_CHUNK * 600)
            if not raw:
                break
            first = lineno + 1
            lineno += len(raw)
            keep = [i for i, line in enumerate(raw) if not line.isspace()]
            if len(keep) == len(raw):
                lines, where = raw, _Where(f"{path}:{{}}", range(first, first + len(raw)))
            else:
                lines = [raw[i] for i in keep]
                where = _Where(f"{path}:{{}}", [first + i for i in keep])
            if not lines:
                continue
            try:
                recs = json.loads(b"[" + b",".join(lines) + b"]")
            except (json.JSONDecodeError, UnicodeDecodeError):
                recs = _parse_lines(lines, where, b)
            else:
                for i, r in enumerate(recs):
                    if type(r) is not dict:
                        recs = _parse_lines(lines, where, b)
                        break
            if any(r is None for r in recs):  # rows _parse_lines skipped (on_error="skip")
                where = where.take([i for i, r in enumerate(recs) if r is not None])
                recs = [r for r in recs if r is not None]
                if not recs:
                    continue
            keys: set[str] = set().union(*recs)
            b.unknown.update(keys - known)
            names = list(_USED) + sorted(_CHECKED & keys)
            if set(map(len, recs)) == {len(keys)} and set(names) <= keys:
                # every record has the same keys: pull all columns in one C-level pass
                cols = dict(zip(names, map(list, zip(*map(itemgetter(*names), recs)))))
            else:
                cols = {name: [r.get(name) for r in recs] for name in names}
            b.add_chunk(cols, where, bool_as_int=False)


def _parse_lines(lines: list[bytes], where: _Where, b: _Builder) -> list[Any]:
    """Slow path: parse line by line to name the malformed one."""
    out: list[Any] = []
    for j, line in enumerate(lines):
        w = where[j]
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            msg = f"{w}: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})"
            if b.on_error == "raise":
                raise DatapointError(msg) from None
            b.skip("malformed JSON", w)
            b.n_read += 1
            out.append(None)
            continue
        if not isinstance(rec, dict):
            if b.on_error == "raise":
                raise DatapointError(f"{w}: expected a JSON object, got {type(rec).__name__}")
            b.skip("not a JSON object", w)
            b.n_read += 1
            out.append(None)
            continue
        out.append(rec)
    return out


def _read_sqlite(path: Path, b: _Builder) -> None:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise DatapointError(f"{path}: cannot open SQLite database: {exc}") from None
    try:
        try:
            present = [r[1] for r in con.execute("PRAGMA table_info(datapoints)")]
        except sqlite3.DatabaseError as exc:
            raise DatapointError(f"{path}: not a readable SQLite database: {exc}") from None
        if not present:
            raise DatapointError(f"{path}: SQLite file has no 'datapoints' table")
        missing_req = [c for c in ("will_refuse", "confidence", "refused") if c not in present]
        if missing_req:
            raise DatapointError(f"{path}: table 'datapoints' lacks column(s) {missing_req}")
        b.unknown.update(set(present) - set(FIELDS) - set(OPTIONAL_FIELDS) - {"seq"})
        wanted = list(_USED) + ["label", "action", JUDGE_FIELD, CLIENT_FIELD]
        select = ", ".join(c if c in present else "NULL" for c in wanted)
        seq = "seq" if "seq" in present else "rowid"
        cur = con.execute(f"SELECT {seq}, {select} FROM datapoints ORDER BY {seq}")
        while True:
            rows = cur.fetchmany(_CHUNK)
            if not rows:
                break
            cols_t = list(zip(*rows))
            where = _Where(f"{path}: row seq={{}}", cols_t[0])
            cols = {name: list(col) for name, col in zip(wanted, cols_t[1:])}
            b.add_chunk(cols, where, bool_as_int=True)
    finally:
        con.close()


def expand_sources(sources: Iterable[Path | str]) -> tuple[list[Path], list[str]]:
    """Files (globs expanded, each file once) and PostgreSQL URLs (each once), in the order given."""
    from calibration.postgres import is_postgres_url

    files: dict[Path, None] = {}
    urls: dict[str, None] = {}
    for source in sources:
        text = str(source)
        if is_postgres_url(text):
            urls[text] = None
        elif isinstance(source, str) and glob.has_magic(text):
            # SQLite's side files (WAL, shared memory, journal) sit beside a log: never datapoints
            matches = sorted(m for m in glob.glob(text, recursive=True) if not m.endswith(_SQLITE_SIDE_FILES))
            if not matches:
                raise DatapointError(f"{text}: no file matches")
            files.update((Path(m).resolve(), None) for m in matches)
        else:
            path = Path(source)
            if not path.is_file():
                raise DatapointError(f"{path}: no such file")
            files[path.resolve()] = None
    return list(files), list(urls)


def read_datapoints(sources: Iterable[Path | str], *, on_error: Literal["raise", "skip"] = "raise",
                    since: datetime | None = None, model: str | None = None) -> DatapointTable:
    """Read JSONL files, the proxy's SQLite logs and PostgreSQL databases into one :class:`DatapointTable`.

    ``sources`` holds paths, globs (strings with ``*?[``) and ``postgresql://`` URLs; files are
    read before databases. SQLite is detected by its magic header (whatever the extension);
    any other file is read as JSONL (blank lines ignored). Only ``will_refuse``, ``confidence``
    and ``refused`` are required for a row to be usable; rows lacking any of them are counted in
    ``skipped`` by reason, and so are repeated rows (see the module docstring). Invalid rows
    (malformed JSON, wrong types, unknown labels, confidence outside 1-5) raise
    :class:`DatapointError` naming the row, or with ``on_error="skip"`` are counted as skipped.
    ``since`` keeps rows whose ``ts`` is at or after it, ``model`` rows of that model; rows left
    out by them are not counted as read. The prompt id is ``id``, else ``prompt_sha256``, else
    unique to the row.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError("on_error must be 'raise' or 'skip'")
    files, urls = expand_sources(sources)
    b = _Builder(on_error, since=since, model=model, keep_keys=bool(urls))
    # Millions of short-lived dicts/tuples would trigger the cyclic GC over and over (it scans
    # every live container); they hold no cycles, so pause it while parsing.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for path in files:
            if _is_sqlite(path):
                _read_sqlite(path, b)
            else:
                _read_jsonl(path, b)
    finally:
        if gc_was_enabled:
            gc.enable()
    for url in urls:
        _read_postgres(url, b)
    return b.build()


def _read_postgres(url: str, b: _Builder) -> None:
    from calibration.postgres import read_postgres_groups, redact_url, scrub

    shown = redact_url(url)
    try:
        found = read_postgres_groups(url, since=b.since, model=b.model, exclude=b.keys)
    except ImportError:
        raise DatapointError(f"{shown}: reading PostgreSQL needs asyncpg (pip install 'refusal-guard[postgres]')") from None
    except LookupError as exc:
        raise DatapointError(f"{shown}: {exc}") from None
    except Exception as exc:  # asyncpg's and the socket's errors: connection refused, auth, ...
        raise DatapointError(f"{shown}: cannot read datapoints: {type(exc).__name__}: {scrub(str(exc), url)}") from None
    b.add_groups(shown, found)
