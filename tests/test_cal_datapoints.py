"""Datapoint schema, JSONL and SQLite readers, skipped rows and error messages."""

import json
import sqlite3

import numpy as np
import pytest

from calibration.datapoints import FIELDS, SQLITE_DDL, DatapointError, read_datapoints


def _row(i, **kw):
    r = dict.fromkeys(FIELDS)
    r.update(id=f"p{i % 3}", ts="2024-01-01T00:00:00+00:00", topic=["a", "b"][i % 2], will_refuse=i % 2 == 0,
             confidence=1 + i % 5, harm_rating=1 + i % 5, harm_level=i % 3, refused=i % 3 == 0,
             probe_status="ok", label="full_refusal" if i % 3 == 0 else "full_compliance",
             prompt_sha256=f"{i:064d}", probe_template="v1", model="m")
    r.update(kw)
    return r


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_sqlite(path, rows):
    con = sqlite3.connect(path)
    con.executescript(SQLITE_DDL)
    cols = list(FIELDS)
    con.executemany(f"INSERT INTO datapoints ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    [tuple(r[c] for c in cols) for r in rows])
    con.commit()
    con.close()
    return path


def test_fields_and_ddl():
    assert FIELDS[:3] == ("id", "request_id", "ts") and FIELDS[-1] == "prompt_sha256" and len(FIELDS) == 22
    con = sqlite3.connect(":memory:")
    con.executescript(SQLITE_DDL)
    cols = [r[1] for r in con.execute("PRAGMA table_info(datapoints)")]
    assert cols == ["seq", *FIELDS, "prompt", "route", "upstream_request_id", "context", "judge_label", "prompt_topic",
                    "client"]
    idx = [r[1] for r in con.execute("PRAGMA index_list(datapoints)")]
    assert any("topic" in name for name in idx)


def test_jsonl_and_sqlite_agree(tmp_path):
    rows = [_row(i) for i in range(40)]
    rows[3]["will_refuse"] = None
    rows[3]["probe_status"] = "timeout"
    rows[7]["refused"] = None          # e.g. blocked request: response never seen
    a = read_datapoints([_write_jsonl(tmp_path / "d.jsonl", rows)])
    b = read_datapoints([_write_sqlite(tmp_path / "log.data", rows)])   # detected by magic, not extension
    assert a.n == b.n == 38 and a.n_read == 40
    assert a.skipped == b.skipped == {"missing will_refuse (probe_status=timeout)": 1, "missing refused": 1}
    assert "d.jsonl:4" in a.skipped_examples["missing will_refuse (probe_status=timeout)"][0]
    for col in ("will_refuse", "refused", "confidence", "harm_rating", "harm_level", "topic", "prompt"):
        assert np.array_equal(getattr(a, col), getattr(b, col)), col
    assert a.data_hash() == b.data_hash()
    assert a.prompt_ids == ("p0", "p1", "p2") and a.topics == ("a", "b")
    assert a.models == ("m",) and a.probe_templates == ("v1",)


def test_id_defaults(tmp_path):
    rows = [_row(0, id=None), _row(1, id=None, prompt_sha256=None), _row(2, id=None, prompt_sha256=None)]
    t = read_datapoints([_write_jsonl(tmp_path / "d.jsonl", rows)])
    assert t.prompt_ids[0] == "0" * 64
    assert len(set(t.prompt_ids)) == 3   # rows without id or sha get row-unique ids


@pytest.mark.parametrize("bad,needle", [
    ('{"id": "x", "will_refuse": true, "confidence": 3, "refused": tru}', "d.jsonl:2: not valid JSON"),
    ('[1, 2]', "d.jsonl:2: expected a JSON object"),
    ('{"id": "x", "will_refuse": true, "confidence": 7, "refused": true}', "d.jsonl:2: field 'confidence'"),
    ('{"id": "x", "will_refuse": "yes", "confidence": 3, "refused": true}', "d.jsonl:2: field 'will_refuse'"),
    ('{"id": "x", "will_refuse": true, "confidence": 3, "refused": true, "label": "meh"}', "d.jsonl:2: field 'label'"),
])
def test_bad_lines_name_file_and_line(tmp_path, bad, needle):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(_row(0)) + "\n" + bad + "\n" + json.dumps(_row(1)) + "\n")
    with pytest.raises(DatapointError) as exc:
        read_datapoints([p])
    assert needle in str(exc.value)
    t = read_datapoints([p], on_error="skip")
    assert t.n == 2 and t.n_skipped == 1 and t.n_read == 3


def test_missing_file_and_bad_sqlite(tmp_path):
    with pytest.raises(DatapointError, match="no such file"):
        read_datapoints([tmp_path / "nope.jsonl"])
    con = sqlite3.connect(tmp_path / "x.db")
    con.execute("CREATE TABLE other (a)")
    con.commit()
    con.close()
    with pytest.raises(DatapointError, match="no 'datapoints' table"):
        read_datapoints([tmp_path / "x.db"])


def test_unknown_fields_are_reported(tmp_path):
    t = read_datapoints([_write_jsonl(tmp_path / "d.jsonl", [_row(0, extra_field=1)])])
    assert t.unknown_fields == ("extra_field",)
