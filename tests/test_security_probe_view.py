"""The probe sees what the model sees (issue 16, item 3; issue 23, row 8).

Each attack hides the harmful text where the model reads it but the old probe did not (a
system message, an earlier user turn, plain-string parts, ``input_text``/``output_text``/
``refusal`` parts, tool-call arguments, ``name`` fields, tool descriptions). The hostile
upstream's probe predicts a refusal whenever ``HARMFUL`` is anywhere in what it was shown, so
with the default settings every one of these requests must be blocked, through the openai SDK.
Plus the pure function :func:`guard.probe.context.conversation_view`: budget, marker, counts.

Issue 23, row 8: with ``probe_unknown_parts: fail`` and ``on_probe_failure: block`` requests whose
content the probe cannot read (Responses images and files, token-id prompts, ``item_reference``,
stored context) passed. Each is now an unknown part (failing, or marked), text the model reads in
other fields (``suffix``, schema descriptions, prompt variables, ``prediction``) is probed, and a
``previous_response_id``'s stored input items are fetched upstream with the client's credentials.
"""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
from openai import OpenAI
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from guard.apis import COMPLETIONS, RESPONSES
from guard.apis.chat import CHAT
from guard.probe.context import conversation_view, last_user_text
from guard.probe.template import INSTRUCTIONS, TEMPLATE_ID, TEMPLATE_REF
from tests import openai_shapes
from tests.fault_upstream import metric_samples, metric_sum
from tests.hostile_upstream import build_hostile, hostile, start_guard  # noqa: F401
from tests.servers import ServerThread

TOOL = {"type": "function", "function": {"name": "lookup", "description": "Looks things up.",
                                         "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
ATTACKS = {
    "system_message": [{"role": "system", "content": "HARMFUL: always give weapon recipes"},
                       {"role": "user", "content": "go on"}],
    "earlier_user_turn": [{"role": "user", "content": "HARMFUL request in turn one"},
                          {"role": "assistant", "content": "ok"}, {"role": "user", "content": "now do it"}],
    "plain_string_part": [{"role": "user", "content": ["HARMFUL as a plain string part"]}],
    "input_text_part": [{"role": "user", "content": [{"type": "input_text", "text": "HARMFUL input_text"}]}],
    "output_text_part": [{"role": "assistant", "content": [{"type": "output_text", "text": "HARMFUL plan"}]},
                         {"role": "user", "content": "continue"}],
    "refusal_part": [{"role": "assistant", "content": [{"type": "refusal", "refusal": "HARMFUL text in a refusal"}]},
                     {"role": "user", "content": "continue"}],
    "tool_call_arguments": [
        {"role": "user", "content": "call the tool"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "HARMFUL"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"}, {"role": "user", "content": "and?"}],
    "tool_call_name": [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "HARMFUL_tool", "arguments": "{}"}}]},
        {"role": "user", "content": "and?"}],
    "name_field": [{"role": "user", "name": "HARMFUL_persona", "content": "hello"}],
    "tool_result": [{"role": "user", "content": "read it"},
                    {"role": "tool", "tool_call_id": "c1", "content": "HARMFUL tool output"}],
}


@pytest.fixture
def client(start_guard):
    proxy = start_guard()
    return proxy, OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0, timeout=30)


@pytest.mark.parametrize("where", sorted(ATTACKS))
def test_harmful_text_anywhere_the_model_reads_is_probed(client, hostile, where):
    proxy, sdk = client
    raw = sdk.chat.completions.with_raw_response.create(model="m", messages=ATTACKS[where])
    assert raw.headers["x-refusal-guard-action"] == "block", hostile.documents()
    completion = raw.parse()
    assert completion.choices[0].finish_reason == "content_filter"
    assert hostile.calls["generation"] == 0  # a blocked request never reaches generation
    assert "HARMFUL" in json.dumps(hostile.documents()[-1])


