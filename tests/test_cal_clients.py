"""calibrate per client (issue 23, row 6): the client field read from every source, the per-client
report and dominated-cell warnings, ``--exclude-client`` and ``--max-client-share``."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from calibration.cli import main
from calibration.clients import (apply_client_limits, cap_client_share, client_report, exclude_clients,
                                 _common_cap)
from calibration.datapoints import FIELDS, NO_CLIENT, SQLITE_DDL, DatapointTable, read_datapoints
from calibration.policy import Policy


def row(i: int, client: str | None, *, topic: str = "other", will_refuse: bool = False, confidence: int = 3,
        refused: bool = False, prompt: str | None = None) -> dict:
    r = dict.fromkeys(FIELDS)
    r.update(id=prompt or f"p{i}", request_id=f"r{i}", ts="2026-12-01T00:00:00.000+00:00", model="m", topic=topic,
             will_refuse=will_refuse, confidence=confidence, harm_rating=1, refused=refused, probe_status="ok",
             label="full_refusal" if refused else "full_compliance", action="pass",
             probe_template="rg-probe-v2:abc", prompt_sha256=prompt or f"p{i}")
    if client is not None:
        r["client"] = client
    return r


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def table_of(clients: list[str | None], cells: list[tuple[str, bool, int]] | None = None) -> DatapointTable:
    names = sorted({c for c in clients if c is not None})
    cells = cells or [("other", False, 3)] * len(clients)
    topics = sorted({t for t, _, _ in cells})
    return DatapointTable.from_arrays(
        prompt=np.arange(len(clients)), will_refuse=[w for _, w, _ in cells], confidence=[c for _, _, c in cells],
        refused=np.zeros(len(clients), bool), topic=[topics.index(t) for t, _, _ in cells], topics=topics,
        client=[names.index(c) if c is not None else -1 for c in clients], clients=names)


# --- reading ------------------------------------------------------------------------------------------

def test_the_client_field_is_read_from_jsonl_and_sqlite_and_old_files_have_none(tmp_path):
    rows = [row(0, "alice"), row(1, "bob"), row(2, None), row(3, "alice")]
    jsonl = tmp_path / "a.jsonl"
    write_jsonl(jsonl, rows)
    db = tmp_path / "a.sqlite3"
    con = sqlite3.connect(db)
    con.executescript(SQLITE_DDL)
    cols = FIELDS + ("client",)
    con.executemany(f"INSERT INTO datapoints ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    [tuple(r.get(k) for k in cols) for r in rows])
    con.commit()
    con.close()
    for source in (jsonl, db):
        table = read_datapoints([source])
        names = [table.client_name(int(c)) for c in table.client_codes()]
        assert names == ["alice", "bob", NO_CLIENT, "alice"], source
    old = tmp_path / "old.jsonl"
    write_jsonl(old, [{k: v for k, v in row(i, None).items()} for i in range(3)])
    table = read_datapoints([old])
    assert table.client is None and table.clients == () and (table.client_codes() == -1).all()


def test_a_client_that_is_not_a_string_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [row(0, "alice"), {**row(1, None), "client": 7}])
    with pytest.raises(Exception, match="client"):
        read_datapoints([path])


# --- the report ---------------------------------------------------------------------------------------

def test_the_report_counts_rows_per_client_and_finds_dominated_cells():
    clients = ["attacker"] * 60 + ["a", "b", "c"] * 10 + [None] * 10
    cells = [("other", False, 3)] * 90 + [("hacking", True, 5)] * 10
    # the 10 unattributed rows fill hacking x refuse x 5 alone (under MIN_WARN_ROWS: no warning)
    report = client_report(table_of(clients, cells))
    assert report.rows[0] == ("attacker", 60) and dict(report.rows)[NO_CLIENT] == 10
    assert report.attributed == 90 and report.n == 100
    assert len(report.dominated) == 1
    cell = report.dominated[0]
    assert (cell.topic, cell.will_refuse, cell.confidence, cell.client, cell.n) == ("other", False, 3, "attacker", 90)
    assert cell.share == pytest.approx(60 / 90)
    assert any("attacker supplies 67% of 90 rows" in w for w in report.warnings())
    assert "attacker" in report.lines()[1] and "60.0%" in report.lines()[1]


def test_no_warning_when_no_client_supplies_most_or_there_is_only_one():
    assert client_report(table_of(["a", "b"] * 40)).warnings() == []
    assert client_report(table_of(["a"] * 80)).warnings() == []  # one client: shares say nothing


# --- exclude and cap ----------------------------------------------------------------------------------

def test_exclude_client_drops_exactly_its_rows():
    table = table_of(["x", "a", "x", None, "b", "x"])
    kept, dropped = exclude_clients(table, ["x", NO_CLIENT, "nobody"])
    assert kept.n == 2 and dropped == {"x": 3, NO_CLIENT: 1, "nobody": 0}
    assert sorted(kept.client_name(int(c)) for c in kept.client_codes()) == ["a", "b"]
    assert kept.prompt.tolist() == [1, 4]  # the other columns follow their rows


@pytest.mark.parametrize("share", [0.2, 0.34, 0.5, 0.75])
def test_the_cap_leaves_no_client_above_its_share_of_any_cell(share):
    rng = np.random.default_rng(7)
    clients = list(rng.choice(["a", "b", "c", "d"], size=400, p=[0.7, 0.1, 0.1, 0.1]))
    cells = [("other" if rng.random() < 0.8 else "hacking", bool(rng.random() < 0.3), int(rng.integers(1, 6)))
             for _ in clients]
    table = table_of(clients, cells)
    capped, dropped = cap_client_share(table, share)
    assert capped.n == table.n - sum(dropped.values()) and "a" in dropped
    codes = capped.client_codes()
    cell = ((capped.topic + 1) * 2 + capped.will_refuse) * 5 + capped.confidence
    for c in np.unique(cell):
        in_cell = codes[cell == c]
        _, counts = np.unique(in_cell, return_counts=True)
        assert counts.max() <= share * in_cell.size + 1e-9
    again, _ = cap_client_share(table, share)
    assert again.prompt.tolist() == capped.prompt.tolist()  # deterministic


def test_the_cap_keeps_as_many_rows_as_it_may_the_same_ones_in_any_read_order():
    clients = ["big"] * 100 + ["a"] * 25 + ["b"] * 25
    table = table_of(clients)
    capped, dropped = cap_client_share(table, 0.5)
    big = table.clients.index("big")
    kept = sorted(table.prompt_ids[int(p)] for p, c in zip(capped.prompt, capped.client_codes()) if c == big)
    assert len(kept) == 50 and dropped == {"big": 50}  # 50 of 100 = half of the 100 kept rows
    # spread evenly over the client's rows ordered by prompt id: every second one of them
    assert kept == sorted(f"p{i}" for i in range(100))[::2]
    order = np.random.default_rng(3).permutation(table.n)
    shuffled = type(table).from_arrays(prompt=table.prompt[order], will_refuse=table.will_refuse[order],
                                      confidence=table.confidence[order], refused=table.refused[order],
                                      topic=table.topic[order], topics=table.topics, client=table.client[order],
                                      clients=table.clients)
    again, _ = cap_client_share(shuffled, 0.5)
    assert again.data_hash() == capped.data_hash()  # the same rows, whatever order they were read in


def test_the_common_cap():
    assert _common_cap(np.array([100, 25, 25]), 0.5) == 50
    assert _common_cap(np.array([10, 10, 10]), 0.34) == 10  # nobody above: nothing to cut
    assert _common_cap(np.array([80]), 0.5) == 0  # one client can never be at most half of a cell
    assert _common_cap(np.array([90, 90, 10]), 0.4) == 20  # 20 = 0.4 x (20 + 20 + 10): two big clients cut alike


def test_a_cap_of_one_changes_nothing_and_a_bad_share_is_refused():
    table = table_of(["a"] * 5)
    assert cap_client_share(table, 1.0)[0] is table
    with pytest.raises(ValueError):
        cap_client_share(table, 0.0)


def test_apply_client_limits_notes_what_went():
    table, notes = apply_client_limits(table_of(["x"] * 10 + ["a"] * 5 + ["b"] * 5), ["b"], 0.5)
    assert notes[0] == "excluded clients: b (5 rows)"
    assert notes[1].startswith("max client share 0.5 per cell: dropped 5 of 15 rows (x 5)")
    assert table.n == 10


# --- the command --------------------------------------------------------------------------------------

def normal_and_poison(path, poison: int, seed: int = 0) -> None:
    """Many clients, confidence-3 compliance right 90% of the time; then one client's correct ones."""
    rng = np.random.default_rng(seed)
    rows = []
    i = 0
    for p in range(1500):
        refused = bool(rng.random() < 0.3)
        for _ in range(2):
            conf = int(rng.choice(5, p=[0.03, 0.07, 0.2, 0.3, 0.4])) + 1
            right = rng.random() < (0.55, 0.62, 0.70, 0.93, 0.99)[conf - 1]
            rows.append(row(i, f"key-{int(rng.integers(20)) + 1}", will_refuse=refused if right else not refused,
                            confidence=conf, refused=refused, prompt=f"n{p}"))
            i += 1
    rows += [row(i + j, "attacker", prompt=f"x{j}") for j in range(poison)]
    write_jsonl(path, rows)


