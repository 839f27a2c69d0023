"""Open-loop HTTP load generator for chat completions (stdlib asyncio, its own process).

Requests are sent on a fixed schedule (request ``i`` at ``t0 + i / rate``) whatever the
system under test does, and latency is measured from the *scheduled* send time to the
last byte of the response, so a stalled server cannot hide its queueing delay
(no coordinated omission). Connections are HTTP/1.1 keep-alive, opened on demand (one
per request in flight, up to ``--max-connections``; beyond that requests wait, and the
wait counts in their latency).

Every prompt is unique (``--tag`` + sequence number), so a proxy's probe cache never
hits: this measures the uncached probe path. A response counts as OK when its status is
200 and, streamed, when it ends with ``data: [DONE]``; anything else, a timeout
(``--timeout`` from the scheduled time) or a dropped connection is an error.

Output: one JSON object on stdout with the achieved rate, error counts, latency
percentiles (end-to-end and, for streams, to the first body byte) over the measured
window (after ``--warmup`` seconds), and the generator's own send lag, which shows
whether the generator itself kept to its schedule.

    python benchmarks/loadgen.py --url http://127.0.0.1:8080/v1/chat/completions \\
        --rate 200 --duration 10 --warmup 2 [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from urllib.parse import urlsplit


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))  # ceil(q/100 * n)
    return ordered[min(rank, len(ordered)) - 1]


class Pending:
    __slots__ = ("index", "scheduled", "sent", "first_byte", "done", "status", "error", "measured", "timer")

    def __init__(self, index: int, scheduled: float, measured: bool) -> None:
        self.index = index
        self.scheduled = scheduled
        self.measured = measured
        self.sent: float | None = None
        self.first_byte: float | None = None
        self.done: float | None = None
        self.status: int | None = None
        self.error: str | None = None
        self.timer: asyncio.TimerHandle | None = None


class Connection(asyncio.Protocol):
    """One keep-alive connection with an incremental HTTP/1.1 response parser."""

    def __init__(self, gen: "LoadGenerator") -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.current: Pending | None = None
        self.buf = bytearray()
        self.reset()
        self.dead = False
        self.served = 0  # responses completed on this connection

    def reset(self) -> None:
        self.buf.clear()
        self.head_done = False
        self.length: int | None = None
        self.chunked = False
        self.close_after = False
        self.body_pos = 0
        self.done_marker = False
        self.body_tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        if self.current is not None and self.served and not self.head_done and not self.buf:
            # A reused keep-alive connection closed by the server before any answer (its idle
            # timeout raced our request): resend on a fresh connection, as HTTP clients do.
            pending, self.current = self.current, None
            self.gen.resend(pending)
        elif self.current is not None:
            if self.head_done and self.length is None and not self.chunked:
                self._complete(None)  # body delimited by connection close
            else:
                self._complete("closed")
        self.gen.forget(self)

    def send(self, pending: Pending, request: bytes) -> None:
        self.current = pending
        self.reset()
        pending.sent = time.perf_counter()
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        if self.current is None:
            return  # stray bytes after a timeout; the connection is being closed
        if self.current.first_byte is None and self.head_done:
            self.current.first_byte = time.perf_counter()
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            try:
                self.current.status = int(head[0].split(" ")[1])
            except (IndexError, ValueError):
                self._complete("protocol")
                return
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                value = value.strip()
                if name == "content-length":
                    self.length = int(value)
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    self.chunked = True
                elif name == "connection" and value.lower() == "close":
                    self.close_after = True
            del self.buf[:end + 4]
            self.head_done = True
            if self.buf:
                self.current.first_byte = time.perf_counter()
        self._body()

    def _body(self) -> None:
        if self.chunked:
            pos = self.body_pos
            while True:
                nl = self.buf.find(b"\r\n", pos)
                if nl < 0:
                    break
                try:
                    size = int(bytes(self.buf[pos:nl]).split(b";")[0], 16)
                except ValueError:
                    self._complete("protocol")
                    return
                if size == 0:
                    if len(self.buf) >= nl + 4:
                        self._complete(None)
                        return
                    break
                if len(self.buf) < nl + 2 + size + 2:
                    break
                data = bytes(self.buf[nl + 2: nl + 2 + size])
                self._watch(data)
                pos = nl + 2 + size + 2
            if pos:
                del self.buf[:pos]
            self.body_pos = 0
        elif self.length is not None:
            if len(self.buf) >= self.length:
                self._watch(bytes(self.buf[: self.length]))
                self._complete(None)

    def _watch(self, data: bytes) -> None:
        window = self.body_tail + data
        if b"data: [DONE]" in window:
            self.done_marker = True
        self.body_tail = window[-16:]

    def _complete(self, error: str | None) -> None:
        pending = self.current
        if pending is None:
            return
        self.current = None
        self.served += 1
        now = time.perf_counter()
        if error is None:
            if pending.status != 200:
                error = f"status_{pending.status}"
            elif self.gen.stream and not self.done_marker:
                error = "no_done"
        if error is not None and not self.dead and self.transport is not None:
            self.transport.abort()  # never reuse a connection in an unknown state
            self.dead = True
        self.gen.finished(pending, now, error)
        if not self.dead and not self.close_after:
            self.gen.release(self)
        elif not self.dead and self.transport is not None:
            self.transport.close()
            self.dead = True


class LoadGenerator:
    def __init__(self, url: str, *, rate: float, duration: float, warmup: float, stream: bool, timeout: float,
                 max_connections: int, model: str, tag: str, headers: dict[str, str], drain: float,
                 api_key: str = "sk-bench") -> None:
        self.api_key = api_key
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path or "/"
        self.rate = rate
        self.duration = duration
        self.warmup = warmup
        self.stream = stream
        self.timeout = timeout
        self.max_connections = max_connections
        self.model = model
        self.tag = tag
        self.extra_headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.drain = drain
        self.idle: list[Connection] = []
        self.all: set[Connection] = set()
        self.opening = 0
        self.waiting: list[Pending] = []
        self.outstanding = 0
        self.results: list[Pending] = []
        self.lags: list[float] = []
        self.errors: Counter[str] = Counter()
        self.connects = 0
        self.retries = 0
        self.loop = asyncio.get_running_loop()
        self.all_done = asyncio.Event()
        self.sending = True

    def request_bytes(self, index: int) -> bytes:
        prompt = f"[{self.tag}-{index}] In one sentence, what is the capital of France?"
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 32}
        if self.stream:
            body["stream"] = True
        data = json.dumps(body, separators=(",", ":")).encode()
        head = (f"POST {self.path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
                f"accept: {'text/event-stream' if self.stream else 'application/json'}\r\n"
                f"authorization: Bearer {self.api_key}\r\n{self.extra_headers}content-length: {len(data)}\r\n\r\n")
        return head.encode() + data

    # --- connections ------------------------------------------------------------------
    def release(self, conn: Connection) -> None:
        if self.waiting:
            self._dispatch(conn, self.waiting.pop(0))
        else:
            self.idle.append(conn)

    def forget(self, conn: Connection) -> None:
        self.all.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        self._open_if_needed()

    def _open_if_needed(self) -> None:
        while self.waiting and len(self.all) + self.opening < self.max_connections and self.opening < len(self.waiting):
            self.opening += 1
            self.loop.create_task(self._open())

    async def _open(self) -> None:
        try:
            _, conn = await self.loop.create_connection(lambda: Connection(self), self.host, self.port)
        except OSError:
            self.opening -= 1
            if self.waiting:
                pending = self.waiting.pop(0)
                self.finished(pending, time.perf_counter(), "connect")
            return
        self.opening -= 1
        self.connects += 1
        self.all.add(conn)
        self.release(conn)

    def _dispatch(self, conn: Connection, pending: Pending) -> None:
        conn.send(pending, self.request_bytes(pending.index))

    # --- requests -----------------------------------------------------------------------
    def submit(self, pending: Pending) -> None:
        self.outstanding += 1
        pending.timer = self.loop.call_later(
            max(0.0, pending.scheduled + self.timeout - time.perf_counter()), self._timed_out, pending)
        while self.idle:
            conn = self.idle.pop()
            if not conn.dead:
                self._dispatch(conn, pending)
                return
        self.waiting.append(pending)
        self._open_if_needed()

    def resend(self, pending: Pending) -> None:
        self.retries += 1
        self.waiting.insert(0, pending)
        self._open_if_needed()

    def _timed_out(self, pending: Pending) -> None:
        if pending.done is not None:
            return
        if pending in self.waiting:
            self.waiting.remove(pending)
            self.finished(pending, time.perf_counter(), "timeout")
            return
        for conn in list(self.all):
            if conn.current is pending:
                conn.current = None
                conn.dead = True
                if conn.transport is not None:
                    conn.transport.abort()
        self.finished(pending, time.perf_counter(), "timeout")

    def finished(self, pending: Pending, now: float, error: str | None) -> None:
        if pending.done is not None:
            return
        pending.done = now
        pending.error = error
        if pending.timer is not None:
            pending.timer.cancel()
        self.outstanding -= 1
        if pending.measured:
            self.results.append(pending)
            if error is not None:
                self.errors[error] += 1
        if not self.sending and self.outstanding == 0:
            self.all_done.set()

    async def run(self) -> dict:
        total = self.warmup + self.duration
        n = int(round(total * self.rate))
        n_warm = int(round(self.warmup * self.rate))
        t0 = time.perf_counter() + 0.05
        interval = 1.0 / self.rate
        for i in range(n):
            scheduled = t0 + i * interval
            delay = scheduled - time.perf_counter()
            if delay > 0.001:
                # asyncio's selector rounds timeouts up to the next millisecond: wake up to 1 ms
                # early rather than late; latency is then measured from the actual send.
                await asyncio.sleep(delay - 0.001)
            lag = time.perf_counter() - scheduled
            measured = i >= n_warm
            if measured:
                self.lags.append(max(0.0, lag))
            self.submit(Pending(i, scheduled, measured))
        self.sending = False
        if self.outstanding:
            try:
                await asyncio.wait_for(self.all_done.wait(), self.timeout + self.drain)
            except TimeoutError:
                pass
        end_of_run = time.perf_counter()
        for conn in list(self.all):
            if conn.transport is not None:
                conn.transport.close()
        return self.summary(n - n_warm, end_of_run - (t0 + self.warmup))

    def summary(self, expected: int, elapsed: float) -> dict:
        ok = [p for p in self.results if p.error is None and p.done is not None]
        lost = expected - len(self.results)
        if lost > 0:
            self.errors["unfinished"] += lost
        # From the scheduled time, or from the actual send if that was (up to 1 ms) earlier.
        lat = [(p.done - min(p.scheduled, p.sent or p.scheduled)) * 1000 for p in ok]  # type: ignore[operator]
        ttfb = [(p.first_byte - min(p.scheduled, p.sent or p.scheduled)) * 1000 for p in ok if p.first_byte is not None]
        lag_ms = [x * 1000 for x in self.lags]
        ok_in_window = sum(1 for p in ok if p.done is not None)
        r = lambda v: None if v is None else round(v, 3)  # noqa: E731
        return {
            "rate": self.rate, "duration": self.duration, "warmup": self.warmup, "stream": self.stream,
            "sent": expected, "ok": ok_in_window, "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "achieved_rate": round(ok_in_window / self.duration, 2),
            "p50_ms": r(percentile(lat, 50)), "p95_ms": r(percentile(lat, 95)), "p99_ms": r(percentile(lat, 99)),
            "max_ms": r(max(lat) if lat else None), "mean_ms": r(sum(lat) / len(lat) if lat else None),
            "ttfb_p50_ms": r(percentile(ttfb, 50)) if self.stream else None,
            "ttfb_p99_ms": r(percentile(ttfb, 99)) if self.stream else None,
            "send_lag_p99_ms": r(percentile(lag_ms, 99)), "send_lag_max_ms": r(max(lag_ms) if lag_ms else None),
            "connections_opened": self.connects, "stale_connection_retries": self.retries, "elapsed_s": round(elapsed, 3),
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="full URL of the chat completions endpoint")
    ap.add_argument("--rate", type=float, required=True, help="requests per second (open loop)")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds at the same rate before measuring")
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds from a request's scheduled time")
    ap.add_argument("--drain", type=float, default=1.0, help="extra seconds to wait for stragglers")
    ap.add_argument("--max-connections", type=int, default=1000)
    ap.add_argument("--model", default="bench")
    ap.add_argument("--api-key", default="sk-bench", help="sent as the bearer token")
    ap.add_argument("--tag", default=f"p{os.getpid()}-{int(time.time())}", help="prefix making prompts unique")
    ap.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="extra request header")
    args = ap.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)

    async def go() -> dict:
        gen = LoadGenerator(args.url, rate=args.rate, duration=args.duration, warmup=args.warmup, stream=args.stream,
                            timeout=args.timeout, max_connections=args.max_connections, model=args.model,
                            tag=args.tag, headers={k.strip(): v.strip() for k, v in headers.items()}, drain=args.drain,
                            api_key=args.api_key)
        return await gen.run()

    print(json.dumps(asyncio.run(go())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
