"""Train the refusal detector's cheap stage and tune the cascade; write the shipped weights.

    python3 benchmarks/train_detector.py [--no-write] [--max-routed 0.15]

The detector (guard/truth/detector.py) is a cascade: a **cheap stage** (a logistic layer over the phrase
groups and shape features, the hand-written decision ``rule:refused`` among them) labels an answer where
it is sure, and the **learned stage** (guard/truth/learned.py, trained by scripts/train_detector_model.py,
which must run first) labels the rest. This script, on the four corpora of real answers only
(benchmarks/corpora.py ``REAL``; the hand-written sets are never trained or chosen on), split by prompt
group (``corpora.split``):

1. fits the cheap stage on every corpus's ``train`` part, each corpus given the same total weight
   (gptfuzz's 5,000+ answers would otherwise decide everything), ``C`` chosen by the mean per-corpus
   accuracy on the ``valid`` part (held-out prompts);
2. chooses the uncertainty band (``low < p < high``: the learned stage decides; so it does where the
   cheap decision differs from the hand-written one, and where the opening rejects the premise
   without declining: ``detector.prompt_decides``) by the mean per-corpus accuracy of the whole cascade
   on the ``valid`` part, among bands that send at most ``--max-routed`` of the answers (mean over
   corpora) to the learned stage: the cost bound (docs/detector.md, "Cost").

The ``final`` part is never read here. Leave-one-corpus-out and by-source-model figures are printed by
benchmarks/detector_accuracy.py; they are reported, not chosen by (the four corpora label different
things, so LOCO measures label-semantics transfer as much as style transfer). numpy + scipy L-BFGS,
deterministic.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize, sparse
from scipy.special import expit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.corpora import REAL, Row, load_corpus, split  # noqa: E402
from guard.truth.detector import HEAD_CHARS, RefusalDetector, is_blank, prompt_decides  # noqa: E402

OUT = ROOT / "guard" / "truth" / "detector_weights.json"
C_GRID = (0.1, 1.0, 10.0)  # inverse L2 strength on the (corpus-weighted, mean-1) summed log-loss
MAX_ROUTED = 0.20  # of the answers, to the learned stage (~8 ms of CPU each): keeps the mean under 2 ms
BAND_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
DECIMALS = 4

_FEATURES = RefusalDetector(rules_only=True)  # feature extraction does not depend on the weights


def features(text: str) -> dict[str, float]:
    """The cheap stage's features: phrase groups per region, shape, crosses, the rule (no n-grams)."""
    return _FEATURES.features(text, ngrams=False)


@dataclass
class Data:
    """The real corpora split by prompt group, featurised."""

    parts: dict[str, dict[str, list[Row]]]  # corpus -> part -> rows
    feats: dict[int, dict[str, float]]  # id(row) -> features

    @classmethod
    def load(cls) -> Data:
        parts = {name: split(load_corpus(name)) for name in REAL}
        feats = {id(r): features(r.text) for p in parts.values() for rows in p.values() for r in rows}
        return cls(parts, feats)

    def rows(self, corpus: str, *names: str) -> list[Row]:
        return [r for name in names for r in self.parts[corpus][name]]

    def featurise(self, rows: Sequence[Row]) -> None:
        """Add rows from elsewhere (e.g. the hand-written sets, to score them)."""
        for r in rows:
            if id(r) not in self.feats:
                self.feats[id(r)] = features(r.text)


def matrix(feats: Sequence[dict[str, float]], index: Mapping[str, int]) -> sparse.csr_matrix:
    rows, cols, vals = [], [], []
    for i, f in enumerate(feats):
        for k, v in f.items():
            j = index.get(k)
            if j is not None and v:
                rows.append(i)
                cols.append(j)
                vals.append(v)
    return sparse.csr_matrix((vals, (rows, cols)), shape=(len(feats), len(index)))


def fit(x: sparse.csr_matrix, y: np.ndarray, weight: np.ndarray, c: float) -> tuple[float, np.ndarray]:
    """Minimise sum_i weight_i log-loss_i + ||w||^2 / (2c) over (bias, w); the bias is not penalised."""
    sign = np.where(y, 1.0, -1.0)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        b, w = theta[0], theta[1:]
        m = sign * (b + x @ w)
        loss = float(weight @ np.logaddexp(0.0, -m)) + w @ w / (2 * c)
        g = -sign * expit(-m) * weight
        return loss, np.concatenate(([g.sum()], x.T @ g + w / c))

    res = optimize.minimize(objective, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B",
                            options={"maxiter": 3000, "gtol": 1e-7})
    return float(res.x[0]), res.x[1:]


def fit_on(data: Data, training: Mapping[str, list[Row]], c: float) -> dict[str, Any]:
    """The cheap stage fitted on ``training`` (corpus -> rows; equal total weight per corpus)."""
    training = {k: v for k, v in training.items() if v}
    feats = [data.feats[id(r)] for rows in training.values() for r in rows]
    names = sorted({k for f in feats for k in f})
    index = {k: i for i, k in enumerate(names)}
    y = np.array([r.refused for rows in training.values() for r in rows], dtype=bool)
    n = len(feats)
    weight = np.concatenate([np.full(len(rows), n / (len(training) * len(rows))) for rows in training.values()])
    b, w = fit(matrix(feats, index), y, weight, c)
    weights = {k: round(float(v), DECIMALS) for k, v in zip(names, w) if round(float(v), DECIMALS)}
    return {"format": 3, "bias": round(b, DECIMALS), "threshold": 0.5, "ngrams": False,
            "weights": dict(sorted(weights.items()))}


