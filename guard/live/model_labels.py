"""The bounded value set of the ``model`` label of one process's request and outcome counters.

A gateway in front of several models wants per-model figures, but the model string comes from
the client, so it cannot become a label value unchecked. :class:`ModelLabels` keeps the set
bounded: the configured models (``metric_models``) always get their own label; besides them at
most ``metric_models_seen`` further models, the first ones seen that the upstream answered
without error (so that made-up names, which the upstream refuses, take no slot); every other
request, and one without a model, is counted as ``other``. Values are the sanitised model
string (:func:`guard.stores.recorder.clean_model`), as in the datapoint log.

Exact fleet counts: Prometheus' ``increase()`` misses the first value of a series that appears
non-zero. Configured models and ``other`` are created at zero at start; a model admitted from
traffic gets its series created at zero and stays *pending* (counted as ``other``) until this
process has answered a scrape of ``/metrics`` (:meth:`scraped`), so every series is scraped at
zero before it counts anything. The state is per process (each uvicorn worker admits its own
first models; configured ones are the same everywhere).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from guard.stores.recorder import clean_model

OTHER = "other"


class ModelLabels:
    def __init__(self, configured: Iterable[str], seen_limit: int, create: Callable[[str], None]) -> None:
        """``create(label)`` makes a label's counter series at zero (``GuardMetrics.initialise_model``)."""
        self.configured = tuple(dict.fromkeys(m for m in (clean_model(c) for c in configured) if m and m != OTHER))
        self.seen_limit = seen_limit
        self._create = create
        self._admitted: set[str] = set(self.configured)
        self._pending: set[str] = set()
        self._seen = 0
        for label in (*self.configured, OTHER):
            create(label)

    def label(self, model: str | None, served: bool) -> str:
        """The label for a request to ``model`` (already sanitised); ``served``: the upstream answered it."""
        if model is None:
            return OTHER
        if model in self._admitted:
            return model
        if served and model not in self._pending and model != OTHER and self._seen < self.seen_limit:
            self._seen += 1
            self._create(model)
            self._pending.add(model)
        return OTHER

    def scraped(self) -> None:
        """This process answered a scrape: its pending models' zero series are in Prometheus now."""
        self._admitted |= self._pending
        self._pending.clear()
