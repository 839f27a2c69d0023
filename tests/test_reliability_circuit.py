"""The probe's circuit breaker under sustained probe timeouts, and its recovery.

While the probe path is broken (every probe stalls past ``probe_timeout``), the first
``circuit_failures`` requests each pay the timeout; then the circuit opens and the probe is
skipped, so the latency the guard adds drops to about zero. It is counted
(``refusal_guard_probe_failures_total{reason="circuit_open"}``) and exported
(``refusal_guard_probe_circuit_open``). After the cool-down exactly one trial probe goes
out, even with many requests at once (half-open); when the probe has recovered, that trial
closes the circuit and requests are probed again.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx

from tests.fault_upstream import datapoint_rows, metric_samples, metric_sum

PROBE_TIMEOUT = 0.4
FAILURES = 3
COOLDOWN = 1.5


def ask(url: str, text: str) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = httpx.post(url + "/v1/chat/completions", timeout=20,
                          json={"model": "m", "messages": [{"role": "user", "content": text}]})
    return time.perf_counter() - started, response


def circuit(url: str) -> tuple[float, float, float]:
    s = metric_samples(url)
    return (metric_sum(s, "refusal_guard_probe_circuit_open"),
            metric_sum(s, "refusal_guard_probe_failures_total", reason="circuit_open"),
            metric_sum(s, "refusal_guard_probe_failures_total", reason="timeout"))


def test_circuit_opens_under_probe_timeouts_and_closes_after_recovery(start_proxy, script, tmp_path):
    db = tmp_path / "dp.sqlite3"
    script.probe_stall = 3.0  # every probe times out
    proxy = start_proxy(mode="sequential", probe_timeout=PROBE_TIMEOUT, circuit_failures=FAILURES,
                        circuit_cooldown=COOLDOWN, datapoints=str(db))

    # 1. Closed: each request pays the probe timeout until FAILURES in a row open the circuit.
    slow = [ask(proxy.url, f"slow {i}") for i in range(FAILURES)]
    assert all(r.status_code == 200 for _, r in slow)  # fail-open: answered without a prediction
    assert all(seconds >= PROBE_TIMEOUT for seconds, _ in slow)
    assert circuit(proxy.url) == (1, 0, FAILURES)
    probes_sent = script.calls["probe"]
    assert probes_sent == FAILURES

    # 2. Open: no probe goes out and the added latency is about zero.
    opened_at = time.monotonic()
    fast = [ask(proxy.url, f"fast {i}") for i in range(10)]
    assert time.monotonic() - opened_at < COOLDOWN, "machine too slow for this test's cool-down"
    assert all(r.status_code == 200 and r.headers["x-refusal-guard-prediction"] == "unknown" for _, r in fast)
    assert script.calls["probe"] == probes_sent
    assert sorted(s for s, _ in fast)[5] < PROBE_TIMEOUT / 2  # median well under the timeout it skips
    assert circuit(proxy.url) == (1, 10, FAILURES)

    # 3. Half-open while the probe is still broken: one trial for 8 concurrent requests, then open again.
    time.sleep(COOLDOWN + 0.1)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        burst = list(pool.map(lambda i: ask(proxy.url, f"burst {i}"), range(8)))
    assert all(r.status_code == 200 for _, r in burst)
    assert script.calls["probe"] == probes_sent + 1  # exactly one trial probe
    assert sum(seconds >= PROBE_TIMEOUT for seconds, _ in burst) >= 1
    assert circuit(proxy.url) == (1, 10 + 7, FAILURES + 1)

    # 4. The probe recovers: after the cool-down the trial succeeds and the circuit closes.
    script.probe_stall = 0.0
    time.sleep(COOLDOWN + 0.1)
    seconds, response = ask(proxy.url, "recovered 0")
    assert response.headers["x-refusal-guard-prediction"] == "comply"
    assert circuit(proxy.url) == (0, 17, FAILURES + 1)
    for i in range(1, 4):
        _, response = ask(proxy.url, f"recovered {i}")
        assert response.headers["x-refusal-guard-prediction"] == "comply"
    assert script.calls["probe"] == probes_sent + 1 + 4

    # The datapoints say the same: skipped probes cost 0 ms.
    time.sleep(0.6)
    rows = datapoint_rows(db)
    skipped = [r for r in rows if r["probe_status"] == "skipped"]
    assert len(skipped) == 17 and all(r["probe_ms"] == 0 for r in skipped)
    assert [r["probe_status"] for r in rows].count("timeout") == FAILURES + 1
    assert [r["probe_status"] for r in rows].count("ok") == 4