def test_calibrate_reports_clients_warns_and_caps(tmp_path, capsys):
    data = tmp_path / "dp.jsonl"
    normal_and_poison(data, 6000)  # the attack of issue 23: 6,000 benign requests
    out = tmp_path / "policy.json"
    base = ["calibrate", "--datapoints", str(data), "--out", str(out), "--n-boot", "100"]
    assert main(base) == 0
    err = capsys.readouterr().err
    assert "calibrate: clients: 21 client(s); 9000 of 9000 rows attributed" in err
    assert "attacker" in err.split("clients:")[2]  # the top client, first in the list
    assert "warning: one client supplies most of the cell other x comply x confidence 3: client attacker" in err
    poisoned = Policy.load(out).decide("other", False, 3, 1)

    assert main(base + ["--exclude-client", "attacker", "--exclude-client", "key-1"]) == 0
    err = capsys.readouterr().err
    assert "excluded clients: attacker (6000 rows), key-1 (" in err
    excluded = Policy.load(out)
    assert excluded.n < 3000

    assert main(base + ["--max-client-share", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "max client share 0.5 per cell: dropped" in err and "(attacker " in err
    capped = Policy.load(out)
    assert 3000 < capped.n < 9000
    assert (poisoned, excluded.decide("other", False, 3, 1), capped.decide("other", False, 3, 1)) == \
        ("pass", "review", "review")


def test_calibrate_refuses_a_share_outside_0_1(tmp_path, capsys):
    data = tmp_path / "dp.jsonl"
    write_jsonl(data, [row(i, "a") for i in range(5)])
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", "--datapoints", str(data), "--out", str(tmp_path / "p.json"), "--max-client-share", "1.5"])
    assert exit_.value.code == 2 and "(0, 1]" in capsys.readouterr().err