def cheap_p(weights: Mapping[str, Any], f: Mapping[str, float]) -> float:
    w = weights["weights"]
    z = weights["bias"] + sum(w.get(k, 0.0) * v for k, v in f.items())
    return float(expit(z))


def cheap_accuracy(data: Data, weights: Mapping[str, Any], rows: Sequence[Row]) -> float:
    """The cheap stage alone (blank answers are refusals)."""
    return sum((is_blank(r.text) or cheap_p(weights, data.feats[id(r)]) >= 0.5) == r.refused
               for r in rows) / len(rows)


def choose_c(data: Data, grid: Sequence[float] = C_GRID, log=print) -> float:
    scores = {}
    for c in grid:
        weights = fit_on(data, {k: data.rows(k, "train") for k in REAL}, c)
        scores[c] = float(np.mean([cheap_accuracy(data, weights, data.rows(k, "valid")) for k in REAL]))
    log("cheap stage, C by mean accuracy on held-out prompts (valid): "
        + ", ".join(f"{c:g}: {v:.3f}" for c, v in scores.items()))
    return max(grid, key=lambda c: (round(scores[c], 6), -c))


def cascade_outcome(weights: Mapping[str, Any], band: tuple[float, float], f: Mapping[str, float],
                    learned_p: float | None) -> tuple[bool, bool]:
    """(refused, routed) for one non-blank answer, as RefusalDetector.label decides it."""
    p = cheap_p(weights, f)
    refused = p >= 0.5
    if band[0] < p < band[1] or refused != bool(f.get("rule:refused")) or prompt_decides(f):
        return (learned_p is not None and learned_p >= 0.5), True
    return refused, False


def choose_band(data: Data, weights: Mapping[str, Any], learned_p: Mapping[int, float],
                max_routed: float, log=print) -> tuple[tuple[float, float], float, float]:
    """The band with the best mean per-corpus accuracy on ``valid`` within the routing bound (ties: the
    narrower band). ``learned_p``: id(row) -> the learned stage's probability."""
    valid = {k: [r for r in data.rows(k, "valid") if not is_blank(r.text)] for k in REAL}
    best = None
    for low in (0.0, *BAND_GRID):
        for high in (*BAND_GRID, 1.0):
            if not low <= 0.5 <= high:
                continue
            accs, routed = [], []
            for rows in valid.values():
                out = [cascade_outcome(weights, (low, high), data.feats[id(r)], learned_p[id(r)]) for r in rows]
                accs.append(sum(o[0] == r.refused for o, r in zip(out, rows)) / len(rows))
                routed.append(sum(o[1] for o in out) / len(rows))
            acc, share = float(np.mean(accs)), float(np.mean(routed))
            if share <= max_routed:
                key = (round(acc, 6), -(high - low))
                if best is None or key > best[0]:
                    best = (key, (low, high), acc, share)
    assert best is not None
    log(f"band ({best[1][0]:g}, {best[1][1]:g}): cascade accuracy on valid {best[2]:.3f}, "
        f"routed {best[3]:.3f} (bound {max_routed:g})")
    return best[1], best[2], best[3]


def learned_probabilities(rows: Sequence[Row]) -> dict[int, float]:
    """The shipped learned stage's probability for each row (id(row) -> p), reading the row's prompt."""
    from guard.truth.learned import LearnedStage

    stage = LearnedStage()
    return {id(r): stage.probability(r.text[:HEAD_CHARS], r.prompt or None) for r in rows}


def train_shipped(data: Data, c: float) -> dict[str, Any]:
    """The cheap stage's shipped fit (every corpus's ``train`` part)."""
    return fit_on(data, {k: data.rows(k, "train") for k in REAL}, c)


def dumps(weights: Mapping[str, Any]) -> str:
    return json.dumps(weights, indent=0, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--no-write", action="store_true", help="train and score, but do not write --out")
    parser.add_argument("--max-routed", type=float, default=MAX_ROUTED)
    args = parser.parse_args(argv)

    data = Data.load()
    print("corpora (train / valid / final, by prompt group): " + ", ".join(
        f"{k} {len(p['train'])}/{len(p['valid'])}/{len(p['final'])}" for k, p in data.parts.items()), flush=True)
    c = choose_c(data)
    weights = train_shipped(data, c)
    valid = [r for k in REAL for r in data.rows(k, "valid") if not is_blank(r.text)]
    band, acc, share = choose_band(data, weights, learned_probabilities(valid), args.max_routed)
    weights["cascade"] = {"low": band[0], "high": band[1]}
    weights["meta"] = {"C": c, "variant": "groups+shape", "valid_accuracy": round(acc, 4),
                       "valid_routed": round(share, 4), "max_routed": args.max_routed,
                       "trained_on": "the 'train' part (benchmarks/corpora.py split) of chatgpt-refusals, "
                                     "refusal-gptfuzz, refusal-openai-rbr-gold, refusal-purseclab-jailbreak-eval; "
                                     "equal total weight per corpus"}
    print(f"features with non-zero weight: {len(weights['weights'])}")
    if not args.no_write:
        args.out.write_text(dumps(weights), encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
