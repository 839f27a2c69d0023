"""``/healthz`` latency while the guard processes the largest request of each kind (issue 23, rows 4 and 9).

Starts a scripted upstream (a child process: probes predict a refusal, so every guarded request is
blocked after its probe and the guard does all its own work: parse, view, probe, block answer) and
the proxy (``python -m guard.cli serve``, a child process) on loopback, then for each kind sends the
request (built before timing starts, seeded) ``--repeat`` times, one at a time, while a poller thread
sends ``GET /healthz`` back to back on one keep-alive connection. Prints, per kind, the request's
status and seconds, ``/healthz`` p50/p99/max beside the 50 ms target, and the proxy's peak RSS so far.

Kinds: the largest request each limit accepts (bodies just under the 32 MiB ``max_body_bytes``), and
the attacks of the issue (now rejected with a 400; ``--attacks``). ``--guard-src DIR`` runs the proxy
from another source tree (e.g. ``git archive HEAD | tar -x -C /tmp/old``) for a before/after.

    .venv/bin/python benchmarks/healthz_under_load.py [--repeat 3] [--attacks] [--only KIND,...]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_common import free_port, wait_http  # noqa: E402

TARGET_MS = 50.0
BODY_ROOM = 31 * 1024 * 1024  # under the default 32 MiB limit, with room for the JSON around the filler
REFUSE = json.dumps({"will_refuse": True, "confidence": 5, "harm_rating": 5, "topic": "weapons"})


# --- the scripted upstream (run as a child: ``--upstream-port``) --------------------------------------------


def serve_upstream(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def completion(content: str) -> dict:
        return {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    async def chat(request: Request) -> JSONResponse:
        await request.body()
        if request.headers.get("x-refusal-guard-probe") == "1":
            return JSONResponse(completion(REFUSE))
        return JSONResponse(completion("Sure."))

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/v1/models", models, methods=["GET"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- the requests ------------------------------------------------------------------------------------------


def text(rng: random.Random, n: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "ember", "quartz", "maple"]
    out, size = [], 0
    while size < n:
        w = rng.choice(words)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


def kinds(rng: random.Random, attacks: bool) -> dict[str, tuple[str, bytes]]:
    from guard.apis.base import (
        MAX_BATCH_CHOICES,
        MAX_CHOICES,
        MAX_INPUT_ITEMS,
        MAX_JSON_OBJECTS,
        MAX_MESSAGES,
        MAX_TOOLS,
    )

    def body(path: str, data: dict) -> tuple[str, bytes]:
        raw = json.dumps(data, separators=(",", ":")).encode()
        assert len(raw) < 32 * 1024 * 1024, (path, len(raw))
        return path, raw

    per_message = BODY_ROOM // MAX_MESSAGES - 64
    per_item = BODY_ROOM // MAX_INPUT_ITEMS - 96
    per_tool = BODY_ROOM // MAX_TOOLS - 256
    out = {
        "completions_16x128_stream": body("/v1/completions", {
            "model": "m", "prompt": [text(rng, 40) for _ in range(MAX_BATCH_CHOICES // MAX_CHOICES)],
            "n": MAX_CHOICES, "stream": True}),
        "completions_2048_prompts": body("/v1/completions", {
            "model": "m", "prompt": [text(rng, BODY_ROOM // 2048 - 8) for _ in range(2048)]}),
        "chat_2048_messages": body("/v1/chat/completions", {"model": "m", "messages": [
            {"role": "user" if i % 2 else "assistant", "content": text(rng, per_message)} for i in range(MAX_MESSAGES)]}),
        "chat_199k_text_parts": body("/v1/chat/completions", {"model": "m", "messages": [
            {"role": "user", "content": [{"type": "text", "text": text(rng, 120)} for _ in range(MAX_JSON_OBJECTS - 1000)]}]}),
        "chat_128_tools": body("/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": f"t{i}", "description": text(rng, per_tool // 2),
                                                        "parameters": {"type": "object", "description": text(rng, per_tool // 2)}}}
                      for i in range(MAX_TOOLS)]}),
        "responses_10000_items": body("/v1/responses", {"model": "m", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": text(rng, per_item)}]} for _ in range(MAX_INPUT_ITEMS)]}),
        "responses_one_30MB_item": body("/v1/responses", {"model": "m", "input": text(rng, BODY_ROOM)}),
    }
    if attacks:
        out |= {
            "attack_completions_20000x128": body("/v1/completions", {
                "model": "m", "prompt": ["x"] * 20_000, "n": 128, "stream": True}),
            "attack_chat_1M_messages": body("/v1/chat/completions", {
                "model": "m", "messages": [{"role": "user", "content": "x"}] * 1_000_000}),
            "attack_responses_1M_items": body("/v1/responses", {
                "model": "m", "input": [{"role": "user", "content": "x"}] * 1_000_000}),
            "attack_chat_1M_text_parts": body("/v1/chat/completions", {"model": "m", "messages": [
                {"role": "user", "content": [{"type": "text", "text": "w"} for _ in range(1_000_000)]}]}),
            "attack_chat_700k_tools": body("/v1/chat/completions", {
                "model": "m", "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f"}}] * 700_000}),
        }
    return out


# --- measuring ---------------------------------------------------------------------------------------------


class Poller(threading.Thread):
    """``GET /healthz`` back to back on one keep-alive connection; latencies in ms while ``recording``."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[float] = []
        self.recording = False
        self.stop = False

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.stop:
            started = time.perf_counter()
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
            elapsed = (time.perf_counter() - started) * 1000
            if self.recording:
                self.samples.append(elapsed)
            time.sleep(0.002)


