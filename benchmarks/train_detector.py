"""Train the refusal detector's linear layer and write ``guard/truth/detector_weights.json``.

    python3 benchmarks/train_detector.py [--data PATH] [--out PATH] [--no-write]

The layer is an L2-regularised logistic regression (numpy + ``scipy.optimize``, no scikit-learn) over the
rule reading as a feature vector (``r:`` features) and binary word 1-2-grams of the opening clauses and the
closing clause (``o:`` / ``c:``) of each response; see ``guard/truth/detector.py``.

It is trained on the **development half only** (the seed-2024 split of ``benchmarks/detector_accuracy.py``).
Everything that is chosen is chosen on the training rows alone: the n-gram vocabulary (document frequency
>= ``MIN_DF`` in the training rows) and the regularisation strength ``C`` (inner 5-fold cross-validation on
the training rows, grid ``C_GRID``). The held-out half and the other-styles set are only scored.

It prints dev (a training-set figure), held-out and other-styles accuracy, and a nested 5-fold
cross-validation over the full set (each outer fold rebuilds the vocabulary and re-picks ``C`` from its own
four training folds), so the cross-validated figure is out-of-sample for everything learned. Deterministic:
the splits are seeded and L-BFGS starts from zero.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import Counter
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

from benchmarks.detector_accuracy import (  # noqa: E402
    ALL_STYLE_CASES,
    DATA,
    load_rows,
    split_rows,
)
from guard.truth.detector import RefusalDetector, is_refusal  # noqa: E402

OUT = ROOT / "guard" / "truth" / "detector_weights.json"
MIN_DF = 5  # an n-gram must occur in at least this many training responses to get a weight
C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # inverse L2 strength, on the summed (not mean) log-loss
FOLDS = 5
CV_SEED = 2024
DECIMALS = 4  # weights are rounded to this many decimals in the file (the file is what gets scored)

Rows = Sequence[tuple[str, bool]]
Feats = list[dict[str, float]]

_RULES = RefusalDetector(rules_only=True)  # feature extraction does not depend on the weights


def featurise(rows: Rows) -> Feats:
    return [_RULES.features(text) for text, _ in rows]


@dataclass(frozen=True, slots=True)
class Design:
    """Column layout and the standardisation of the dense columns, fixed on the training rows."""

    names: list[str]
    index: dict[str, int]
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def build(cls, feats: Feats, min_df: int = MIN_DF) -> Design:
        dense = sorted({k for f in feats for k in f if k.startswith("r:")})
        df = Counter(k for f in feats for k in f if not k.startswith("r:"))
        grams = sorted(k for k, n in df.items() if n >= min_df)
        names = dense + grams
        index = {k: i for i, k in enumerate(names)}
        x = cls._raw(feats, index, len(names)).tocsc()
        mean = np.zeros(len(names))
        scale = np.ones(len(names))
        for j in range(len(dense)):
            col = x[:, j].toarray().ravel()
            mean[j] = col.mean()
            scale[j] = col.std() or 1.0
        return cls(names, index, mean, scale)

    @staticmethod
    def _raw(feats: Feats, index: Mapping[str, int], width: int) -> sparse.csr_matrix:
        rows, cols, vals = [], [], []
        for i, f in enumerate(feats):
            for k, v in f.items():
                j = index.get(k)
                if j is not None and v:
                    rows.append(i)
                    cols.append(j)
                    vals.append(v)
        return sparse.csr_matrix((vals, (rows, cols)), shape=(len(feats), width))

    def matrix(self, feats: Feats) -> sparse.csr_matrix:
        """Standardised design matrix (dense columns centred and scaled; n-gram columns as they are)."""
        raw = self._raw(feats, self.index, len(self.names))
        scaled = raw @ sparse.diags(1.0 / self.scale)
        # Centring a sparse matrix would densify it: subtract the means through the bias instead (see fit).
        return scaled.tocsr()

    def offsets(self) -> np.ndarray:
        return self.mean / self.scale


def fit(x: sparse.csr_matrix, y: np.ndarray, offsets: np.ndarray, c: float) -> tuple[float, np.ndarray]:
    """Minimise sum log-loss + ||w||^2 / (2c) over (bias, w); the bias is not penalised.

    The model is ``z = b + (x - offsets) . w`` (dense columns centred), written without densifying x.
    """
    n, d = x.shape
    sign = np.where(y, 1.0, -1.0)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        b, w = theta[0], theta[1:]
        z = b - offsets @ w + x @ w
        m = sign * z
        loss = np.logaddexp(0.0, -m).sum() + w @ w / (2 * c)
        g = -sign * expit(-m)  # d loss / d z
        grad_w = x.T @ g - offsets * g.sum() + w / c
        return loss, np.concatenate(([g.sum()], grad_w))

    res = optimize.minimize(objective, np.zeros(d + 1), jac=True, method="L-BFGS-B",
                            options={"maxiter": 2000, "gtol": 1e-6})
    return float(res.x[0]), res.x[1:]


def to_weights(design: Design, b: float, w: np.ndarray, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Fold the standardisation into raw-feature weights and round them: the dict the detector loads."""
    raw = w / design.scale
    bias = b - float(design.offsets() @ w)
    dense, grams = {}, {}
    for name, value in zip(design.names, raw):
        v = round(float(value), DECIMALS)
        if v:
            (dense if name.startswith("r:") else grams)[name] = v
    return {"format": 1, "bias": round(bias, DECIMALS), "threshold": 0.5, "dense": dense, "ngrams": grams,
            "meta": dict(meta)}


