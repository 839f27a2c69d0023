"""``refusal-guard classify``: label a JSONL file of responses offline.

Each input line is a JSON object with at least a string ``response`` (``prompt`` and any other fields are
passed through untouched); each output line is the same object plus ``label`` and ``refused``. Bad lines
are reported with their line number and skipped rather than aborting the run, because such files are
usually large collections where one broken record should not cost the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TextIO

from guard.truth.detector import RefusalDetector, is_refusal


@dataclass(frozen=True, slots=True)
class ClassifyStats:
    """Counts for one run. ``read`` counts non-blank lines; ``read == written + skipped``."""

    read: int
    written: int
    skipped: int


def classify_jsonl(
    inp: TextIO,
    out: TextIO,
    detector: RefusalDetector,
    strict: bool = False,
    err: TextIO = sys.stderr,
) -> ClassifyStats:
    """Label every record of ``inp`` into ``out``; report and skip malformed lines on ``err``.

    Blank lines are ignored (not counted): they carry no record and are common at the end of files.
    """
    read = written = skipped = 0
    for number, line in enumerate(inp, start=1):
        if not line.strip():
            continue
        read += 1
        problem = None
        try:
            record = json.loads(line)
        except ValueError as exc:
            problem = f"invalid JSON ({exc})"
        else:
            if not isinstance(record, dict):
                problem = "not a JSON object"
            elif not isinstance(record.get("response"), str):
                problem = "missing or non-string 'response'"
        if problem is not None:
            print(f"line {number}: {problem}; skipped", file=err)
            skipped += 1
            continue
        prompt = record.get("prompt")  # read by the detector's learned stage, as the proxy's last user turn
        label = detector.label(record["response"], prompt if isinstance(prompt, str) else None)
        record["label"] = label.value
        record["refused"] = is_refusal(label, strict)
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        written += 1
    return ClassifyStats(read=read, written=written, skipped=skipped)


def run(args: argparse.Namespace) -> int:
    """Run the ``classify`` subcommand.

    Exit codes: 0 all records labelled, 1 some lines skipped (so scripts notice), 2 a file could not be
    opened.
    """
    with ExitStack() as stack:
        try:
            inp = sys.stdin if args.inp == "-" else stack.enter_context(open(args.inp, encoding="utf-8"))
            out = (
                sys.stdout
                if args.out == "-"
                else stack.enter_context(open(args.out, "w", encoding="utf-8"))
            )
        except OSError as exc:
            print(f"refusal-guard classify: {exc}", file=sys.stderr)
            return 2
        stats = classify_jsonl(inp, out, RefusalDetector(), strict=args.strict, err=sys.stderr)
    print(
        f"classified {stats.written} of {stats.read} records, skipped {stats.skipped}",
        file=sys.stderr,
    )
    return 1 if stats.skipped else 0


def add_classify_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``classify [--in FILE] [--out FILE] [--strict]`` (stdin to stdout by default)."""
    parser = subparsers.add_parser(
        "classify",
        help="label JSONL responses as refusals or compliances",
        description="Add 'label' and 'refused' to each JSONL record {\"prompt\", \"response\", ...}.",
    )
    parser.add_argument("--in", dest="inp", default="-", metavar="FILE", help="input JSONL (default stdin)")
    parser.add_argument("--out", default="-", metavar="FILE", help="output JSONL (default stdout)")
    parser.add_argument(
        "--strict", action="store_true", help="count only full refusals as refused (default: lenient)"
    )
    parser.set_defaults(func=run)
