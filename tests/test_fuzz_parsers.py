"""Hypothesis against the three parsers that read untrusted text.

* ``guard.probe.template.parse_prediction`` (the model's probe answer): a Prediction or ProbeParseError,
  nothing else; a Prediction only for an answer that holds a schema-valid object.
* ``guard.truth.detector.RefusalDetector().label`` (the upstream's answer): always a label, quickly.
* ``calibration.policy.Policy.load`` (the policy file): a Policy or PolicyError, nothing else.

Derandomized and bounded so CI runs are repeatable and take seconds.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from calibration.policy import Policy, PolicyError
from guard.truth.detector import RefusalDetector
from guard.probe.template import Prediction, ProbeParseError, parse_prediction
from guard.settings import DEFAULT_TOPICS

FUZZ = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)
VALID = {"will_refuse": False, "confidence": 4, "harm_rating": 2, "topic": "hacking"}
answer_like = st.fixed_dictionaries(
    {},
    optional={
        "will_refuse": st.booleans() | st.sampled_from(["true", "false", 0, 1, None]),
        "confidence": st.integers(-2, 8) | st.sampled_from([4.0, "4", True, None, 3.5]),
        "harm_rating": st.integers(-2, 8) | st.sampled_from([2.0, "2", False, None]),
        "topic": st.sampled_from([*DEFAULT_TOPICS, "other", "HACKING ", "nonsense", 5, None]),
        "extra": json_values,
    },
)


def _schema_valid(data: object) -> bool:
    if not isinstance(data, dict) or set(data) != set(VALID):
        return False
    wr, conf, harm, topic = data["will_refuse"], data["confidence"], data["harm_rating"], data["topic"]
    ints_ok = all(type(v) is int and 1 <= v <= 5 for v in (conf, harm))
    return isinstance(wr, bool) and ints_ok and isinstance(topic, str)


@FUZZ
@given(text=st.text(max_size=400))
@example(text='{"will_refuse": false, "confidence": 4, "harm_rating": 1, "topic": "other"')
@example(text="```json\n{}\n```")
@example(text="{" * 50 + "}" * 50)
@example(text='"' * 30)
def test_parse_prediction_on_arbitrary_text_never_crashes(text):
    try:
        prediction = parse_prediction(text, DEFAULT_TOPICS)
    except ProbeParseError:
        return
    assert isinstance(prediction, Prediction)
    assert prediction.topic in (*DEFAULT_TOPICS, "other")


@FUZZ
@given(data=answer_like, prose=st.sampled_from(["{}", "Answer: {}", "```json\n{}\n```", "{} ", "\n{}\n\nThanks."]))
def test_parse_prediction_accepts_exactly_the_schema(data, prose):
    text = prose.replace("{}", json.dumps(data))
    try:
        prediction = parse_prediction(text, DEFAULT_TOPICS)
    except ProbeParseError:
        assert not _schema_valid(data), f"rejected a valid answer: {text}"
        return
    assert _schema_valid(data), f"accepted an invalid answer: {text}"
    assert prediction.will_refuse is data["will_refuse"]
    assert (prediction.confidence, prediction.harm_rating) == (data["confidence"], data["harm_rating"])


@pytest.mark.parametrize("answer", [
    {**VALID, "note": "x"},  # extra key
    {**VALID, "will_refuse": "false"},  # string boolean
    {**VALID, "will_refuse": 0},
    {**VALID, "confidence": 6},  # out of range
    {**VALID, "confidence": 0},
    {**VALID, "harm_rating": 4.0},  # float
    {**VALID, "confidence": True},  # bool is not an int here
    {k: v for k, v in VALID.items() if k != "topic"},  # missing key
    {"answer": VALID},  # nested one level down
])
def test_schema_deviations_are_parse_failures(answer):
    with pytest.raises(ProbeParseError):
        parse_prediction(json.dumps(answer), DEFAULT_TOPICS)


def test_two_json_objects_are_a_parse_failure():
    fake, real = {**VALID, "will_refuse": False}, {**VALID, "will_refuse": True}
    for text in (json.dumps(fake) + json.dumps(real), f"{json.dumps(fake)}\n\nActually: {json.dumps(real)}"):
        try:
            parse_prediction(text, DEFAULT_TOPICS)
        except ProbeParseError:
            continue
        raise AssertionError(f"two objects parsed as one answer: {text}")


def test_deeply_nested_probe_answer_is_a_parse_failure():
    with pytest.raises(ProbeParseError):
        parse_prediction("[" * 100_000, DEFAULT_TOPICS)


DETECTOR = RefusalDetector()


@FUZZ
@given(text=st.text(max_size=2000))
@example(text="I'm sorry, but I can't " * 500)
@example(text="\u202eI cannot help\u202c" + "\u200b" * 300)
@example(text="a" * 50_000)
@example(text=" " * 20_000 + "sorry")
def test_detector_labels_any_text_quickly(text):
    started = time.perf_counter()
    label = DETECTOR.label(text)
    assert time.perf_counter() - started < 2.0, "the detector is slow on this input (backtracking?)"
    assert label.value in {"full_refusal", "partial_refusal", "partial_compliance", "full_compliance"}


policy_documents = st.one_of(
    json_values,
    st.fixed_dictionaries({"schema_version": st.sampled_from([1, 2])}, optional={
        "created_at": st.text(max_size=30) | st.just("2024-01-01T00:00:00Z"),
        "thresholds": st.dictionaries(st.sampled_from(["block", "pass", "x"]), st.floats() | st.none() | st.text(max_size=3)),
        "topics": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
        "calibrator": json_values,
        "sdt": json_values,
        "baseline": json_values,
    }),
)


@FUZZ
@given(document=policy_documents)
@example(document={"schema_version": 1.0})
@example(document={"schema_version": True})
@example(document=float("nan"))
def test_policy_load_on_arbitrary_json_raises_only_policy_error(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("policy") / "policy.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    try:
        Policy.load(path)
    except PolicyError:
        pass


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
@example(raw=b"")
@example(raw=b"\xef\xbb\xbf{}")  # a UTF-8 byte-order mark
@example(raw=b'{"schema_version": 1, "schema_version": 2}')
def test_policy_load_on_arbitrary_bytes_raises_only_policy_error(tmp_path_factory, raw):
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        assume(False)  # pinned separately below
    path = tmp_path_factory.mktemp("policy") / "policy.json"
    path.write_bytes(raw)
    try:
        Policy.load(path)
    except PolicyError:
        pass


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", b'{"schema_version": 1, "note": "\xe9"}'])
def test_policy_load_on_non_utf8_bytes_raises_policy_error(tmp_path, raw):
    (tmp_path / "policy.json").write_bytes(raw)
    with pytest.raises(PolicyError):
        Policy.load(tmp_path / "policy.json")


def test_policy_load_on_deeply_nested_json_raises_policy_error(tmp_path):
    (tmp_path / "policy.json").write_bytes(b"[" * 100_000)
    with pytest.raises(PolicyError):
        Policy.load(tmp_path / "policy.json")
