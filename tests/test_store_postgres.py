"""Datapoints in PostgreSQL, against a real server the tests start (Debian's postgresql package).

The sink: every datapoint written once with native types, the table created or migrated,
loss counted (bad values, database down at shutdown), reconnection by itself, retention.
The fleet: two guard processes writing to one database (rows = answered requests); a database
restart mid-load loses nothing beyond what is counted as dropped. Calibration: the database
aggregates, and the result equals calibrating its JSONL export; sources are de-duplicated.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import httpx
import numpy as np
import openai
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from calibration.calibrate import calibrate_table
from calibration.clients import cap_client_share, client_report
from calibration.cli import main as calibrate_main
from calibration.agreement import detector_judge_agreement
from calibration.datapoints import DUPLICATE, FIELDS, DatapointError, read_datapoints
from calibration.postgres import postgres_ddl
from calibration.policy import Policy
from calibration.sdt import simulate
from guard.app import create_app
from guard.cli import main as guard_main
from guard.live.metrics import GuardMetrics
from guard.settings import Settings, settings_to_json
from guard.stores.postgres import PostgresSink, _pg_row
from guard.stores.recorder import COLUMNS
from guard.stores.sink import Retention
from tests.postgres_server import PASSWORD, PostgresServer, postgres_bin
from tests.servers import ServerThread, free_port, wait_http

pytestmark = pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL not installed (apt-get install postgresql)")

REFUSAL = "I'm sorry, but I can't help with that request."
COMPLIANCE = "Sure. Here is a clear explanation: the process has three steps, each described below in detail. " * 3


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def db_url(pg: PostgresServer) -> str:
    return pg.create_database("t_" + uuid.uuid4().hex[:12])


def record(i: int, *, ts: datetime | None = None, model: str = "m", **kw) -> dict:
    r = dict.fromkeys(FIELDS)
    r.update(id=f"p{i % 7}", request_id=f"req-{i}", ts=(ts or datetime.now(timezone.utc)).isoformat(timespec="milliseconds"),
             model=model, topic=["hacking", "drugs"][i % 2], will_refuse=i % 3 == 0, confidence=1 + i % 5,
             harm_rating=1 + i % 5, p_refuse_logprob=-0.25, p_correct=0.9, action="pass", mode="sequential",
             probe_status="ok", label="full_refusal" if i % 4 == 0 else "full_compliance", refused=i % 4 == 0,
             probe_ms=1.5, upstream_ms=2.5, total_ms=4.0, policy_version="v", probe_template="rg-probe-v1:abc",
             prompt_sha256=f"{i % 7:064d}")
    r.update(kw)
    return r


async def fetch(url: str, query: str, *args):
    con = await asyncpg.connect(url)
    try:
        return await con.fetch(query, *args)
    finally:
        await con.close()


async def acount(url: str) -> int:
    return (await fetch(url, "SELECT count(*) AS n FROM datapoints"))[0]["n"]


def count(url: str) -> int:
    return asyncio.run(acount(url))


def dropped(metrics: GuardMetrics) -> float:
    return metrics.registry.get_sample_value("refusal_guard_datapoints_dropped_total") or 0.0


# ------------------------------------------------------------------------------------------ the sink


async def test_every_datapoint_is_written_once_with_native_types(db_url):
    metrics = GuardMetrics(CollectorRegistry())
    sink = PostgresSink(SecretStr(db_url), metrics.datapoints_dropped, batch_size=100, flush_interval=0.01)
    await sink.start()
    for i in range(1234):
        sink.put(record(i, prompt="hello" if i == 0 else None, judge_label="partial_refusal" if i % 3 == 0 else None,
                        client="alice" if i % 2 else None))
    await sink.stop()
    rows = await fetch(db_url, "SELECT * FROM datapoints ORDER BY seq")
    assert len(rows) == 1234 and sink.written == 1234 and dropped(metrics) == 0
    assert [r["request_id"] for r in rows] == [f"req-{i}" for i in range(1234)]
    first = rows[0]
    assert first["will_refuse"] is True and first["refused"] is True and first["confidence"] == 1
    assert isinstance(first["ts"], datetime) and first["ts"].tzinfo is not None
    assert first["prompt"] == "hello" and rows[1]["prompt"] is None
    assert first["probe_ms"] == 1.5 and first["harm_level"] is None
    assert [r["judge_label"] for r in rows[:3]] == ["partial_refusal", None, None]
    assert [r["client"] for r in rows[:3]] == [None, "alice", None]


async def test_an_old_table_is_migrated_and_keeps_its_rows(db_url):
    con = await asyncpg.connect(db_url)
    await con.execute("CREATE TABLE datapoints (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                      "request_id text, ts timestamptz)")
    await con.execute("INSERT INTO datapoints (request_id, ts) VALUES ('old', now())")
    await con.close()
    sink = PostgresSink(SecretStr(db_url), GuardMetrics(CollectorRegistry()).datapoints_dropped, flush_interval=0.01)
    await sink.start()
    sink.put(record(1))
    await sink.stop()
    rows = await fetch(db_url, "SELECT request_id, p_correct, prompt, judge_label, client FROM datapoints ORDER BY seq")
    assert [r["request_id"] for r in rows] == ["old", "req-1"] and rows[1]["p_correct"] == 0.9
    assert [r["client"] for r in rows] == [None, None]


async def test_a_batch_retried_after_its_commit_is_not_written_twice(db_url):
    sink = PostgresSink(SecretStr(db_url), GuardMetrics(CollectorRegistry()).datapoints_dropped)
    await sink.start()
    batch = [record(i) for i in range(5)]
    await sink._write(batch)
    await sink._write(batch)            # the same batch again, as after a lost commit acknowledgement
    await sink._write(list(batch))      # a different batch (even with equal content) is written
    await sink.stop()
    assert await acount(db_url) == 10


async def test_a_value_the_table_rejects_drops_its_batch_counted_and_writing_goes_on(db_url, caplog):
    metrics = GuardMetrics(CollectorRegistry())
    sink = PostgresSink(SecretStr(db_url), metrics.datapoints_dropped, flush_interval=0.01)
    await sink.start()
    sink.put({**record(1), "ts": "yesterday-ish"})
    await asyncio.sleep(0.3)
    sink.put(record(2, confidence="high"))
    await asyncio.sleep(0.3)
    sink.put(record(3))
    await sink.stop()
    assert dropped(metrics) == 2
    assert [r["request_id"] for r in await fetch(db_url, "SELECT request_id FROM datapoints")] == ["req-3"]
    assert PASSWORD not in caplog.text


async def test_database_down_at_start_then_up_loses_nothing_and_never_blocks_put():
    with PostgresServer() as server:
        url = server.create_database("late")
        server.stop()
        metrics = GuardMetrics(CollectorRegistry())
        sink = PostgresSink(SecretStr(url), metrics.datapoints_dropped, flush_interval=0.01, connect_timeout=1)
        await sink.start()                      # the guard starts although the database is down
        t0 = time.perf_counter()
        for i in range(300):
            sink.put(record(i))
        assert time.perf_counter() - t0 < 0.5   # put never waits for the database
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.start)
        await sink.stop()
        assert dropped(metrics) == 0 and await acount(url) == 300


async def test_database_down_at_shutdown_counts_the_rest_as_dropped(caplog):
    with PostgresServer() as server:
        url = server.create_database("gone")
        metrics = GuardMetrics(CollectorRegistry())
        sink = PostgresSink(SecretStr(url), metrics.datapoints_dropped, flush_interval=0.01, stop_timeout=1.5, connect_timeout=1)
        await sink.start()
        sink.put(record(0))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(server.stop)
        for i in range(1, 51):
            sink.put(record(i))
        t0 = time.perf_counter()
        await sink.stop()
        assert time.perf_counter() - t0 < 8
        assert dropped(metrics) == 50
        await asyncio.to_thread(server.start)
        assert await acount(url) == 1
    assert PASSWORD not in caplog.text and "s3cret" not in caplog.text


async def test_postgres_retention_prunes_by_age_and_by_rows(db_url):
    now = datetime.now(timezone.utc)
    sink = PostgresSink(SecretStr(db_url), GuardMetrics(CollectorRegistry()).datapoints_dropped)   # no pruning by the drain task
    await sink.start()
    await sink._write([record(i, ts=now - timedelta(hours=2)) for i in range(30)])
    await sink._write([record(100 + i, ts=now) for i in range(20)])
    sink.retention = Retention(max_age=3600)
    assert await sink.prune() == 30
    assert await acount(db_url) == 20
    sink.retention = Retention(max_rows=7)
    assert await sink.prune() == 13
    kept = [r["request_id"] for r in await fetch(db_url, "SELECT request_id FROM datapoints ORDER BY seq")]
    assert kept == [f"req-{100 + i}" for i in range(13, 20)]        # the newest seven
    await sink.stop()


async def test_sqlite_retention_prunes_by_age_and_by_rows(tmp_path):
    from guard.stores.recorder import DatapointRecorder

    now = datetime.now(timezone.utc)
    db = tmp_path / "dp.sqlite3"
    recorder = DatapointRecorder(db, GuardMetrics(CollectorRegistry()).datapoints_dropped)
    await recorder.start()
    await asyncio.to_thread(recorder._write, [record(i, ts=now - timedelta(days=1)) for i in range(30)])
    await asyncio.to_thread(recorder._write, [record(100 + i, ts=now) for i in range(20)])
    recorder.retention = Retention(max_age=3600, max_rows=15)
    assert await asyncio.to_thread(recorder._prune) == 35            # 30 too old, then 5 over the row limit
    await recorder.stop()
    import sqlite3
    con = sqlite3.connect(db)
    kept = [r[0] for r in con.execute("SELECT request_id FROM datapoints ORDER BY seq")]
    con.close()
    assert kept == [f"req-{100 + i}" for i in range(5, 20)]


async def test_the_drain_task_prunes_on_its_own(db_url):
    old = datetime.now(timezone.utc) - timedelta(days=3)
    sink = PostgresSink(SecretStr(db_url), GuardMetrics(CollectorRegistry()).datapoints_dropped, flush_interval=0.01,
                        retention=Retention(max_age=86400, interval=0.2))
    await sink.start()
    for i in range(10):
        sink.put(record(i, ts=old))
    sink.put(record(99))
    await asyncio.sleep(1.0)
    await sink.stop()
    assert [r["request_id"] for r in await fetch(db_url, "SELECT request_id FROM datapoints")] == ["req-99"]


# ------------------------------------------------------------------------------------------ settings


def test_the_url_is_a_secret_in_settings(monkeypatch, db_url):
    monkeypatch.setenv("REFUSAL_GUARD_DATAPOINTS", db_url)
    from guard.settings import load_settings

    s = load_settings({"upstream": "http://127.0.0.1:1/v1"})
    assert isinstance(s.datapoints, SecretStr) and s.datapoints.get_secret_value() == db_url
    assert PASSWORD not in repr(s) and PASSWORD not in str(s.model_dump())
    again = Settings.model_validate_json(settings_to_json(s))       # what each uvicorn worker rebuilds
    assert again.datapoints.get_secret_value() == db_url
    assert isinstance(Settings(upstream="http://x/v1", datapoints="dp.sqlite3").datapoints, Path)
    with pytest.raises(ValueError, match="postgresql://"):
        Settings(upstream="http://x/v1", datapoints="mysql://u:p@h/db")
    assert Settings(upstream="http://x/v1", datapoint_max_age="30d").datapoint_max_age == 30 * 86400
    with pytest.raises(ValueError):
        Settings(upstream="http://x/v1", datapoint_max_age="soon")


# ------------------------------------------------------------------------------------------ the fleet


def _serve(upstream_url: str, port: int, env_extra: dict[str, str], *args: str) -> subprocess.Popen:
    env = {**os.environ, **env_extra}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return subprocess.Popen([sys.executable, "-m", "guard.cli", "serve", "--upstream", upstream_url,
                             "--port", str(port), "--mode", "sequential", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_guard_processes_one_database_every_answered_request_is_one_row(script, upstream, db_url):
    script.probe_reply = json.dumps({"will_refuse": False, "confidence": 4, "harm_rating": 1, "topic": "hacking"})
    script.reply = COMPLIANCE
    ports = [free_port(), free_port()]
    procs = [_serve(upstream.url + "/v1", ports[0], {"REFUSAL_GUARD_DATAPOINTS": db_url}),   # env
             _serve(upstream.url + "/v1", ports[1], {}, "--datapoints", db_url)]             # flag
    try:
        for port, proc in zip(ports, procs):
            wait_http(f"http://127.0.0.1:{port}/healthz", proc, timeout=180)  # a loaded 2-core CI machine
        ids: list[str] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{ports[k % 2]}/v1", api_key="k", max_retries=0)
            for i in range(25):
                raw = sdk.chat.completions.with_raw_response.create(
                    model="m", messages=[{"role": "user", "content": f"q {k} {i}"}])
                raw.parse()
                with lock:
                    ids.append(raw.headers["x-request-id"])

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(ids) == 100
        for port in ports:
            assert "refusal_guard_datapoints_dropped_total 0.0" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        outputs = []
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            outputs.append(proc.communicate(timeout=60)[0])
    rows = asyncio.run(fetch(db_url, "SELECT request_id FROM datapoints"))
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert all(PASSWORD not in out for out in outputs)


@pytest.mark.parametrize("queue_size", [10_000, 3])
def test_a_database_restart_mid_load_loses_nothing_beyond_what_is_counted(script, upstream, queue_size, caplog):
    script.probe_reply = json.dumps({"will_refuse": True, "confidence": 5, "harm_rating": 4, "topic": "hacking"})
    script.reply = REFUSAL
    with PostgresServer() as server:
        url = server.create_database("load")
        registry = CollectorRegistry()
        settings = Settings(upstream=upstream.url + "/v1", mode="sequential", datapoints=url,
                            datapoint_queue_size=queue_size)
        proxy = ServerThread(create_app(settings, registry=registry)).start()
        answered = failed = 0
        lock = threading.Lock()
        stop = threading.Event()

        def load(k: int) -> None:
            nonlocal answered, failed
            with httpx.Client(base_url=proxy.url, timeout=30) as client:
                i = 0
                while not stop.is_set():
                    r = client.post("/v1/chat/completions",
                                    json={"model": "m", "messages": [{"role": "user", "content": f"x {k} {i}"}]})
                    with lock:
                        if r.status_code == 200:
                            answered += 1
                        else:
                            failed += 1
                    i += 1

        threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        server.restart()                                  # connections cut, in-flight batches rolled back
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join()
        proxy.stop()                                      # flushes the queue
        lost = registry.get_sample_value("refusal_guard_datapoints_dropped_total")
        rows = count(url)
    assert failed == 0 and answered > 50
    assert "datapoint store unreachable" in caplog.text   # the restart was met mid-write, and retried
    assert rows + lost == answered
    if queue_size == 10_000:
        assert lost == 0                                  # the queue absorbs a restart of a few seconds
    else:
        assert lost > 0                                   # the loss is real here, and counted
    assert PASSWORD not in caplog.text


# ------------------------------------------------------------------------------------------ calibrate


@pytest.fixture(scope="module")
def fleet_data(pg: PostgresServer, tmp_path_factory) -> tuple[str, Path]:
    """~3000 simulated datapoints from two models over 10 days in one database, and its JSONL export."""
    url = pg.create_database("calib")
    d = simulate(300, 8, 2.0, -0.1, n_topics=3, seed=3)
    n = d["prompt"].size
    rng = np.random.default_rng(5)
    order = rng.permutation(n)                           # requests of one prompt arrive interleaved
    start = datetime(2026, 11, 20, tzinfo=timezone.utc)
    records = []
    judge_flips = rng.random(n) < 0.2                    # where a judge audited, it disagrees on a fifth
    for j, i in enumerate(order):
        refused = bool(d["refused"][i])
        judge = None
        if j % 3 == 0:                                   # a third of the rows carry the judge's label
            judge = ("partial_refusal" if refused != bool(judge_flips[j]) else "partial_compliance")
        records.append(record(j, ts=start + timedelta(minutes=5 * j), model="m-1" if i % 5 else "m-2",
                              id=f"prompt-{d['prompt'][i]}", topic=["cyber", "bio", "misc"][d["topic"][i]],
                              will_refuse=bool(d["will_refuse"][i]), confidence=int(d["confidence"][i]),
                              harm_rating=int(d["harm_rating"][i]), refused=refused,
                              prompt_sha256=None, judge_label=judge,
                              client=None if j % 7 == 0 else ("big" if j % 2 else f"c{j % 5}")))
    for j in range(40):                                  # unusable rows: probe timeouts, blocked requests
        records.append(record(n + j, ts=start + timedelta(days=5, minutes=j), model="m-1",
                              will_refuse=None, confidence=None, probe_status="timeout"))
    metrics = GuardMetrics(CollectorRegistry())

    async def write() -> None:
        sink = PostgresSink(SecretStr(url), metrics.datapoints_dropped, batch_size=500, flush_interval=0.01)
        await sink.start()
        for r in records:
            sink.put(r)
        await sink.stop()

    asyncio.run(write())
    assert dropped(metrics) == 0
    export = tmp_path_factory.mktemp("export") / "fleet.jsonl"
    assert guard_main(["export", "--db", url, "--out", str(export)]) == 0
    exported = [json.loads(line) for line in export.open()]
    assert len(exported) == len(records)
    assert [r.get("judge_label") for r in exported] == [r.get("judge_label") for r in records]
    return url, export


def _policy(table) -> dict:
    data = json.loads(calibrate_table(table, n_boot=200, seed=1, target_accuracy=0.9).policy.to_json())
    data.pop("created_at")
    return data


def test_calibrate_from_the_database_equals_calibrate_from_its_export(fleet_data):
    url, export = fleet_data
    for model in ("m-1", "m-2"):
        from_db = read_datapoints([url], model=model)
        from_file = read_datapoints([export], model=model)
        assert from_db.n == from_file.n > 100 and from_db.n_read == from_file.n_read
        assert from_db.prompt_ids == from_file.prompt_ids and from_db.topics == from_file.topics
        assert from_db.skipped == from_file.skipped
        assert from_db.data_hash() == from_file.data_hash()
        # the judge's label is the ground truth where present, in the database's aggregation as in the file
        assert from_db.judged.sum() == from_file.judged.sum() > 30
        assert from_db.detector_refused.sum() == from_file.detector_refused.sum() != from_db.refused.sum()
        assert detector_judge_agreement(from_db) == detector_judge_agreement(from_file)
        assert _policy(from_db) == _policy(from_file)
        # the client of each row, aggregated in the database as read from the file: same report, same cap
        report = client_report(from_db)
        assert report.rows == client_report(from_file).rows and report.rows[0][0] == "big"
        assert dict(report.rows)["(none)"] > 0 and len(report.rows) == 7
        capped_db, dropped_db = cap_client_share(from_db, 0.3)
        capped_file, dropped_file = cap_client_share(from_file, 0.3)
        assert dropped_db == dropped_file and dropped_db.get("big", 0) > 0
        assert capped_db.data_hash() == capped_file.data_hash()
    everything = read_datapoints([url])
    assert everything.n == read_datapoints([url], model="m-1").n + read_datapoints([url], model="m-2").n


def test_since_filters_the_same_rows_in_the_database_and_in_files(fleet_data):
    url, export = fleet_data
    since = datetime(2026, 11, 27, tzinfo=timezone.utc)
    from_db, from_file = read_datapoints([url], since=since), read_datapoints([export], since=since)
    assert 0 < from_db.n == from_file.n < read_datapoints([url]).n
    assert from_db.n_read == from_file.n_read and from_db.data_hash() == from_file.data_hash()


def test_a_row_given_twice_is_used_once(fleet_data, tmp_path):
    url, export = fleet_data
    alone = read_datapoints([export])
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(export.read_bytes())
    # the same file or URL twice is read once; a copy, a glob, or a file and its database: rows counted once
    for sources, repeats in (([export, export], 0), ([url, url], 0), ([export, copy], alone.n_read),
                             ([str(tmp_path / "*.jsonl"), export], alone.n_read),
                             ([url, export], alone.n_read), ([export, url], alone.n_read)):
        both = read_datapoints(sources)
        assert both.n == alone.n and both.data_hash() == alone.data_hash(), sources
        assert both.skipped.get(DUPLICATE, 0) == repeats, sources
    # a repeated request id with another timestamp is another request (client-chosen ids may repeat)
    lines = export.read_text().splitlines()
    moved = json.loads(lines[0])
    moved["ts"] = "2030-01-01T00:00:00.000+00:00"
    copy.write_text(json.dumps(moved) + "\n")
    assert read_datapoints([export, copy]).n == alone.n + 1


async def test_judge_labels_in_a_table_from_before_them_or_invalid(db_url, tmp_path):
    # A table written before judge_label existed is still calibrated (no judged rows); an invalid
    # judge_label is named like any invalid enum, in the database as in its export.
    con = await asyncpg.connect(db_url)
    await con.execute(postgres_ddl()[0])
    await con.execute("ALTER TABLE datapoints DROP COLUMN judge_label")
    await con.execute("ALTER TABLE datapoints DROP COLUMN client")  # nor client (issue 23)
    columns = [c for c in COLUMNS if c not in ("judge_label", "client")]
    await con.copy_records_to_table("datapoints", columns=columns, records=[
        tuple(v for k, v in zip(COLUMNS, _pg_row(record(i))) if k not in ("judge_label", "client")) for i in range(20)])
    await con.close()
    table = await asyncio.to_thread(read_datapoints, [db_url])
    assert table.n == 20 and not table.judged.any() and (table.refused == table.detector_refused).all()
    assert table.client is None
    sink = PostgresSink(SecretStr(db_url), GuardMetrics(CollectorRegistry()).datapoints_dropped, flush_interval=0.01)
    await sink.start()                                   # the sink adds the column
    sink.put(record(20, judge_label="maybe"))
    sink.put(record(21, judge_label="full_refusal", refused=False))
    await sink.stop()
    with pytest.raises(DatapointError, match="invalid judge_label"):
        await asyncio.to_thread(read_datapoints, [db_url])
    export = tmp_path / "x.jsonl"
    assert await asyncio.to_thread(guard_main, ["export", "--db", db_url, "--out", str(export)]) == 0
    from_db = await asyncio.to_thread(read_datapoints, [db_url], on_error="skip")
    from_file = await asyncio.to_thread(read_datapoints, [export], on_error="skip")
    assert from_db.skipped == from_file.skipped == {"invalid judge_label": 1}
    assert from_db.judged.sum() == from_file.judged.sum() == 1 and from_db.data_hash() == from_file.data_hash()


def test_calibrate_cli_reads_urls_with_since_and_model(fleet_data, tmp_path, capsys):
    url, export = fleet_data
    out_db, out_file = tmp_path / "db.json", tmp_path / "file.json"
    common = ["--n-boot", "100", "--target-accuracy", "0.9", "--model", "m-1"]
    assert calibrate_main(["calibrate", "--datapoints", url, "--out", str(out_db), *common]) == 0
    assert calibrate_main(["calibrate", "--datapoints", str(export), "--out", str(out_file), *common]) == 0
    a, b = json.loads(out_db.read_text()), json.loads(out_file.read_text())
    a.pop("created_at"), b.pop("created_at")
    assert a == b and a["model"] == "m-1" and Policy.load(out_db).model == "m-1"
    assert PASSWORD not in capsys.readouterr().err
    # --since relative to now: every simulated row is older than a day
    rc = calibrate_main(["calibrate", "--datapoints", url, "--out", str(tmp_path / "x.json"), "--since", "1d"])
    assert rc == 2 and "no usable datapoints" in capsys.readouterr().err


def test_unreachable_or_empty_databases_are_named_without_the_password(pg, db_url):
    with pytest.raises(DatapointError, match="no 'datapoints' table") as info:
        read_datapoints([db_url])
    assert PASSWORD not in str(info.value) and "***" in str(info.value)
    dead = f"postgresql://rg:{PASSWORD}@127.0.0.1:{free_port()}/nope"
    with pytest.raises(DatapointError, match="cannot read datapoints") as info:
        read_datapoints([dead])
    assert PASSWORD not in str(info.value)
    wrong = pg.url().replace(PASSWORD, "not-" + PASSWORD)
    with pytest.raises(DatapointError, match="password authentication failed") as info:
        read_datapoints([wrong])
    assert PASSWORD not in str(info.value)
