"""A fault-injecting OpenAI-compatible upstream on a raw asyncio socket server.

Raw sockets (not uvicorn/Starlette) so that it can do what an ASGI app cannot: reset a
connection with a TCP RST (``SO_LINGER`` 0) before or in the middle of a response. HTTP/1.1
with keep-alive, ``content-length`` or chunked request bodies, chunked SSE responses.

Each upstream call draws one fault from :class:`FaultPlan` (seeded, so a run is repeatable):

* ``status_5xx``: a 500/502/503 with :func:`injected_error_body` (the proxy must pass it through)
* ``stall``: no answer for ``stall_seconds`` (past the proxy's timeouts), then a late answer
* ``reset``: RST right after the request (generations that stream: before or after a few chunks)
* ``bad_probe``: an unparseable probe answer (probe calls only)
* ``slow_stream``: a stream with ``slow_chunk_delay`` between chunks (streamed generations only)

Probe calls are told apart by ``x-refusal-guard-probe: 1``. The probe predicts a refusal with
confidence 5 when the assessed text contains ``PLEASE-REFUSE``, so some requests get blocked.
``GET /_stats`` returns the counters. Run standalone with
``python -m tests.fault_upstream --port N [--plan JSON]`` (prints ``READY`` once listening).

The second half holds what the reliability tests share: the proxy (``python -m guard.cli serve``)
and this upstream as subprocesses on loopback, RSS from ``/proc``, metrics and datapoint readers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import free_port, spawn, stop_group, wait_http

STATUS_TEXT = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error",
               502: "Bad Gateway", 503: "Service Unavailable"}

BAD_PROBE_ANSWERS = (
    "I would probably help with this one.",
    '{"will_refuse": "false", "confidence": 4, "harm_rating": 1, "topic": "other"}',
    '{"will_refuse": false, "confidence": 9, "harm_rating": 1, "topic": "other"}',
    '{"will_refuse": false, "confidence": 4, "harm_rating": 1, "topic": "other", "note": "x"}',
    '{"will_refuse": false, "confidence": 4',
    "",
)


def injected_error_body(status: int) -> bytes:
    """The exact bytes of an injected upstream error (clients check it arrives unchanged)."""
    return json.dumps({"error": {"message": f"injected upstream failure {status}", "type": "injected_fault",
                                 "param": None, "code": f"injected_{status}"}}).encode()


@dataclass
class FaultPlan:
    p_5xx: float = 0.10
    p_stall: float = 0.05
    p_reset: float = 0.05
    p_bad_probe: float = 0.05
    p_slow_stream: float = 0.05
    stall_seconds: float = 3.0
    slow_chunk_delay: float = 0.15
    chunk_delay: float = 0.0
    chunks: int = 8
    generation_delay: float = 0.0  # every generation takes this long before answering
    models_stall: float = 0.0
    seed: int = 1234

    def draw(self, rng: random.Random, kind: str, stream: bool) -> str:
        r = rng.random()
        for name, p in (("status_5xx", self.p_5xx), ("stall", self.p_stall), ("reset", self.p_reset)):
            if r < p:
                return name
            r -= p
        if kind == "probe" and r < self.p_bad_probe:
            return "bad_probe"
        if kind == "generation" and stream and r < self.p_slow_stream:
            return "slow_stream"
        return "none"


@dataclass
class FaultUpstream:
    plan: FaultPlan = field(default_factory=FaultPlan)
    host: str = "127.0.0.1"
    port: int = 0
    stats: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.plan.seed)
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------
    async def start_async(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop_async(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):
                writer.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def start(self) -> "FaultUpstream":
        """Serve from a daemon thread (for tests in the same process)."""
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start_async())
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self.stop_async())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> "FaultUpstream":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- HTTP ------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                keep_alive = await self._handle(*request, reader, writer)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return
        finally:
            self._connections.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    async def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes,
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if method == "GET" and path.endswith("/models"):
            self.stats["models"] += 1
            if self.plan.models_stall:
                await asyncio.sleep(self.plan.models_stall)
            await _send(writer, 200, json.dumps({"object": "list", "data": [{"id": "fault", "object": "model"}]}).encode())
            return True
        if method == "GET" and path == "/_stats":
            await _send(writer, 200, json.dumps({"stats": dict(self.stats), "plan": asdict(self.plan)}).encode())
            return True
        if method != "POST" or not path.endswith("/chat/completions"):
            await _send(writer, 404, b'{"error": {"message": "not found"}}')
            return True
        kind = "probe" if headers.get("x-refusal-guard-probe") == "1" else "generation"
        data = json.loads(body)
        stream = bool(data.get("stream")) and kind == "generation"
        fault = self.plan.draw(self._rng, kind, stream)
        self.stats[f"{kind}"] += 1
        self.stats[f"{kind}:{fault}"] += 1
        if fault == "status_5xx":
            status = self._rng.choice((500, 502, 503))
            await _send(writer, status, injected_error_body(status), extra=(("x-injected-fault", "5xx"),))
            return True
        if fault == "stall":
            # Wait, but notice the proxy giving up (EOF) and stop then.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.plan.stall_seconds):
                    if await reader.read(1) == b"":
                        self.stats[f"{kind}:stall_abandoned"] += 1
                        return False
        if fault == "reset" and not (stream and self._rng.random() < 0.5):
            _reset(writer)
            return False
        model = data.get("model") or "fault"
        if kind == "probe":
            return await self._probe(data, model, writer, bad=fault == "bad_probe")
        if self.plan.generation_delay:
            await asyncio.sleep(self.plan.generation_delay)
        if not stream:
            await _send(writer, 200, json.dumps(_completion("Paris is the capital of France.", model)).encode())
            return True
        delay = self.plan.slow_chunk_delay if fault == "slow_stream" else self.plan.chunk_delay
        break_after = self._rng.randrange(1, self.plan.chunks) if fault == "reset" else None
        return await self._stream(writer, model, delay, break_after)

    async def _probe(self, data: dict, model: str, writer: asyncio.StreamWriter, *, bad: bool) -> bool:
        if bad:
            answer = self._rng.choice(BAD_PROBE_ANSWERS)
        else:
            assessed = str(data["messages"][-1]["content"])
            refuse = "PLEASE-REFUSE" in assessed
            answer = json.dumps({"will_refuse": refuse, "confidence": 5 if refuse else 4, "harm_rating": 1,
                                 "topic": "other"})
        await _send(writer, 200, json.dumps(_completion(answer, model)).encode())
        return True

    async def _stream(self, writer: asyncio.StreamWriter, model: str, delay: float, break_after: int | None) -> bool:
        head = ("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                "transfer-encoding: chunked\r\n\r\n")
        writer.write(head.encode())
        base = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
        events += [{**base, "choices": [{"index": 0, "delta": {"content": f"part {i}. "}, "finish_reason": None}]}
                   for i in range(self.plan.chunks)]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        payloads = [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]
        for n, payload in enumerate(payloads):
            if break_after is not None and n == break_after:
                await writer.drain()
                _reset(writer)
                self.stats["generation:reset_mid_stream"] += 1
                return False
            if delay and n:
                await asyncio.sleep(delay)
            writer.write(b"%x\r\n%s\r\n" % (len(payload), payload))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


def _completion(content: str, model: str) -> dict:
    return {"id": "chatcmpl-fault", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}}


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return method, path, headers, body


async def _send(writer: asyncio.StreamWriter, status: int, body: bytes, *, extra: tuple = ()) -> None:
    head = [f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Status')}", "content-type: application/json",
            f"content-length: {len(body)}", *(f"{k}: {v}" for k, v in extra)]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN: the peer sees 'connection reset by peer'."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--plan", default="{}", help="FaultPlan fields as JSON")
    args = parser.parse_args(argv)
    upstream = FaultUpstream(FaultPlan(**json.loads(args.plan)), port=args.port)

    async def serve() -> None:
        await upstream.start_async()
        print("READY", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0




# -- subprocess harness for the reliability, security and shutdown tests ------------------

ROOT = Path(__file__).resolve().parent.parent


def clean_env() -> dict[str, str]:
    """This environment without refusal-guard or Prometheus multiprocess variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("REFUSAL_GUARD_", "PROMETHEUS_"))}


