"""calibrate's inputs without a database: globs, de-duplication of a SQLite log and its own JSONL
export, ``--since`` and ``--model`` on files, durations, and the CLI's errors for them."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client import CollectorRegistry

from calibration.cli import main
from calibration.datapoints import DUPLICATE, FIELDS, DatapointError, parse_duration, read_datapoints
from guard.live.metrics import GuardMetrics
from guard.stores.recorder import DatapointRecorder, export_jsonl

NOW = datetime.now(timezone.utc)


def row(i: int) -> dict:
    r = dict.fromkeys(FIELDS)
    r.update(id=f"p{i % 11}", request_id=f"r{i}", ts=(NOW - timedelta(hours=i)).isoformat(timespec="milliseconds"),
             model="a" if i % 3 else "b", topic=["x", "y"][i % 2], will_refuse=i % 2 == 0, confidence=1 + i % 5,
             harm_rating=1 + i % 5, refused=i % 3 == 0, probe_status="ok", label="full_compliance",
             action="pass", probe_template="t:h")
    return r


@pytest.fixture
def log_and_export(tmp_path):
    db = tmp_path / "log.sqlite3"

    async def write() -> None:
        recorder = DatapointRecorder(db, GuardMetrics(CollectorRegistry()).datapoints_dropped, flush_interval=0.01)
        await recorder.start()
        for i in range(60):
            recorder.put(row(i))
        await recorder.stop()

    asyncio.run(write())
    export = tmp_path / "log.jsonl"
    with export.open("w") as out:
        assert export_jsonl(db, out) == 60
    return db, export


def test_a_sqlite_log_and_its_own_export_count_once(log_and_export, tmp_path):
    db, export = log_and_export
    alone = read_datapoints([db])
    both = read_datapoints([db, export])
    assert alone.n == 60 and both.n == 60 and both.skipped == {DUPLICATE: 60}
    assert both.data_hash() == alone.data_hash() == read_datapoints([export]).data_hash()
    (tmp_path / "log.sqlite3-wal").write_bytes(b"\0" * 32)     # SQLite's side files are skipped by globs
    assert read_datapoints([str(tmp_path / "log.*")]).skipped == {DUPLICATE: 60}     # a glob finds both
    with pytest.raises(DatapointError, match="no file matches"):
        read_datapoints([str(tmp_path / "*.nothing")])


def test_since_and_model_filter_files(log_and_export):
    db, export = log_and_export
    recent = read_datapoints([db, export], since=NOW - timedelta(hours=9, minutes=30))   # rows 0..9
    assert recent.n == 10 and recent.n_read == 20 and recent.skipped == {DUPLICATE: 10}   # rows left out: not read
    only_b = read_datapoints([export], model="b")
    assert only_b.n == 20 and only_b.models == ("b",)
    assert read_datapoints([export], model="b", since=NOW - timedelta(hours=9, minutes=30)).n == 4   # 0, 3, 6, 9


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("15m") == 900 and parse_duration("12h") == 43200
    assert parse_duration("7d") == 7 * 86400 and parse_duration("2w") == 14 * 86400 and parse_duration("30") == 30
    for bad in ("", "soon", "-1d", "0h", "infd"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_cli_filters_and_errors(log_and_export, tmp_path, capsys):
    db, export = log_and_export
    out = tmp_path / "p.json"
    assert main(["calibrate", "--datapoints", str(db), str(export), "--out", str(out), "--n-boot", "50",
                 "--model", "a"]) == 0
    assert json.loads(out.read_text())["model"] == "a" and json.loads(out.read_text())["n"] == 40
    assert "skipped 40 rows" in capsys.readouterr().err                 # the export's 40 rows of model a
    with pytest.raises(SystemExit) as info:
        main(["calibrate", "--datapoints", str(db), "--out", str(out), "--since", "soon"])
    assert info.value.code == 2 and "not a duration" in capsys.readouterr().err
