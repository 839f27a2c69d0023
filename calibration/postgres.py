"""Datapoints in PostgreSQL: the table the proxy's sink writes, and an aggregating reader.

The table holds :data:`calibration.datapoints.FIELDS` (plus ``OPTIONAL_FIELDS``) with native types
(``ts`` is ``timestamptz``), a ``seq`` in write order, and a BRIN index on ``ts`` for time
filters and age pruning. :func:`postgres_ddl` creates or migrates it (new columns are added,
nothing is dropped).

:func:`read_postgres_groups` never moves rows into Python: the database returns one row per
(prompt cluster, topic, harm level, harm rating, prediction, confidence, outcome, model,
probe template, ``p_refuse_logprob``, judge's verdict) with its count and the first ``seq`` it was
seen at, plus one row per reason a row is unusable. The logprob is continuous, so where probes return
it nearly every row is its own group: the aggregation then saves little, but calibration sees the
same values as from a file export (the continuous score uses them). The judge's verdict
(``judge_refused``) is null where the row has no ``judge_label``, else whether that label is a refusal
label: the row's ground truth, as in the file readers. It splits a group in three at most. The
group key holds the row's ``client`` too (``client_of``: null where the table has no such column,
one written before it existed), so calibrate can report, cap and exclude clients as from a file.
``calibration.datapoints`` expands these counts into the columnar table calibration consumes, in the
same first-seen order the file readers produce.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from calibration.datapoints import ACTIONS, CLIENT_FIELD, FIELDS, JUDGE_FIELD, LABELS, OPTIONAL_FIELDS, PROBE_STATUSES, REFUSAL_LABELS
from calibration.datapoints import _BOOL_FIELDS as BOOL_FIELDS
from calibration.datapoints import _FLOAT_FIELDS as FLOAT_FIELDS
from calibration.datapoints import _INT_FIELDS as INT_FIELDS

__all__ = ["POSTGRES_SCHEMES", "is_postgres_url", "postgres_ddl", "PostgresGroups", "read_postgres_groups",
           "redact_url", "scrub"]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
#: Serialises schema changes when several replicas start at once.
SCHEMA_LOCK_KEY = 0x7267_6470  # "rgdp"


def is_postgres_url(value: str) -> bool:
    return value.startswith(POSTGRES_SCHEMES)


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def scrub(text: str, url: str) -> str:
    """``text`` (say, a driver's error message) with the URL's password replaced by ``***``."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    text = text.replace(url, redact_url(url))
    return text.replace(password, "***") if password else text


def _pg_type(name: str) -> str:
    if name == "ts":
        return "timestamptz"
    if name in BOOL_FIELDS:
        return "boolean"
    if name in INT_FIELDS:
        return "smallint"
    if name in FLOAT_FIELDS:
        return "double precision"
    return "text"


def postgres_ddl() -> list[str]:
    """Statements that create or migrate the ``datapoints`` table (idempotent)."""
    cols = FIELDS + OPTIONAL_FIELDS
    return [
        "CREATE TABLE IF NOT EXISTS datapoints (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
        + ", ".join(f"{c} {_pg_type(c)}" for c in cols) + ")",
        *(f"ALTER TABLE datapoints ADD COLUMN IF NOT EXISTS {c} {_pg_type(c)}" for c in cols),
        "CREATE INDEX IF NOT EXISTS datapoints_ts_brin ON datapoints USING brin (ts)",
        # One row per written batch, in the batch's own transaction: a batch retried after a
        # connection loss whose commit did go through is recognised and not written twice.
        "CREATE TABLE IF NOT EXISTS datapoint_batches (batch_id uuid PRIMARY KEY, "
        "written_at timestamptz NOT NULL DEFAULT now())",
    ]


def _in(values: frozenset[str]) -> str:
    return ", ".join("'" + v + "'" for v in sorted(values))


# Why a row cannot be used, the same reasons (and precedence) as the file readers.
_INVALID = f"""CASE
    WHEN confidence IS NOT NULL AND confidence NOT BETWEEN 1 AND 5 THEN 'invalid confidence'
    WHEN harm_rating IS NOT NULL AND harm_rating NOT BETWEEN 1 AND 5 THEN 'invalid harm_rating'
    WHEN probe_status IS NOT NULL AND probe_status NOT IN ({_in(PROBE_STATUSES)}) THEN 'invalid probe_status'
    WHEN label IS NOT NULL AND label NOT IN ({_in(LABELS)}) THEN 'invalid label'
    WHEN action IS NOT NULL AND action NOT IN ({_in(ACTIONS)}) THEN 'invalid action'
    WHEN {{judge}} IS NOT NULL AND {{judge}} NOT IN ({_in(LABELS)}) THEN 'invalid judge_label'
END"""

_SOURCE = f"""
    SELECT d.*, coalesce(d.id, d.prompt_sha256, 'row:' || d.seq) AS cluster, {_INVALID} AS invalid,
           {{dup}} AS dup, {{judge}} IN ({_in(REFUSAL_LABELS)}) AS judge_refused, {{client}} AS client_of
    FROM datapoints d
    WHERE ($1::timestamptz IS NULL OR d.ts >= $1) AND ($2::text IS NULL OR d.model = $2)
"""
_GROUPS = """
    SELECT cluster, topic, harm_level, harm_rating, will_refuse, confidence, refused, model, probe_template,
           p_refuse_logprob, judge_refused, client_of,
           count(*) AS n, min(seq) AS first
    FROM src
    WHERE NOT dup AND invalid IS NULL AND will_refuse IS NOT NULL AND confidence IS NOT NULL AND refused IS NOT NULL
    GROUP BY cluster, topic, harm_level, harm_rating, will_refuse, confidence, refused, model, probe_template,
             p_refuse_logprob, judge_refused, client_of
    ORDER BY first
"""
_UNUSABLE = """
    SELECT dup, invalid, will_refuse IS NULL AS no_wr, confidence IS NULL AS no_conf, refused IS NULL AS no_ref,
           probe_status, count(*) AS n, min(seq) AS first
    FROM src
    WHERE dup OR invalid IS NOT NULL OR will_refuse IS NULL OR confidence IS NULL OR refused IS NULL
    GROUP BY 1, 2, 3, 4, 5, 6
    ORDER BY first
"""


@dataclass(frozen=True)
class PostgresGroups:
    """What the database returned: usable groups (with counts) and unusable counts by reason."""

    groups: list[dict[str, Any]]
    unusable: list[dict[str, Any]]
    unknown_fields: tuple[str, ...]


async def _read(url: str, since: datetime | None, model: str | None,
                exclude: list[tuple[str, datetime]]) -> PostgresGroups:
    import asyncpg

    con = await asyncpg.connect(url, timeout=10)
    try:
        present = [r["column_name"] for r in await con.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'datapoints' "
            "AND table_schema = current_schema()")]
        if not present:
            raise LookupError("no 'datapoints' table")
        missing = sorted(set(FIELDS) - set(present))  # an optional column the table lacks is null (judge_label below)
        judge = f"d.{JUDGE_FIELD}" if JUDGE_FIELD in present else "NULL::text"
        client = f"d.{CLIENT_FIELD}" if CLIENT_FIELD in present else "NULL::text"
        if missing:
            raise LookupError(f"table 'datapoints' lacks column(s) {missing}")
        async with con.transaction(readonly=not exclude, isolation="repeatable_read"):
            dup = "false"
            if exclude:
                await con.execute("CREATE TEMP TABLE seen (request_id text, ts timestamptz) ON COMMIT DROP")
                await con.copy_records_to_table("seen", records=exclude)
                await con.execute("ANALYZE seen")
                dup = "EXISTS (SELECT 1 FROM seen s WHERE s.request_id = d.request_id AND s.ts = d.ts)"
            with_src = "WITH src AS (" + _SOURCE.format(dup=dup, judge=judge, client=client) + ")"
            groups = [dict(r) for r in await con.fetch(with_src + _GROUPS, since, model)]
            unusable = [dict(r) for r in await con.fetch(with_src + _UNUSABLE, since, model)]
    finally:
        await con.close()
    unknown = tuple(sorted(set(present) - set(FIELDS) - set(OPTIONAL_FIELDS) - {"seq"}))
    return PostgresGroups(groups, unusable, unknown)


def read_postgres_groups(url: str, *, since: datetime | None = None, model: str | None = None,
                         exclude: list[tuple[str, datetime]] | None = None) -> PostgresGroups:
    """Aggregate the ``datapoints`` table at ``url`` in the database (see the module docstring).

    ``since`` and ``model`` filter rows; ``exclude`` holds ``(request_id, ts)`` keys already read
    from other sources: matching rows are counted as duplicates, not used twice.
    """
    return asyncio.run(_read(url, since, model, list(exclude or ())))
