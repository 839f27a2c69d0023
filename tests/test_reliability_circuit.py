"""The probe's circuit breaker under sustained probe timeouts, and its recovery.

While the probe path is broken (every probe stalls past ``probe_timeout``), the first
``circuit_failures`` requests each pay the timeout; then a check probe that stalls too opens the
circuit and the probe is skipped, so the latency the guard adds drops to about zero. It is counted
(``refusal_guard_probe_failures_total{reason="circuit_open"}``) and exported
(``refusal_guard_probe_circuit_open``). After the cool-down exactly one trial probe goes
out, even with many requests at once (half-open); when the probe has recovered, that trial
closes the circuit and requests are probed again. Timeouts a client's own prompts cause never
open it: the check probe answers, and the breaker stays closed for everyone else.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx

from tests.fault_upstream import datapoint_rows, metric_samples, metric_sum
from tests.servers import eventually

PROBE_TIMEOUT = 0.4
FAILURES = 3
COOLDOWN = 3.0  # room for 10 requests on a busy 2-core machine


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


def checks(url: str) -> tuple[float, float]:
    """Check probes run: (healthy, unhealthy)."""
    s = metric_samples(url)
    return (metric_sum(s, "refusal_guard_probe_checks_total", result="healthy"),
            metric_sum(s, "refusal_guard_probe_checks_total", result="unhealthy"))


def test_circuit_opens_under_probe_timeouts_and_closes_after_recovery(start_proxy, script, tmp_path):
    db = tmp_path / "dp.sqlite3"
    script.probe_stall = 3.0  # every probe times out
    proxy = start_proxy(mode="sequential", probe_timeout=PROBE_TIMEOUT, circuit_failures=FAILURES,
                        circuit_cooldown=COOLDOWN, datapoints=str(db))

    # 1. Closed: each request pays the probe timeout until FAILURES in a row open the circuit.
    slow = [ask(proxy.url, f"slow {i}") for i in range(FAILURES)]
    assert all(r.status_code == 200 for _, r in slow)  # fail-open: answered without a prediction
    assert all(seconds >= PROBE_TIMEOUT for seconds, _ in slow)
    eventually(lambda: circuit(proxy.url)[0] == 1, what="the check probe timed out and the circuit opened")
    assert circuit(proxy.url) == (1, 0, FAILURES)  # the check's own timeout is no request's probe failure
    assert checks(proxy.url) == (0, 1)
    probes_sent = script.calls["probe"]
    assert probes_sent == FAILURES + 1  # the requests' probes and the check

    # 2. Open: no probe goes out and the added latency is about zero.
    opened_at = time.monotonic()
    fast = [ask(proxy.url, f"fast {i}") for i in range(10)]
    assert time.monotonic() - opened_at < COOLDOWN, "machine too slow for this test's cool-down"
    assert all(r.status_code == 200 and r.headers["x-refusal-guard-prediction"] == "unknown" for _, r in fast)
    assert script.calls["probe"] == probes_sent
    assert sorted(s for s, _ in fast)[5] < PROBE_TIMEOUT / 2  # median well under the timeout it skips
    assert circuit(proxy.url) == (1, 10, FAILURES)

    # 3. Half-open while the probe is still broken: one trial for 8 concurrent requests; it fails, the
    #    check fails too, and the circuit opens again (the other requests skip meanwhile).
    time.sleep(COOLDOWN + 0.1)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        burst = list(pool.map(lambda i: ask(proxy.url, f"burst {i}"), range(8)))
    assert all(r.status_code == 200 for _, r in burst)
    eventually(lambda: checks(proxy.url) == (0, 2), what="the second check")
    assert script.calls["probe"] == probes_sent + 2  # exactly one trial probe, and the check
    assert sum(seconds >= PROBE_TIMEOUT for seconds, _ in burst) >= 1
    assert circuit(proxy.url) == (1, 10 + 7, FAILURES + 1)
    probes_sent += 1  # the check

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
    rows = eventually(lambda: len(got := datapoint_rows(db)) >= 17 + FAILURES + 1 + 4 and got, what="every datapoint")
    skipped = [r for r in rows if r["probe_status"] == "skipped"]
    assert len(skipped) == 17 and all(r["probe_ms"] == 0 for r in skipped)
    assert [r["probe_status"] for r in rows].count("timeout") == FAILURES + 1
    assert [r["probe_status"] for r in rows].count("ok") == 4


def test_a_client_whose_own_prompts_time_the_probe_out_cannot_open_the_circuit(start_proxy, script, tmp_path):
    """Prompts that slow the probe past its timeout fail only their own requests: each time the
    breaker is due, the check probe answers at once, so it stays closed and another client's request
    is probed (before, three such requests opened it and, with on_probe_failure=block, blocked
    every client of the model for the cool-down)."""
    script.probe_stall = lambda body, headers: 3.0 if "SLOW-ME-DOWN" in json.dumps(body) else 0.0
    proxy = start_proxy(mode="sequential", probe_timeout=PROBE_TIMEOUT, circuit_failures=FAILURES,
                        circuit_cooldown=60, on_probe_failure="block", datapoints=None)
    for i in range(3 * FAILURES):
        _, response = ask(proxy.url, f"SLOW-ME-DOWN {i}")
        assert response.headers["x-refusal-guard-action"] == "block"  # its own probe failed: its own request
        eventually(lambda: sum(checks(proxy.url)) == (i + 1) // FAILURES, what="the check, when due")
    assert checks(proxy.url) == (3, 0)
    assert circuit(proxy.url) == (0, 0, 3 * FAILURES)
    probes = script.calls["probe"]
    _, response = ask(proxy.url, "What is the capital of France?")
    assert response.status_code == 200
    assert response.headers["x-refusal-guard-action"] == "pass"
    assert response.headers["x-refusal-guard-prediction"] == "comply"  # probed, not skipped
    assert script.calls["probe"] == probes + 1


def test_a_client_whose_own_key_is_slow_opens_only_its_own_circuit(start_proxy, script):
    """Where clients bring their own upstream keys, the probe's state is per key: a key whose calls all
    time out (a gateway routing it to a dead backend), check probe included, opens the breaker for
    that key alone; another client's requests to the same model are still probed."""
    script.probe_stall = lambda body, headers: 3.0 if headers.get("authorization") == "Bearer sk-slow" else 0.0
    proxy = start_proxy(mode="sequential", probe_timeout=PROBE_TIMEOUT, circuit_failures=FAILURES,
                        circuit_cooldown=60, datapoints=None)

    def ask_as(key: str, text: str) -> httpx.Response:
        return httpx.post(proxy.url + "/v1/chat/completions", timeout=20, headers={"authorization": f"Bearer {key}"},
                          json={"model": "m", "messages": [{"role": "user", "content": text}]})

    for i in range(FAILURES):
        assert ask_as("sk-slow", f"q{i}").headers["x-refusal-guard-prediction"] == "unknown"
    eventually(lambda: checks(proxy.url) == (0, 1), what="the slow key's check")
    assert circuit(proxy.url)[0] == 1
    probes = script.calls["probe"]
    assert ask_as("sk-slow", "again").headers["x-refusal-guard-prediction"] == "unknown"  # skipped: its breaker
    assert script.calls["probe"] == probes
    assert ask_as("sk-other", "hello").headers["x-refusal-guard-prediction"] == "comply"  # probed
    assert script.calls["probe"] == probes + 1 and circuit(proxy.url)[:2] == (1, 1)