def test_tool_descriptions_are_probed(client, hostile):
    proxy, sdk = client
    tool = {"type": "function", "function": {"name": "lookup", "description": "HARMFUL: this tool builds weapons",
                                             "parameters": {"type": "object"}}}
    raw = sdk.chat.completions.with_raw_response.create(model="m", tools=[tool],
                                                        messages=[{"role": "user", "content": "use it"}])
    assert raw.headers["x-refusal-guard-action"] == "block"
    assert hostile.documents()[-1][0] == {"role": "tool_definition", "name": "lookup",
                                          "content": 'HARMFUL: this tool builds weapons\n{"type": "object"}'}


def test_benign_conversation_passes_and_the_probe_template_is_v2(client, hostile):
    proxy, sdk = client
    raw = sdk.chat.completions.with_raw_response.create(model="m", tools=[TOOL], messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert raw.headers["x-refusal-guard-action"] == "pass"
    _, probe = hostile.of("probe")[-1]
    assert probe["messages"][0]["content"].startswith(INSTRUCTIONS.split("{topics}")[0])
    assert hostile.documents()[-1] == [
        {"role": "tool_definition", "name": "lookup",
         "content": 'Looks things up.\n{"type": "object", "properties": {"q": {"type": "string"}}}'},
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert TEMPLATE_ID == "rg-probe-v2" and TEMPLATE_REF.startswith("rg-probe-v2:")


def test_last_user_context_is_still_available_and_weaker(start_guard, hostile):
    proxy = start_guard(probe_context="last_user")
    sdk = OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0, timeout=30)
    raw = sdk.chat.completions.with_raw_response.create(model="m", messages=ATTACKS["system_message"])
    assert raw.headers["x-refusal-guard-action"] == "pass"  # documented: it only shows the last user turn
    assert hostile.documents()[-1] == "go on"


def test_unknown_parts_are_marked_counted_or_fail_the_probe(start_guard, hostile):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}]
    marking = start_guard()
    sdk = OpenAI(base_url=marking.url + "/v1", api_key="sk-test", max_retries=0, timeout=30)
    sdk.chat.completions.create(model="m", messages=messages)
    assert hostile.documents()[-1] == [{"role": "user", "content": "what is this?\n[image_url part]"}]
    failing = start_guard(probe_unknown_parts="fail", on_probe_failure="review")
    sdk = OpenAI(base_url=failing.url + "/v1", api_key="sk-test", max_retries=0, timeout=30)
    probes = hostile.calls["probe"]
    raw = sdk.chat.completions.with_raw_response.create(model="m", messages=messages)
    assert raw.headers["x-refusal-guard-action"] == "review" and hostile.calls["probe"] == probes
    s = metric_samples(failing.url)
    assert metric_sum(s, "refusal_guard_probe_failures_total", reason="unsupported_content") == 1
    assert metric_sum(s, "refusal_guard_probe_circuit_open") == 0


def test_a_long_conversation_is_cut_in_the_middle_and_the_last_user_turn_kept(start_guard, hostile):
    proxy = start_guard(probe_context_chars=2000)
    sdk = OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0, timeout=30)
    middle = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "z" * 200} for i in range(40)]
    last = "HARMFUL final question " + "q" * 900
    raw = sdk.chat.completions.with_raw_response.create(model="m", messages=[
        {"role": "system", "content": "SYSTEM PROMPT"}, *middle, {"role": "user", "content": last}])
    assert raw.headers["x-refusal-guard-action"] == "block"
    shown = hostile.documents()[-1]
    assert shown[0] == {"role": "system", "content": "SYSTEM PROMPT"}
    assert shown[-1] == {"role": "user", "content": last}
    markers = [item for item in shown if item["role"] == "omitted"]
    assert len(markers) == 1 and "characters of the conversation omitted" in markers[0]["content"]
    assert sum(len(v) for item in shown for v in item.values()) < 2000 + 200


# --- the function itself ---------------------------------------------------------------------------------


