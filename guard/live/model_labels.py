"""The bounded value set of the ``model`` label of one process's request and outcome counters.

A gateway in front of several models wants per-model figures, but the model string comes from
the client, so it cannot become a label value unchecked. :class:`ModelLabels` keeps the set
bounded: the configured models (``metric_models``) always get their own label; besides them at
most ``metric_models_seen`` further models, the first ones seen **that the upstream lists** in
``GET /models`` (:meth:`ModelLabels.listed`: the app passes the listing in, fetched with the
guard's own credentials by the upstream health check, at start and every ``upstream_check_interval``,
and, at most every ``refresh_every`` seconds, when a request names a model the listing lacks). Neither an answer to a
request nor its echo of the model name admits a model: an upstream that answers any name (a
gateway with a wildcard route, a server that ignores ``model``) would otherwise hand every slot to
junk names. Every other request, and one without a model, is counted as ``other``. Values are
the sanitised model string (:func:`guard.stores.recorder.clean_model`), as in the datapoint log.

Exact fleet counts: Prometheus' ``increase()`` misses the first value of a series that appears
non-zero. Configured models and ``other`` are created at zero at start; a model admitted from
traffic gets its series created at zero and stays *pending* (counted as ``other``) until this
process has answered a scrape of ``/metrics`` (:meth:`scraped`), so every series is scraped at
zero before it counts anything. The state is per process (each uvicorn worker admits its own
first models; configured ones are the same everywhere).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from guard.stores.recorder import clean_model

OTHER = "other"
#: Model names kept from one listing (a listing is the upstream's, but need not be small).
MAX_LISTED = 10_000


class ModelLabels:
    def __init__(self, configured: Iterable[str], seen_limit: int, create: Callable[[str], None], *,
                 refresh_every: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        """``create(label)`` makes a label's counter series at zero (``GuardMetrics.initialise_model``).
        ``refresh`` (set by the app) asks for a fresh listing; a miss calls it at most every ``refresh_every`` s."""
        self.configured = tuple(dict.fromkeys(m for m in (clean_model(c) for c in configured) if m and m != OTHER))
        self.seen_limit = seen_limit
        self.refresh: Callable[[], None] | None = None
        self.refresh_every = refresh_every
        self._clock = clock
        self._next_refresh = float("-inf")
        self._create = create
        self._listed: frozenset[str] = frozenset()
        self._admitted: set[str] = set(self.configured)
        self._pending: set[str] = set()
        self._seen = 0
        for label in (*self.configured, OTHER):
            create(label)

    def listed(self, models: Iterable[str]) -> None:
        """The models the upstream lists now (raw ids from ``GET /models``); replaces the last listing."""
        names = (clean_model(m) for m in models if isinstance(m, str))
        self._listed = frozenset(m for _, m in zip(range(MAX_LISTED), names) if m)

    def label(self, model: str | None) -> str:
        """The label for a request to ``model`` (already sanitised)."""
        if model is None:
            return OTHER
        if model in self._admitted:
            return model
        if model in self._pending or model == OTHER or self._seen >= self.seen_limit:
            return OTHER
        if model in self._listed:
            self._seen += 1
            self._create(model)
            self._pending.add(model)
        elif self.refresh is not None and self._clock() >= self._next_refresh:
            self._next_refresh = self._clock() + self.refresh_every  # junk names cost one listing a period
            self.refresh()
        return OTHER

    def scraped(self) -> None:
        """This process answered a scrape: its pending models' zero series are in Prometheus now."""
        self._admitted |= self._pending
        self._pending.clear()
