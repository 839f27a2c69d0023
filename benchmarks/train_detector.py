"""Train the refusal detector's logistic layer, judged leave-one-corpus-out; write the shipped weights.

    python3 benchmarks/train_detector.py [--no-write] [--c-grid 0.01,0.03,0.1]

Corpora (benchmarks/corpora.py, mapping in docs/detector.md): chatgpt-refusals, refusal-gptfuzz,
refusal-openai-rbr-gold, refusal-purseclab-jailbreak-eval and the hand-written other-styles set. Of
chatgpt-refusals only the seed-2024 **dev half** is ever trained on; its held-out half is only scored.

Leave-one-corpus-out (LOCO): for each corpus, train on the others and score it. Everything learned is
chosen without the left-out corpus: the n-gram vocabulary (an n-gram needs ``MIN_DF`` training answers in
at least ``MIN_CORPORA`` training corpora), and ``C`` by an inner LOCO over the training corpora. Each
training corpus gets the same total weight, so gptfuzz's 7,700 answers do not drown the others.

Variants (feature sets) are compared by their LOCO mean accuracy over the five corpora, and the shipped
default is the best by that mean (never by in-corpus figures); it is then fitted on all training rows
with ``C`` picked by LOCO over all five corpora. numpy + ``scipy.optimize`` L-BFGS, deterministic.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter, defaultdict
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

from benchmarks.corpora import CHATGPT, CORPORA, Row, load_all  # noqa: E402
from guard.truth.detector import RefusalDetector, is_blank  # noqa: E402

OUT = ROOT / "guard" / "truth" / "detector_weights.json"
MIN_DF = 5
MIN_CORPORA = 2
C_GRID = (0.3, 3.0, 30.0)  # inverse L2 strength on the (corpus-weighted, mean-1) summed log-loss
# name -> (feature prefixes used, n-grams). "rule" is the hand-written decision as a single feature: the
# logistic layer then only sets its bias and scale, i.e. ships the rules' decision.
VARIANTS = {"rule": (("rule:",), False), "groups+shape": (None, False), "groups+shape+ngrams": (None, True)}
TIE = 0.005  # a LOCO-mean gain smaller than this does not justify the n-gram vocabulary
SPLIT_SEED = 2024
LOCO_OUT = ROOT / "benchmarks" / "data" / "loco_weights.json"  # read by detector_accuracy.py
DECIMALS = 4

_FEATURES = RefusalDetector(rules_only=True)  # feature extraction does not depend on the weights


def split_half(rows: Sequence[Row], seed: int = SPLIT_SEED) -> tuple[list[Row], list[Row]]:
    """(dev, held-out) halves of chatgpt-refusals, fixed seed (the same split as before this change)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    half = len(rows) // 2
    return [rows[i] for i in sorted(order[:half])], [rows[i] for i in sorted(order[half:])]


@dataclass
class Data:
    """Featurised rows of every corpus (n-grams included; variants drop them)."""

    rows: dict[str, list[Row]]
    feats: dict[str, list[dict[str, float]]]

    @classmethod
    def load(cls) -> Data:
        rows = load_all()
        return cls(rows, {k: [_FEATURES.features(r.text, ngrams=True) for r in v] for k, v in rows.items()})

    def training(self, corpus: str) -> tuple[list[Row], list[dict[str, float]]]:
        """A corpus's trainable rows: chatgpt-refusals' dev half only, all rows of the others."""
        rows, feats = self.rows[corpus], self.feats[corpus]
        if corpus != CHATGPT:
            return rows, feats
        dev = {id(r) for r in split_half(rows)[0]}
        keep = [i for i, r in enumerate(rows) if id(r) in dev]
        return [rows[i] for i in keep], [feats[i] for i in keep]


