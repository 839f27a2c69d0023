"""Prompts, responses and credentials never reach logs, metrics or the datapoint log by default.

The proxy runs as ``python -m guard.cli serve`` (log level info, as deployed). Requests carry
distinctive canary strings in the prompt, the Authorization header, the admin token and the
x-api-key header; the upstream answers with canaries in the response, in a failing probe's
answer and in its own error body. The run covers a passed request, a streamed one, a failing
(unparseable) probe, an upstream error, a review event (logged, as no webhook is set), a
block, a bad request and a failed admin call. Then the proxy's stdout/stderr, ``/metrics``
and the SQLite datapoint log (WAL files included) must contain none of the canaries.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.fault_upstream import ProxyProcess
from tests.scripted_upstream import Script, build_upstream
from tests.servers import ServerThread

PROMPT = "prompt-canary-4c1d9e"
RESPONSE = "response-canary-77b2af"
PROBE_ANSWER = "probe-canary-5e0c31"
UPSTREAM_ERROR = "upstream-error-canary-a81f"
AUTH = "sk-auth-canary-0f9e2b"
API_KEY_HEADER = "x-api-key-canary-31d7"
ADMIN = "admin-canary-c4e8"
CANARIES = (PROMPT, RESPONSE, PROBE_ANSWER, UPSTREAM_ERROR, AUTH, API_KEY_HEADER, ADMIN)


def probe_reply(body: dict) -> str:
    assessed = json.dumps(json.loads(body["messages"][-1]["content"])["request_to_assess"])
    if "unparseable" in assessed:
        return f"I will not say: {PROBE_ANSWER}"
    if "review" in assessed:
        return json.dumps({"will_refuse": False, "confidence": 2, "harm_rating": 1, "topic": "other"})
    if "block" in assessed:
        return json.dumps({"will_refuse": True, "confidence": 5, "harm_rating": 5, "topic": "weapons"})
    return json.dumps({"will_refuse": False, "confidence": 5, "harm_rating": 1, "topic": "other"})


def test_no_prompt_response_or_secret_in_logs_metrics_or_datapoints(tmp_path):
    script = Script(reply=f"Here you go: {RESPONSE}", probe_reply=probe_reply)
    db = tmp_path / "dp.sqlite3"
    with ServerThread(build_upstream(script)) as upstream, ProxyProcess(
        upstream.url + "/v1", tmp_path, "--mode", "sequential", "--datapoints", str(db), "--admin-token", ADMIN,
        "--probe-timeout", "2",
    ) as proxy:
        headers = {"authorization": f"Bearer {AUTH}", "x-api-key": API_KEY_HEADER}

        def chat(kind: str, stream: bool = False) -> httpx.Response:
            body = {"model": "m", "stream": stream, "messages": [
                {"role": "system", "content": f"system {PROMPT}"}, {"role": "user", "content": f"{kind} {PROMPT}"}]}
            return httpx.post(proxy.url + "/v1/chat/completions", json=body, headers=headers, timeout=20)

        assert RESPONSE in chat("plain").text
        assert chat("streamed", stream=True).text.endswith("data: [DONE]\n\n")  # the canary, 5 chars a chunk
        assert chat("unparseable").headers["x-refusal-guard-prediction"] == "unknown"
        assert chat("review").headers["x-refusal-guard-action"] == "review"
        assert chat("block").headers["x-refusal-guard-action"] == "block"
        script.status, script.error = 503, {"error": {"message": UPSTREAM_ERROR, "type": "server_error"}}
        assert chat("failing").status_code == 503
        script.status = 200
        bad = httpx.post(proxy.url + "/v1/chat/completions", headers=headers,
                         content=f'{{"messages": [{{"content": "{PROMPT}"}}]}}'.encode())
        assert bad.status_code == 400
        assert httpx.post(proxy.url + "/admin/policy/reload",
                          headers={"authorization": f"Bearer {ADMIN}x"}).status_code == 401
        assert httpx.post(proxy.url + "/admin/policy/reload",
                          headers={"authorization": f"Bearer {ADMIN}"}).status_code == 422
        metrics = httpx.get(proxy.url + "/metrics").text
        proxy.terminate()
        output = proxy.output()

    assert "review" in output  # the review event was logged (without the prompt)
    assert "refusal_guard_requests_total" in metrics
    stored = b"".join(p.read_bytes() for p in Path(db).parent.glob(db.name + "*"))
    assert len(stored) > 0
    for canary in CANARIES:
        assert canary not in output, f"{canary} in the proxy's output"
        assert canary not in metrics, f"{canary} in /metrics"
        assert canary.encode() not in stored, f"{canary} in the datapoint log"


# --- issue 16: model strings capped and sanitised; keyed prompt hashes ------------------------------

import hashlib  # noqa: E402
import hmac  # noqa: E402
import os  # noqa: E402
import sqlite3  # noqa: E402
import stat  # noqa: E402

from guard.stores.recorder import MODEL_MAX_CHARS, clean_model  # noqa: E402
from tests.conftest import *  # noqa: E402,F401,F403


def stored(db: Path) -> list[sqlite3.Row]:
    connection = sqlite3.connect(db)
    connection.row_factory = sqlite3.Row
    try:
        return connection.execute("SELECT * FROM datapoints ORDER BY seq").fetchall()
    finally:
        connection.close()


def wait_rows(db: Path, n: int) -> list[sqlite3.Row]:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if db.exists():
            try:
                rows = stored(db)
            except sqlite3.OperationalError:
                rows = []
            if len(rows) >= n:
                return rows
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} datapoints in {db}")


def test_a_huge_or_hostile_model_string_is_capped_and_sanitised(start_proxy, tmp_path):
    db = tmp_path / "dp.sqlite3"
    proxy = start_proxy(mode="sequential", datapoints=str(db), on_probe_failure="pass")
    huge = "M" * 3_000_000
    hostile = "evil\n\x1b[31mred\x00model\u202e" + "x" * 50
    for model in (huge, hostile):
        r = httpx.post(proxy.url + "/v1/chat/completions", timeout=60,
                       json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
    rows = wait_rows(db, 2)
    assert rows[0]["model"] == "M" * (MODEL_MAX_CHARS - 1) + "~"
    assert rows[1]["model"] == clean_model(hostile) == "evil___31mred_model_" + "x" * 50
    assert all(len(row["model"]) <= MODEL_MAX_CHARS for row in rows)
    assert os.path.getsize(db) < 1_000_000  # nothing near the 3 MB name was kept


def test_prompt_hashes_are_keyed_and_still_group_repeats(start_proxy, tmp_path):
    db = tmp_path / "dp.sqlite3"
    prompt = "How do I bake bread?"
    first = start_proxy(mode="sequential", datapoints=str(db))
    for _ in range(2):
        httpx.post(first.url + "/v1/chat/completions", timeout=20,
                   json={"model": "m", "messages": [{"role": "user", "content": prompt}]})
    rows = wait_rows(db, 2)
    key_file = db.with_name(db.name + ".key")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip().encode()
    expected = hmac.new(key, prompt.encode(), hashlib.sha256).hexdigest()
    assert rows[0]["prompt_sha256"] == rows[1]["prompt_sha256"] == rows[0]["id"] == expected  # repeats grouped
    assert expected != hashlib.sha256(prompt.encode()).hexdigest()  # a guessed prompt cannot be confirmed
    # A restart on the same log keeps the key, so later repeats join the same group.
    second = start_proxy(mode="sequential", datapoints=str(db))
    httpx.post(second.url + "/v1/chat/completions", timeout=20,
               json={"model": "m", "messages": [{"role": "user", "content": prompt}]})
    assert wait_rows(db, 3)[2]["id"] == expected
    assert key_file.read_text().strip().encode() == key
    # A configured key is used as given.
    other_db = tmp_path / "other.sqlite3"
    third = start_proxy(mode="sequential", datapoints=str(other_db), prompt_hash_key="k" * 40)
    httpx.post(third.url + "/v1/chat/completions", timeout=20,
               json={"model": "m", "messages": [{"role": "user", "content": prompt}]})
    assert wait_rows(other_db, 1)[0]["id"] == hmac.new(b"k" * 40, prompt.encode(), hashlib.sha256).hexdigest()
    assert not other_db.with_name(other_db.name + ".key").exists()