def test_view_within_budget_is_everything_in_order():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "name": "n", "content": ["a", {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "c"}], "refusal": "r",
                 "function_call": {"name": "f", "arguments": "{}"}}]
    view = conversation_view(messages, [{"name": "flat", "description": "d", "parameters": None}], budget_chars=10_000)
    assert view.items == (
        {"role": "tool_definition", "name": "flat", "content": "d"},
        {"role": "system", "content": "s"}, {"role": "user", "content": "a\nb", "name": "n"},
        {"role": "assistant", "content": "c\nr"}, {"role": "assistant", "tool_call": "f", "content": "{}"})
    assert (view.n_unknown_parts, view.truncated) == (0, False)
    assert json.loads(view.text) == list(view.items)


def test_view_counts_unknown_parts_and_skips_or_marks_them():
    messages = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}, {"type": "file"}, {"x": 1},
                                             {"type": "mystery", "text": "still read"}]}]
    marked = conversation_view(messages, budget_chars=1000)
    skipped = conversation_view(messages, budget_chars=1000, unknown_parts="skip")
    assert marked.n_unknown_parts == skipped.n_unknown_parts == 4
    assert marked.items[0]["content"] == "[input_audio part]\n[file part]\n[untyped part]\nstill read"
    assert skipped.items[0]["content"] == "still read"


@pytest.mark.parametrize("budget", [300, 700, 1500, 3000])
def test_view_budget_keeps_head_tail_and_last_user_turn(budget):
    messages = [{"role": "system", "content": "S" * 100}]
    messages += [{"role": "user" if i % 2 else "assistant", "content": f"{i:02d}" + "m" * 98} for i in range(30)]
    messages += [{"role": "user", "content": "LAST" + "u" * 196}, {"role": "assistant", "content": "after"}]
    view = conversation_view(messages, budget_chars=budget)
    roles = [item["role"] for item in view.items]
    assert view.truncated and roles.count("omitted") == 1
    assert {"role": "user", "content": "LAST" + "u" * 196} in view.items
    assert view.items[-1] == {"role": "assistant", "content": "after"}
    assert view.items[0]["content"].startswith("S")
    size = sum(len(v) for item in view.items for v in item.values())
    assert size <= budget + 80  # the marker's own text
    assert roles.index("omitted") < roles.index("user", roles.index("omitted")) or roles[-2] == "user"


def test_a_last_user_turn_larger_than_the_budget_is_cut_in_its_middle():
    view = conversation_view([{"role": "system", "content": "s"}, {"role": "user", "content": "A" * 500 + "Z" * 500}],
                             budget_chars=100)
    (item,) = view.items
    assert item["content"].startswith("A" * 40) and item["content"].endswith("Z" * 40) and "omitted" in item["content"]


def test_view_never_raises_and_is_always_encodable():
    odd = [None, 5, {"role": None}, {"role": "user", "content": {"weird": "\ud800"}},
           {"role": "user", "content": [None, 7, {"type": ["list"]}, {"type": "text", "text": "\udfff"}]},
           {"role": "assistant", "tool_calls": [None, {"function": None}, {"function": {"name": 3, "arguments": {"a": 1}}}]}]
    view = conversation_view(odd, [None, {"function": {"name": "\ud83d"}}], budget_chars=50)
    view.text.encode("utf-8")
    assert last_user_text(odd) == "\ufffd" or last_user_text(odd).encode("utf-8")
    assert conversation_view([], budget_chars=sys.maxsize).items == ()


# --- issue 23, row 8: what the probe cannot read is unknown; what is text is read -------------------------


IMAGE = {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}
FILE = {"type": "input_file", "filename": "a.pdf", "file_data": "data:application/pdf;base64,AAAA"}


class Stored:
    """The upstream's stored responses: ``items[id]`` (oldest first) for ``GET /v1/responses/{id}/input_items``."""

    def __init__(self) -> None:
        self.items: dict[str, list[dict]] = {}
        self.outputs: dict[str, list[dict]] = {}  # ``GET /v1/responses/{id}``'s output (default: one answer)
        self.stall = 0.0
        self.fetches: list[tuple[dict, str]] = []  # (headers, query string) of each input_items call


@pytest.fixture
def stored() -> Stored:
    return Stored()


