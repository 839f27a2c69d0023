"""Fault-injection soak: 200 concurrent clients against the proxy while its upstream misbehaves.

The proxy runs as ``python -m guard.cli serve`` (a subprocess, so its RSS can be read), the
fault upstream (``tests/fault_upstream.py``) in another, and 200 asyncio+httpx clients in this
process, all on 127.0.0.1. The upstream injects 10% 5xx, 5% stalls past the timeouts, 5% TCP
resets, 5% unparseable probe answers and 5% slow streams, on probe and generation calls alike.

Pass means: no 500 of the guard's own (every 5xx is either the upstream's error, byte for
byte, or a 502/504 in the OpenAI error shape); every request is answered; the action counters
sum to the requests sent; the datapoint log has exactly one record per request, none dropped;
the proxy's RSS grows less than 10% from the end of warm-up to the end.

Bounded: ``RG_SOAK_SECONDS`` (default 60) of load, ``RG_SOAK_CLIENTS`` (default 200) clients.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest

from tests.fault_upstream import (
    FaultUpstreamProcess,
    ProxyProcess,
    datapoint_rows,
    injected_error_body,
    metric_samples,
    metric_sum,
)

SECONDS = float(os.environ.get("RG_SOAK_SECONDS", "60"))
CLIENTS = int(os.environ.get("RG_SOAK_CLIENTS", "200"))
WARMUP = min(10.0, SECONDS / 4)
MODE = os.environ.get("RG_SOAK_MODE", "sequential")


@dataclass
class Tally:
    sent: list[str] = field(default_factory=list)  # request ids
    outcomes: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def classify(status: int, body: bytes, stream: bool, content_type: str) -> str:
    """Name one response, or raise AssertionError if the guard misbehaved."""
    if status == 200:
        if stream and content_type.startswith("text/event-stream"):
            if body.endswith(b"data: [DONE]\n\n"):
                return "stream_done"
            last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
            assert last.startswith(b"data: {") and "error" in json.loads(last[6:]), f"stream ended badly: {body[-200:]!r}"
            return "stream_error_in_band"
        answer = json.loads(body)
        assert answer["choices"][0]["message"]["content"], body[:200]
        return "completion_blocked" if answer["choices"][0]["finish_reason"] == "content_filter" else "completion"
    if status in (500, 502, 503) and body == injected_error_body(status):
        return f"upstream_{status}_passed_through"
    assert status in (502, 504), f"status {status} of the guard's own: {body[:300]!r}"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "upstream_error", body[:300]
    return f"guard_{status}_{error['code']}"


async def client_loop(n: int, client: httpx.AsyncClient, deadline: float, tally: Tally, rng: random.Random) -> None:
    while time.monotonic() < deadline:
        stream = rng.random() < 0.5
        roll = rng.random()
        if roll < 0.1:
            prompt = f"PLEASE-REFUSE request {rng.randrange(50)}"  # probe predicts refusal (conf 5): blocked
        elif roll < 0.4:
            prompt = f"popular question {rng.randrange(100)}"  # repeats: probe cache and shared probes
        else:
            prompt = f"client {n} question {uuid.uuid4().hex}"
        request_id = uuid.uuid4().hex
        body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": prompt}]}
        tally.sent.append(request_id)
        started = time.perf_counter()
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body,
                                     headers={"x-request-id": request_id}) as response:
                data = await response.aread()
            tally.latencies.append(time.perf_counter() - started)
            tally.statuses[response.status_code] += 1
            assert response.headers.get("x-request-id") == request_id
            tally.outcomes[classify(response.status_code, data, stream, response.headers.get("content-type", ""))] += 1
        except AssertionError as exc:
            tally.problems.append(str(exc))
        except httpx.HTTPError as exc:
            tally.problems.append(f"no answer: {type(exc).__name__}: {exc}")
        await asyncio.sleep(rng.uniform(0.0, 0.3))  # think time


async def run_load(url: str, rss_at_warmup: list[int], proxy: ProxyProcess) -> Tally:
    tally = Tally()
    # Reuse an idle connection only well inside the proxy's keepalive_timeout (5 s): with equal timeouts
    # (httpx's default expiry is also 5 s) the server may close a connection as the client sends on it.
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(30.0)) as client:
        deadline = time.monotonic() + SECONDS

        async def sample_rss() -> None:
            await asyncio.sleep(WARMUP)
            rss_at_warmup.append(proxy.rss_kib())

        sampler = asyncio.create_task(sample_rss())
        await asyncio.gather(*(client_loop(n, client, deadline, tally, random.Random(n)) for n in range(CLIENTS)))
        await sampler
    return tally


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fault_injection_soak(tmp_path, capsys):
    db = tmp_path / "datapoints.sqlite3"
    plan = {"p_5xx": 0.10, "p_stall": 0.05, "p_reset": 0.05, "p_bad_probe": 0.05, "p_slow_stream": 0.05,
            "stall_seconds": 2.5, "slow_chunk_delay": 0.15, "seed": 20240601}
    with FaultUpstreamProcess(plan) as upstream, ProxyProcess(
        upstream.url + "/v1", tmp_path, "--mode", MODE, "--datapoints", str(db),
        "--probe-timeout", "0.5", "--read-timeout", "1.5", "--connect-timeout", "2",
        "--circuit-failures", "5", "--circuit-cooldown", "2", "--shutdown-grace", "10",
    ) as proxy:
        rss_start = proxy.rss_kib()
        rss_warm: list[int] = []
        started = time.monotonic()
        tally = asyncio.run(run_load(proxy.url, rss_warm, proxy))
        elapsed = time.monotonic() - started
        rss_end = proxy.rss_kib()
        sent = len(tally.sent)

        # Scoring runs just after the last byte: give the counters a moment to catch up.
        deadline = time.monotonic() + 10
        while True:
            samples = metric_samples(proxy.url)
            counted = metric_sum(samples, "refusal_guard_requests_total")
            if counted >= sent or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        dropped = metric_sum(samples, "refusal_guard_datapoints_dropped_total")
        own_500 = metric_sum(samples, "refusal_guard_http_requests_total", route="chat", status="500")
        circuit_opened = metric_sum(samples, "refusal_guard_probe_failures_total", reason="circuit_open")
        upstream_stats = upstream.stats()
        # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught (exit status -15).
        assert proxy.terminate(timeout=30) in (0, -15)
        output = proxy.output()
    rows = datapoint_rows(db)

    latencies = sorted(tally.latencies)
    p50 = latencies[len(latencies) // 2] if latencies else float("nan")
    p99 = latencies[int(len(latencies) * 0.99)] if latencies else float("nan")
    faults = {k: v for k, v in sorted(upstream_stats.items()) if ":" in k and not k.endswith(":none")}
    with capsys.disabled():
        print(f"\n[soak] mode={MODE} clients={CLIENTS} load={elapsed:.1f}s requests={sent} "
              f"({sent / elapsed:.0f}/s) answered={len(latencies)} p50={p50 * 1000:.0f}ms p99={p99 * 1000:.0f}ms")
        print(f"[soak] statuses={dict(sorted(tally.statuses.items()))}")
        print(f"[soak] outcomes={dict(sorted(tally.outcomes.items()))}")
        print(f"[soak] upstream calls={upstream_stats.get('generation', 0)} generations + "
              f"{upstream_stats.get('probe', 0)} probes; injected={faults}")
        print(f"[soak] counters={counted:.0f} datapoints={len(rows)} dropped={dropped:.0f} "
              f"circuit_open_skips={circuit_opened:.0f}")
        print(f"[soak] rss start={rss_start}KiB warm={rss_warm[0] if rss_warm else '?'}KiB end={rss_end}KiB "
              f"growth={(rss_end / rss_warm[0] - 1) * 100 if rss_warm else float('nan'):+.1f}%")

    assert not tally.problems, f"{len(tally.problems)} problems, first: {tally.problems[:5]}"
    assert len(latencies) == sent > 0
    assert "Finished server process" in output
    assert "unhandled error" not in output and "Traceback" not in output, output[-3000:]
    assert own_500 == tally.outcomes["upstream_500_passed_through"]  # every 500 was the upstream's
    for kind in ("status_5xx", "stall", "reset"):
        assert upstream_stats.get(f"generation:{kind}", 0) > 0 and upstream_stats.get(f"probe:{kind}", 0) > 0
    assert upstream_stats.get("probe:bad_probe", 0) > 0 and upstream_stats.get("generation:slow_stream", 0) > 0
    assert counted == sent
    assert dropped == 0
    assert len(rows) == sent
    assert sorted(r["request_id"] for r in rows) == sorted(tally.sent)
    assert rss_warm and rss_end < rss_warm[0] * 1.10
