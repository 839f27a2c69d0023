"""Process logs: ``log_format: json`` (every line one JSON object, one access line per request,
never prompt text), ``log_level``, and access fields that never cross between concurrent requests."""

from __future__ import annotations

import json
import logging
import threading

import httpx
import pytest

from guard.logs import ACCESS_LOGGER, JsonFormatter
from tests.fault_upstream import ProxyProcess
from tests.scripted_upstream import Script, build_upstream
from tests.servers import ServerThread

PROMPT = "prompt-canary-9d2e41"
KEY = "sk-upstream-canary-13ab"


def probe_reply(body: dict) -> str:
    assessed = json.loads(body["messages"][-1]["content"])["request_to_assess"]  # the probe's view of the request
    if "unparseable" in json.dumps(assessed):
        return "no idea"
    return json.dumps({"will_refuse": False, "confidence": 5, "harm_rating": 1, "topic": "other"})


def _run(tmp_path, *flags: str) -> tuple[list[httpx.Response], str]:
    script = Script(reply="Here you go.", probe_reply=probe_reply)
    with ServerThread(build_upstream(script)) as upstream, ProxyProcess(
        upstream.url + "/v1", tmp_path, "--mode", "sequential", "--datapoints", "", "--on-probe-failure", "block",
        "--upstream-api-key", KEY, *flags,
    ) as proxy:
        def chat(kind: str, stream: bool = False) -> httpx.Response:
            body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": f"{kind} {PROMPT}"}]}
            return httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=30)

        answers = [chat("plain"), chat("streamed", stream=True), chat("unparseable"),
                   httpx.post(proxy.url + "/v1/chat/completions", content=b'{"messages": 1}', timeout=30),
                   httpx.get(proxy.url + "/healthz", timeout=30)]
        proxy.terminate()
        return answers, proxy.output()


def test_json_logs_one_access_line_per_request_never_prompt_text(tmp_path):
    answers, output = _run(tmp_path, "--log-format", "json")
    assert [a.status_code for a in answers] == [200, 200, 200, 400, 200]
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]   # every line is JSON
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line["logger"].startswith("uvicorn") for line in lines)          # uvicorn's lines too
    access = {line["request_id"]: line for line in lines if line["logger"] == ACCESS_LOGGER}
    chat_lines = [line for line in lines if line["logger"] == ACCESS_LOGGER and line["route"] == "chat"]
    assert len(chat_lines) == 4 == len({line["request_id"] for line in chat_lines})   # one line per request
    plain, streamed, blocked, invalid, health = (access[a.headers["x-request-id"]] for a in answers)
    for line, action in ((plain, "pass"), (streamed, "pass"), (blocked, "block")):
        assert line["route"] == "chat" and line["status"] == 200 and line["action"] == action
        assert line["mode"] == "sequential" and line["probe_ms"] > 0 and line["duration_ms"] > 0
    assert plain["probe_status"] == "ok" and plain["upstream_ms"] > 0
    assert blocked["probe_status"] == "unparseable" and blocked.get("upstream_ms") is None
    assert invalid["status"] == 400 and "action" not in invalid
    assert health == {**health, "route": "healthz", "status": 200, "method": "GET"} and "action" not in health
    assert PROMPT not in output and KEY not in output


def test_log_level_warning_silences_info_and_access_lines(tmp_path):
    answers, output = _run(tmp_path, "--log-format", "json", "--log-level", "warning")
    assert [a.status_code for a in answers] == [200, 200, 200, 400, 200]
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert all(line["level"] in ("warning", "error", "critical") for line in lines)


def test_text_format_is_the_default_and_has_no_access_lines(tmp_path):
    answers, output = _run(tmp_path)
    assert answers[0].status_code == 200
    assert "Uvicorn running" in output and not any(line.startswith("{") for line in output.splitlines())
    assert ACCESS_LOGGER not in output and PROMPT not in output


def test_access_fields_never_cross_between_concurrent_requests(start_proxy, script):
    script.probe_reply = probe_reply
    script.stall = 0.05
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        proxy = start_proxy(mode="sequential", log_format="json", on_probe_failure="block")
        expected: dict[str, str] = {}
        lock = threading.Lock()

        def client(k: int) -> None:
            with httpx.Client(base_url=proxy.url, timeout=30) as c:
                for i in range(10):
                    kind = "unparseable" if (k + i) % 2 else "plain"
                    r = c.post("/v1/chat/completions",
                               json={"model": "m", "messages": [{"role": "user", "content": f"{kind} {k} {i}"}]})
                    with lock:
                        expected[r.headers["x-request-id"]] = r.headers["x-refusal-guard-action"]

        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        logger.removeHandler(handler)
    seen = {r.access["request_id"]: r.access["action"] for r in records if r.access["route"] == "chat"}
    assert len(expected) == 60 and seen == expected
    assert set(expected.values()) == {"pass", "block"}
    formatted = json.loads(JsonFormatter().format(records[0]))
    assert formatted["request_id"] == records[0].access["request_id"] and formatted["level"] == "info"


@pytest.mark.parametrize("value", ["xml", "loud"])
def test_unknown_log_settings_are_rejected(value):
    from guard.settings import Settings

    with pytest.raises(ValueError):
        Settings(upstream="http://x/v1", log_format=value)
    with pytest.raises(ValueError):
        Settings(upstream="http://x/v1", log_level=value)


def test_no_record_prints_a_query_string_or_a_websocket_access_line():
    """The filter on the process's one handler (``configure_logging``): a URL's query string is
    redacted in any record and traceback; uvicorn's WebSocket handshake lines are dropped."""
    from guard.logs import RedactQueryStrings

    def filtered(name: str, msg: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord | None:
        record = logging.LogRecord(name, logging.INFO, __file__, 1, msg, args,
                                   (type(exc), exc, exc.__traceback__) if exc else None)
        return record if RedactQueryStrings().filter(record) else None

    record = filtered("aiohttp", "cannot reach %s", "http://10.0.0.5:8000/v1/models?api-key=sk-canary-1&x=2")
    assert record.getMessage() == "cannot reach http://10.0.0.5:8000/v1/models?[redacted]"
    assert filtered("uvicorn.error", '%s - "WebSocket %s" 403', "127.0.0.1:5000", "/v1/realtime?api-key=k") is None
    plain = filtered("refusal_guard", "GET %s answered 404: does the upstream URL end in /v1? (e.g. %s)", "u", "v")
    assert plain.getMessage() == "GET u answered 404: does the upstream URL end in /v1? (e.g. v)"  # prose kept
    try:
        raise ValueError("bad URL /v1/files?key=sk-canary-2")
    except ValueError as exc:
        record = filtered("refusal_guard", "failed", exc=exc)
    line = JsonFormatter().format(record)
    assert "sk-canary-2" not in line and "/v1/files?[redacted]" in line