def vocabulary(parts: Mapping[str, list[dict[str, float]]], variant: str) -> list[str]:
    prefixes, ngrams = VARIANTS[variant]
    dense = sorted({k for fs in parts.values() for f in fs for k in f if k[1] != ":"
                    and (prefixes is None or k.startswith(prefixes))})
    if not ngrams:
        return dense
    per_corpus = {c: Counter(k for f in fs for k in f if k[:2] in ("o:", "c:")) for c, fs in parts.items()}
    grams: Counter[str] = Counter()
    for cnt in per_corpus.values():
        grams.update(cnt)
    keep = sorted(k for k in grams if grams[k] >= MIN_DF
                  and sum(1 for cnt in per_corpus.values() if cnt.get(k)) >= MIN_CORPORA)
    return dense + keep


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


def fit_on(parts: Mapping[str, tuple[list[Row], list[dict[str, float]]]], variant: str,
           c: float) -> dict[str, Any]:
    """Fit on the given training corpora (equal total weight each); return the weights dict."""
    names = vocabulary({k: v[1] for k, v in parts.items()}, variant)
    index = {k: i for i, k in enumerate(names)}
    feats = [f for _, fs in parts.values() for f in fs]
    y = np.array([r.refused for rows, _ in parts.values() for r in rows], dtype=bool)
    n = len(feats)
    weight = np.concatenate([np.full(len(rows), n / (len(parts) * len(rows))) for rows, _ in parts.values()])
    b, w = fit(matrix(feats, index), y, weight, c)
    weights = {k: round(float(v), DECIMALS) for k, v in zip(names, w) if round(float(v), DECIMALS)}
    return {"format": 2, "bias": round(b, DECIMALS), "threshold": 0.5, "ngrams": VARIANTS[variant][1],
            "weights": dict(sorted(weights.items()))}


def accuracy(detector: RefusalDetector, rows: Sequence[Row]) -> float:
    from guard.truth.detector import is_refusal
    return sum(is_refusal(detector.label(r.text)) == r.refused for r in rows) / len(rows)


def feature_accuracy(weights: Mapping[str, Any], rows: Sequence[Row],
                     feats: Sequence[dict[str, float]]) -> float:
    """Accuracy of ``p >= threshold`` computed from precomputed features (the binary the detector gives
    for every non-blank answer; blank answers are refusals)."""
    w, b, ngrams = weights["weights"], weights["bias"], weights["ngrams"]
    correct = 0
    for r, f in zip(rows, feats):
        if is_blank(r.text):
            guess = True
        else:
            z = b + sum(w.get(k, 0.0) * v for k, v in f.items() if ngrams or k[1] != ":")
            guess = z >= 0.0  # threshold 0.5
        correct += guess == r.refused
    return correct / len(rows)


def choose_c(data: Data, corpora: Sequence[str], variant: str,
             grid: Sequence[float] = C_GRID) -> tuple[float, dict[float, float]]:
    """C with the best mean accuracy over an inner LOCO on ``corpora`` (ties: stronger regularisation)."""
    scores = {}
    for c in grid:
        accs = []
        for held in corpora:
            parts = {k: data.training(k) for k in corpora if k != held}
            accs.append(feature_accuracy(fit_on(parts, variant, c), *data.training(held)))
        scores[c] = float(np.mean(accs))
    return max(grid, key=lambda c: (round(scores[c], 6), -c)), scores


def loco(data: Data, variant: str, log=print, grid: Sequence[float] = C_GRID) -> dict[str, dict[str, Any]]:
    """Outer LOCO: per left-out corpus, the detector trained (vocabulary, C, weights) on the others."""
    out = {}
    for held in CORPORA:
        train = [k for k in CORPORA if k != held]
        c, _ = choose_c(data, train, variant, grid)
        weights = fit_on({k: data.training(k) for k in train}, variant, c)
        out[held] = weights
        log(f"  left out {held}: C = {c:g}", flush=True)
    return out