# --- issue 16: failures are attributed to their cause -------------------------------------------------

from openai import OpenAI  # noqa: E402

from tests.hostile_upstream import COMPLY, build_hostile, hostile, start_guard  # noqa: E402,F401


def sdk(proxy) -> OpenAI:
    return OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0, timeout=30)


def test_no_client_can_open_the_circuit_with_failures_of_its_own(start_guard, hostile):
    """A bogus model, a prompt too long for the probe and an answer that does not parse each fail
    only the request that caused them: with on_probe_failure=block, another client's benign
    request is still probed and passed afterwards (before the fix, 5 such requests opened the one
    global breaker for 30 s and then every client was blocked)."""
    hostile.missing_models = {"bogus"}
    hostile.context_chars = 20_000
    proxy = start_guard(on_probe_failure="block", circuit_failures=3, circuit_cooldown=60)
    attacker, victim = sdk(proxy), sdk(proxy)
    for i in range(5):
        for model, text in (("bogus", f"hi {i}"), ("m", "x" * 60_000 + str(i)), ("m", f"UNPARSEABLE {i}")):
            raw = attacker.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": text}]) if model != "bogus" else None
            if raw is not None:
                assert raw.headers["x-refusal-guard-action"] == "block"  # its own probe failed: its own request
            else:
                try:  # the upstream 404s the generation too; the guard blocked it before that
                    attacker.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
                except Exception as exc:  # pragma: no cover - shown on failure
                    raise AssertionError(exc)
    s = metric_samples(proxy.url)
    assert metric_sum(s, "refusal_guard_probe_failures_total", reason="rejected") == 10
    assert metric_sum(s, "refusal_guard_probe_failures_total", reason="unparseable") == 5
    assert metric_sum(s, "refusal_guard_probe_failures_total", reason="circuit_open") == 0
    assert metric_sum(s, "refusal_guard_probe_circuit_open") == 0
    probes = hostile.calls["probe"]
    raw = victim.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "Hello"}])
    assert raw.headers["x-refusal-guard-action"] == "pass" and raw.headers["x-refusal-guard-prediction"] == "comply"
    assert hostile.calls["probe"] == probes + 1
    assert raw.parse().choices[0].message.content == "Sure, here it is."


