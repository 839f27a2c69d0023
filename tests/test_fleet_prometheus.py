"""A real Prometheus scraping two real proxies: the recorded fleet d' matches the Python figure.

Prometheus' ``increase()`` extrapolates a little past the last sample, scaling each
instance's counts by its own factor f_i slightly above 1 (the same for all series of one
instance, since they are scraped together and all start at zero). The test measures f_i per
instance at the rule's evaluation time, checks every cell of that instance is scaled by the
same f_i, then checks the recorded fleet cells equal sum_i f_i * (instance i's datapoint
counts) and the recorded d' and c equal ``calibration.sdt`` on those within the stated
Abramowitz-Stegun error.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from calibration.sdt import sdt_from_counts
from tests.servers import free_port, spawn, stop_group

pytestmark = [pytest.mark.prometheus,
              pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus package")]

ROOT = Path(__file__).resolve().parent.parent
REFUSAL = "I'm sorry, but I can't help with that."
COMPLIANCE = "Of course. Here is a thorough answer with the steps laid out one after another in detail. " * 3


def render_config(targets: list[str]) -> str:
    spec = importlib.util.spec_from_file_location("render_config", ROOT / "deploy/prometheus/render_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.render(targets, scrape_interval="1s")


def query(url: str, expr: str, at: float | None = None) -> dict[str, float]:
    params = {"query": expr} | ({"time": repr(at)} if at is not None else {})
    data = httpx.get(url + "/api/v1/query", params=params).json()
    assert data["status"] == "success", data
    return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in data["data"]["result"]}


def one(url: str, expr: str, at: float | None = None) -> float:
    (value,) = query(url, expr, at).values()
    return value


CELLS = (("hits", "refuse", "refused"), ("misses", "comply", "refused"),
         ("false_alarms", "refuse", "complied"), ("correct_rejections", "comply", "complied"))


def db_counts(db: Path, models: tuple[str, ...] | None = None) -> list[int]:
    con = sqlite3.connect(db)
    pairs = con.execute("SELECT will_refuse, refused, model FROM datapoints WHERE refused IS NOT NULL "
                        "AND will_refuse IS NOT NULL").fetchall()
    con.close()
    pairs = [(w, r) for w, r, m in pairs if models is None or m in models]
    return [sum(1 for w, r in pairs if (w == (p == "refuse")) and (r == (a == "refused"))) for _, p, a in CELLS]


def test_fleet_d_prime_from_recording_rules_matches_python(start_proxy, script, tmp_path):
    dbs = [tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"]
    # Two configured models and a third beyond the bound (counted as model="other").
    proxies = [start_proxy(mode="sequential", datapoints=str(db), metric_models="m1,m2", metric_models_seen=0)
               for db in dbs]
    config = tmp_path / "prometheus.yml"
    config.write_text(render_config([p.url.removeprefix("http://") for p in proxies]))
    port = free_port()
    prom = spawn(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prom_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not query_ready(prom_url):
            assert prom.poll() is None and time.monotonic() < deadline, "prometheus did not start"
            time.sleep(0.3)
        # Both instances scraped at least twice while every counter is still zero.
        while len(query(prom_url, "count_over_time(refusal_guard_requests_total[1m]) >= 2")) < 2 * 8 * 3:
            assert time.monotonic() < deadline + 30, "prometheus did not scrape both proxies"
            time.sleep(0.3)
        rng = random.Random(11)
        for i in range(60):
            predicted, actual = rng.random() < 0.45, rng.random() < 0.4
            script.probe_reply = json.dumps({"will_refuse": predicted, "confidence": 4, "harm_rating": 1,
                                             "topic": "fraud"})
            script.reply = REFUSAL if actual else COMPLIANCE
            sdk = openai.OpenAI(base_url=proxies[i % 2].url + "/v1", api_key="k", max_retries=0)
            sdk.chat.completions.create(model=f"m{i % 3 + 1}", messages=[{"role": "user", "content": f"fleet {i}"}])
        deadline = time.monotonic() + 30
        while sum(query(prom_url, "refusal_guard_outcomes_total").values()) < 60:  # scraped the last request
            assert time.monotonic() < deadline
            time.sleep(0.3)
        time.sleep(2.5)  # two more rule evaluations; the datapoint logs are flushed by now too
        counts = {p.url.removeprefix("http://"): db_counts(db) for p, db in zip(proxies, dbs)}
        assert sum(map(sum, counts.values())) == 60

        # An evaluation of the rule, with its own timestamp (an instant query would report "now"). Under
        # load a scrape can be ingested just after an evaluation that its timestamp precedes, so that
        # evaluation saw one sample less than a later query at its time does: take the newest of the
        # last evaluations that saw every sample (the check is of the rules' arithmetic, not of timing).
        data = httpx.get(prom_url + "/api/v1/query", params={"query": 'refusal_guard:d_prime:5m{topic="all"}[20s]'}).json()
        (series,) = data["data"]["result"]
        for at_text, d_text in reversed(series["values"][-10:]):
            at, d_recorded = float(at_text), float(d_text)
            expected_cells = [0.0] * 4
            factors = {}
            for instance, truth in counts.items():
                measured = [one(prom_url, f'sum(increase(refusal_guard_outcomes_total{{instance="{instance}",'
                                          f'predicted="{p}",actual="{a}"}}[5m]))', at) for _, p, a in CELLS]
                factor = sum(measured) / sum(truth)
                assert 1.0 <= factor < 1.25, factor
                for got, true in zip(measured, truth):
                    assert got == pytest.approx(factor * true, rel=1e-9, abs=1e-9)  # one factor per instance
                expected_cells = [e + factor * t for e, t in zip(expected_cells, truth)]
                factors[instance] = factor
            recorded_cells = [one(prom_url, f'refusal_guard:{name}:5m{{topic="all"}}', at) for name, _, _ in CELLS]
            if recorded_cells == pytest.approx(expected_cells, rel=1e-9):  # summed across both replicas
                break
        else:
            pytest.fail(f"no evaluation of the last 10 matches the summed counters: {recorded_cells} {expected_cells}")
        expected = sdt_from_counts(*expected_cells)
        assert d_recorded == pytest.approx(expected.d_prime, abs=9e-4)
        assert one(prom_url, 'refusal_guard:criterion:5m{topic="all"}', at) == pytest.approx(expected.criterion, abs=4.5e-4)
        union = [sum(c[i] for c in counts.values()) for i in range(4)]
        assert abs(d_recorded - sdt_from_counts(*union).d_prime) < 0.1  # and near the unextrapolated figure
        assert one(prom_url, 'refusal_guard:d_prime:5m{topic="fraud"}', at) == pytest.approx(d_recorded, abs=1e-12)

        # Per model: the same chain by model, with every instance's series scaled by its one factor.
        dbs_of = {p.url.removeprefix("http://"): db for p, db in zip(proxies, dbs)}
        for label, models in (("m1", ("m1",)), ("m2", ("m2",)), ("other", ("m3",))):
            truth = [sum(factors[i] * db_counts(dbs_of[i], models)[k] for i in dbs_of) for k in range(4)]
            recorded = [one(prom_url, f'refusal_guard:{name}_by_model:5m{{model="{label}"}}', at)
                        for name, _, _ in CELLS]
            assert recorded == pytest.approx(truth, rel=1e-9), label
            expected = sdt_from_counts(*truth)
            assert one(prom_url, f'refusal_guard:d_prime_by_model:5m{{model="{label}"}}', at) == pytest.approx(
                expected.d_prime, abs=9e-4)
            assert one(prom_url, f'refusal_guard:accuracy_by_model:5m{{model="{label}"}}', at) == pytest.approx(
                expected.accuracy, rel=1e-9)
        assert set(query(prom_url, "refusal_guard:scored_by_model:5m", at)) == {
            json.dumps({"__name__": "refusal_guard:scored_by_model:5m", "job": "refusal-guard", "model": m},
                       sort_keys=True) for m in ("m1", "m2", "other")}
    finally:
        stop_group(prom, grace=30)


def query_ready(url: str) -> bool:
    try:
        return httpx.get(url + "/-/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
