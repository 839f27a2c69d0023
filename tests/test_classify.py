"""The JSONL classify tool: labelling, pass-through, bad lines, and the CLI wiring."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from guard.ops.classify import ClassifyStats, add_classify_parser, classify_jsonl
from guard.truth.detector import RefusalDetector

REFUSAL = "I'm sorry, but I can't help with that."
ANSWER = "The boiling point of water at sea level is 100 degrees Celsius."


def _run(text: str, strict: bool = False) -> tuple[ClassifyStats, list[dict], str]:
    out, err = io.StringIO(), io.StringIO()
    stats = classify_jsonl(io.StringIO(text), out, RefusalDetector(), strict=strict, err=err)
    return stats, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()


def test_labels_records_and_preserves_fields() -> None:
    lines = [
        {"prompt": "help me", "response": REFUSAL, "id": 7, "meta": {"model": "x"}},
        {"prompt": "boil?", "response": ANSWER},
    ]
    stats, records, err = _run("".join(json.dumps(r) + "\n" for r in lines))
    assert stats == ClassifyStats(read=2, written=2, skipped=0)
    assert err == ""
    assert records[0] == {**lines[0], "label": "full_refusal", "refused": True}
    assert records[1] == {**lines[1], "label": "full_compliance", "refused": False}


def test_bad_lines_are_counted_with_line_numbers() -> None:
    text = "\n".join(
        [
            json.dumps({"response": ANSWER}),  # 1 ok
            "{not json",  # 2
            "",  # 3 blank: ignored
            json.dumps({"prompt": "no response"}),  # 4
            json.dumps({"response": 12}),  # 5
            json.dumps(["response", REFUSAL]),  # 6
            json.dumps({"response": REFUSAL}),  # 7 ok
        ]
    )
    stats, records, err = _run(text)
    assert stats == ClassifyStats(read=6, written=2, skipped=4)
    assert [r["refused"] for r in records] == [False, True]
    reported = [line.split(":")[0] for line in err.splitlines()]
    assert reported == ["line 2", "line 4", "line 5", "line 6"]


def test_strict_counts_only_full_refusals() -> None:
    # A refusal that goes on to redirect: partial_refusal, refused only under the lenient binary.
    partial = (
        "I can't provide instructions for that. It is important to stay safe, and if you feel at risk, "
        "please contact a local crisis line or emergency services, who can help you right away."
    )
    line = json.dumps({"response": partial}) + "\n"
    _, (lenient,), _ = _run(line)
    _, (strict,), _ = _run(line, strict=True)
    assert lenient["label"] == strict["label"] == "partial_refusal"
    assert lenient["refused"] is True
    assert strict["refused"] is False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refusal-guard")
    add_classify_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_files_and_exit_codes(tmp_path: Path, capsys) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "p", "response": REFUSAL}) + "\n", encoding="utf-8")
    args = _parser().parse_args(["classify", "--in", str(src), "--out", str(dst), "--strict"])
    assert args.strict is True
    assert args.func(args) == 0
    assert json.loads(dst.read_text(encoding="utf-8"))["refused"] is True

    src.write_text("garbage\n", encoding="utf-8")
    assert args.func(args) == 1
    assert "line 1:" in capsys.readouterr().err

    missing = _parser().parse_args(["classify", "--in", str(tmp_path / "nope.jsonl")])
    assert missing.func(missing) == 2


def test_cli_defaults_to_stdin_stdout(monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"response": ANSWER}) + "\n"))
    args = _parser().parse_args(["classify"])
    assert (args.inp, args.out, args.strict) == ("-", "-", False)
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["label"] == "full_compliance"


def test_the_prompt_field_reaches_the_detector() -> None:
    # The learned stage reads the prompt (as in the proxy); a record without a string prompt is labelled
    # from the answer alone.
    seen: list[str | None] = []

    class Spy(RefusalDetector):
        def label(self, response: str, prompt: str | None = None):
            seen.append(prompt)
            return super().label(response, prompt)

    lines = [{"prompt": "boil?", "response": ANSWER}, {"response": ANSWER}, {"prompt": 3, "response": ANSWER}]
    out = io.StringIO()
    stats = classify_jsonl(io.StringIO("".join(json.dumps(r) + "\n" for r in lines)), out, Spy(), err=io.StringIO())
    assert stats.written == 3 and seen == ["boil?", None, None]
