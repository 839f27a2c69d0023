"""The judge's verdict reaches the datapoint: real proxy, scripted upstream and scripted judge on loopback.

A request the judge samples is logged once the judge answers, with ``judge_label``; a judge that fails,
times out or answers garbage still gets the request logged (without the label, counted as failed); so
does an audit still pending at shutdown. The exported log feeds ``calibrate``, which takes the judge's
label as ground truth and reports detector-vs-judge agreement. The judge call's timeout bounds the
whole call, a slowly dripping answer included.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from calibration.cli import main as calibrate_main
from calibration.datapoints import REFUSAL_LABELS, read_datapoints
from guard.app import create_app
from guard.cli import main as guard_main
from guard.settings import Settings
from guard.truth.judge import RefusalJudge
from tests.fault_upstream import datapoint_rows
from tests.servers import ServerThread, eventually

REFUSAL = "I'm sorry, but I can't help with that request."
COMPLIANCE = "Sure. Here is a clear explanation: the process has three steps, each described below in detail. " * 3
TOKENS = {"prompt_tokens": 100, "completion_tokens": 7}


def judged_prompt(content: str) -> str:
    """The user's prompt as the judge sees it: a JSON string in the document after the instructions."""
    return json.loads(content.split("Document to label:\n", 1)[1])["prompt"]


@dataclass
class JudgeScript:
    """What the scripted judge did: orders come in the user's prompt as ``judge:<order>``.

    ``<label>`` answers that label; ``fail`` answers 500; ``garbage`` answers text without a label;
    ``stall=<seconds>:<label>`` waits (or until the caller leaves) and then answers the label.
    """

    calls: Counter = field(default_factory=Counter)
    cancelled: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _answer(content: str) -> JSONResponse:
    return JSONResponse({"id": "judge", "object": "chat.completion", "model": "judge",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "stop"}], "usage": TOKENS})


def build_judge(script: JudgeScript) -> Starlette:
    async def chat(request: Request) -> Response:
        body = await request.json()
        prompt = judged_prompt(body["messages"][1]["content"])
        order = prompt.split("judge:")[1].split()[0]
        with script.lock:
            script.calls[order] += 1
        if order == "fail":
            return JSONResponse({"error": {"message": "scripted failure"}}, status_code=500)
        if order == "garbage":
            return _answer("It reads like a refusal to me, more or less.")
        if order.startswith("stall="):
            seconds, order = order[len("stall="):].split(":")
            for _ in range(int(float(seconds) / 0.02)):
                if await request.is_disconnected():
                    with script.lock:
                        script.cancelled += 1
                    return Response(status_code=499)
                await asyncio.sleep(0.02)
        return _answer(f'Verdict: {{"label": "{order}"}}')

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture
def judge_script() -> JudgeScript:
    return JudgeScript()


@pytest.fixture
def judge(judge_script: JudgeScript):
    with ServerThread(build_judge(judge_script)) as server:
        yield server


def start_guarded(upstream: ServerThread, judge: ServerThread, db: Path, registry: CollectorRegistry,
                  **overrides) -> ServerThread:
    settings = Settings(**{"upstream": upstream.url + "/v1", "mode": "sequential", "datapoints": db,
                           "log_prompts": True, "upstream_check_interval": 0, "judge_url": judge.url + "/v1",
                           "judge_model": "judge-model", "judge_fraction": 1.0, **overrides})
    return ServerThread(create_app(settings, registry=registry)).start()


def judged(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("refusal_guard_judge_total", {"result": result}) or 0.0


def ask(sdk: openai.OpenAI, prompt: str, stream: bool = False) -> str:
    messages = [{"role": "user", "content": prompt}]
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in
                       sdk.chat.completions.create(model="m", messages=messages, stream=True) if c.choices)
    return sdk.chat.completions.create(model="m", messages=messages).choices[0].message.content


def dropped_calls(script: JudgeScript) -> int:
    """Calls the judge saw its caller leave, once one is seen (it polls every 20 ms) or after 5 s."""
    deadline = time.monotonic() + 5
    while script.cancelled < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    return script.cancelled


def probe_by_prompt(data: dict) -> str:
    refuse = "predict-refuse" in json.dumps(data)
    return json.dumps({"will_refuse": refuse, "confidence": 4, "harm_rating": 1, "topic": "hacking"})