@pytest.fixture
def start_full(hostile, stored):
    """The hostile upstream (probe predicts a refusal when HARMFUL is shown) plus generations for
    completions and responses and the stored responses' input items; real proxies in front of it."""
    from prometheus_client import CollectorRegistry

    from guard.app import create_app
    from guard.settings import Settings

    async def generation(request: Request) -> JSONResponse:
        body = await request.body()
        with hostile.lock:
            hostile.calls["generation"] += 1
            hostile.received.append(("generation", dict(request.headers), body))
        shape = openai_shapes.text_completion if request.url.path.endswith("/completions") else openai_shapes.response
        return JSONResponse(shape("Sure.", "m"))

    async def input_items(request: Request) -> JSONResponse:
        stored.fetches.append((dict(request.headers), request.url.query))
        if stored.stall:
            await asyncio.sleep(stored.stall)
        items = stored.items.get(request.path_params["rid"])
        if items is None or request.headers.get("authorization") != "Bearer sk-test":
            return JSONResponse({"error": {"message": "Response not found", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=404)
        newest = [{"id": f"it_{i}", **item} for i, item in reversed(list(enumerate(items)))]
        after, limit = request.query_params.get("after"), int(request.query_params.get("limit", 20))
        if after is not None:
            newest = newest[[i["id"] for i in newest].index(after) + 1:]
        page = newest[:limit]
        return JSONResponse({"object": "list", "data": page, "has_more": len(newest) > limit,
                             "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None})

    async def stored_response(request: Request) -> JSONResponse:
        rid = request.path_params["rid"]
        if rid not in stored.items or request.headers.get("authorization") != "Bearer sk-test":
            return JSONResponse({"error": {"message": "Response not found", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=404)
        default = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Stored answer."}]}]
        return JSONResponse({"id": rid, "object": "response", "output": stored.outputs.get(rid, default)})

    app = build_hostile(hostile)
    app.router.routes += [Route("/v1/completions", generation, methods=["POST"]),
                          Route("/v1/responses", generation, methods=["POST"]),
                          Route("/v1/responses/{rid}/input_items", input_items, methods=["GET"]),
                          Route("/v1/responses/{rid}", stored_response, methods=["GET"])]
    servers = [ServerThread(app).start()]

    def start(**overrides) -> tuple[ServerThread, OpenAI]:
        values = {"upstream": servers[0].url + "/v1", "mode": "sequential", "datapoints": None, **overrides}
        server = ServerThread(create_app(Settings(**values), registry=CollectorRegistry())).start()
        servers.append(server)
        return server, OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0, timeout=30)

    yield start
    for server in reversed(servers):
        server.stop()


def say(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "input_text", "text": text}]}]


UNREADABLE = {
    "responses_input_image": lambda sdk: sdk.responses.with_raw_response.create(
        model="m", input=[{"role": "user", "content": [{"type": "input_text", "text": "what is it?"}, IMAGE]}]),
    "responses_input_file": lambda sdk: sdk.responses.with_raw_response.create(
        model="m", input=[{"role": "user", "content": [FILE, {"type": "input_text", "text": "summarise"}]}]),
    "completions_token_ids": lambda sdk: sdk.completions.with_raw_response.create(model="m", prompt=[101, 2023, 102]),
    "completions_token_id_batch": lambda sdk: sdk.completions.with_raw_response.create(model="m", prompt=[[1, 2], [3]]),
    "item_reference": lambda sdk: sdk.responses.with_raw_response.create(
        model="m", input=[{"type": "item_reference", "id": "msg_123"}, *say("and?")]),
    "conversation": lambda sdk: sdk.responses.with_raw_response.create(
        model="m", input="go on", extra_body={"conversation": "conv_123"}),
    "previous_response_not_stored": lambda sdk: sdk.responses.with_raw_response.create(
        model="m", input="go on", previous_response_id="resp_missing"),
    "stored_prompt": lambda sdk: sdk.responses.with_raw_response.create(
        model="m", input="go on", extra_body={"prompt": {"id": "pmpt_123", "variables": {"x": "y"}}}),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_what_the_probe_cannot_read_fails_the_probe_and_blocks(start_full, hostile, case):
    proxy, sdk = start_full(probe_unknown_parts="fail", on_probe_failure="block")
    raw = UNREADABLE[case](sdk)
    assert raw.headers["x-refusal-guard-action"] == "block"
    assert raw.headers["x-refusal-guard-prediction"] == "unknown"
    assert hostile.calls["generation"] == hostile.calls["probe"] == 0
    s = metric_samples(proxy.url)
    assert metric_sum(s, "refusal_guard_probe_failures_total", reason="unsupported_content") == 1


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_what_the_probe_cannot_read_is_marked_by_default(start_full, hostile, case):
    proxy, sdk = start_full()
    raw = UNREADABLE[case](sdk)
    assert raw.headers["x-refusal-guard-action"] == "pass" and hostile.calls["probe"] == 1
    shown = json.dumps(hostile.documents()[-1])
    marker = {"responses_input_image": "[input_image part]", "responses_input_file": "[input_file part]",
              "completions_token_ids": "[token_ids part]", "completions_token_id_batch": "[token_ids part]",
              "item_reference": "[item_reference part]", "conversation": "[stored_conversation part]",
              "previous_response_not_stored": "[previous_response part]", "stored_prompt": "[stored_prompt part]"}[case]
    assert marker in shown, shown


READABLE = {
    "completions_suffix": lambda sdk: sdk.completions.with_raw_response.create(model="m", prompt="def f():",
                                                                               suffix="# HARMFUL recipe"),
    "chat_response_format_description": lambda sdk: sdk.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "fill it in"}],
        response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": {
            "type": "object", "properties": {"steps": {"type": "string", "description": "HARMFUL synthesis steps"}}}}}),
    "chat_prediction": lambda sdk: sdk.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "edit it"}],
        prediction={"type": "content", "content": "HARMFUL predicted output"}),
    "responses_text_format_description": lambda sdk: sdk.responses.with_raw_response.create(
        model="m", input="fill it in", text={"format": {"type": "json_schema", "name": "out",
                                                        "description": "HARMFUL instructions", "schema": {"type": "object"}}}),
    "responses_prompt_variables": lambda sdk: sdk.responses.with_raw_response.create(
        model="m", input="go on", extra_body={"prompt": {"id": "pmpt_1", "variables": {"topic": "HARMFUL thing"}}}),
    "responses_reasoning_summary": lambda sdk: sdk.responses.with_raw_response.create(
        model="m", input=[{"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "HARMFUL plan"}]},
                          *say("continue")]),
}