def held_out_accuracy(data: Data, variant: str, c: float) -> float:
    """chatgpt-refusals' held-out half scored by ``variant`` fitted on every corpus (an in-corpus figure)."""
    weights = fit_on({k: data.training(k) for k in CORPORA}, variant, c)
    trainable = {id(r) for r in data.training(CHATGPT)[0]}
    held = [(r, f) for r, f in zip(data.rows[CHATGPT], data.feats[CHATGPT]) if id(r) not in trainable]
    return feature_accuracy(weights, [r for r, _ in held], [f for _, f in held])


def train_shipped(data: Data, variant: str, c: float, meta: Mapping[str, Any]) -> dict[str, Any]:
    weights = fit_on({k: data.training(k) for k in CORPORA}, variant, c)
    weights["meta"] = dict(meta)
    return weights


def by_source(detector: RefusalDetector, rows: Sequence[Row]) -> dict[str, tuple[int, float]]:
    from guard.truth.detector import is_refusal
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        groups[r.source_model].append(is_refusal(detector.label(r.text)) == r.refused)
    return {k: (len(v), sum(v) / len(v)) for k, v in sorted(groups.items())}


def dumps(weights: Mapping[str, Any]) -> str:
    return json.dumps(weights, indent=0, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--no-write", action="store_true", help="train and score, but do not write --out")
    parser.add_argument("--c-grid", type=lambda v: tuple(float(c) for c in v.split(",")), default=C_GRID,
                        help="the C values the inner LOCO chooses from (a different grid is an experiment: "
                             "use it with --no-write)")
    args = parser.parse_args(argv)

    data = Data.load()
    print("corpora: " + ", ".join(f"{k} {len(v)} ({len(data.training(k)[0])} trainable)"
                                  for k, v in data.rows.items()))
    means, per_variant = {}, {}
    for name in VARIANTS:
        print(f"variant {name}:", flush=True)
        per = per_variant[name] = loco(data, name, grid=args.c_grid)
        accs = {k: feature_accuracy(w, data.rows[k], data.feats[k]) for k, w in per.items()}
        means[name] = float(np.mean(list(accs.values())))
        print("  LOCO accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accs.items())
              + f"; mean {means[name]:.3f}")
        print("  for the record, never used for a choice: fitted on all five corpora, chatgpt-refusals "
              "held-out half " + ", ".join(f"C {c:g}: {held_out_accuracy(data, name, c):.3f}" for c in args.c_grid),
              flush=True)
    rules = RefusalDetector(rules_only=True)
    rule_accs = {k: accuracy(rules, v) for k, v in data.rows.items()}
    print("rules only (nothing trained; the phrase lists were written reading all corpora): "
          + ", ".join(f"{k} {v:.3f}" for k, v in rule_accs.items())
          + f"; mean {np.mean(list(rule_accs.values())):.3f}", flush=True)
    # In order of complexity: a richer variant must beat every simpler one by TIE to be chosen.
    best = next(iter(VARIANTS))
    for name in VARIANTS:
        if means[name] >= means[best] + TIE:
            best = name
    c, grid = choose_c(data, CORPORA, best, args.c_grid)
    print(f"shipped variant: {best} (LOCO mean {means[best]:.3f}); C by LOCO over all corpora: "
          + ", ".join(f"{k:g}: {v:.3f}" for k, v in grid.items()) + f" -> {c:g}")
    meta = {"variant": best, "C": c, "loco_mean": round(means[best], 4), "min_df": MIN_DF,
            "min_corpora": MIN_CORPORA,
            "trained_on": "chatgpt-refusals dev half (seed 2024) + all of refusal-gptfuzz, "
                          "refusal-openai-rbr-gold, refusal-purseclab-jailbreak-eval, other-styles; "
                          "equal total weight per corpus"}
    weights = train_shipped(data, best, c, meta)
    print(f"features with non-zero weight: {len(weights['weights'])}")
    if not args.no_write:
        LOCO_OUT.write_text(dumps({"variant": best, "left_out": per_variant[best]}), encoding="utf-8")
        args.out.write_text(dumps(weights), encoding="utf-8")
        print(f"wrote {args.out} ({len(dumps(weights).encode()) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
