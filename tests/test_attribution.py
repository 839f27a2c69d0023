"""Issue 23, row 6: every datapoint says which client sent it, and never holds the client's key.

Against the real proxy on loopback (the scripted upstream): with ``api_keys`` the ``client`` field is
the name of the key the request used (names from a mapping, else ``key-1``, ``key-2``...); without
them it is a keyed hash (HMAC under ``prompt_hash_key``, 16 hex digits) of the credential the client
sent, or null without one. The key text is in no byte of the log or its export. Old logs gain the
column; ``calibrate`` reads it back and can exclude a client by it.
"""

from __future__ import annotations

import io
import json
import sqlite3

import httpx
import pytest

from calibration.datapoints import SQLITE_DDL, read_datapoints
from guard.stores.recorder import export_jsonl
from tests.fault_upstream import datapoint_rows
from tests.servers import eventually

HASH_KEY = "k" * 40


def chat(url: str, text: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=20, headers=headers or {},
                      json={"model": "scripted", "messages": [{"role": "user", "content": text}]})


def clients(db, n: int) -> list:
    rows = eventually(lambda: len(got := datapoint_rows(db)) >= n and got, what=f"{n} datapoints")
    return [r["client"] for r in rows]


def test_named_inbound_keys_are_recorded_by_name_never_the_key(start_proxy, tmp_path, monkeypatch):
    db = tmp_path / "dp.sqlite3"
    monkeypatch.setenv("REFUSAL_GUARD_API_KEYS", json.dumps({"alice": "sk-alice-SECRET-1", "batch-job": "sk-job-SECRET-2"}))
    from guard.settings import load_settings

    named = load_settings({"upstream": "http://127.0.0.1:1/v1"})
    assert named.api_key_names == ("alice", "batch-job") and named.api_key_name(1) == "batch-job"
    proxy = start_proxy(mode="sequential", datapoints=str(db), api_keys=named.api_keys,
                        api_key_names=named.api_key_names)
    assert chat(proxy.url, "one", {"authorization": "Bearer sk-alice-SECRET-1"}).status_code == 200
    assert chat(proxy.url, "two", {"authorization": "Bearer sk-job-SECRET-2"}).status_code == 200
    assert chat(proxy.url, "three", {"authorization": "Bearer sk-wrong"}).status_code == 401  # no datapoint
    assert clients(db, 2) == ["alice", "batch-job"]
    out = io.StringIO()
    assert export_jsonl(db, out) == 2
    assert [json.loads(line)["client"] for line in out.getvalue().splitlines()] == ["alice", "batch-job"]
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("dp.sqlite3") and p.is_file())
    assert b"SECRET" not in raw and b"SECRET" not in out.getvalue().encode()


def test_unnamed_inbound_keys_are_named_by_position(start_proxy, tmp_path):
    db = tmp_path / "dp.sqlite3"
    proxy = start_proxy(mode="sequential", datapoints=str(db), api_keys="sk-first,sk-second")
    chat(proxy.url, "a", {"authorization": "Bearer sk-second"})
    chat(proxy.url, "b", {"authorization": "Bearer sk-first"})
    assert clients(db, 2) == ["key-2", "key-1"]


