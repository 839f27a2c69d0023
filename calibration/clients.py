"""Who supplied the datapoints: rows per client, dominated cells, and excluding or capping clients.

A datapoint's ``client`` (``calibration.datapoints.CLIENT_FIELD``) is the name of the inbound key the
request came with, or a keyed hash of its credential; rows without one form one group,
:data:`~calibration.datapoints.NO_CLIENT`. Calibration trusts its rows, so one client that sends
thousands of requests of one kind can move a policy for everyone: 6,000 benign requests that the probe
predicts to comply with at confidence 3 make confidence-3 predicted compliance look certain, and the
recalibrated policy passes it where it used to route it to review (``benchmarks/client_poisoning.py``).

* :func:`client_report` counts rows per client and finds the **cells** (topic x prediction x
  confidence, the probe's own cells) where one client supplies more than :data:`DOMINANT_SHARE` of
  the rows; ``calibrate`` prints both and warns.
* :func:`exclude_clients` drops every row of the given clients (``--exclude-client``).
* :func:`cap_client_share` (``--max-client-share F``) **drops** rows, deterministically, so that no
  client supplies more than ``F`` of any cell: one common per-client cap ``K`` per cell, the largest
  with ``K <= F x`` (the cell's rows kept), keeps ``min(n_c, K)`` rows of each client ``c``, spread
  evenly over its rows ordered by content (the prompt's keyed hash first, then the outcome): never at
  random, and independent of read order, so a database (whose reader aggregates) and its export keep
  the same rows, and of time, so an attacker cannot choose which of its rows survive by when it sends
  them. Dropping, not
  down-weighting: every downstream statistic (bootstrap, design effects, certification) counts rows,
  and a dropped row is plainly accounted for (``calibrate`` prints how many per client). Rows without
  a client are one group and capped like a client: rows that cannot be attributed cannot be trusted
  more. A cell only one client ever filled keeps nothing under a cap (that client supplies all of
  it): the cap is for deployments with several clients; the report shows where it bites.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from calibration.datapoints import NO_CLIENT, DatapointTable

__all__ = ["DOMINANT_SHARE", "MIN_WARN_ROWS", "ClientReport", "client_report", "exclude_clients",
           "cap_client_share", "apply_client_limits"]

#: A cell where one client supplies more than this share of the rows is reported as dominated.
DOMINANT_SHARE = 0.5
#: Cells smaller than this are not warned about (every small cell is "dominated" by someone).
MIN_WARN_ROWS = 30


@dataclass(frozen=True)
class DominatedCell:
    topic: str
    will_refuse: bool
    confidence: int
    n: int
    client: str
    share: float

    def describe(self) -> str:
        return (f"{self.topic} x {'refuse' if self.will_refuse else 'comply'} x confidence {self.confidence}: "
                f"client {self.client} supplies {self.share:.0%} of {self.n} rows")


@dataclass(frozen=True)
class ClientReport:
    n: int
    rows: list[tuple[str, int]]                 # (client, rows), most rows first
    dominated: list[DominatedCell] = field(default_factory=list)   # largest first
    attributed: int = 0                         # rows with a client

    def lines(self, top: int = 10) -> list[str]:
        if not self.n:
            return []
        out = [f"{len(self.rows)} client(s); {self.attributed} of {self.n} rows attributed"]
        for name, k in self.rows[:top]:
            out.append(f"  {name:<24} {k:>9} rows  {k / self.n:6.1%}")
        if len(self.rows) > top:
            rest = sum(k for _, k in self.rows[top:])
            out.append(f"  ({len(self.rows) - top} more clients) {rest:>9} rows  {rest / self.n:6.1%}")
        return out

    def warnings(self, top: int = 10) -> list[str]:
        if len(self.rows) < 2:
            return []  # one client supplies everything: shares say nothing
        out = [f"one client supplies most of the cell {c.describe()}" for c in self.dominated[:top]]
        if len(self.dominated) > top:
            out.append(f"... and {len(self.dominated) - top} more dominated cell(s)")
        return out


def _cells(table: DatapointTable) -> np.ndarray:
    """Each row's probe cell (topic x prediction x confidence) as one int code."""
    return ((table.topic.astype(np.int64) + 1) * 2 + table.will_refuse) * 5 + (table.confidence.astype(np.int64) - 1)


def _cell_name(table: DatapointTable, code: int) -> tuple[str, bool, int]:
    rest, conf = divmod(int(code), 5)
    topic, wr = divmod(rest, 2)
    return (table.topics[topic - 1] if topic > 0 else "(no topic)", bool(wr), conf + 1)


def client_report(table: DatapointTable, dominant: float = DOMINANT_SHARE,
                  min_rows: int = MIN_WARN_ROWS) -> ClientReport:
    """Rows per client and the cells (with at least ``min_rows`` rows) one client supplies more than
    ``dominant`` of."""
    client = table.client_codes().astype(np.int64)
    codes, counts = np.unique(client, return_counts=True)
    order = np.lexsort((codes, -counts))
    rows = [(table.client_name(int(codes[i])), int(counts[i])) for i in order]
    cells = _cells(table)
    dominated = []
    if table.n:
        pair = cells * (len(table.clients) + 1) + (client + 1)
        pairs, pair_n = np.unique(pair, return_counts=True)
        cell_of, client_of = np.divmod(pairs, len(table.clients) + 1)
        cell_codes, cell_n = np.unique(cells, return_counts=True)
        total = dict(zip(cell_codes.tolist(), cell_n.tolist()))
        for c, who, k in zip(cell_of.tolist(), client_of.tolist(), pair_n.tolist()):
            n = total[c]
            if n >= min_rows and k / n > dominant:
                topic, wr, conf = _cell_name(table, c)
                dominated.append(DominatedCell(topic, wr, conf, n, table.client_name(who - 1), k / n))
    dominated.sort(key=lambda d: (-d.n, d.topic, d.will_refuse, d.confidence))
    return ClientReport(table.n, rows, dominated, int((client >= 0).sum()))


