"""The pooled upstream client (``guard.proxy.transport``) against real loopback servers.

* aiohttp's failures arrive as the httpx exceptions whose meaning the proxy's failure reasons
  need: refused -> ConnectError, silence past the read timeout -> ReadTimeout, a connection
  dropped mid-body -> RemoteProtocolError.
* Closing a response before its end drops the connection, so the upstream sees the client
  leave (parallel mode's cancelled generations rely on it); a fully read one is reused.
* The shared client keeps no cookies: one user's ``Set-Cookie`` never reaches another's request.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from guard.proxy.transport import pooled_client
from tests.servers import ServerThread, free_port

TIMEOUT = httpx.Timeout(connect=2.0, read=0.5, write=2.0, pool=2.0)


class Upstream:
    """A loopback server whose routes misbehave on purpose, recording what it saw."""

    def __init__(self) -> None:
        self.cookies: list[str | None] = []
        self.peers: list[tuple[str, int]] = []
        self.stream_gone = threading.Event()

    def app(self) -> Starlette:
        async def cookie(request: Request) -> Response:
            self.cookies.append(request.headers.get("cookie"))
            response = JSONResponse({"ok": True})
            response.set_cookie("session", "first-users-secret")
            return response

        async def whole(request: Request) -> Response:
            assert request.client is not None
            self.peers.append((request.client.host, request.client.port))
            return JSONResponse({"ok": True})

        async def silent(request: Request) -> Response:
            await asyncio.sleep(5)
            return JSONResponse({"late": True})

        async def endless(request: Request) -> Response:
            async def events():
                try:
                    while True:
                        yield b"data: {}\n\n"
                        await asyncio.sleep(0.02)
                finally:
                    self.stream_gone.set()
            return StreamingResponse(events(), media_type="text/event-stream")

        return Starlette(routes=[Route("/cookie", cookie, methods=["POST"]), Route("/whole", whole),
                                 Route("/silent", silent), Route("/endless", endless)])


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


@pytest.fixture
def server(upstream: Upstream):
    with ServerThread(upstream.app()) as running:
        yield running


def client() -> httpx.AsyncClient:
    return pooled_client(timeout=TIMEOUT, max_connections=8, keepalive_expiry=4.0)


def test_a_cookie_set_for_one_request_is_not_sent_with_the_next(server, upstream):
    async def run() -> None:
        async with client() as c:
            for _ in range(3):
                assert (await c.post(server.url + "/cookie", content=b"{}")).status_code == 200
    asyncio.run(run())
    assert upstream.cookies == [None, None, None]


def test_refused_connection_is_a_connect_error():
    async def run() -> None:
        async with client() as c:
            await c.get(f"http://127.0.0.1:{free_port()}/v1/models")
    with pytest.raises(httpx.ConnectError):
        asyncio.run(run())


def test_silence_past_the_read_timeout_is_a_read_timeout(server):
    async def run() -> None:
        async with client() as c:
            await c.get(server.url + "/silent")
    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(run())


def test_connection_dropped_mid_body_is_a_protocol_error():
    """A server that promises 1,000 bytes, sends 10 and hangs up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve_once() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"partial\"")
        conn.close()

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()

    async def run() -> None:
        async with client() as c:
            await c.get(f"http://127.0.0.1:{port}/")
    try:
        with pytest.raises(httpx.RemoteProtocolError):
            asyncio.run(run())
    finally:
        thread.join(timeout=5)
        listener.close()


def test_closing_a_stream_early_drops_the_connection_and_a_read_one_is_reused(server, upstream):
    async def run() -> None:
        async with client() as c:
            request = c.build_request("GET", server.url + "/endless")
            response = await c.send(request, stream=True)
            chunks = response.aiter_raw()
            assert (await anext(chunks)).startswith(b"data:")
            await response.aclose()
            assert await asyncio.to_thread(upstream.stream_gone.wait, 5), "upstream never saw the client leave"
            for _ in range(3):
                assert (await c.get(server.url + "/whole")).json() == {"ok": True}
    asyncio.run(run())
    assert len(set(upstream.peers)) == 1, f"whole responses should share one pooled connection: {upstream.peers}"