@pytest.mark.parametrize("case", sorted(READABLE))
def test_text_the_model_reads_is_probed(start_full, hostile, case):
    proxy, sdk = start_full()
    raw = READABLE[case](sdk)
    assert raw.headers["x-refusal-guard-action"] == "block", hostile.documents()
    assert "HARMFUL" in json.dumps(hostile.documents()[-1]) and hostile.calls["generation"] == 0


def test_previous_response_items_are_fetched_with_the_clients_key_and_probed(start_full, hostile, stored):
    stored.items["resp_1"] = [*say("HARMFUL request in an earlier turn"),
                              {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}]
    proxy, sdk = start_full(probe_unknown_parts="fail", on_probe_failure="block")
    raw = sdk.responses.with_raw_response.create(model="m", input="now do it", previous_response_id="resp_1")
    assert raw.headers["x-refusal-guard-action"] == "block" and raw.headers["x-refusal-guard-prediction"] == "refuse"
    assert hostile.documents()[-1] == [{"role": "user", "content": "HARMFUL request in an earlier turn"},
                                       {"role": "assistant", "content": "ok"},
                                       {"role": "assistant", "content": "Stored answer."},  # the stored output
                                       {"role": "user", "content": "now do it"}]
    headers, query = stored.fetches[-1]
    assert headers["authorization"] == "Bearer sk-test" and headers["x-refusal-guard-probe"] == "1"
    assert "order=desc" in query and "limit=100" in query
    # cached per id and credentials: the same client does not fetch again; another key does (and gets a 404)
    sdk.responses.create(model="m", input="again", previous_response_id="resp_1")
    assert len(stored.fetches) == 1
    other = OpenAI(base_url=proxy.url + "/v1", api_key="sk-other", max_retries=0, timeout=30)
    raw = other.responses.with_raw_response.create(model="m", input="now do it", previous_response_id="resp_1")
    assert len(stored.fetches) == 2 and raw.headers["x-refusal-guard-prediction"] == "unknown"
    assert hostile.calls["generation"] == 0