def test_without_inbound_keys_the_client_is_a_keyed_hash_of_its_credential(start_proxy, script, tmp_path):
    db = tmp_path / "dp.sqlite3"
    proxy = start_proxy(mode="sequential", datapoints=str(db), prompt_hash_key=HASH_KEY)
    sent = [({"authorization": "Bearer sk-user-AAAA-SECRET"}, "a"), ({"authorization": "Bearer sk-user-AAAA-SECRET"}, "b"),
            ({"authorization": "Bearer sk-user-BBBB-SECRET"}, "c"), ({"api-key": "azure-CCCC-SECRET"}, "d"),
            ({"x-api-key": "anthropic-style-DDDD-SECRET"}, "e"), ({}, "f")]
    for headers, text in sent:
        assert chat(proxy.url, text, headers).status_code == 200
    got = clients(db, len(sent))
    a, a2, b, azure, x, none = got
    assert a == a2 and len({a, b, azure, x}) == 4 and none is None
    assert all(len(c) == 16 and int(c, 16) >= 0 for c in (a, b, azure, x))
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert b"SECRET" not in raw
    # the upstream still got the client's own key: attribution changes nothing that is forwarded
    assert [r.headers.get("authorization") for r in script.of("generation")][:1] == ["Bearer sk-user-AAAA-SECRET"]

    # keyed: another deployment secret gives other ids for the same key (a guess cannot be confirmed
    # from the log by hashing it), while the prompt hashes change with it too
    db2 = tmp_path / "dp2.sqlite3"
    other = start_proxy(mode="sequential", datapoints=str(db2), prompt_hash_key="z" * 40)
    chat(other.url, "a", {"authorization": "Bearer sk-user-AAAA-SECRET"})
    assert clients(db2, 1)[0] not in (a, None)


def test_an_old_log_gains_the_column_and_calibrate_reads_and_excludes_by_it(start_proxy, tmp_path, script, capsys):
    db = tmp_path / "dp.sqlite3"
    con = sqlite3.connect(db)
    con.executescript(SQLITE_DDL)
    con.execute("ALTER TABLE datapoints DROP COLUMN client")  # a log from before the field
    assert "client" not in {r[1] for r in con.execute("PRAGMA table_info(datapoints)")}
    con.execute("INSERT INTO datapoints (request_id, will_refuse, confidence, refused, topic, id) "
                "VALUES ('old', 0, 4, 0, 'other', 'p-old')")
    con.commit()
    con.close()
    script.probe_reply = json.dumps({"will_refuse": False, "confidence": 4, "harm_rating": 1, "topic": "other"})
    proxy = start_proxy(mode="sequential", datapoints=str(db), api_keys={"alice": "sk-a", "mallory": "sk-m"})
    for i in range(3):
        chat(proxy.url, f"alice {i}", {"authorization": "Bearer sk-a"})
    for i in range(5):
        chat(proxy.url, f"mallory {i}", {"authorization": "Bearer sk-m"})
    assert clients(db, 9) == [None] + ["alice"] * 3 + ["mallory"] * 5
    table = read_datapoints([db])
    names = sorted(table.client_name(int(c)) for c in table.client_codes())
    assert names == ["(none)"] + ["alice"] * 3 + ["mallory"] * 5

    from calibration.cli import main

    code = main(["calibrate", "--datapoints", str(db), "--out", str(tmp_path / "p.json"), "--n-boot", "50",
                 "--exclude-client", "mallory", "--target-accuracy", "0.5"])
    err = capsys.readouterr().err
    assert "clients: 3 client(s); 8 of 9 rows attributed" in err and "mallory" in err
    assert "excluded clients: mallory (5 rows)" in err
    assert code == 0 and "4 usable datapoints" in err


@pytest.mark.parametrize("bad", [{"has space": "sk-1"}, {"a": "sk-1", "b": ""}])
def test_key_names_are_checked(bad):
    from pydantic import ValidationError

    from guard.settings import Settings

    if "b" in bad:  # an empty key is dropped with its name, as an empty key always was
        assert Settings(upstream="http://u/v1", api_keys=bad).api_key_names == ("a",)
        return
    with pytest.raises(ValidationError, match="api key name"):
        Settings(upstream="http://u/v1", api_keys=bad)


def test_names_and_keys_must_line_up_and_survive_the_worker_handover():
    from pydantic import ValidationError

    from guard.settings import Settings, settings_to_json

    with pytest.raises(ValidationError, match="2 names for 1 api_keys"):
        Settings(upstream="http://u/v1", api_keys=["sk-1"], api_key_names=["a", "b"])
    settings = Settings(upstream="http://u/v1", api_keys={"a": "sk-1", "b": "sk-2"})
    again = Settings.model_validate_json(settings_to_json(settings))
    assert again.api_key_names == ("a", "b") and [k.get_secret_value() for k in again.api_keys] == ["sk-1", "sk-2"]