def _codes_of(table: DatapointTable, names: Iterable[str]) -> set[int]:
    index = {name: i for i, name in enumerate(table.clients)}
    return {index.get(name, -2) if name != NO_CLIENT else -1 for name in names} - {-2}


def exclude_clients(table: DatapointTable, names: Iterable[str]) -> tuple[DatapointTable, dict[str, int]]:
    """``table`` without the rows of the clients ``names`` (:data:`NO_CLIENT` names rows without a
    client); also the rows dropped per client (0 for a name no row has)."""
    names = list(dict.fromkeys(names))
    client = table.client_codes()
    codes = _codes_of(table, names)
    drop = np.isin(client, list(codes)) if codes else np.zeros(table.n, dtype=bool)
    dropped = {name: 0 for name in names}
    for code, k in zip(*np.unique(client[drop], return_counts=True)):
        dropped[table.client_name(int(code))] = int(k)
    return table.subset(~drop), dropped


def _common_cap(counts: np.ndarray, share: float) -> int:
    """The largest K with K <= share x sum(min(counts, K)): each client keeps at most K rows."""
    k = int(counts.max())
    while True:
        allowed = int(np.floor(share * np.minimum(counts, k).sum() + 1e-9))
        if allowed >= k:
            return k
        k = allowed  # decreasing and bounded below by 0: the greatest fixed point below the start


def _content(table: DatapointTable) -> list[np.ndarray]:
    """Sort keys of each row's content, most significant first: the prompt id's rank by name, then what
    else a row holds (so equal keys mean equal rows, whatever order they were read in)."""
    names = np.array(table.prompt_ids, dtype=object)
    rank = np.empty(len(names), np.int64)
    rank[np.argsort(names, kind="stable")] = np.arange(len(names))
    keys = [rank[table.prompt], table.refused.astype(np.int64), table.harm_level.astype(np.int64),
            table.harm_rating.astype(np.int64)]
    if table.p_refuse_logprob is not None:
        keys.append(np.nan_to_num(table.p_refuse_logprob, nan=-1.0))
    if table.judged is not None:
        keys.append(table.judged.astype(np.int64))
    if table.detector_refused is not None:
        keys.append(table.detector_refused.astype(np.int64))
    return keys


def cap_client_share(table: DatapointTable, share: float) -> tuple[DatapointTable, dict[str, int]]:
    """Drop rows so that no client supplies more than ``share`` of any cell (see the module
    docstring); also the rows dropped per client (only clients that lost rows)."""
    if not 0.0 < share <= 1.0:
        raise ValueError("the maximum client share must be in (0, 1]")
    keep = np.ones(table.n, dtype=bool)
    if share >= 1.0 or table.n == 0:
        return table, {}
    client = table.client_codes().astype(np.int64)
    cells = _cells(table)
    order = np.lexsort((*_content(table)[::-1], client, cells))  # by cell, client, then content
    sorted_cells, sorted_clients = cells[order], client[order]
    bounds = np.flatnonzero(np.diff(sorted_cells)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, table.n]):
        who = sorted_clients[lo:hi]
        starts = np.r_[0, np.flatnonzero(np.diff(who)) + 1]
        counts = np.diff(np.r_[starts, hi - lo])
        k = _common_cap(counts, share)
        for start, n in zip(starts.tolist(), counts.tolist()):
            if n > k:
                rows = order[lo + start:lo + start + n]
                kept = (np.arange(k) * n) // k if k else np.zeros(0, np.int64)  # evenly spread
                mask = np.zeros(n, dtype=bool)
                mask[kept] = True
                keep[rows[~mask]] = False
    dropped: dict[str, int] = {}
    for code, k in zip(*np.unique(client[~keep], return_counts=True)):
        dropped[table.client_name(int(code))] = int(k)
    return table.subset(keep), dropped


def apply_client_limits(table: DatapointTable, exclude: Iterable[str] = (),
                        max_share: float | None = None) -> tuple[DatapointTable, list[str]]:
    """``--exclude-client`` then ``--max-client-share`` on ``table``; returns the table calibrate
    fits and one note per step saying how many rows went, per client."""
    notes: list[str] = []
    exclude = list(exclude)
    if exclude:
        table, dropped = exclude_clients(table, exclude)
        notes.append("excluded clients: " + ", ".join(f"{name} ({k} rows)" for name, k in dropped.items()))
    if max_share is not None:
        before = table.n
        table, dropped = cap_client_share(table, max_share)
        worst = sorted(dropped.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{name} {k}" for name, k in worst[:10]) + (", ..." if len(worst) > 10 else "")
        notes.append(f"max client share {max_share:g} per cell: dropped {before - table.n} of {before} rows"
                     + (f" ({shown})" if worst else ""))
    return table, notes
