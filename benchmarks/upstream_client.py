"""Upstream client: CPU per call of httpx's own transport vs the guard's (httpx over aiohttp).

    python benchmarks/upstream_client.py [--calls 3000] [--concurrency 4] [--out BENCHMARKS.md]

Starts ``benchmarks/fast_upstream.py`` (1 ms service time) and, in this process, sends the
same chat request ``--calls`` times with ``--concurrency`` in flight through each client,
measuring this process's CPU time per call (after a warm-up). Clients, in interleaved rounds:

* ``httpx (default transport)``: ``httpx.AsyncClient`` as it comes (httpcore + anyio + h11);
  what the guard used before ``guard/proxy/transport.py``.
* ``httpx over guard.proxy.transport``: the client the guard builds (``guard.proxy.transport.pooled_client``).
* ``aiohttp (reference)``: a bare ``aiohttp.ClientSession``, the floor for this pool.

The event loop is uvloop, as in ``refusal-guard serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import REPO, exit_on_sigterm, free_port, git_revision, machine_facts, stop_process, versions, write_section  # noqa: E402

from guard.proxy.transport import pooled_client  # noqa: E402

BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "How do I bake bread?"}]}).encode()
HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-bench", "accept-encoding": "identity"}
TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=120.0, pool=5.0)


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(call: Callable[[], Awaitable[None]], calls: int, concurrency: int) -> float:
    """CPU milliseconds per call, after a warm-up that opens the pool's connections."""
    await asyncio.gather(*(call() for _ in range(4 * concurrency)))
    slots = asyncio.Semaphore(concurrency)

    async def limited() -> None:
        async with slots:
            await call()

    started = cpu_now()
    await asyncio.gather(*(limited() for _ in range(calls)))
    return (cpu_now() - started) / calls * 1000


async def with_httpx(client: httpx.AsyncClient, url: str, calls: int, concurrency: int) -> float:
    async with client:
        async def call() -> None:
            response = await client.post(url, headers=HEADERS, content=BODY)
            if response.status_code != 200:
                raise RuntimeError(f"upstream answered {response.status_code}")
        return await measure(call, calls, concurrency)


async def with_aiohttp(url: str, calls: int, concurrency: int) -> float:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async def call() -> None:
            async with session.post(url, headers=HEADERS, data=BODY) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"upstream answered {response.status}")
        return await measure(call, calls, concurrency)


CLIENTS: dict[str, Callable[[str, int, int], Awaitable[float]]] = {
    "httpx (default transport)": lambda url, n, c: with_httpx(
        httpx.AsyncClient(timeout=TIMEOUT, limits=httpx.Limits(max_connections=512, max_keepalive_connections=128)), url, n, c),
    "httpx over guard.proxy.transport": lambda url, n, c: with_httpx(
        pooled_client(timeout=TIMEOUT, max_connections=512, keepalive_expiry=4.0), url, n, c),
    "aiohttp (reference)": with_aiohttp,
}


def main() -> int:
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="markdown file to update ('-': none)")
    args = ap.parse_args()

    port = free_port()
    upstream = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fast_upstream.py"), "--serve", f"{port}:1:1"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert upstream.stdout is not None and upstream.stdout.readline().strip() == "ready"
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        figures: dict[str, list[float]] = {name: [] for name in CLIENTS}
        for round_ in range(args.rounds):
            for name, run in CLIENTS.items():
                ms = uvloop.run(run(url, args.calls, args.concurrency))
                figures[name].append(ms)
                print(f"round {round_ + 1}: {name:<28} {ms:.3f} ms CPU per call", flush=True)
    finally:
        stop_process(upstream, grace=5)

    facts = machine_facts()
    rows = ["| client | CPU ms per call (each round) | median |", "|---|---|---:|"]
    for name, values in figures.items():
        rows.append(f"| {name} | {', '.join(f'{v:.3f}' for v in values)} | {statistics.median(values):.3f} |")
    command = "python benchmarks/upstream_client.py" + "".join(
        f" --{k} {v}" for k, v in (("calls", args.calls), ("concurrency", args.concurrency), ("rounds", args.rounds)))
    text = "\n".join([
        "## Upstream client (`benchmarks/upstream_client.py`)", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')}; code: {git_revision()}.", "",
        "Command:", "", "```", command, "```", "",
        f"Machine: {facts['nproc']} cores ({facts['cpu']}), Python {facts['python']} ({facts['python_loop']}); "
        + ", ".join(f"{k} {v}" for k, v in versions(["httpx", "httpcore", "anyio", "aiohttp", "uvloop"]).items()) + ".", "",
        f"The same non-streamed chat call to `fast_upstream.py` (1 ms service time), {args.calls} calls per round with "
        f"{args.concurrency} in flight, uvloop; CPU time of the calling process per call, after a warm-up. "
        "The guard makes one such call per request with the probe off and two with it on.", "",
        *rows, "",
    ])
    print(text)
    if args.out != "-":
        write_section(Path(args.out), "upstream_client", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
