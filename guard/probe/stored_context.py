"""Context stored upstream that the probe must see: a Responses request's ``previous_response_id``.

A request that names ``previous_response_id`` is answered as the continuation of that stored
response: its input items (which, chained, hold the earlier turns too) are part of what the model
reads. The guard fetches them from the upstream, ``GET /responses/{id}/input_items`` (newest first,
pages of 100, at most :data:`MAX_PAGES` pages), with the client's own forwarded headers (so its own
credentials: it sees only what the client may see) and query string, within :data:`BUDGET_SHARE` of
the probe's budget; the probe's view shows the items in place of the placeholder the API put where
they belong (``GuardedRequest.stored_index``). Fetched items are cached for ``ttl`` seconds under the
upstream, the id, the query string and a hash of the credential headers (``CREDENTIAL_HEADERS``), so
one client's fetch never serves another's.

Where the fetch fails (a 404 or any other status, a timeout, an answer that is not an item list, an id
that cannot go into a path) the placeholder stays: an unknown part of the view, marked, skipped or
failing the probe per ``probe_unknown_parts``. Items beyond :data:`MAX_PAGES` pages (the oldest) are
one more unknown part. The stored response's own output (the model's previous answer) is fetched too,
``GET /responses/{id}`` (its ``output`` items follow the input items); where that fails it is one more
unknown part. Out of reach: a ``conversation`` (never fetched: an unknown part) and a stored ``prompt``
template.

:func:`request_view` is the prober's entry point: the stored items spliced in, then the view, built
in a worker thread when the request (or what was fetched) is larger than ``OFF_LOOP_BYTES``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from cachetools import TTLCache

from guard.probe.context import OFF_LOOP_BYTES, ProbeView
from guard.probe.credentials import credential_digest

if TYPE_CHECKING:
    from guard.apis.base import GuardedRequest
    from guard.probe.prober import Prober
    from guard.proxy.upstream import Upstream

#: Pages of input items fetched at most (100 items each, newest first).
MAX_PAGES = 10
PAGE_ITEMS = 100
#: The share of ``probe_timeout`` the whole fetch may take (the probe itself gets its full budget after).
BUDGET_SHARE = 0.5
#: The unknown part that stands for stored items the guard did not fetch (older than MAX_PAGES pages).
NOT_FETCHED = "stored_items_not_fetched"
_DROPPED = frozenset({"content-type", "content-length", "transfer-encoding"})


@dataclass(frozen=True, slots=True)
class Fetched:
    """What was fetched of a stored response: its input items (oldest first), whether older ones were
    left out, and its output items (None: not fetched)."""

    items: list[Any]
    older_missing: bool
    output: list[Any] | None


class StoredContext:
    """Fetches (and briefly caches) the input items of stored responses, per client credentials."""

    def __init__(self, upstream: Upstream, *, timeout: float, cache_size: int = 1024, ttl: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.upstream = upstream
        self.timeout = timeout
        self._cache: TTLCache[str, Fetched] = TTLCache(maxsize=cache_size, ttl=ttl, timer=clock)
        self.fetches = 0  # upstream calls made (for tests and the benchmark)

    async def items(self, response_id: str, headers: Mapping[str, Any], query: bytes) -> Fetched | None:
        """The stored input items of ``response_id``, oldest first, and its output; None if the input items
        cannot be had (the caller keeps the placeholder: unknown context)."""
        key = _cache_key(self.upstream.base_url, response_id, headers, query)
        if (cached := self._cache.get(key)) is not None:
            return cached
        try:
            async with asyncio.timeout(self.timeout):
                fetched = await self._fetch(response_id, headers, query)
        except TimeoutError:
            return None
        if fetched is not None:
            self._cache[key] = fetched
        return fetched

    async def _fetch(self, response_id: str, headers: Mapping[str, Any], query: bytes) -> Fetched | None:
        sent = {k: v for k, v in headers.items() if k.lower() not in _DROPPED}
        sent["x-refusal-guard-probe"] = "1"  # the guard's own call, like the probe's
        listed = await self._input_items(response_id, sent, query)
        if listed is None:
            return None
        items, older_missing = listed
        return Fetched(items, older_missing, await self._output(response_id, sent, query))

    async def _output(self, response_id: str, sent: Mapping[str, Any], query: bytes) -> list[Any] | None:
        """The stored response's own output items (``GET /responses/{id}``: the model's previous answer)."""
        from guard.proxy.upstream import UpstreamFailure

        try:
            answer = await self.upstream.request("GET", f"/responses/{response_id}", headers=sent,
                                                 query=_without_paging(query).rstrip(b"&"), timeout=self.timeout)
        except UpstreamFailure:
            return None
        if answer.status != 200:
            return None
        stored = await _loads(answer.body)
        output = stored.get("output") if isinstance(stored, dict) else None
        return output if isinstance(output, list) else None

    async def _input_items(self, response_id: str, sent: Mapping[str, Any], query: bytes) -> tuple[list[Any], bool] | None:
        from guard.proxy.upstream import UpstreamFailure

        newest_first: list[Any] = []
        after: str | None = None
        for _ in range(MAX_PAGES):
            params = f"order=desc&limit={PAGE_ITEMS}" + (f"&after={after}" if after else "")
            full_query = _without_paging(query) + params.encode()
            self.fetches += 1
            try:
                answer = await self.upstream.request("GET", f"/responses/{response_id}/input_items", headers=sent,
                                                     query=full_query, timeout=self.timeout)
            except UpstreamFailure:
                return None
            if answer.status != 200:
                return None
            page = await _loads(answer.body)
            if not isinstance(page, dict) or not isinstance(page.get("data"), list):
                return None
            newest_first += page["data"]
            last = page.get("last_id")
            if not page.get("has_more") or not page["data"]:
                return list(reversed(newest_first)), False
            after = last if isinstance(last, str) and _plain(last) else None
            if after is None:
                break
        return list(reversed(newest_first)), True


async def request_view(prober: Prober, request: GuardedRequest, headers: Mapping[str, Any],
                       query: bytes = b"") -> ProbeView:
    """The probe's view of ``request``: its stored context fetched where it can be, and the view built
    off the event loop when the request or the fetched items are large."""
    messages = request.messages
    size = len(request.raw)
    if request.stored_index is not None and request.previous_response_id is not None:
        fetched = await prober.stored_context.items(request.previous_response_id, headers, query)
        convert = getattr(request.api, "input_messages", None)
        if fetched is not None and convert is not None:
            size += (len(fetched.items) + len(fetched.output or ())) * 256  # a rough guess: only decides the thread
            unseen = {"role": "context", "content": [{"type": NOT_FETCHED}]}
            # older items beyond the pages fetched (unknown), the items, then the stored response's own
            # output (the model's previous answer; unknown if it could not be fetched)
            spliced = (([unseen] if fetched.older_missing else []) + convert(fetched.items)
                       + (convert(fetched.output) if fetched.output is not None else [unseen]))
            i = request.stored_index
            messages = [*messages[:i], *spliced, *messages[i + 1:]]
    if size > OFF_LOOP_BYTES:
        return await asyncio.to_thread(prober.view, messages, request.tools)
    return prober.view(messages, request.tools)


def _cache_key(base_url: str, response_id: str, headers: Mapping[str, Any], query: bytes) -> str:
    return credential_digest(base_url.encode() + b"\0" + response_id.encode() + b"\0" + query, headers)


def _plain(value: str) -> bool:
    return len(value) <= 256 and value.replace("_", "").replace("-", "").isalnum() and value.isascii()


async def _loads(body: bytes) -> Any:
    try:
        if len(body) > OFF_LOOP_BYTES:
            return await asyncio.to_thread(json.loads, body)
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


#: Query parameters of the listing that only the guard sets: a client's own (``?after=<newest>``,
#: ``?order=asc&limit=1``) would make an upstream that takes the first value fetch a subset.
_PAGING = frozenset({b"order", b"limit", b"after", b"before", b"include", b"include[]"})


def _without_paging(query: bytes) -> bytes:
    """The client's query string (e.g. Azure's ``api-version``) without the paging parameters, with a
    trailing ``&`` when anything is left."""
    kept = [p for p in query.split(b"&") if p and unquote_to_bytes(p.split(b"=", 1)[0]).lower() not in _PAGING]
    return b"&".join(kept) + b"&" if kept else b""