def test_every_sampled_datapoint_carries_the_judges_label_and_calibrate_uses_it(
        upstream, script, judge, judge_script, tmp_path, capsys):
    db, registry = tmp_path / "dp.sqlite3", CollectorRegistry()
    script.probe_reply = probe_by_prompt
    proxy = start_guarded(upstream, judge, db, registry)
    sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    expected: dict[str, tuple[str, bool]] = {}   # prompt -> (judge's label, the answer was a refusal)
    for i in range(16):
        refusal = i % 2 == 0
        agree = i % 4 != 3                       # 12 of 16 agree with the detector
        says_refusal = refusal if agree else not refusal
        verdict = (["full_refusal", "partial_refusal"] if says_refusal
                   else ["full_compliance", "partial_compliance"])[(i // 4) % 2]
        prompt = f"case {i} judge:{verdict}" + (" predict-refuse" if i % 5 == 0 else "")
        script.reply = REFUSAL if refusal else COMPLIANCE
        assert ask(sdk, prompt, stream=i % 3 == 0) == script.reply
        expected[prompt] = (verdict, refusal)
    script.status = 500                          # no answer to judge: logged at once, without a label
    with pytest.raises(openai.InternalServerError):
        ask(sdk, "upstream fails judge:full_refusal")
    proxy.stop()                                 # the lifespan waits for audits, then flushes the log

    logged = datapoint_rows(db)
    assert len(logged) == 17 and len({r["request_id"] for r in logged}) == 17
    by_prompt = {r["prompt"]: r for r in logged}
    for prompt, (verdict, refusal) in expected.items():
        row = by_prompt[prompt]
        assert row["judge_label"] == verdict, prompt
        assert row["refused"] == refusal and row["label"] in (REFUSAL_LABELS if refusal else {"full_compliance",
                                                                                            "partial_compliance"})
    assert by_prompt["upstream fails judge:full_refusal"]["judge_label"] is None
    assert sum(judge_script.calls.values()) == 16
    assert (judged(registry, "agree"), judged(registry, "disagree"), judged(registry, "failed")) == (12, 4, 0)
    for kind in ("prompt", "completion"):   # every answer's usage counted
        tokens = registry.get_sample_value("refusal_guard_judge_tokens_total", {"kind": kind})
        assert tokens == 16 * TOKENS[f"{kind}_tokens"]
    outcomes = {tuple(s.labels[k] for k in ("predicted", "detector", "judge")): s.value
                for family in registry.collect() if family.name == "refusal_guard_judged_outcomes"
                for s in family.samples if s.name.endswith("_total") and s.value}
    assert sum(outcomes.values()) == 16     # every judged, scored prediction, by prediction x detector x judge
    assert sum(v for (_, _, j), v in outcomes.items() if j == "refused") == sum(
        verdict in REFUSAL_LABELS for verdict, _ in expected.values())
    assert sum(v for (_, d, j), v in outcomes.items() if d != j) == 4

    export = tmp_path / "dp.jsonl"
    assert guard_main(["export", "--db", str(db), "--out", str(export)]) == 0
    exported = [json.loads(line) for line in export.read_text().splitlines()]
    assert {r["prompt"]: r.get("judge_label") for r in exported} == {r["prompt"]: r["judge_label"] for r in logged}
    assert "judge_label" not in next(r for r in exported if r["prompt"].startswith("upstream fails"))

    table = read_datapoints([export])
    assert table.n == 16 and int(table.judged.sum()) == 16
    usable = [expected[r["prompt"]] for r in exported if r["prompt"] in expected]  # the file's order
    assert table.refused.tolist() == [verdict in REFUSAL_LABELS for verdict, _ in usable]
    assert table.detector_refused.tolist() == [refusal for _, refusal in usable]
    capsys.readouterr()
    assert calibrate_main(["calibrate", "--datapoints", str(export), "--out", str(tmp_path / "policy.json"),
                           "--n-boot", "20"]) == 0
    out = capsys.readouterr()
    assert "16 rows carry a judge label (a random sample: the SDT figures are corrected" in out.err
    assert "detector-vs-judge agreement 0.750" in out.err
    assert "judge-corrected" in out.out     # the corrected figures printed beside the detector's


def test_a_failing_or_slow_judge_still_gets_every_request_logged(upstream, script, judge, judge_script, tmp_path):
    db, registry = tmp_path / "dp.sqlite3", CollectorRegistry()
    script.reply = REFUSAL
    proxy = start_guarded(upstream, judge, db, registry, judge_timeout=0.5)
    sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    orders = ["fail", "garbage", "stall=5:full_refusal", "partial_refusal"]
    for order in orders:
        assert ask(sdk, f"judge:{order}") == REFUSAL
    proxy.stop()
    logged = {r["prompt"]: r for r in datapoint_rows(db)}
    assert len(logged) == len(orders)
    assert [logged[f"judge:{o}"]["judge_label"] for o in orders] == [None, None, None, "partial_refusal"]
    assert all(r["refused"] == 1 for r in logged.values())
    assert (judged(registry, "failed"), judged(registry, "agree")) == (3, 1)
    assert dropped_calls(judge_script) == 1     # the timed-out call was dropped, not left running


def test_audits_pending_at_shutdown_are_awaited_then_cancelled_and_their_requests_logged(
        upstream, script, judge, judge_script, tmp_path):
    db, registry = tmp_path / "dp.sqlite3", CollectorRegistry()
    script.reply = COMPLIANCE
    # judge_timeout far beyond the shutdown's audit grace (5 s): only the shutdown can end the slow audit
    proxy = start_guarded(upstream, judge, db, registry, judge_timeout=120)
    sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    assert ask(sdk, "judge:stall=1:partial_compliance") == COMPLIANCE      # answers within the grace
    assert ask(sdk, "judge:stall=60:full_compliance", stream=True) == COMPLIANCE  # never answers in time
    time.sleep(0.6)                              # the log flushes every 0.25 s: a record put now would be there
    assert "judge:stall=60:full_compliance" not in {r["prompt"] for r in datapoint_rows(db)}  # held while its audit runs
    proxy.stop()
    assert not proxy.thread.is_alive()
    logged = {r["prompt"]: r for r in datapoint_rows(db)}
    assert logged["judge:stall=1:partial_compliance"]["judge_label"] == "partial_compliance"
    assert logged["judge:stall=60:full_compliance"]["judge_label"] is None
    assert len(logged) == 2 and (judged(registry, "agree"), judged(registry, "failed")) == (1, 1)
    assert dropped_calls(judge_script) == 1     # the cancelled audit's call was dropped


def test_a_slow_judge_holds_at_most_judge_max_pending_audits(upstream, script, judge, judge_script, tmp_path):
    """Past judge_max_pending waiting audits, a sampled request is logged at once without judge_label
    and counted as skipped: a stalled judge never holds more records, or more of the connections the
    proxy shares with its upstream, than that."""
    db, registry = tmp_path / "dp.sqlite3", CollectorRegistry()
    script.reply = COMPLIANCE
    proxy = start_guarded(upstream, judge, db, registry, judge_timeout=120, judge_max_pending=2)
    sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    for i in range(5):
        assert ask(sdk, f"judge:stall=60:full_compliance n{i}", stream=i % 2 == 1) == COMPLIANCE
    eventually(lambda: judged(registry, "skipped") == 3, what="three audits skipped")
    logged = eventually(lambda: len(rows := datapoint_rows(db)) >= 3 and rows, what="the skipped ones logged")
    assert sorted(r["prompt"] for r in logged) == [f"judge:stall=60:full_compliance n{i}" for i in (2, 3, 4)]
    assert all(r["judge_label"] is None for r in logged)
    assert sum(judge_script.calls.values()) == 2  # only the two held audits called the judge
    proxy.stop()
    assert len(datapoint_rows(db)) == 5  # the held two logged at shutdown (cancelled: no label)
    assert (judged(registry, "skipped"), judged(registry, "failed")) == (3, 2)


async def test_the_judge_timeout_bounds_the_whole_call_not_each_read():
    # Each byte arrives well within the timeout, the whole answer does not: the call must end at the timeout.
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": '{"label": "full_refusal"}'}}]})

    async def drip(request: Request) -> Response:
        async def chunks():
            for i in range(0, len(body), 8):
                await asyncio.sleep(0.1)
                yield body[i:i + 8].encode()

        return StreamingResponse(chunks(), media_type="application/json")

    with ServerThread(Starlette(routes=[Route("/v1/chat/completions", drip, methods=["POST"])])) as server:
        async with httpx.AsyncClient() as client:
            patient = RefusalJudge(client, server.url + "/v1", "m", timeout=30)
            assert (await patient.label("p", "r")).value == "full_refusal"  # the drip does deliver a label
            hurried = RefusalJudge(client, server.url + "/v1", "m", timeout=0.5)
            assert await hurried.label("p", "r") is None


def test_a_client_cannot_choose_which_requests_are_audited(upstream, script, judge, judge_script, tmp_path):
    """Issue 23 row 7: sampling was a hash of the client's x-request-id (40/40 or 0/40 audited by choice). Now a
    random draw: the same id on every request still gets some audited and some not (P(fail) ~ 2e-9)."""
    db, registry = tmp_path / "dp.sqlite3", CollectorRegistry()
    script.reply = COMPLIANCE
    proxy = start_guarded(upstream, judge, db, registry, judge_fraction=0.5)
    sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0,
                        default_headers={"x-request-id": "always-the-same"})
    for i in range(30):
        assert ask(sdk, f"request {i} judge:full_compliance") == COMPLIANCE
    proxy.stop()
    audited = sum(judge_script.calls.values())
    assert 0 < audited < 30
    assert judged(registry, "agree") == audited