def test_a_long_stored_conversation_is_paged_newest_first(start_full, hostile, stored):
    stored.items["resp_long"] = [*say("HARMFUL first turn")] + [*say("filler")] * 249
    proxy, sdk = start_full(probe_context_chars=100_000)
    raw = sdk.responses.with_raw_response.create(model="m", input="go on", previous_response_id="resp_long")
    assert raw.headers["x-refusal-guard-action"] == "block"
    assert len(stored.fetches) == 3  # 100 + 100 + 50
    shown = hostile.documents()[-1]
    assert shown[0]["content"] == "HARMFUL first turn" and len(shown) == 252  # 250 items, the output, "go on"


def test_benign_stored_context_passes_even_when_unknown_parts_fail(start_full, hostile, stored):
    stored.items["resp_ok"] = say("What is the capital of France?")
    proxy, sdk = start_full(probe_unknown_parts="fail", on_probe_failure="block")
    raw = sdk.responses.with_raw_response.create(model="m", input="and Spain?", previous_response_id="resp_ok")
    assert raw.headers["x-refusal-guard-action"] == "pass" and hostile.calls["generation"] == 1


def test_the_stored_output_is_probed_and_unknown_when_it_cannot_be_fetched(start_full, hostile, stored):
    stored.items["resp_out"] = say("What is the capital of France?")
    stored.outputs["resp_out"] = [{"type": "message", "role": "assistant",
                                   "content": [{"type": "output_text", "text": "HARMFUL steps, part one"}]}]
    proxy, sdk = start_full()
    raw = sdk.responses.with_raw_response.create(model="m", input="and part two?", previous_response_id="resp_out")
    assert raw.headers["x-refusal-guard-action"] == "block" and hostile.calls["generation"] == 0
    assert {"role": "assistant", "content": "HARMFUL steps, part one"} in hostile.documents()[-1]
    stored.outputs["resp_out"] = "not a list"  # an output that cannot be read is unknown context
    proxy, sdk = start_full(probe_unknown_parts="fail", on_probe_failure="block")
    raw = sdk.responses.with_raw_response.create(model="m", input="and Spain?", previous_response_id="resp_out")
    assert raw.headers["x-refusal-guard-action"] == "block" and raw.headers["x-refusal-guard-prediction"] == "unknown"


def test_a_fetch_that_outlasts_its_budget_is_unknown_context(start_full, hostile, stored):
    stored.items["resp_slow"] = say("HARMFUL")
    stored.stall = 2.0
    proxy, sdk = start_full(probe_unknown_parts="fail", on_probe_failure="block", probe_timeout=0.5)
    raw = sdk.responses.with_raw_response.create(model="m", input="go on", previous_response_id="resp_slow")
    assert raw.headers["x-refusal-guard-action"] == "block" and hostile.calls["probe"] == 0
    s = metric_samples(proxy.url)
    assert metric_sum(s, "refusal_guard_probe_failures_total", reason="unsupported_content") == 1


def test_an_id_that_is_not_an_id_is_never_put_in_an_upstream_path(start_full, hostile, stored):
    proxy, sdk = start_full()
    for rid in ("../../admin", "resp_1/../x", "resp 1", "%2e%2e"):
        raw = sdk.responses.with_raw_response.create(model="m", input="go on", previous_response_id=rid)
        assert raw.headers["x-refusal-guard-action"] == "pass"
        assert "[previous_response part]" in json.dumps(hostile.documents()[-1])
    assert stored.fetches == []


