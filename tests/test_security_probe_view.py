"""The probe sees what the model sees (issue 16, item 3).

Each attack hides the harmful text where the model reads it but the old probe did not (a
system message, an earlier user turn, plain-string parts, ``input_text``/``output_text``/
``refusal`` parts, tool-call arguments, ``name`` fields, tool descriptions). The hostile
upstream's probe predicts a refusal whenever ``HARMFUL`` is anywhere in what it was shown, so
with the default settings every one of these requests must be blocked, through the openai SDK.
Plus the pure function :func:`guard.probe.context.conversation_view`: budget, marker, counts.
"""

from __future__ import annotations

import json
import sys

import pytest
from openai import OpenAI

from guard.probe.context import conversation_view, last_user_text
from guard.probe.template import INSTRUCTIONS, TEMPLATE_ID, TEMPLATE_REF
from tests.fault_upstream import metric_samples, metric_sum
from tests.hostile_upstream import hostile, start_guard  # noqa: F401

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
