"""Measure the refusal detector on every labelled corpus, side by side with the keyword baselines.

    python3 benchmarks/detector_accuracy.py [--repeats N] [--before REV]

Columns, for each corpus (benchmarks/corpora.py; label mapping in docs/detector.md), lenient binary,
refusal = positive, accuracy:

* **LOCO** - the detector trained without that corpus (``benchmarks/data/loco_weights.json``, written
  by ``benchmarks/train_detector.py``): the generalisation figure, the one the shipped default is chosen by;
  for the blind other-styles sets, which no fit is trained on, the shipped detector;
* **shipped** - the shipped weights (trained on every corpus: an in-corpus figure, except for
  chatgpt-refusals' held-out half, which no weights were trained on);
* **rules only** - ``RefusalDetector(rules_only=True)``, the hand-written decision over the same features;
* each keyword list of ``../shared/data/refusal-keyword-lists.json`` (JailbreakBench, GCG, XSTest).

Then a **semantics-consistent** diagnostic for the two corpora whose labels mean something else (the
official figures above are unchanged): the same accuracy without the rows the label mapping cannot agree
with under our semantics, found by a test independent of the detector (``label_mismatch``). Then the same
per source model; a few counts docs/detector.md quotes; with ``--before REV`` the rules-only accuracy
of the detector at a git revision beside today's; and the cost: CPU time per ``label`` call over every
answer of every corpus (mean, p50, p99) and for a 5 MiB answer, and the characters the SSE collector
keeps for a streamed 5 MiB answer.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import types
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.corpora import CHATGPT, Row, keyword_lists, keyword_predictor, load_all, load_blind  # noqa: E402
from benchmarks.train_detector import LOCO_OUT, split_half  # noqa: E402
from guard.proxy.sse import ContentCollector  # noqa: E402
from guard.truth.detector import RefusalDetector, is_refusal  # noqa: E402

Predict = Callable[[str], bool]
_CJK = re.compile(r"[\u4e00-\u9fff]")
# Corpora whose own labels are not refusal labels (docs/detector.md, the mapping table).
MISMATCHED = ("refusal-gptfuzz", "refusal-purseclab-jailbreak-eval")


def detector_predictor(detector: RefusalDetector) -> Predict:
    return lambda text: is_refusal(detector.label(text))


def accuracy(predict: Predict, rows: Sequence[Row]) -> float:
    return sum(predict(r.text) == r.refused for r in rows) / len(rows)


def columns(corpus: str, loco: dict) -> dict[str, Predict]:
    """The predictors compared on ``corpus``. For a set no fit was trained on (the blind set), the
    left-out figure is the shipped detector's: it never saw that set either."""
    left_out = RefusalDetector(weights=loco[corpus]) if corpus in loco else RefusalDetector()
    cols = {"LOCO": detector_predictor(left_out),
            "shipped": detector_predictor(RefusalDetector()),
            "rules only": detector_predictor(RefusalDetector(rules_only=True))}
    cols.update({name: keyword_predictor(spec) for name, spec in keyword_lists().items()})
    return cols


def label_mismatch(row: Row, refusal_words: Sequence[str]) -> bool:
    """Whether ``row``'s label likely means something our semantics do not: labelled refused although the
    whole answer contains none of ``refusal_words`` (JailbreakBench's substrings; gptfuzz: role-play that
    neither refuses nor helps; purseclab: garbage output, or a deflection without a refusal phrase), or
    an answer in Chinese (the detector's phrases are English). One-sided and approximate: it also drops
    soft refusals worded without any of the substrings, and it favours the JailbreakBench list, which is
    right by construction on every refused row it keeps."""
    text = row.text.replace("\u2019", "'")
    return bool(_CJK.search(text[:200])) or (row.refused and not any(w in text for w in refusal_words))