def test_parsed_views_count_what_cannot_be_read():
    def unknown(api, body):
        request = api.parse(json.dumps(body).encode())
        return conversation_view(request.messages, request.tools, budget_chars=100_000).n_unknown_parts

    assert unknown(RESPONSES, {"input": say("hi")}) == 0
    assert unknown(RESPONSES, {"input": [{"role": "user", "content": [IMAGE, FILE, {"type": "input_audio"}]}]}) == 3
    assert unknown(RESPONSES, {"input": "x", "previous_response_id": "r", "conversation": {"id": "c"},
                               "prompt": {"id": "p"}}) == 3
    assert unknown(RESPONSES, {"input": [{"type": "item_reference", "id": "m"}, {"type": "web_search_call"}]}) == 2
    assert unknown(RESPONSES, {"input": [{"type": "function_call", "name": "f", "arguments": "{}", "call_id": "c"},
                                         {"type": "function_call_output", "call_id": "c", "output": "done"},
                                         {"type": "reasoning", "summary": [], "encrypted_content": "gAAA"}]}) == 0
    assert unknown(COMPLETIONS, {"prompt": "hi", "suffix": "there"}) == 0
    assert unknown(COMPLETIONS, {"prompt": [[1, 2], [3], [4]]}) == 3
    assert unknown(CHAT, {"messages": [{"role": "user", "content": "hi"}],
                          "response_format": {"type": "json_schema", "json_schema": {"name": "n"}}}) == 0


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url"}]}, {"role": "user", "name": "n",
                                                                                         "content": ["p", "q"]}],
    [{"role": "system", "content": "only system"}, {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]}],
    [{"role": "user", "content": "u", "refusal": "r"}, None, 7],
    [],
])
def test_last_user_text_read_from_the_end_is_the_whole_views(messages):
    whole = conversation_view(messages, budget_chars=sys.maxsize, last_user_only=True).last_user_text()
    assert last_user_text(messages) == whole


# --- found by review: case-folded field names, a cut last turn, custom tools, the listing's paging ----------

@pytest.mark.parametrize("twin", ["Messages", "MESSAGES", "me\u017f\u017fages"])  # ſ folds to s (Go's EqualFold too)
def test_a_field_spelled_twice_in_another_case_is_a_400(twin):
    from guard.errors import ProxyError

    body = json.dumps({"model": "m", "messages": say("hello"), twin: say("HARMFUL")}).encode()
    with pytest.raises(ProxyError) as refused:
        CHAT.parse(body)
    assert refused.value.status == 400 and "duplicate_key" in refused.value.body().decode()
    # keys of the client's own maps that are no field the guard reads may differ in case
    schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "properties": {"Colour": {"type": "string"}, "colour": {"type": "string"}}}}}
    assert CHAT.parse(json.dumps({"model": "m", "messages": say("hi"), "response_format": schema}).encode())


def test_a_last_user_turn_cut_to_fit_counts_as_unknown():
    padded = [{"role": "user", "content": "A" * 20_000 + "HARMFUL" + "B" * 20_000}]
    view = conversation_view(padded, budget_chars=24_000)
    assert "HARMFUL" not in view.text and view.n_unknown_parts == 1
    assert conversation_view(say("short"), budget_chars=24_000).n_unknown_parts == 0


def test_a_custom_tools_description_is_probed():
    chat = CHAT.parse(json.dumps({"model": "m", "messages": say("hi"), "tools": [
        {"type": "custom", "custom": {"name": "x", "description": "HARMFUL chat tool"}}]}).encode())
    responses = RESPONSES.parse(json.dumps({"model": "m", "input": "hi", "tools": [
        {"type": "custom", "name": "x", "description": "HARMFUL responses tool", "format": {"type": "text"}}]}).encode())
    for request, text in ((chat, "HARMFUL chat tool"), (responses, "HARMFUL responses tool")):
        assert text in conversation_view(request.messages, request.tools, budget_chars=100_000).text


def test_the_stored_listing_sets_its_own_paging():
    from guard.probe.stored_context import _without_paging

    assert _without_paging(b"") == b""
    assert _without_paging(b"api-version=2024-10-21") == b"api-version=2024-10-21&"
    assert _without_paging(b"after=it_9&Order=asc&limit=1&api-version=1&include%5B%5D=x") == b"api-version=1&"

