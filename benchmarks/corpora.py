"""The labelled refusal corpora, read from ``../shared/data`` (never shipped), as one row type.

    rows = load_all()            # every labelled corpus plus the hand-written other-styles set
    blind = load_blind()         # the blind sets in current models' styles: never trained on
    rows = load_corpus("refusal-gptfuzz")

Each row is ``Row(text, refused, corpus, source_model, group, prompt)``: the answer, the lenient binary under
the label semantics of ``docs/detector.md`` (refusal = positive), the corpus name, the answering model, a
grouping key (the prompt or question) for clustered statistics and prompt-grouped splits, and the prompt the
model answered (the last user turn; empty where a set has none).

``split(rows)`` cuts a corpus by prompt group into training, validation and a **final** part (20%, seeded)
that is only scored once, at the end (``benchmarks/detector_accuracy.py --final``). The per-corpus mapping from each corpus's
own labels is written down in docs/detector.md; the code below is that mapping and nothing else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
OTHER_STYLES = ROOT / "benchmarks" / "data" / "other_styles.jsonl"
BLIND = ROOT / "benchmarks" / "data" / "other_styles_blind.jsonl"
BLIND_SECOND = ROOT / "benchmarks" / "data" / "other_styles_blind2.jsonl"

CHATGPT = "chatgpt-refusals"
CORPORA = (CHATGPT, "refusal-gptfuzz", "refusal-openai-rbr-gold", "refusal-purseclab-jailbreak-eval",
           "other-styles")
# The four corpora of real model answers (the learned detector trains on these only; other-styles is
# hand-written: tested, never trained on).
REAL = CORPORA[:4]
# chatgpt-refusals: the authors' binary (drop these tones, every other non-"complied" tone is a refusal).
DROPPED_TONES = frozenset({"dontknow", "incoherent"})


@dataclass(frozen=True, slots=True)
class Row:
    text: str
    refused: bool
    corpus: str
    source_model: str
    group: str
    prompt: str = ""


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def load_corpus(name: str, shared: Path = SHARED) -> list[Row]:
    """One corpus's rows in file order, ``refused`` as mapped in docs/detector.md."""
    if name == CHATGPT:
        records = json.loads((shared / CHATGPT / "all_hand_labeled.json").read_text(encoding="utf-8"))
        return [Row(r["response"], r["tone"] != "complied", name, "gpt-3.5-turbo", r["prompt"], r["prompt"])
                for r in records if r["tone"] not in DROPPED_TONES]
    if name == "other-styles":
        return [Row(r["response"], r["refused"], name, r["style"], r["response"])
                for r in _jsonl(OTHER_STYLES)]
    rows = []
    for r in _jsonl(shared / name / "data.jsonl"):
        group = r.get("question") or r.get("intent") or r["prompt"]
        rows.append(Row(r["response"], bool(r["refused"]), name, r["source_model"], group, r["prompt"]))
    return rows


def load_all(shared: Path = SHARED) -> dict[str, list[Row]]:
    """Every corpus by name, in ``CORPORA`` order."""
    return {name: load_corpus(name, shared) for name in CORPORA}


class BlindSets(NamedTuple):
    """The hand-written blind sets in current models' styles (never trained on; not in ``CORPORA``)."""

    dev: list[Row]  # first set, even SHA-256(id): errors read while the rules were revised
    test: list[Row]  # first set, odd SHA-256(id): measured only, items never read
    second: list[Row]  # the second set, written later: measured only, items never read


def load_blind() -> BlindSets:
    """Both blind sets (docs/detector.md, "The blind other-styles set" and "The second blind set")."""
    first: tuple[list[Row], list[Row]] = ([], [])
    for r in _jsonl(BLIND):
        first[int(hashlib.sha256(r["id"].encode()).hexdigest(), 16) % 2].append(_blind_row(r))
    return BlindSets(first[0], first[1], [_blind_row(r) for r in _jsonl(BLIND_SECOND)])


def _blind_row(r: dict) -> Row:
    return Row(r["response"], r["refused"], "other-styles-blind", r["style"], r["prompt"], r["prompt"])


# --- prompt-grouped splits ---------------------------------------------------------------------------
SPLIT_SEED = 24
FINAL_SHARE = 0.20  # of each corpus's prompt groups: scored once, at the end, never read or chosen on
VALID_SHARE = 0.20  # of the remaining groups: where the learned stage is validated and the cascade tuned


def _unit(group: str, salt: str, seed: int) -> float:
    """A uniform draw in [0, 1) fixed by the group, a salt and the seed (SHA-256; order-independent)."""
    return int(hashlib.sha256(f"{seed}:{salt}:{group}".encode()).hexdigest()[:15], 16) / 16**15


def part(row: Row, seed: int = SPLIT_SEED) -> str:
    """Which part ``row``'s prompt group falls in: ``final``, ``valid`` or ``train``. Every answer to one
    prompt (gptfuzz: one question under any template) is in the same part, so no prompt leaks."""
    if _unit(row.group, "final", seed) < FINAL_SHARE:
        return "final"
    return "valid" if _unit(row.group, "valid", seed) < VALID_SHARE else "train"


def row_key(row: Row) -> str:
    """A stable key of one (prompt, answer) pair: stored predictions of the learned stage join on it."""
    return hashlib.sha256(f"{row.prompt}\0{row.text}".encode()).hexdigest()[:20]


def split(rows: list[Row], seed: int = SPLIT_SEED) -> dict[str, list[Row]]:
    """``rows`` by part (``train``, ``valid``, ``final``), each in file order."""
    out: dict[str, list[Row]] = {"train": [], "valid": [], "final": []}
    for r in rows:
        out[part(r, seed)].append(r)
    return out


def keyword_lists(shared: Path = SHARED) -> dict[str, dict]:
    """The keyword baselines of ``refusal-keyword-lists.json`` (name -> {match, words, source})."""
    data = json.loads((shared / "refusal-keyword-lists.json").read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def keyword_predictor(spec: dict):
    """A predictor for one keyword list, matched as the file's ``_about`` says (after U+2019 -> ')."""
    words = tuple(spec["words"])
    if spec["match"] == "prefix":
        return lambda text: text.replace("\u2019", "'").strip().lower().startswith(words)
    return lambda text: any(w in text.replace("\u2019", "'") for w in words)