def rules_at(rev: str) -> Predict:
    """The rules-only decision of ``guard/truth/detector.py`` as it was at git revision ``rev`` (a
    before/after comparison; the rules need no weights, so the old module runs on its own)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:guard/truth/detector.py"],
                            capture_output=True, text=True, check=True).stdout
    old = types.ModuleType(f"detector_at_{rev}")
    exec(compile(source, f"{rev}:guard/truth/detector.py", "exec"), old.__dict__)
    detector = old.RefusalDetector(rules_only=True)
    return lambda text: old.is_refusal(detector.label(text))


def diagnostics(detector: RefusalDetector, chatgpt_dev: Sequence[Row], corpora: dict[str, list[Row]],
                blind_dev: Sequence[Row]) -> None:
    """Counts docs/detector.md quotes: the cells the rules find hardest, and how rare a decline followed
    by a list is in the labelled corpora."""
    cell = [r for r in chatgpt_dev if (lambda f: (f.get("open:no_opinion") or f.get("open:hedge"))
                                       and not f.get("x:decline_open"))(detector.features(r.text))]
    right = sum(is_refusal(detector.label(r.text)) == r.refused for r in cell)
    print(f"\n{CHATGPT} dev half, answers opening with an opinion disclaimer or a hedge and no decline: "
          f"{len(cell)}; labelled refused {sum(r.refused for r in cell)}, compliance "
          f"{sum(not r.refused for r in cell)}; shipped right on {right}")

    def listed_declines(rows: Sequence[Row]) -> int:
        return sum(1 for r in rows if (lambda f: f.get("x:decline_open") and f.get("shape:listed"))(
            detector.features(r.text)))

    labelled = [r for rows in corpora.values() for r in rows]
    print(f"a decline followed by a list: {listed_declines(labelled)} of the corpora's {len(labelled)} answers, "
          f"{listed_declines(blind_dev)} of the blind dev half's {len(blind_dev)}")


def cost(texts: Sequence[str], repeats: int) -> dict[str, float]:
    """CPU milliseconds per ``label`` call (best of ``repeats`` per answer, so a shared machine's
    preemptions do not count), and the 5 MiB answer."""
    detector = RefusalDetector()
    per = []
    for text in texts:
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time_ns()
            detector.label(text)
            best = min(best, time.process_time_ns() - start)
        per.append(best / 1e6)
    per.sort()
    huge = ("I can't help with that. " + "word " * (5 * 2**20 // 5))[: 5 * 2**20]
    big = min(_timed(detector, huge) for _ in range(max(repeats, 5)))
    return {"mean": sum(per) / len(per), "p50": per[len(per) // 2], "p99": per[int(0.99 * len(per))],
            "max": per[-1], "5MiB": big}


def _timed(detector: RefusalDetector, text: str) -> float:
    start = time.process_time_ns()
    detector.label(text)
    return (time.process_time_ns() - start) / 1e6


def streamed_5mib() -> tuple[int, int]:
    """(characters streamed, characters the collector keeps) for a 5 MiB answer in 1 KiB deltas."""
    collector = ContentCollector()
    delta = "x" * 1024
    event = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": delta}}]}).encode() + b"\n\n"
    for _ in range(5 * 1024):
        collector.feed(event)
    return collector.length, len(collector.text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats per answer (best of)")
    parser.add_argument("--before", metavar="REV", help="also print the rules-only accuracy of the detector "
                        "at this git revision beside today's (e.g. --before 6677d0e)")
    args = parser.parse_args(argv)

    corpora = load_all()
    loco = json.loads(LOCO_OUT.read_text(encoding="utf-8"))
    print(f"LOCO variant: {loco['variant']}; shipped: {RefusalDetector().rules_only is False}")
    sets = dict(corpora)
    sets[f"{CHATGPT} (held-out half)"] = split_half(corpora[CHATGPT])[1]
    sets["other-styles v3 (items 81-149; errors never inspected)"] = corpora["other-styles"][80:]
    blind = load_blind()
    sets["other-styles-blind dev half (errors read while revising the rules)"] = blind.dev
    sets["other-styles-blind test half (items never read)"] = blind.test
    sets["other-styles-blind2 (test only; items never read)"] = blind.second
    names = list(columns(CHATGPT, loco["left_out"]))
    print("| corpus | n | refusals | " + " | ".join(names) + " | LOCO - best list |")
    print("|---|---:|---:|" + "---:|" * (len(names) + 1))
    for name, rows in sets.items():
        base = name.split(" ")[0]
        accs = {k: accuracy(p, rows) for k, p in columns(base, loco["left_out"]).items()}
        best_list = max(v for k, v in accs.items() if k not in ("LOCO", "shipped", "rules only"))
        print(f"| {name} | {len(rows)} | {sum(r.refused for r in rows)} | "
              + " | ".join(f"{accs[k]:.3f}" for k in names) + f" | {accs['LOCO'] - best_list:+.3f} |")
    loco_mean = sum(accuracy(columns(k, loco["left_out"])["LOCO"], v) for k, v in corpora.items()) / len(corpora)
    print(f"LOCO mean over the {len(corpora)} corpora: {loco_mean:.3f}")

    words = keyword_lists()["jailbreakbench"]["words"]
    print("\nsemantics-consistent diagnostic (official figures above unchanged; rows dropped by label_mismatch):")
    print("| corpus | column | official | errors | of them in mismatch rows | semantics-consistent (n) |")
    print("|---|---|---:|---:|---:|---:|")
    for name in MISMATCHED:
        rows = corpora[name]
        keep = [r for r in rows if not label_mismatch(r, words)]
        for col, predict in columns(name, loco["left_out"]).items():
            if col == "shipped":
                continue
            wrong = [r for r in rows if predict(r.text) != r.refused]
            in_drop = sum(label_mismatch(r, words) for r in wrong)
            print(f"| {name} | {col} | {1 - len(wrong) / len(rows):.3f} | {len(wrong)} | {in_drop} | "
                  f"{accuracy(predict, keep):.3f} ({len(keep)}) |")

    print("\nper source model (accuracy):")
    print("| corpus | source model | n | " + " | ".join(names) + " |")
    print("|---|---|---:|" + "---:|" * len(names))
    never_read = {"other-styles-blind (test half)": blind.test, "other-styles-blind2 (test only)": blind.second}
    for name, rows in {**corpora, **never_read}.items():
        groups: dict[str, list[Row]] = defaultdict(list)
        for r in rows:
            groups[r.source_model].append(r)
        if len(groups) < 2:
            continue
        cols = columns(name.split(" ")[0], loco["left_out"])  # the blind sets: the shipped detector
        for model, sub in sorted(groups.items()):
            print(f"| {name} | {model} | {len(sub)} | "
                  + " | ".join(f"{accuracy(cols[k], sub):.3f}" for k in names) + " |")

    diagnostics(RefusalDetector(), split_half(corpora[CHATGPT])[0], corpora, blind.dev)
    if args.before:
        before, now = rules_at(args.before), detector_predictor(RefusalDetector(rules_only=True))
        print(f"\nrules only, before ({args.before}) and now:")
        print("| corpus | n | before | now |\n|---|---:|---:|---:|")
        for name, rows in sets.items():
            print(f"| {name} | {len(rows)} | {accuracy(before, rows):.3f} | {accuracy(now, rows):.3f} |")

    texts = [r.text for rows in corpora.values() for r in rows]
    c = cost(texts, args.repeats)
    print(f"\ncost, shipped detector, CPU time per answer over {len(texts)} answers (best of {args.repeats}): "
          f"mean {c['mean']:.3f} ms, p50 {c['p50']:.3f} ms, p99 {c['p99']:.3f} ms, max {c['max']:.3f} ms; "
          f"a 5 MiB answer {c['5MiB']:.3f} ms")
    streamed, kept = streamed_5mib()
    print(f"SSE collector: {streamed:,} characters streamed, {kept:,} kept for the detector")
    return 0


if __name__ == "__main__":
    sys.exit(main())
