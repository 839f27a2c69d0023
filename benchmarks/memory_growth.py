"""Memory growth: the proxy's RSS after 100,000 requests with unique prompts vs after 10,000.

    python benchmarks/memory_growth.py

Starts ``benchmarks/fast_upstream.py`` and ``refusal-guard serve --mode sequential`` (probe
cache on at its default size, 10,000 entries; datapoints to a temporary SQLite file), then
sends chat requests, every one with a unique prompt, from a closed-loop driver (a fixed
number of keep-alive connections, each sending its next request when the previous one is
answered). The proxy's resident set size (VmRSS of its process tree) is read at
checkpoints; the caches, live windows and queues are bounded, so RSS at 100,000 should be
within 10% of RSS at 10,000 (by then the probe cache is full).

If the run would pass ``--time-limit`` seconds, it stops at the last checkpoint reached and
says so. The result goes to stdout and to ``BENCHMARKS.md`` (``memory_growth`` section).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    REPO,
    exit_on_sigterm,
    free_port,
    git_revision,
    machine_facts,
    rss_bytes,
    stop_process,
    tree_pids,
    versions,
    wait_http,
    write_section,
)

HERE = Path(__file__).resolve().parent


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    length = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
        elif name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if length is not None:
        await reader.readexactly(length)
    elif chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


class Driver:
    def __init__(self, port: int, concurrency: int, tag: str) -> None:
        self.port = port
        self.concurrency = concurrency
        self.tag = tag
        self.next_index = 0
        self.done = 0
        self.errors = 0

    def request(self, index: int) -> bytes:
        body = json.dumps({"model": "bench", "max_tokens": 32, "messages": [
            {"role": "user", "content": f"[{self.tag}-{index}] Tell me one fact about the number {index}."}]},
            separators=(",", ":")).encode()
        return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{self.port}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body

    async def run_until(self, target: int) -> None:
        async def worker() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                while self.next_index < target:
                    index = self.next_index
                    self.next_index += 1
                    try:
                        status = await asyncio.wait_for(_one(reader, writer, self.request(index)), 30)
                    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                        status = 0
                        writer.close()
                        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    self.done += 1
                    if status != 200:
                        self.errors += 1
            finally:
                writer.close()

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))


def main() -> int:
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--baseline", type=int, default=10_000, help="the checkpoint the final RSS is compared with")
    ap.add_argument("--checkpoints", default="1000,10000,25000,50000,75000,100000")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--mode", default="sequential")
    ap.add_argument("--gen-ms", type=float, default=2.0)
    ap.add_argument("--probe-ms", type=float, default=2.0)
    ap.add_argument("--time-limit", type=float, default=540.0, help="stop at the last checkpoint before this many seconds")
    ap.add_argument("--settle", type=float, default=2.0, help="idle seconds before each RSS reading (queues drain)")
    ap.add_argument("--guard-root", default=str(REPO))
    ap.add_argument("--guard-python", default=sys.executable)
    ap.add_argument("--guard-label", default=None)
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", help="markdown file to update ('-': none)")
    args = ap.parse_args()
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if int(c) <= args.requests} | {args.requests,
                                                                                                      args.baseline})
    command = "python benchmarks/memory_growth.py " + " ".join(sys.argv[1:])
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="rg-memory-"))
    up_port, port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, str(HERE / "fast_upstream.py"), "--serve",
                                 f"{up_port}:{args.gen_ms}:{args.probe_ms}"], stdout=subprocess.PIPE,
                                stderr=open(workdir / "upstream.log", "w"), text=True, start_new_session=True)
    assert upstream.stdout is not None
    if upstream.stdout.readline().strip() != "ready":
        raise RuntimeError("fast_upstream did not start")
    db = workdir / "datapoints.sqlite3"
    guard = subprocess.Popen(
        [args.guard_python, "-m", "guard.cli", "serve", "--upstream", f"http://127.0.0.1:{up_port}/v1",
         "--port", str(port), "--mode", args.mode, "--datapoints", str(db), "--workers", "1"],
        cwd=args.guard_root, stdout=open(workdir / "guard.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    rows: list[tuple[int, int, float, int]] = []  # (requests, rss bytes, seconds so far, errors)
    stopped_early = None
    try:
        wait_http("127.0.0.1", port, "/healthz", 60, guard)
        driver = Driver(port, args.concurrency, f"mem{os.getpid()}-{int(time.time())}")
        t0 = time.monotonic()
        rss0 = rss_bytes(tree_pids(guard.pid))
        print(f"guard pid {guard.pid}: RSS at start {rss0 / 2**20:.1f} MiB", flush=True)
        last_t, last_n = t0, 0
        for cp in checkpoints:
            elapsed = time.monotonic() - t0
            rate = last_n / (last_t - t0) if last_n else None
            if rate and elapsed + (cp - last_n) / rate > args.time_limit:
                stopped_early = (f"stopped after {last_n} requests: at {rate:.0f} req/s, reaching {cp} would pass "
                                 f"the {args.time_limit:.0f} s limit")
                print(stopped_early, flush=True)
                break
            asyncio.run(driver.run_until(cp))
            last_t, last_n = time.monotonic(), cp
            time.sleep(args.settle)
            rss = rss_bytes(tree_pids(guard.pid))
            rows.append((cp, rss, last_t - t0, driver.errors))
            print(f"{cp:>7} requests: RSS {rss / 2**20:7.1f} MiB  ({(last_t - t0):6.1f} s, "
                  f"{cp / (last_t - t0):6.0f} req/s, errors {driver.errors})", flush=True)
    finally:
        stop_process(guard, grace=15)
        stop_process(upstream)
    written = None
    try:
        import sqlite3

        con = sqlite3.connect(db)
        written = con.execute("SELECT COUNT(*) FROM datapoints").fetchone()[0]
        con.close()
    except Exception:  # noqa: BLE001 - only informative
        pass
    base = next((r for r in rows if r[0] == args.baseline), None)
    final = rows[-1] if rows else None
    ratio = final[1] / base[1] if base and final else None
    lines = ["## Memory growth (`benchmarks/memory_growth.py`)", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')}; guard code: {args.guard_label or git_revision(Path(args.guard_root))}; "
             f"{(time.monotonic() - started) / 60:.1f} minutes.", "", "Command:", "", "```", command, "```", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in machine_facts().items()) + "; " + ", ".join(f"{k} {v}" for k, v in versions(["fastapi", "uvicorn", "httpx", "aiohttp"]).items()) + ".", "",
             f"`refusal-guard serve --mode {args.mode}` (probe cache on, default size 10,000, TTL 600 s; datapoints to a "
             f"temporary SQLite file) in front of `fast_upstream.py` (generation {args.gen_ms:g} ms, probe {args.probe_ms:g} ms); "
             f"a closed-loop driver with {args.concurrency} keep-alive connections; every prompt unique (every probe a cache miss). "
             f"RSS = VmRSS of the proxy process, read after {args.settle:g} s idle at each checkpoint.", "",
             "| requests | RSS MiB | elapsed s | errors |", "|---:|---:|---:|---:|"]
    lines += [f"| {n} | {rss / 2**20:.1f} | {t:.0f} | {e} |" for n, rss, t, e in rows]
    lines.append("")
    if ratio is not None and base is not None and final is not None:
        verdict = "met" if ratio <= 1.10 else "missed"
        lines.append(f"RSS after {final[0]} requests / after {base[0]}: **{ratio:.3f}** (target <= 1.10 at 100,000: "
                     f"**{verdict if final[0] >= 100_000 else 'not reached: ' + verdict + ' for the requests run'}**). "
                     f"Datapoints written: {written}.")
    if stopped_early:
        lines.append(f"Note: {stopped_early}.")
    text = "\n".join(lines)
    print("\n" + text)
    if str(args.out) != "-":
        write_section(args.out, "memory_growth", text)
        print(f"updated {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