def send(port: int, path: str, raw: bytes) -> tuple[int, float, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    conn.request("POST", path, body=raw, headers={"content-type": "application/json", "authorization": "Bearer sk-b"})
    response = conn.getresponse()
    size = 0
    while chunk := response.read(1 << 20):
        size += len(chunk)
    conn.close()
    return response.status, time.perf_counter() - started, size


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set so far (VmHWM), in MB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--attacks", action="store_true", help="also send the issue's attacks (now 400s)")
    parser.add_argument("--only", default="", help="comma-separated kinds")
    parser.add_argument("--guard-src", default=None, help="run the proxy from this source tree")
    parser.add_argument("--proxy-log", default=None, help="the proxy's stderr goes here (e.g. with PYTHONASYNCIODEBUG=1)")
    parser.add_argument("--upstream-port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream_port:
        serve_upstream(args.upstream_port)
        return 0

    rng = random.Random(args.seed)
    requests = kinds(rng, args.attacks)
    if args.only:
        requests = {k: v for k, v in requests.items() if k in args.only.split(",")}
    up_port, port = free_port(), free_port()
    env = dict(os.environ)
    if args.guard_src:
        env["PYTHONPATH"] = args.guard_src
    children = [subprocess.Popen([sys.executable, __file__, "--upstream-port", str(up_port)], start_new_session=True)]
    state = tempfile.TemporaryDirectory(prefix="rg-healthz-")
    try:
        wait_http("127.0.0.1", up_port, "/v1/models", 30, children[0])
        children.append(subprocess.Popen(
            [sys.executable, "-m", "guard.cli", "serve", "--upstream", f"http://127.0.0.1:{up_port}/v1",
             "--port", str(port), "--mode", "sequential", "--probe-timeout", "30", "--upstream-check-interval", "0",
             "--datapoints", str(Path(state.name) / "dp.sqlite3")],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=open(args.proxy_log, "wb") if args.proxy_log else subprocess.DEVNULL,
            cwd=args.guard_src or None))
        wait_http("127.0.0.1", port, "/readyz", 60, children[1])
        poller = Poller(port)
        poller.start()
        time.sleep(0.5)
        poller.recording = True
        time.sleep(1.0)
        poller.recording = False
        idle, poller.samples = poller.samples, []
        print(f"{'kind':32} {'body MB':>8} {'status':>6} {'req s':>7} {'answer MB':>9} {'n':>5} "
              f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'peak RSS MB':>11}  target p99 < {TARGET_MS:.0f} ms")
        print(f"{'(idle)':32} {'':>8} {'':>6} {'':>7} {'':>9} {len(idle):>5} {percentile(idle, .5):7.1f} "
              f"{percentile(idle, .99):7.1f} {max(idle):7.1f} {peak_rss_mb(children[1].pid):11.0f}")
        worst = 0.0
        for kind, (path, raw) in requests.items():
            statuses, seconds, sizes = set(), [], []
            poller.samples = []
            poller.recording = True
            for _ in range(args.repeat):
                status, took, size = send(port, path, raw)
                statuses.add(status)
                seconds.append(took)
                sizes.append(size)
            poller.recording = False
            samples = poller.samples
            p99 = percentile(samples, .99)
            worst = max(worst, p99)
            print(f"{kind:32} {len(raw) / 1e6:8.1f} {','.join(map(str, sorted(statuses))):>6} "
                  f"{statistics.median(seconds):7.2f} {max(sizes) / 1e6:9.2f} {len(samples):>5} "
                  f"{percentile(samples, .5):7.1f} {p99:7.1f} {max(samples or [0]):7.1f} "
                  f"{peak_rss_mb(children[1].pid):11.0f}  "
                  f"{'ok' if p99 < TARGET_MS else 'OVER'}")
        poller.stop = True
        print(f"worst /healthz p99: {worst:.1f} ms (target {TARGET_MS:.0f} ms)")
        return 0
    finally:
        for child in reversed(children):
            try:
                os.killpg(child.pid, 15)
                child.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        state.cleanup()


if __name__ == "__main__":
    sys.exit(main())
