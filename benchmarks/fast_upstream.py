"""A fast scripted OpenAI-compatible upstream for load tests (stdlib asyncio only).

Not a general HTTP server: a hand-written HTTP/1.1 keep-alive protocol that answers
``POST /v1/chat/completions`` and ``GET /v1/models`` after a fixed, known service time, so
that at 1,000+ requests/s it costs a few percent of a core and every system under test
(direct calls, refusal-guard, LiteLLM) sees exactly the same upstream.

* Generation: answered ``--gen-ms`` after the request is read. Non-streamed: one JSON
  completion (``content-length``). Streamed (``"stream": true``): SSE over chunked encoding;
  the role event and first content chunk at ``--gen-ms``, then ``--stream-chunks`` more
  content events ``--chunk-gap-ms`` apart, then the finish event and ``[DONE]``.
* Probe (header ``x-refusal-guard-probe: 1``): a completion whose content is a valid JSON
  prediction ``{"will_refuse": false, "confidence": 4, "harm_rating": 1, "topic": "other"}``
  (the default policy passes it), answered ``--probe-ms`` after the request.

Several listeners with different timings can share one process:
``--serve 8101:5:5 --serve 8102:50:20`` (port:gen_ms:probe_ms). Prints ``ready`` once all
listen. Counters go to stderr on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

PROBE_ANSWER = json.dumps({"will_refuse": False, "confidence": 4, "harm_rating": 1, "topic": "other"})
REPLY = "Paris is the capital of France, and it is also its largest city."
MODELS = json.dumps({"object": "list", "data": [{"id": "bench", "object": "model", "owned_by": "bench"}]}).encode()


class Timing:
    def __init__(self, gen_ms: float, probe_ms: float, chunks: int, gap_ms: float) -> None:
        self.gen = gen_ms / 1000
        self.probe = probe_ms / 1000
        self.chunks = chunks
        self.gap = gap_ms / 1000
        self.counts = {"generation": 0, "stream": 0, "probe": 0, "models": 0, "bad": 0}


def _completion(content: str, model: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 14, "total_tokens": 26},
    }, separators=(",", ":")).encode()


def _head(status: str, ctype: bytes, length: int | None) -> bytes:
    framing = b"content-length: %d\r\n" % length if length is not None else b"transfer-encoding: chunked\r\n"
    return (b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + ctype + b"\r\n" + framing
            + b"connection: keep-alive\r\n\r\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return _chunk(b"data: " + data.encode() + b"\n\n")


class UpstreamProtocol(asyncio.Protocol):
    """One client connection; requests are answered in order (no pipelining needed)."""

    def __init__(self, timing: Timing) -> None:
        self.timing = timing
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a response is being produced
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def _next(self) -> None:
        """Parse one complete request from the buffer, if there is one, and schedule its answer."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        method, path, _ = (head[0].split(" ") + ["", ""])[:3]
        headers: dict[str, str] = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            pos = start
            while True:
                nl = self.buf.find(b"\r\n", pos)
                if nl < 0:
                    return
                size = int(bytes(self.buf[pos:nl]).split(b";")[0], 16)
                if size == 0:
                    if len(self.buf) < nl + 4:
                        return
                    consumed = nl + 4
                    break
                if len(self.buf) < nl + 2 + size + 2:
                    return
                body += self.buf[nl + 2: nl + 2 + size]
                pos = nl + 2 + size + 2
            body = bytes(body)
        else:
            length = int(headers.get("content-length", "0") or 0)
            if len(self.buf) < start + length:
                return
            body = bytes(self.buf[start:start + length])
            consumed = start + length
        del self.buf[:consumed]
        self.busy = True
        path = path.split("?")[0]
        if method == "GET" and path.endswith("/models"):
            self.timing.counts["models"] += 1
            self._finish(_head("200 OK", b"application/json", len(MODELS)) + MODELS)
        elif method == "POST" and path.endswith("/chat/completions"):
            try:
                data = json.loads(body)
                model = str(data.get("model") or "bench")
                stream = bool(data.get("stream"))
            except ValueError:
                self.timing.counts["bad"] += 1
                err = b'{"error":{"message":"bad json","type":"invalid_request_error"}}'
                self._finish(_head("400 Bad Request", b"application/json", len(err)) + err)
                return
            if headers.get("x-refusal-guard-probe") == "1":
                self.timing.counts["probe"] += 1
                payload = _completion(PROBE_ANSWER, model)
                self.loop.call_later(self.timing.probe, self._finish,
                                     _head("200 OK", b"application/json", len(payload)) + payload)
            elif stream:
                self.timing.counts["stream"] += 1
                self.loop.call_later(self.timing.gen, self._stream, model, 0)
            else:
                self.timing.counts["generation"] += 1
                payload = _completion(REPLY, model)
                self.loop.call_later(self.timing.gen, self._finish,
                                     _head("200 OK", b"application/json", len(payload)) + payload)
        else:
            self.timing.counts["bad"] += 1
            err = b'{"error":{"message":"not found","type":"invalid_request_error"}}'
            self._finish(_head("404 Not Found", b"application/json", len(err)) + err)

    def _finish(self, data: bytes) -> None:
        self._write(data)
        self.busy = False
        if self.buf and not self.closed:
            self._next()

    def _stream(self, model: str, step: int) -> None:
        """Emit the stream: step 0 = head + role + first piece; then one piece per gap; then the end."""
        if self.closed:
            self.busy = False
            return
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        words = REPLY.split(" ")
        n = max(1, self.timing.chunks)
        pieces = [" ".join(words[i * len(words) // n:(i + 1) * len(words) // n]) + " " for i in range(n)]
        if step == 0:
            out = _head("200 OK", b"text/event-stream", None)
            out += _event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None}]})
        else:
            out = b""
        if step < n:
            out += _event({**base, "choices": [{"index": 0, "delta": {"content": pieces[step]}, "finish_reason": None}]})
        if step + 1 >= n:
            out += _event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            out += _event("[DONE]") + b"0\r\n\r\n"
            self._finish(out)
            return
        self._write(out)
        if self.timing.gap > 0:
            self.loop.call_later(self.timing.gap, self._stream, model, step + 1)
        else:
            self._stream(model, step + 1)


async def serve(specs: list[tuple[int, float, float]], chunks: int, gap_ms: float, host: str) -> None:
    loop = asyncio.get_running_loop()
    timings = []
    servers = []
    for port, gen_ms, probe_ms in specs:
        timing = Timing(gen_ms, probe_ms, chunks, gap_ms)
        timings.append((port, timing))
        servers.append(await loop.create_server(lambda t=timing: UpstreamProtocol(t), host, port, backlog=4096))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()
    for port, timing in timings:
        print(f"fast_upstream :{port} {timing.counts}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", action="append", required=True, metavar="PORT:GEN_MS:PROBE_MS")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--stream-chunks", type=int, default=8, help="content events per streamed answer")
    ap.add_argument("--chunk-gap-ms", type=float, default=1.0, help="time between streamed content events")
    args = ap.parse_args()
    specs = []
    for spec in args.serve:
        port, gen, probe = spec.split(":")
        specs.append((int(port), float(gen), float(probe)))
    asyncio.run(serve(specs, args.stream_chunks, args.chunk_gap_ms, args.host))
    return 0


if __name__ == "__main__":
    sys.exit(main())
