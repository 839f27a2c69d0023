"""Validate the bundled example prompt set and its paraphrases."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "examples" / "prompts" / "prompts.jsonl"
PARAPHRASES = ROOT / "examples" / "prompts" / "paraphrases.jsonl"

TOPICS = [
    "weapons", "drugs", "hacking", "self_harm", "hate_speech",
    "fraud", "privacy", "illegal_activities", "manipulation", "violence",
]
PER_LEVEL = {1: 5, 2: 5, 3: 10, 4: 5, 5: 5}
ID_RE = re.compile(r"^(?P<topic>[a-z_]+)-L(?P<level>[1-5])-(?P<n>\d{2})$")


def _load(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            assert line.strip(), f"{path.name}:{lineno}: blank line"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:  # pragma: no cover - failure path
                pytest.fail(f"{path.name}:{lineno}: invalid JSON: {exc}")
            assert isinstance(row, dict), f"{path.name}:{lineno}: not an object"
            rows.append(row)
    return rows


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return _load(PROMPTS)


@pytest.fixture(scope="module")
def paras() -> list[dict]:
    return _load(PARAPHRASES)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def test_base_schema(base):
    for row in base:
        assert set(row) == {"id", "topic", "harm_level", "prompt"}, row
        assert row["topic"] in TOPICS, row
        assert type(row["harm_level"]) is int and row["harm_level"] in PER_LEVEL, row
        assert isinstance(row["prompt"], str) and row["prompt"].strip(), row
        m = ID_RE.match(row["id"])
        assert m, row["id"]
        assert m["topic"] == row["topic"] and int(m["level"]) == row["harm_level"], row


def test_base_counts(base):
    assert len(base) == len(TOPICS) * sum(PER_LEVEL.values()) == 300
    counts = Counter((r["topic"], r["harm_level"]) for r in base)
    for topic in TOPICS:
        for level, n in PER_LEVEL.items():
            assert counts[(topic, level)] == n, (topic, level, counts[(topic, level)])


def test_base_unique(base):
    ids = [r["id"] for r in base]
    assert len(ids) == len(set(ids))
    texts = Counter(_norm(r["prompt"]) for r in base)
    dups = [t for t, c in texts.items() if c > 1]
    assert not dups, dups


def test_paraphrase_schema_and_counts(paras):
    assert len(paras) == 300
    for row in paras:
        assert set(row) == {"id", "paraphrase_of", "topic", "harm_level", "prompt"}, row
        assert row["id"] == row["paraphrase_of"] + "-p", row
        assert isinstance(row["prompt"], str) and row["prompt"].strip(), row
    counts = Counter((r["topic"], r["harm_level"]) for r in paras)
    for topic in TOPICS:
        for level, n in PER_LEVEL.items():
            assert counts[(topic, level)] == n, (topic, level)


def test_paraphrases_map_to_base(base, paras):
    by_id = {r["id"]: r for r in base}
    ids = [r["id"] for r in paras]
    assert len(ids) == len(set(ids))
    targets = [r["paraphrase_of"] for r in paras]
    assert len(targets) == len(set(targets)), "a base prompt is paraphrased twice"
    assert set(targets) == set(by_id), "every base prompt needs exactly one paraphrase"
    for row in paras:
        src = by_id[row["paraphrase_of"]]
        assert row["topic"] == src["topic"], row
        assert row["harm_level"] == src["harm_level"], row
        assert _norm(row["prompt"]) != _norm(src["prompt"]), row


def test_no_duplicate_texts_across_files(base, paras):
    texts = Counter(_norm(r["prompt"]) for r in base + paras)
    dups = [t for t, c in texts.items() if c > 1]
    assert not dups, dups