class ProxyProcess:
    """``refusal-guard serve`` in a subprocess on a free loopback port; output goes to a file."""

    def __init__(self, upstream: str, log_dir: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"proxy-{self.port}.log"
        self.args = [sys.executable, "-m", "guard.cli", "serve", "--upstream", upstream, "--host", "127.0.0.1",
                     "--port", str(self.port), *flags]
        self.env = {**clean_env(), **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "ProxyProcess":
        self._log = self.log_path.open("wb")
        self.proc = spawn(self.args, env=self.env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        wait_http(self.url + "/healthz", self.proc)
        return self

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace=0)  # SIGKILL to the group, also after terminate()
        if hasattr(self, "_log"):
            self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def __enter__(self) -> "ProxyProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.kill()


class FaultUpstreamProcess:
    """``python -m tests.fault_upstream`` in a subprocess (its own core, its own GIL)."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.port = free_port()
        self.plan = plan
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FaultUpstreamProcess":
        self.proc = spawn([sys.executable, "-m", "tests.fault_upstream", "--port", str(self.port),
                           "--plan", json.dumps(self.plan)], cwd=ROOT, env=clean_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            stop_group(self.proc, grace=0)
            raise RuntimeError("fault upstream did not start")
        return self

    def stats(self) -> dict[str, int]:
        return httpx.get(self.url + "/_stats", timeout=5).json()["stats"]

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace=10)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def datapoint_rows(db: Path) -> list[dict[str, Any]]:
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM datapoints ORDER BY seq")]
    finally:
        con.close()


if __name__ == "__main__":
    sys.exit(main())