def test_an_unhealthy_model_opens_only_its_own_circuit(start_guard, hostile):
    hostile.down_models = {"down"}
    proxy = start_guard(circuit_failures=3, circuit_cooldown=60)
    client = sdk(proxy)
    for i in range(6):
        raw = httpx.post(proxy.url + "/v1/chat/completions", timeout=20,
                         json={"model": "down", "messages": [{"role": "user", "content": f"q{i}"}]})
        assert raw.status_code == 503  # the upstream's own answer to the generation, passed through
        if i == 2:  # due: the check probe gets a 503 too, and the breaker for (upstream, "down") opens
            eventually(lambda: metric_sum(metric_samples(proxy.url), "refusal_guard_probe_circuit_open") == 1,
                       what="the circuit open")
    assert hostile.calls["probe"] == 3 + 1  # three requests' probes and the check; then skipped
    s = metric_samples(proxy.url)
    assert metric_sum(s, "refusal_guard_probe_failures_total", reason="circuit_open") == 3
    assert metric_sum(s, "refusal_guard_probe_circuit_open") == 1
    raw = client.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-refusal-guard-prediction"] == "comply"  # another model is still probed
    assert hostile.calls["probe"] == 5


def test_one_request_cannot_weaken_the_probe_dialect(start_guard, hostile):
    """A 400 for one request's own content (too long; or an error that echoes the request, which
    can name ``response_format``) leaves the dialect at json_schema for everyone; a model that
    really cannot do json_schema steps down alone, and is offered it again after the retry time."""
    hostile.context_chars = 20_000
    hostile.no_json_schema = {"old"}
    proxy = start_guard(probe_dialect_retry=1.5)
    client = sdk(proxy)

    def ask(model: str, text: str) -> None:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])

    def formats(model: str) -> list[str | None]:
        return [(body.get("response_format") or {}).get("type") for _, body in hostile.of("probe")
                if body.get("model") == model]

    ask("m", "x" * 60_000)
    ask("m", "ECHO response_format json_schema is not supported")
    ask("m", "a normal question")
    # The echoing error names response_format, so it cost one check probe, which succeeded: not a
    # capability error. The context-length error names no structured-output parameter: no check.
    assert formats("m") == ["json_schema"] * 4
    ask("old", "first")
    ask("old", "second")
    assert formats("old") == ["json_schema", "json_schema", "json_object", "json_object"]
    ask("m", "still the best dialect")
    assert formats("m")[-1] == "json_schema"
    time.sleep(1.6)
    ask("old", "after the retry time")
    assert formats("old")[4:] == ["json_schema", "json_schema", "json_object"]
    assert COMPLY["will_refuse"] is False
