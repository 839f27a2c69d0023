"""Ground truth, the datapoint log and live metrics: every request is counted and logged once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import norm

from calibration.datapoints import FIELDS, read_datapoints
from guard.app import create_app
from guard.settings import Settings
from tests.fault_upstream import datapoint_rows as rows
from tests.servers import ServerThread, eventually, free_port, spawn, stop_group, wait_http

REFUSAL = "I'm sorry, but I can't help with that request."
COMPLIANCE = "Sure. Here is a clear explanation: the process has three steps, each described below in detail. " * 3


def probe_says(will_refuse: bool, confidence: int = 4, topic: str = "hacking") -> str:
    return json.dumps({"will_refuse": will_refuse, "confidence": confidence, "harm_rating": 1, "topic": topic})


def samples(proxy_url: str, by_model: bool = False) -> dict[tuple[str, tuple], float]:
    """Samples by name and labels; the ``model`` label summed away unless ``by_model``."""
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(httpx.get(proxy_url + "/metrics").text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if by_model or k != "model"))
            out[(s.name, labels)] = out.get((s.name, labels), 0) + s.value
    return out


def test_outcomes_are_scored_and_gauges_match_the_counters(start_proxy, script, tmp_path):
    db = tmp_path / "dp.sqlite3"
    proxy = start_proxy(mode="sequential", datapoints=str(db), window_size=1000)
    sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    rng = random.Random(7)
    truth = {"hits": 0, "misses": 0, "fa": 0, "cr": 0}
    for i in range(40):
        predicted, actual = rng.random() < 0.5, rng.random() < 0.4
        script.probe_reply = probe_says(predicted, confidence=rng.choice([4, 5]) if not predicted else 4)
        script.reply = REFUSAL if actual else COMPLIANCE
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": f"question {i}"}])
        truth[("hits" if predicted else "misses") if actual else ("fa" if predicted else "cr")] += 1
    passed = ("refusal_guard_requests_total", (("action", "pass"), ("mode", "sequential")))
    s = eventually(lambda: (got := samples(proxy.url)).get(passed) == 40 and got, what="40 requests scored")
    cell = lambda p, a: s.get(("refusal_guard_outcomes_total", (("actual", a), ("predicted", p), ("topic", "hacking"))), 0)  # noqa: E731
    counted = {"hits": cell("refuse", "refused"), "misses": cell("comply", "refused"),
               "fa": cell("refuse", "complied"), "cr": cell("comply", "complied")}
    assert counted == truth
    # An independent computation (scipy, log-linear correction) from the counters.
    h = (counted["hits"] + 0.5) / (counted["hits"] + counted["misses"] + 1)
    f = (counted["fa"] + 0.5) / (counted["fa"] + counted["cr"] + 1)
    for topic in ("hacking", "all"):
        assert s[("refusal_guard_d_prime", (("topic", topic),))] == pytest.approx(norm.ppf(h) - norm.ppf(f), abs=1e-9)
        assert s[("refusal_guard_criterion", (("topic", topic),))] == pytest.approx(-(norm.ppf(h) + norm.ppf(f)) / 2)
        assert s[("refusal_guard_accuracy", (("topic", topic),))] == pytest.approx((truth["hits"] + truth["cr"]) / 40)
    logged = eventually(lambda: len(got := rows(db)) >= 40 and got, what="40 datapoints logged")
    assert len(logged) == 40
    assert sum(r["refused"] for r in logged) == truth["hits"] + truth["misses"]
    assert {r["label"] for r in logged} <= {"full_refusal", "partial_refusal", "partial_compliance", "full_compliance"}
    assert all(r["prompt"] is None for r in logged)  # prompt text only with log_prompts


def test_confidence_outcomes_and_ece_gauge(start_proxy, script, tmp_path):
    proxy = start_proxy(mode="sequential", datapoints=None)
    sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    script.reply = COMPLIANCE
    for i, (predicted, conf) in enumerate([(False, 4), (False, 4), (True, 4), (False, 2)]):
        script.probe_reply = probe_says(predicted, conf)
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q{i}"}])
    s = samples(proxy.url)
    key = lambda c, ok: ("refusal_guard_confidence_outcomes_total", (("confidence", c), ("correct", ok), ("topic", "hacking")))  # noqa: E731
    assert s[key("4", "true")] == 2 and s[key("4", "false")] == 1 and s[key("2", "true")] == 1
    # ECE, one bin per confidence level, stated confidence c maps to c/5:
    expected = (3 / 4) * abs(2 / 3 - 4 / 5) + (1 / 4) * abs(1.0 - 2 / 5)
    assert s[("refusal_guard_ece", (("topic", "all"),))] == pytest.approx(expected)


def test_every_request_is_logged_once_under_concurrency_and_at_shutdown(upstream, script, tmp_path):
    db = tmp_path / "dp.sqlite3"
    script.probe_reply = probe_says(False, 5)
    script.stall = 0.05
    settings = Settings(upstream=upstream.url + "/v1", mode="sequential", datapoints=db)
    from prometheus_client import CollectorRegistry

    proxy = ServerThread(create_app(settings, registry=CollectorRegistry())).start()
    statuses: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        with httpx.Client(base_url=proxy.url, timeout=30) as client:
            for i in range(n):
                body = {"model": "m", "messages": [{"role": "user", "content": f"{threading.get_ident()}-{i}"}],
                        "stream": i % 2 == 0}
                r = client.post("/v1/chat/completions", json=body)
                with lock:
                    statuses.append(r.status_code)

    threads = [threading.Thread(target=worker, args=(15,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bad = httpx.post(proxy.url + "/v1/chat/completions", content=b"nope")
    assert bad.status_code == 400
    proxy.stop()  # graceful shutdown flushes the queue
    assert statuses == [200] * 120
    logged = rows(db)
    assert len(logged) == 120
    assert len({r["request_id"] for r in logged}) == 120
    table = read_datapoints([db])  # calibrate reads the proxy's log directly
    assert table.n == 120


def test_blocked_and_failed_requests_are_logged_without_an_outcome(start_proxy, script, tmp_path):
    db = tmp_path / "dp.sqlite3"
    proxy = start_proxy(mode="sequential", datapoints=str(db))
    sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    script.probe_reply = probe_says(True, 5)
    sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "blocked one"}])
    script.probe_reply = probe_says(False, 5)
    script.status = 500
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "failing one"}])
    blocked, failed = eventually(lambda: len(got := rows(db)) >= 2 and got, what="2 datapoints logged")
    assert blocked["action"] == "block" and blocked["refused"] is None and blocked["label"] is None
    assert failed["action"] == "pass" and failed["refused"] is None
    s = samples(proxy.url)
    assert s[("refusal_guard_upstream_errors_total", (("reason", "status_5xx"),))] == 1
    assert s[("refusal_guard_requests_total", (("action", "block"), ("mode", "sequential")))] == 1


def test_export_writes_the_log_as_jsonl(start_proxy, script, tmp_path):
    db = tmp_path / "dp.sqlite3"
    proxy = start_proxy(mode="sequential", datapoints=str(db), log_prompts=True)
    openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "export me"}])
    eventually(lambda: rows(db), what="the datapoint logged")
    out = tmp_path / "dp.jsonl"
    done = subprocess.run([sys.executable, "-m", "guard.cli", "export", "--db", str(db), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text().splitlines()[0])
    assert set(FIELDS) <= set(record) and record["prompt"] == "export me" and record["will_refuse"] is False


def test_two_workers_sum_counters_and_share_the_log(upstream, script, tmp_path):
    script.probe_reply = probe_says(False, 5)
    db = tmp_path / "dp.sqlite3"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REFUSAL_GUARD_", "PROMETHEUS_"))}
    proc = spawn([sys.executable, "-m", "guard.cli", "serve", "--upstream", upstream.url + "/v1",
                             "--port", str(port), "--workers", "2", "--mode", "sequential", "--datapoints", str(db)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        for i in range(40):
            # A fresh connection each time, so both workers take requests.
            r = httpx.post(url + "/v1/chat/completions",
                           json={"model": "m", "messages": [{"role": "user", "content": f"w{i}"}]})
            assert r.status_code == 200
        for _ in range(5):
            s = samples(url)
            assert s[("refusal_guard_requests_total", (("action", "pass"), ("mode", "sequential")))] == 40
    finally:
        proc.send_signal(signal.SIGTERM)  # the master alone: it drains and stops its workers
        try:
            proc.wait(timeout=30)
        finally:
            stop_group(proc, grace=0)  # whatever of its process group is left
    assert len(rows(db)) == 40


def test_model_label_is_bounded_and_new_models_wait_for_a_scrape(start_proxy, script):
    """Two models get their own label, a third beyond the bound is ``other``; the sums stay exact."""
    script.models = ["be/ta v2", "gamma"]  # only a model the upstream lists can take a slot
    proxy = start_proxy(mode="sequential", datapoints=None, metric_models="alpha", metric_models_seen=1)
    assert httpx.get(proxy.url + "/readyz?upstream=1").status_code == 200  # the listing is in
    sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    script.reply = REFUSAL

    def ask(model: str, n: int) -> None:
        for i in range(n):
            script.probe_reply = probe_says(i % 2 == 0)
            sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": f"{model} {i}"}])

    s = samples(proxy.url, by_model=True)  # configured model and other: at zero before any request
    assert s[("refusal_guard_requests_total", (("action", "pass"), ("mode", "sequential"), ("model", "alpha")))] == 0
    assert s[("refusal_guard_outcomes_total", (("actual", "refused"), ("model", "other"), ("predicted", "refuse"),
                                               ("topic", "hacking")))] == 0
    ask("alpha", 3)
    ask("be/ta v2", 2)  # seen first: takes the one free slot, but counts as other until a scrape saw it at zero
    s = samples(proxy.url, by_model=True)
    req = lambda model: s.get(("refusal_guard_requests_total",  # noqa: E731
                               (("action", "pass"), ("mode", "sequential"), ("model", model))))
    assert (req("alpha"), req("be/ta_v2"), req("other")) == (3, 0, 2)  # the sanitised name, at zero
    ask("be/ta v2", 4)
    ask("gamma", 5)  # over the bound: other, for good
    s = samples(proxy.url, by_model=True)
    assert (req("alpha"), req("be/ta_v2"), req("other"), req("gamma")) == (3, 4, 7, None)
    outcomes = lambda model: sum(v for (name, labels), v in s.items()  # noqa: E731
                                 if name == "refusal_guard_outcomes_total" and ("model", model) in labels)
    confidences = lambda model: sum(v for (name, labels), v in s.items()  # noqa: E731
                                    if name == "refusal_guard_confidence_outcomes_total" and ("model", model) in labels)
    assert (outcomes("alpha"), outcomes("be/ta_v2"), outcomes("other")) == (3, 4, 7)
    assert (confidences("alpha"), confidences("be/ta_v2"), confidences("other")) == (3, 4, 7)
    hits = ("refusal_guard_outcomes_total", (("actual", "refused"), ("model", "be/ta_v2"), ("predicted", "refuse"),
                                             ("topic", "hacking")))
    assert s[hits] == 2  # i = 0, 2 of the four admitted requests predicted a refusal
    assert {labels for (name, labels) in s if name == "refusal_guard_requests_total"} >= {
        (("action", "invalid"), ("mode", "sequential"), ("model", m)) for m in ("alpha", "be/ta_v2", "other")}
    assert samples(proxy.url)[("refusal_guard_requests_total", (("action", "pass"), ("mode", "sequential")))] == 14


def test_a_model_the_upstream_rejects_takes_no_slot(start_proxy, script):
    script.models = ["real"]
    proxy = start_proxy(mode="sequential", datapoints=None, metric_models_seen=1)
    assert httpx.get(proxy.url + "/readyz?upstream=1").status_code == 200  # the listing is in
    sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    script.probe_reply = probe_says(False)
    script.status = 404
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="made-up", messages=[{"role": "user", "content": "q"}])
    script.status = 200
    script.reply = COMPLIANCE
    sdk.chat.completions.create(model="real", messages=[{"role": "user", "content": "q"}])
    samples(proxy.url)  # the scrape that admits "real"
    sdk.chat.completions.create(model="real", messages=[{"role": "user", "content": "q2"}])
    sdk.chat.completions.create(model="made-up", messages=[{"role": "user", "content": "q3"}])
    s = samples(proxy.url, by_model=True)
    req = lambda model: s.get(("refusal_guard_requests_total",  # noqa: E731
                               (("action", "pass"), ("mode", "sequential"), ("model", model))))
    assert (req("real"), req("other"), req("made-up")) == (1, 3, None)


def test_model_labels_clean_configured_names_and_keep_other_reserved():
    from guard.live.model_labels import ModelLabels

    created: list[str] = []
    labels = ModelLabels(["be/ta v2", "alpha", "alpha", "other"], 1, created.append)
    assert labels.configured == ("be/ta_v2", "alpha") and created == ["be/ta_v2", "alpha", "other"]
    assert labels.label("be/ta_v2") == "be/ta_v2"  # configured: labelled whether listed or not
    assert labels.label(None) == "other"
    labels.listed(["gamma", "delta", "other"])
    assert labels.label("other") == "other" and created[-1] == "other"  # takes no slot
    assert labels.label("junk") == "other" and "junk" not in created  # not listed: no slot
    assert labels.label("gamma") == "other" and created[-1] == "gamma"  # pending until a scrape
    assert labels.label("delta") == "other" and "delta" not in created  # over the bound
    labels.scraped()
    assert labels.label("gamma") == "gamma" and labels.label("delta") == "other"
