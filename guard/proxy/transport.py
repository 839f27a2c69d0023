"""The process's pooled HTTP client: httpx's API over aiohttp's connection pool.

Why not httpx's own transport: the proxy makes one or two upstream calls per request, and
httpx's default stack (httpcore + anyio + h11) spent three times the CPU per call of httpx
over this transport on the project's 2-core machine (1.94 vs 0.63 ms, BENCHMARKS.md,
"Upstream client"). httpcore's pool also scans every connection for every queued request, so
a backlog made each request slower than the last and an overloaded worker collapsed. aiohttp's
pool hands out connections in constant time and parses responses in C.

Everything else keeps httpx's interface (requests, streamed responses, timeouts, errors), so
callers do not change. aiohttp's errors are mapped onto httpx's exception classes with the
meaning the proxy's failure reasons need: could not connect, timed out, or broken exchange.
Proxies from the environment (``HTTPS_PROXY``...) are still honoured: httpx routes such URLs
through its own proxy transport, so they work as before, without the saving.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httpx


@contextlib.contextmanager
def _as_httpx_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:  # waiting for a pooled connection, or connecting
        raise httpx.ConnectTimeout(str(exc) or "timed out connecting upstream", request=request) from exc
    except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as exc:  # no bytes within the read timeout
        raise httpx.ReadTimeout(str(exc) or "timed out reading from upstream", request=request) from exc
    except aiohttp.ClientConnectorError as exc:  # refused, unreachable, DNS
        raise httpx.ConnectError(str(exc), request=request) from exc
    except aiohttp.InvalidURL as exc:
        raise httpx.UnsupportedProtocol(str(exc), request=request) from exc
    except (aiohttp.ClientError, OSError) as exc:  # disconnected, reset, malformed response
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc


class _Body(httpx.AsyncByteStream):
    """A response body read as it arrives; closing it early drops the connection, which tells
    the upstream to stop generating (a cancelled parallel-mode generation relies on that)."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors(self._request):
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # whole body read: the connection goes back to the pool
        else:
            self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An ``httpx`` transport backed by one ``aiohttp.ClientSession``.

    The session is created on first use, inside the running event loop, as aiohttp requires.
    Timeouts come from each request's httpx timeout: ``pool`` bounds waiting for a pooled
    connection plus connecting, ``connect`` the TCP connect, ``read`` the gap between reads
    (aiohttp has no write timeout). No redirects, no decompression: the proxy relays bytes.
    """

    def __init__(self, *, max_connections: int, keepalive_expiry: float) -> None:
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0,
                                             keepalive_timeout=self._keepalive_expiry)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                                                  skip_auto_headers=("User-Agent", "Accept-Encoding"))
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        headers = request.headers.multi_items()
        try:
            body: bytes | httpx.AsyncByteStream | None = request.content or None  # bytes, read by httpx
        except httpx.RequestNotRead:
            body = request.stream  # a streamed body (the pass-through): sent as it arrives,
            headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]  # chunked by aiohttp
        with _as_httpx_errors(request):
            response = await self._open().request(
                request.method,
                str(request.url),
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
                timeout=aiohttp.ClientTimeout(total=None, connect=timeout.get("pool"), sock_connect=timeout.get("connect"),
                                              sock_read=timeout.get("read")),
            )
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def pooled_client(*, timeout: httpx.Timeout, max_connections: int, keepalive_expiry: float) -> httpx.AsyncClient:
    """The one way the guard builds an HTTP client (proxy, judge, review webhook, collect).

    The client is shared by every request the process serves, so it must keep no cookies: a
    ``Set-Cookie`` from the upstream in one user's answer would otherwise ride along on every
    later request, whoever sent it (httpx's client keeps a jar by default).
    """
    transport = AiohttpTransport(max_connections=max_connections, keepalive_expiry=keepalive_expiry)
    no_cookies = http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(transport=transport, timeout=timeout, follow_redirects=False, cookies=no_cookies)
