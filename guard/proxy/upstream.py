"""The OpenAI-compatible server behind the proxy: forwarding, streaming, error mapping.

One :class:`Upstream` wraps the process's pooled ``httpx.AsyncClient`` and a base URL.
Transport failures become :class:`UpstreamFailure` (a 502/504 in the OpenAI error shape,
with a ``reason`` label for metrics) in exactly one place, ``_translate``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass

import httpx
from pydantic import SecretStr

from guard.errors import ProxyError, upstream_protocol, upstream_timeout, upstream_unreachable

# Not forwarded in either direction: connection-level or recomputed by the server.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "accept-encoding",
    }
)
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}


class UpstreamFailure(ProxyError):
    """The upstream could not be reached or did not answer in time."""

    def __init__(self, error: ProxyError, reason: str) -> None:
        super().__init__(error.status, error.message, type=error.type, code=error.code)
        self.reason = reason


def _translate(exc: httpx.HTTPError | TimeoutError) -> UpstreamFailure:
    # Only the exception's type reaches the client: its text names the upstream's host and port.
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return UpstreamFailure(upstream_timeout(type(exc).__name__), "timeout")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamFailure(upstream_unreachable(type(exc).__name__), "connect")
    return UpstreamFailure(upstream_protocol(type(exc).__name__), "protocol")


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def response_headers(headers: httpx.Headers) -> dict[str, str]:
    """Upstream response headers worth relaying (content type, rate limits, ids...)."""
    return {k: v for k, v in headers.items() if k.lower() not in RESPONSE_DROP}


class Upstream:
    """One OpenAI-compatible endpoint (``base_url`` ends before ``/chat/completions``)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        *,
        api_key: SecretStr | None = None,
        total_timeout: float = 600.0,
    ) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.total_timeout = total_timeout

    def url(self, path: str, query: bytes = b"") -> str:
        """``path`` under the base URL, with the client's query string (e.g. Azure's ``api-version``)."""
        return self.base_url + path + ("?" + query.decode("latin-1") if query else "")

    def forward_headers(self, incoming: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The client's headers minus hop-by-hop ones; our key replaces theirs if configured."""
        headers = {k: v for k, v in incoming.items() if k.lower() not in HOP_BY_HOP}
        if self.api_key is not None:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            headers["authorization"] = f"Bearer {self.api_key.get_secret_value()}"
        headers["accept-encoding"] = "identity"  # relay the upstream's bytes as they are
        if extra:
            headers.update(extra)
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        timeout: float | None = None,
        query: bytes = b"",
    ) -> UpstreamResponse:
        """A whole exchange, bounded by ``timeout`` (default: the total timeout)."""
        try:
            async with asyncio.timeout(timeout or self.total_timeout):
                response = await self.client.request(method, self.url(path, query), headers=headers, content=content)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise _translate(exc) from None
        return UpstreamResponse(response.status_code, response_headers(response.headers), response.content)

    async def open_stream(
        self,
        path: str,
        *,
        headers: Mapping[str, str],
        content: bytes | AsyncIterable[bytes] | None,
        method: str = "POST",
        query: bytes = b"",
    ) -> httpx.Response:
        """Send a request (its body whole or streamed) and return once the response headers are
        in; the body is unread. The caller must ``aclose()`` the response (``relay`` does).
        """
        request = self.client.build_request(method, self.url(path, query), headers=headers, content=content)
        try:
            async with asyncio.timeout(self.total_timeout):
                return await self.client.send(request, stream=True)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise _translate(exc) from None

    async def relay(self, response: httpx.Response, deadline: float) -> AsyncIterator[bytes]:
        """Yield the response body as it arrives, until done or ``deadline`` (loop time)."""
        try:
            chunks = response.aiter_raw()
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                yield chunk
        except (httpx.HTTPError, TimeoutError) as exc:
            raise _translate(exc) from None
        finally:
            await response.aclose()