def folds(n: int, k: int = FOLDS, seed: int = CV_SEED) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [sorted(order[i::k]) for i in range(k)]


def _cv_accuracy(feats: Feats, y: np.ndarray, c: float, k: int = FOLDS) -> tuple[float, float]:
    """Inner CV on the training rows: (accuracy, mean log-loss) of probability >= 0.5."""
    correct, logloss = 0, 0.0
    for test in folds(len(feats), k, seed=CV_SEED + 1):
        held = set(test)
        train = [i for i in range(len(feats)) if i not in held]
        design = Design.build([feats[i] for i in train])
        b, w = fit(design.matrix([feats[i] for i in train]), y[train], design.offsets(), c)
        z = b - design.offsets() @ w + design.matrix([feats[i] for i in test]) @ w
        p = expit(z)
        correct += int(((p >= 0.5) == y[test]).sum())
        logloss += float(-np.log(np.where(y[test], p, 1 - p).clip(1e-12)).sum())
    return correct / len(feats), logloss / len(feats)


def choose_c(feats: Feats, y: np.ndarray) -> tuple[float, dict[float, float]]:
    """C with the best inner-CV accuracy (ties: lower log-loss, then the stronger regularisation)."""
    scores = {c: _cv_accuracy(feats, y, c) for c in C_GRID}
    best = max(C_GRID, key=lambda c: (round(scores[c][0], 6), -scores[c][1], -c))
    return best, {c: s[0] for c, s in scores.items()}


def train(rows: Rows, meta: Mapping[str, Any] | None = None, verbose: bool = False) -> dict[str, Any]:
    """Choose C and the vocabulary on ``rows``, fit, and return the weights dict."""
    feats = featurise(rows)
    y = np.array([t for _, t in rows], dtype=bool)
    c, grid = choose_c(feats, y)
    if verbose:
        print("inner-CV accuracy by C: " + ", ".join(f"{k:g}: {v:.3f}" for k, v in grid.items())
              + f" -> C = {c:g}")
    design = Design.build(feats)
    b, w = fit(design.matrix(feats), y, design.offsets(), c)
    info = {"C": c, "min_df": MIN_DF, "n_train": len(rows), "n_features": len(design.names),
            **(meta or {})}
    return to_weights(design, b, w, info)


def accuracy(detector: RefusalDetector, rows: Rows) -> float:
    return sum(is_refusal(detector.label(t)) == truth for t, truth in rows) / len(rows)


def cross_validate(rows: Rows, k: int = FOLDS) -> list[float]:
    """Nested k-fold CV of the whole training procedure over ``rows``: per-fold test accuracy."""
    out = []
    for test in folds(len(rows), k):
        held = set(test)
        weights = train([r for i, r in enumerate(rows) if i not in held])
        out.append(accuracy(RefusalDetector(weights=weights), [rows[i] for i in test]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--no-write", action="store_true", help="train and score, but do not write --out")
    parser.add_argument("--no-cv", action="store_true", help="skip the nested 5-fold CV (slowest part)")
    args = parser.parse_args(argv)

    rows = load_rows(args.data)
    dev, held_out = split_rows(rows)
    weights = train(dev, {"trained_on": "dev half (seed 2024) of chatgpt-refusals all_hand_labeled.json"},
                    verbose=True)
    detector = RefusalDetector(weights=weights)
    print(f"features: {weights['meta']['n_features']} ({len(weights['dense'])} rule, "
          f"{len(weights['ngrams'])} n-gram with non-zero weight)")
    for name, subset in (("dev (train)", dev), ("held-out", held_out), ("other-styles", ALL_STYLE_CASES),
                         ("other-styles 1-40", ALL_STYLE_CASES[:40]),
                         ("other-styles 41-80", ALL_STYLE_CASES[40:])):
        print(f"{name:<20} n={len(subset):>4} accuracy {accuracy(detector, subset):.3f}")
    if not args.no_cv:
        per_fold = cross_validate(rows)
        mean = sum(per_fold) / len(per_fold)
        sd = math.sqrt(sum((a - mean) ** 2 for a in per_fold) / (len(per_fold) - 1))
        print(f"nested {FOLDS}-fold CV over full set (n={len(rows)}): accuracy {mean:.3f} +- {sd:.3f} "
              f"(folds: {', '.join(f'{a:.3f}' for a in per_fold)})")
    if not args.no_write:
        text = json.dumps(weights, indent=0, sort_keys=True, ensure_ascii=False) + "\n"
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out} ({len(text.encode()) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
