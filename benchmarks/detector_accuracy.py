"""Measure the refusal detector on every labelled corpus, side by side with the keyword baselines.

    python3 benchmarks/detector_accuracy.py [--repeats N] [--final]

Lenient binary, refusal = positive, accuracy. Variants (columns):

* **cascade** - the shipped detector, ``RefusalDetector().label(answer, prompt)``: the cheap stage where
  it is sure, the learned stage (which reads the prompt) elsewhere; **cascade, no prompt** - the same
  without the prompt (what the proxy does when it has none);
* **cheap** - the cheap stage alone (``RefusalDetector(learned=False)``); **rules** - the hand-written
  decision (``rules_only=True``, the detector shipped before the cascade);
* **learned** - the learned stage alone on every answer (with the prompt);
* each keyword list of ``../shared/data/refusal-keyword-lists.json`` (JailbreakBench, GCG, XSTest).

Schemes (benchmarks/corpora.py ``split``: every corpus cut by prompt group into train / valid / final):

1. **held-out prompts** - each real corpus's ``valid`` part: prompts no stage was trained on (the cheap
   stage's ``C`` and the cascade's band were chosen on it, so it is a validation figure); per source model too;
2. **leave one source model out** (Llama-2-7b-chat, the only source model with its own rows besides the
   OpenAI ones) and **leave one corpus out**: both stages trained without those rows (the learned stage's
   logits from benchmarks/data/learned_holdout.json, written by scripts/train_detector_model.py --holdout;
   the cheap stage refitted here with the shipped ``C``), with the shipped band, scored on the left-out
   rows' train + valid parts (never the final part);
3. **hand-written sets** (test only: never trained or chosen on);
4. with ``--final``: the ``final`` part of every real corpus, printed separately (compute it once, at
   the end; its errors are not printed).

Then the cost: CPU time per ``label`` call (best of ``--repeats``), the share of answers the cascade sends to
the learned stage, and each stage's own cost and accuracy where it decides.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.corpora import (REAL, Row, keyword_lists, keyword_predictor, load_all, load_blind,  # noqa: E402
                                row_key)
from benchmarks.train_detector import Data, cascade_outcome, cheap_p, fit_on  # noqa: E402
from guard.sse import ContentCollector  # noqa: E402
from guard.truth.detector import HEAD_CHARS, RefusalDetector, is_blank, is_refusal, load_weights  # noqa: E402

Predict = Callable[[Row], bool]
HOLDOUT = ROOT / "benchmarks" / "data" / "learned_holdout.json"
LLAMA = "Llama-2-7b-chat-hf"


def accuracy(predict: Predict, rows: Sequence[Row]) -> float:
    return sum(predict(r) == r.refused for r in rows) / len(rows)


def shipped_columns() -> dict[str, Predict]:
    cascade, cheap, rules = RefusalDetector(), RefusalDetector(learned=False), RefusalDetector(rules_only=True)
    stage = cascade.learned_stage
    cols: dict[str, Predict] = {
        "cascade": lambda r: is_refusal(cascade.label(r.text, r.prompt or None)),
        "cascade, no prompt": lambda r: is_refusal(cascade.label(r.text)),
        "cheap": lambda r: is_refusal(cheap.label(r.text)),
        "rules": lambda r: is_refusal(rules.label(r.text)),
        "learned": lambda r: is_blank(r.text) or stage.probability(r.text[:HEAD_CHARS], r.prompt or None) >= 0.5,
    }
    for name, spec in keyword_lists().items():
        match = keyword_predictor(spec)
        cols[name] = lambda r, match=match: match(r.text)
    return cols


def table(title: str, sets: dict[str, list[Row]], cols: dict[str, Predict]) -> None:
    print(f"\n{title}")
    print("| set | n | refusals | " + " | ".join(cols) + " | cascade - best list |")
    print("|---|---:|---:|" + "---:|" * (len(cols) + 1))
    lists = set(keyword_lists())
    for name, rows in sets.items():
        if not rows:
            continue
        accs = {k: accuracy(p, rows) for k, p in cols.items()}
        best = max(v for k, v in accs.items() if k in lists)
        print(f"| {name} | {len(rows)} | {sum(r.refused for r in rows)} | "
              + " | ".join(f"{accs[k]:.3f}" for k in cols) + f" | {accs['cascade'] - best:+.3f} |")


def left_out(data: Data, held: list[Row], training: dict[str, list[Row]], logits: dict[str, float] | None,
             band: tuple[float, float], c: float) -> dict[str, float]:
    """Accuracy on ``held`` of the cheap stage refitted on ``training``, of the learned stage trained
    without ``held`` (stored logits), and of their cascade; plus the share routed."""
    data.featurise(held)
    weights = fit_on(data, training, c)
    rules = RefusalDetector(rules_only=True)
    out = {"cheap": 0.0, "rules": 0.0, "learned": 0.0, "cascade": 0.0, "routed": 0.0}
    for r in held:
        f = data.feats[id(r)]
        blank = is_blank(r.text)
        z = logits.get(row_key(r)) if logits is not None else None
        learned = blank or (z is not None and z >= 0.0)
        refused, routed = (True, False) if blank else cascade_outcome(weights, band, f, None if z is None else
                                                                       (1.0 if z >= 0 else 0.0))
        out["cheap"] += (blank or cheap_p(weights, f) >= 0.5) == r.refused
        out["rules"] += is_refusal(rules.label(r.text)) == r.refused
        out["learned"] += learned == r.refused
        out["cascade"] += refused == r.refused
        out["routed"] += routed
    return {k: v / len(held) for k, v in out.items()}


def generalisation(data: Data) -> None:
    shipped = load_weights()
    band = (shipped["cascade"]["low"], shipped["cascade"]["high"])
    c = shipped["meta"]["C"]
    stored = json.loads(HOLDOUT.read_text(encoding="utf-8")) if HOLDOUT.exists() else {}
    dev = {k: data.rows(k, "train", "valid") for k in REAL}
    schemes: dict[str, tuple[list[Row], dict[str, list[Row]]]] = {}
    held = [r for rows in dev.values() for r in rows if r.source_model == LLAMA]
    schemes[f"source:{LLAMA}"] = (held, {k: [r for r in v if r.source_model != LLAMA] for k, v in dev.items()})
    for corpus in REAL:
        schemes[f"corpus:{corpus}"] = (dev[corpus], {k: v for k, v in dev.items() if k != corpus})
    print("\nleft out (train + valid parts of the left-out rows; both stages trained without them; the shipped "
          "band; learned = stored logits of scripts/train_detector_model.py --holdout, fp32):")
    print("| left out | n | refusals | cascade | cheap | rules | learned | routed | learned fit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    loco = defaultdict(list)
    for name, (rows, training) in schemes.items():
        entry = stored.get(name)
        logits = entry["logits"] if entry else None
        res = left_out(data, rows, training, logits, band, c)
        fit = (f"{entry['settings']['per_corpus']} rows/corpus, {entry['settings']['epochs']} epoch"
               if entry else "not trained (cascade: learned stage missing, counted as not refused)")
        cells = [f"{res[k]:.3f}" if (k not in ("learned", "cascade") or entry) else "-"
                 for k in ("cascade", "cheap", "rules", "learned")]
        print(f"| {name} | {len(rows)} | {sum(r.refused for r in rows)} | " + " | ".join(cells)
              + f" | {res['routed']:.3f} | {fit} |")
        if name.startswith("corpus:"):
            for k in ("cascade", "cheap", "rules", "learned"):
                if entry or k not in ("learned", "cascade"):
                    loco[k].append(res[k])
    print("LOCO mean over the four corpora: " + ", ".join(
        f"{k} {sum(v) / len(v):.3f}" for k, v in loco.items() if len(v) == len(REAL)))


def cost(rows: Sequence[Row], repeats: int) -> None:
    """CPU milliseconds per call (best of ``repeats`` per answer, so a shared machine's preemptions do
    not count): the cascade, each stage, and the share routed; a 5 MiB answer."""
    cascade = RefusalDetector()
    stage = cascade.learned_stage
    per, routed_ms, cheap_ms = [], [], []
    routed = 0
    for r in rows:
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time_ns()
            cascade.label(r.text, r.prompt or None)
            best = min(best, time.process_time_ns() - start)
        ms = best / 1e6
        per.append(ms)
        if cascade.routes(r.text):
            routed += 1
            routed_ms.append(ms)
        else:
            cheap_ms.append(ms)

    def stats(xs: list[float]) -> str:
        xs = sorted(xs)
        return (f"mean {sum(xs) / len(xs):.3f} ms, p50 {xs[len(xs) // 2]:.3f}, p99 {xs[int(0.99 * len(xs))]:.3f}, "
                f"max {xs[-1]:.3f} (n {len(xs)})") if xs else "none"

    print(f"\ncost, CPU time per label call (best of {repeats}) over {len(rows)} answers:")
    print(f"  cascade: {stats(per)}; routed to the learned stage {routed / len(rows):.3f}")
    print(f"  answers the cheap stage decided: {stats(cheap_ms)}")
    print(f"  answers the learned stage decided (cheap stage included): {stats(routed_ms)}")
    huge = ("I can't help with that. " + "word " * (5 * 2**20 // 5))[: 5 * 2**20]
    big = []
    for _ in range(max(repeats, 3)):
        start = time.process_time_ns()
        cascade.label(huge, "x" * 100_000)
        big.append((time.process_time_ns() - start) / 1e6)
    print(f"  a 5 MiB answer with a 100 kB prompt: {min(big):.3f} ms")
    del stage


def stage_accuracy(sets: dict[str, list[Row]]) -> None:
    """Where each stage decides, how often it is right (held-out prompts)."""
    cascade = RefusalDetector()
    print("\neach stage where it decides (held-out prompts):")
    print("| set | n | routed | cheap stage right (of its answers) | learned stage right (of its answers) |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in sets.items():
        cheap_ok = cheap_n = learned_ok = learned_n = 0
        for r in rows:
            refused = is_refusal(cascade.label(r.text, r.prompt or None)) == r.refused
            if cascade.routes(r.text):
                learned_n += 1
                learned_ok += refused
            else:
                cheap_n += 1
                cheap_ok += refused
        print(f"| {name} | {len(rows)} | {learned_n / len(rows):.3f} | "
              f"{cheap_ok / max(cheap_n, 1):.3f} ({cheap_n}) | {learned_ok / max(learned_n, 1):.3f} ({learned_n}) |")


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
    parser.add_argument("--final", action="store_true",
                        help="also score the final part of every real corpus (once, at the end)")
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args(argv)

    data = Data.load()
    cols = shipped_columns()
    valid = {f"{k} (valid)": data.rows(k, "valid") for k in REAL}
    table("held-out prompts (each real corpus's valid part; the cascade's band and C were chosen on it):",
          valid, cols)
    by_model: dict[str, list[Row]] = defaultdict(list)
    for k in REAL:
        for r in data.rows(k, "valid"):
            by_model[f"{k} / {r.source_model}"].append(r)
    table("held-out prompts, by source model:", dict(sorted(by_model.items())), cols)
    stage_accuracy(valid)
    generalisation(data)

    blind = load_blind()
    hand = {"other-styles (hand-written, no prompts)": load_all()["other-styles"],
            "other-styles-blind dev half": blind.dev,
            "other-styles-blind test half (items never read)": blind.test,
            "other-styles-blind2 (test only)": blind.second}
    table("hand-written sets (test only, never trained or chosen on):", hand, cols)

    if not args.skip_cost:
        texts = [r for k in REAL for part in ("train", "valid") for r in data.rows(k, part)]
        cost(texts, args.repeats)
        streamed, kept = streamed_5mib()
        print(f"SSE collector: {streamed:,} characters streamed, {kept:,} kept for the detector")

    if args.final:
        final = {f"{k} (final)": data.rows(k, "final") for k in REAL}
        table("FINAL: each real corpus's final part (20% of prompt groups, never read, trained or chosen on; "
              "computed once):", final, cols)
        rows = [r for v in final.values() for r in v]
        print(f"final, pooled over the four corpora: cascade {accuracy(cols['cascade'], rows):.3f} (n {len(rows)}); "
              f"mean of the four corpora {sum(accuracy(cols['cascade'], v) for v in final.values()) / 4:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
