"""Header hygiene, both ways: what goes from the client to the upstream, and back.

Client to upstream (:func:`upstream_request_headers`): hop-by-hop headers (``connection``,
``keep-alive``, ``te``, ``trailer``, ``transfer-encoding``, ``upgrade``, ``proxy-*``, and any
header the client's ``Connection`` names), ``expect`` (an upstream that never sends
``100 Continue`` would hang), framing the proxy recomputes (``host``, ``content-length``,
``content-encoding``, ``accept-encoding``), and every guard-internal ``x-refusal-guard-*``
header (a client must not be able to mark its generation as a probe) are dropped. The client's
``Authorization`` is replaced by the configured upstream key, or dropped when it is the
client's key for the guard itself (``api_keys`` set), unless the operator says to forward it.
Values keep their bytes: a non-ASCII (Latin-1) value is passed on as bytes, never re-encoded
into an error.

Upstream to client (:func:`relayed_response_headers`): hop-by-hop and framing headers,
``date``/``server`` (the guard's server sets its own) and the upstream's ``x-refusal-guard-*``
headers (only the guard may speak for the guard) are dropped; the upstream's ``x-request-id``
reaches the client unchanged (the guard's id goes in ``x-refusal-guard-request-id``); repeated headers such as ``set-cookie`` stay
separate pairs, in order. A ``Location`` (or ``Content-Location``) that names the upstream never
reaches the client as such (:func:`client_location`): under the upstream's base URL it becomes the
same path under the guard's ``/v1``, elsewhere on the upstream's origin it is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httpx
from starlette.responses import Response

GUARD_PREFIX = "x-refusal-guard-"

#: Connection-level (RFC 9110 7.6.1) or recomputed by whoever sends the message on.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length", "content-encoding", "accept-encoding",
})
#: ``x-request-id`` passes both ways: the client's goes upstream, the upstream's comes back (the
#: guard's own id travels as ``x-refusal-guard-request-id``: ``guard.proxy.request_context``).
REQUEST_DROP = HOP_BY_HOP | {"expect"}
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}


def _connection_tokens(pairs: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The header names a ``Connection`` header lists as hop-by-hop."""
    return frozenset(
        token.strip().lower()
        for name, value in pairs if name.lower() == "connection"
        for token in value.split(",") if token.strip()
    )


def _pairs(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    if isinstance(headers, Mapping):
        multi = getattr(headers, "multi_items", None)  # Starlette's and httpx's headers keep repeats
        return list(multi()) if multi is not None else list(headers.items())
    return list(headers)


def upstream_request_headers(
    incoming: Mapping[str, str] | Iterable[tuple[str, str]],
    *,
    authorization: str | None,
    forward_client_authorization: bool,
) -> dict[str, str | bytes]:
    """The headers to send upstream for a client request with ``incoming`` headers.

    ``authorization`` (the configured upstream key, as a full header value) replaces the
    client's; without one the client's is forwarded only if ``forward_client_authorization``.
    Values are Latin-1 bytes where they are not ASCII (Starlette decodes header bytes as Latin-1).
    """
    pairs = _pairs(incoming)
    drop = REQUEST_DROP | _connection_tokens(pairs)
    out: dict[str, str | bytes] = {}
    for name, value in pairs:
        lowered = name.lower()
        if lowered in drop or lowered.startswith(GUARD_PREFIX) or lowered.startswith("proxy-"):
            continue
        if lowered == "authorization" and (authorization is not None or not forward_client_authorization):
            continue
        out[lowered] = value if value.isascii() else value.encode("latin-1", "replace")
    if authorization is not None:
        out["authorization"] = authorization
    out["accept-encoding"] = "identity"  # relay the upstream's bytes as they are
    return out


def relayed_response_headers(raw: Iterable[tuple[bytes, bytes]]) -> httpx.Headers:
    """The upstream's response headers worth relaying (content type, rate limits, cookies, ids...),
    from its raw header pairs; bytes are kept as they came."""
    pairs = list(raw)
    drop = RESPONSE_DROP | _connection_tokens((k.decode("latin-1"), v.decode("latin-1")) for k, v in pairs)
    kept = []
    for name, value in pairs:
        lowered = name.decode("latin-1").lower()
        if lowered not in drop and not lowered.startswith(GUARD_PREFIX):
            kept.append((lowered.encode("latin-1"), value))
    return httpx.Headers(kept)


def add_relayed_headers(response: Response, relayed: httpx.Headers) -> Response:
    """Append ``relayed`` to a Starlette response as separate raw pairs (``set-cookie`` stays
    one header per cookie, bytes unchanged). The response must not set the same names itself."""
    response.raw_headers.extend((name.lower(), value) for name, value in relayed.raw)
    return response


#: Response headers whose value is a URL the client may follow.
LOCATION_HEADERS = ("location", "content-location")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: SplitResult, scheme: str) -> tuple[str, str, int | None]:
    return scheme.lower(), (url.hostname or "").lower(), url.port or _DEFAULT_PORTS.get(scheme.lower())


def client_location(location: str, upstream_base: str, prefix: str = "/v1") -> str | None:
    """``location`` (from an upstream answer) as the client may see it, or None to drop it.

    A URL on the upstream's origin (absolute, scheme-relative or a path from the root) under the
    upstream's base URL becomes the same path under the guard's ``prefix``, relative to the
    guard (``http://10.0.0.5:8000/v1/models`` -> ``/v1/models``); one elsewhere on that origin is
    dropped (it names the upstream and nothing at the guard serves it). Another origin's URL and
    a relative reference (resolved against the guard's own URL) are kept.
    """
    base = urlsplit(upstream_base)
    try:
        target = urlsplit(location)
        if target.scheme or target.netloc:
            if _origin(target, target.scheme or base.scheme) != _origin(base, base.scheme):
                return location  # another origin: a CDN, a presigned URL...
        elif not target.path.startswith("/"):
            return location
    except ValueError:  # an invalid port or IPv6 literal: not something to relay
        return None
    base_path = base.path.rstrip("/")
    if target.path != base_path and not target.path.startswith(base_path + "/"):
        return None
    return urlunsplit(("", "", prefix + target.path[len(base_path):], target.query, target.fragment))


def rewrite_locations(headers: httpx.Headers, upstream_base: str) -> None:
    """Apply :func:`client_location` to ``headers`` in place."""
    for name in LOCATION_HEADERS:
        if name in headers:
            value = client_location(headers[name], upstream_base)
            del headers[name]
            if value is not None:
                headers[name] = value
