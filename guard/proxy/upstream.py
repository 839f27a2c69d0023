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
from guard.proxy.headers import relayed_response_headers, rewrite_locations, upstream_request_headers

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


def too_large(limit: int) -> UpstreamFailure:
    """The upstream's answer passed ``max_response_bytes``: cut, and counted as ``too_large``."""
    error = ProxyError(502, f"upstream response exceeds the limit of {limit} bytes", type="upstream_error",
                       code="upstream_response_too_large")
    return UpstreamFailure(error, "too_large")


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    headers: httpx.Headers  # the relayable ones; repeats (set-cookie) kept apart
    body: bytes


def response_headers(headers: httpx.Headers) -> httpx.Headers:
    """Upstream response headers worth relaying (see :mod:`guard.proxy.headers`)."""
    return relayed_response_headers(headers.raw)


class Upstream:
    """One OpenAI-compatible endpoint (``base_url`` ends before ``/chat/completions``)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        *,
        api_key: SecretStr | None = None,
        total_timeout: float = 600.0,
        forward_client_authorization: bool = True,
        max_response_bytes: int | None = None,
    ) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.total_timeout = total_timeout
        self.forward_client_authorization = forward_client_authorization
        self.max_response_bytes = max_response_bytes

    def url(self, path: str, query: bytes = b"") -> str:
        """``path`` under the base URL, with the client's query string (e.g. Azure's ``api-version``)."""
        return self.base_url + path + ("?" + query.decode("latin-1") if query else "")

    def forward_headers(self, incoming: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str | bytes]:
        """The client's headers as :mod:`guard.proxy.headers` filters them; our key replaces theirs if configured."""
        key = f"Bearer {self.api_key.get_secret_value()}" if self.api_key is not None else None
        headers = upstream_request_headers(incoming, authorization=key,
                                           forward_client_authorization=self.forward_client_authorization)
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
        """A whole exchange, bounded by ``timeout`` (default: the total timeout) and by
        ``max_response_bytes`` (a longer body is a :func:`too_large` failure, never buffered)."""
        request = self.client.build_request(method, self.url(path, query), headers=headers, content=content)
        try:
            async with asyncio.timeout(timeout or self.total_timeout):
                response = await self.client.send(request, stream=True)
                try:
                    rewrite_locations(response.headers, self.base_url)
                    body = await self._read_capped(response)
                finally:
                    await response.aclose()
        except (httpx.HTTPError, TimeoutError) as exc:
            raise _translate(exc) from None
        return UpstreamResponse(response.status_code, response_headers(response.headers), body)

    async def _read_capped(self, response: httpx.Response) -> bytes:
        limit = self.max_response_bytes
        if limit is None:
            return await response.aread()
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

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
        A ``Location`` naming the upstream is already rewritten (``headers.client_location``).
        """
        request = self.client.build_request(method, self.url(path, query), headers=headers, content=content)
        try:
            async with asyncio.timeout(self.total_timeout):
                response = await self.client.send(request, stream=True)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise _translate(exc) from None
        rewrite_locations(response.headers, self.base_url)
        return response

    async def relay(self, response: httpx.Response, deadline: float, *, capped: bool = True) -> AsyncIterator[bytes]:
        """Yield the response body as it arrives, until done, ``deadline`` (loop time), or, if
        ``capped``, ``max_response_bytes`` (then :func:`too_large` is raised before the chunk that
        passes it). Pass-through routes relay uncapped: they keep nothing, so size costs no memory."""
        limit, size = (self.max_response_bytes if capped else None), 0
        try:
            chunks = response.aiter_raw()
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                size += len(chunk)
                if limit is not None and size > limit:
                    raise too_large(limit)
                yield chunk
        except (httpx.HTTPError, TimeoutError) as exc:
            raise _translate(exc) from None
        finally:
            await response.aclose()
