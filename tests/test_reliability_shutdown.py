"""Graceful shutdown: SIGTERM mid-load loses nothing.

The proxy runs as ``python -m guard.cli serve`` with ``--shutdown-grace`` (uvicorn's
``timeout_graceful_shutdown``). Clients keep sending slow requests (streams of ~2 s, whole
answers after ~1 s) and a ``/readyz`` is in flight when SIGTERM arrives. Then:

* ``/readyz`` answers 503 ``draining`` (the guard chains uvicorn's signal handler);
* every request the proxy had accepted completes: 200, streams through ``[DONE]``;
* requests after the signal are refused at connect (the listener is closed), never half-answered;
* the datapoint queue is flushed: exactly the completed requests have a record;
* the process exits cleanly within the grace period.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from tests.fault_upstream import FaultPlan, FaultUpstream, ProxyProcess, datapoint_rows

NO_FAULTS = dict(p_5xx=0, p_stall=0, p_reset=0, p_bad_probe=0, p_slow_stream=0)


@pytest.mark.timeout(120)
def test_sigterm_mid_load_finishes_in_flight_work_and_flushes_datapoints(tmp_path):
    db = tmp_path / "dp.sqlite3"
    plan = FaultPlan(**NO_FAULTS, chunk_delay=0.25, chunks=8, generation_delay=1.0, models_stall=1.0)
    with FaultUpstream(plan) as upstream, ProxyProcess(
        upstream.url + "/v1", tmp_path, "--mode", "sequential", "--datapoints", str(db), "--shutdown-grace", "15",
        "--read-timeout", "10",
    ) as proxy:
        answered: dict[str, tuple[int, bytes, bool]] = {}
        finished_after_signal: list[str] = []
        broken: list[str] = []
        signalled = asyncio.Event()

        async def client(n: int, http: httpx.AsyncClient) -> None:
            i = 0
            while True:
                request_id, stream = uuid.uuid4().hex, (n + i) % 2 == 0
                i += 1
                body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": f"c{n} r{i}"}]}
                try:
                    async with http.stream("POST", "/v1/chat/completions", json=body,
                                           headers={"x-request-id": request_id}) as r:
                        answered[request_id] = (r.status_code, await r.aread(), stream)
                    if signalled.is_set():
                        finished_after_signal.append(request_id)
                except httpx.TransportError:
                    # A keep-alive connection closed by the shutdown before it carried this request.
                    broken.append(request_id)
                    return
                if signalled.is_set():
                    return

        async def readyz(http: httpx.AsyncClient) -> httpx.Response:
            return await http.get("/readyz?upstream=1")  # the upstream's /models stalls: in flight at the signal

        async def main() -> tuple[httpx.Response, bool]:
            limits = httpx.Limits(max_connections=40)
            async with httpx.AsyncClient(base_url=proxy.url, limits=limits, timeout=60) as http:
                assert (await http.get("/readyz")).status_code == 200
                clients = [asyncio.create_task(client(n, http)) for n in range(20)]
                await asyncio.sleep(1.6)  # a round of requests done, the next one in flight
                ready = asyncio.create_task(readyz(http))
                await asyncio.sleep(0.3)
                proxy.proc.send_signal(15)
                signalled.set()
                signal_at = time.monotonic()
                await asyncio.gather(*clients)
                assert time.monotonic() - signal_at < 15
                try:
                    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as fresh:
                        await fresh.post("/v1/chat/completions",
                                         json={"model": "m", "messages": [{"role": "user", "content": "late"}]})
                    late_refused = False
                except httpx.ConnectError:
                    late_refused = True  # the listener is closed: a new connection is not accepted
                return await ready, late_refused

        ready, late_refused = asyncio.run(main())
        exit_status = proxy.proc.wait(timeout=30)
        output = proxy.output()

    assert ready.status_code == 503 and ready.json() == {"status": "draining"}
    assert exit_status in (0, -15)  # uvicorn re-raises the SIGTERM it handled
    assert "Finished server process" in output and "Traceback" not in output, output[-3000:]
    assert "timeout graceful shutdown exceeded" not in output
    assert late_refused
    assert len(finished_after_signal) >= 15  # in flight at the signal, completed during the drain
    assert not broken, broken
    for request_id, (status, body, stream) in answered.items():
        assert status == 200, body[:300]
        if stream:
            assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
    rows = datapoint_rows(db)
    assert sorted(r["request_id"] for r in rows) == sorted(answered)  # flushed, nothing lost, nothing extra
    assert all(r["action"] == "pass" for r in rows)
