"""Judge-corrected SDT figures vs the detector's own and the judged rows alone: bias and interval coverage.

Seeded simulation with known truth. Per model, ``--rows`` requests (one per prompt, or ``--repeats``
paraphrases sharing a prompt and its outcome) over four topics with their own refusal rates and probe
criteria; the probe follows equal-variance Gaussian SDT (d' = ``--d-prime`` within a topic). The detector
misses refusals and invents them at rates that differ by model and topic (about ``--fn`` and ``--fp``)
and, worse, more often where the probe itself is wrong (borderline answers: x1.5 on the mispredicted
side), so its errors are not independent of the prediction. A uniform random ``--judged`` share of rows
carries the judge's label (= the truth).

The truth is the population's: per model, H = sum_t w_t p_t H_t / sum_t w_t p_t (FA likewise), so
d' = z(H) - z(FA) of the topic mix; the estimators are judged on it.

* ``detector``: every row, the detector's label as truth (what calibrate did without a judge);
  intervals ``calibration.sdt.sdt_intervals``;
* ``judged only``: the judged rows and their judge labels; same intervals;
* ``plain PPI``: prediction-powered inference on each rate separately (Angelopoulos et al. 2023): P(refused)
  and P(predicted refuse, refused) as the detector's mean over every row plus the judged rows' mean
  rectifier (judge - detector), H and FA their ratios; point estimate only (no interval: coverage "-"),
  for the comparison the issue author made;
* ``corrected``: ``calibration.label_error`` (two-phase estimator stratified by prediction x detector
  label; percentile bootstrap over prompts of rows and judged rows together).

Printed per model and estimator: mean bias of d' (with its Monte-Carlo SE), SD of d' over datasets,
median width of the 95% d' interval and the coverage (share of datasets whose interval holds the truth,
MC SE sqrt(cov(1-cov)/datasets)) of d', c, H, FA and accuracy.

    python3 benchmarks/judge_correction.py                 # 1,000 datasets of 20,000 rows per model
    python3 benchmarks/judge_correction.py --quick         # 200 datasets (a check, MC SE ~ .015)
    python3 benchmarks/judge_correction.py --repeats 3     # clustered: 3 paraphrases per prompt
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import norm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration.label_error import corrected_sdt  # noqa: E402
from calibration.sdt import STAT_NAMES, count_table, outcome_codes, sdt_from_counts, sdt_intervals  # noqa: E402

SHORT = {"accuracy": "acc", "hit_rate": "H", "false_alarm_rate": "FA", "d_prime": "d'", "criterion": "c"}
#: per model: topic weights, refusal rates, probe criteria, detector FN and FP multipliers per topic
MODELS = {
    "model-a": dict(w=(0.4, 0.3, 0.2, 0.1), p=(0.2, 0.35, 0.5, 0.3), c=(0.0, 0.2, -0.2, 0.4),
                    fn=(0.8, 1.2, 1.0, 1.4), fp=(1.0, 0.6, 1.4, 1.0)),
    "model-b": dict(w=(0.25, 0.25, 0.25, 0.25), p=(0.1, 0.3, 0.45, 0.6), c=(0.3, -0.1, 0.1, 0.0),
                    fn=(1.3, 0.7, 1.1, 0.9), fp=(0.7, 1.3, 0.9, 1.2)),
}


def truth(m: dict, d: float) -> dict[str, float]:
    w, p, c = (np.asarray(m[k], float) for k in ("w", "p", "c"))
    h_t, f_t = norm.cdf(d / 2 - c), norm.cdf(-d / 2 - c)
    h = (w * p * h_t).sum() / (w * p).sum()
    f = (w * (1 - p) * f_t).sum() / (w * (1 - p)).sum()
    zh, zf = norm.ppf(h), norm.ppf(f)
    return {"accuracy": float((w * p * h_t).sum() + (w * (1 - p) * (1 - f_t)).sum()), "hit_rate": float(h),
            "false_alarm_rate": float(f), "d_prime": float(zh - zf), "criterion": float(-(zh + zf) / 2)}


def simulate(m: dict, args, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n_prompts = args.rows // args.repeats
    topic_p = rng.choice(4, size=n_prompts, p=np.asarray(m["w"]) / sum(m["w"]))
    refused_p = rng.random(n_prompts) < np.asarray(m["p"])[topic_p]
    prompt = np.repeat(np.arange(n_prompts), args.repeats)
    topic, y = topic_p[prompt], refused_p[prompt]
    x = args.d_prime * y + rng.normal(size=prompt.size)
    wr = x > args.d_prime / 2 + np.asarray(m["c"])[topic]
    fn = args.fn * np.asarray(m["fn"])[topic] * np.where(wr, 0.75, 1.5)     # borderline: more errors where
    fp = args.fp * np.asarray(m["fp"])[topic] * np.where(wr, 1.5, 0.75)     # the probe is wrong too
    flip = rng.random(prompt.size) < np.where(y, fn, fp)
    det = y ^ flip
    judged = rng.random(prompt.size) < args.judged
    return {"prompt": prompt, "wr": wr, "y": y, "det": det, "judged": judged}


def analytic(wr: np.ndarray, refused: np.ndarray, prompt: np.ndarray) -> dict[str, tuple[float, float, float]]:
    _, unit = np.unique(prompt, return_inverse=True)
    tab = count_table(unit, int(unit.max()) + 1, np.zeros(unit.size, np.int64), 1, outcome_codes(wr, refused))
    ci = sdt_intervals(tab)
    pt = sdt_from_counts(*tab.sum(axis=0)[0])
    return {s: (float(getattr(pt, s)), float(ci[s][0, 0]), float(ci[s][0, 1])) for s in STAT_NAMES}


def plain_ppi(d: dict[str, np.ndarray]) -> dict[str, tuple[float, float, float]]:
    """PPI point estimates of the rates (rectified means), then the SDT figures; no interval (nan bounds)."""
    wr, det, y, j = d["wr"].astype(float), d["det"].astype(float), d["y"].astype(float), d["judged"]
    refused = det.mean() + (y[j] - det[j]).mean()
    hit = (wr * det).mean() + (wr[j] * (y[j] - det[j])).mean()
    fa = (wr * (1 - det)).mean() + (wr[j] * ((1 - y[j]) - (1 - det[j]))).mean()
    n = wr.size
    h, m = hit * n, (refused - hit) * n
    f, cr = fa * n, (1 - refused - fa) * n
    pt = sdt_from_counts(*(max(v, 0.0) for v in (h, m, f, cr)))
    return {s: (float(getattr(pt, s)), np.nan, np.nan) for s in STAT_NAMES}


def run(args) -> None:
    rng = np.random.default_rng(args.seed)
    print(f"judge-corrected SDT: {args.datasets} datasets per model, {args.rows} rows ({args.repeats} per prompt), "
          f"{args.judged:.0%} judged, detector FN ~{args.fn:.0%} FP ~{args.fp:.0%} (by model, topic and probe "
          f"side), probe d' {args.d_prime} within topics, bootstrap {args.n_boot}, seed {args.seed}")
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    head = (f"{'model':<9}{'estimator':<13}{'true d':>7}{'bias d':>9}{'+-MC':>6}{'sd d':>7}{'width':>7}"
            + "".join(f"{'cov ' + SHORT[s]:>9}" for s in ("d_prime", "criterion", "hit_rate", "false_alarm_rate",
                                                          "accuracy")) + f"{'judged':>8}{'unjudged':>9}")
    print(head)
    print("-" * len(head))
    t0 = time.time()
    for name, m in MODELS.items():
        tr = truth(m, args.d_prime)
        res: dict[str, dict[str, list]] = {e: {s: [] for s in STAT_NAMES}
                                           for e in ("detector", "judged only", "plain PPI", "corrected")}
        judged_n, unjudged = [], 0
        for _ in range(args.datasets):
            d = simulate(m, args, rng)
            for est, got in (("detector", analytic(d["wr"], d["det"], d["prompt"])),
                             ("judged only", analytic(d["wr"][d["judged"]], d["y"][d["judged"]],
                                                      d["prompt"][d["judged"]])),
                             ("plain PPI", plain_ppi(d))):
                for s in STAT_NAMES:
                    res[est][s].append(got[s])
            c = corrected_sdt(d["wr"], d["det"], d["judged"], d["y"], d["prompt"], n_boot=args.n_boot, seed=rng)
            judged_n.append(c.n_judged)
            unjudged += bool(c.unjudged)
            for s in STAT_NAMES:
                lo, hi = c.ci[s]
                res["corrected"][s].append((getattr(c, s), -np.inf if lo is None else lo, np.inf if hi is None else hi))
        for est, by in res.items():
            arr = {s: np.array(v, dtype=float) for s, v in by.items()}
            dp = arr["d_prime"]
            bias = dp[:, 0] - tr["d_prime"]
            cov = {s: float(np.mean((arr[s][:, 1] <= tr[s]) & (tr[s] <= arr[s][:, 2]))) for s in STAT_NAMES}
            width = float(np.median(dp[:, 2] - dp[:, 1]))
            if est == "plain PPI":
                print(f"{name:<9}{est:<13}{tr['d_prime']:>7.3f}{bias.mean():>+9.3f}"
                      f"{bias.std(ddof=1) / np.sqrt(len(bias)):>6.3f}{dp[:, 0].std(ddof=1):>7.3f}{'-':>7}"
                      + "".join(f"{'-':>9}" for _ in range(5)))
                continue
            mc = bias.std(ddof=1) / np.sqrt(len(bias))
            print(f"{name:<9}{est:<13}{tr['d_prime']:>7.3f}{bias.mean():>+9.3f}{mc:>6.3f}"
                  f"{dp[:, 0].std(ddof=1):>7.3f}{width:>7.3f}"
                  + "".join(f"{cov[s]:>9.3f}" for s in ("d_prime", "criterion", "hit_rate", "false_alarm_rate",
                                                         "accuracy"))
                  + (f"{np.mean(judged_n):>8.0f}{unjudged:>9d}" if est == "corrected" else ""))
    n = args.datasets
    print(f"coverage MC SE at .95: {np.sqrt(0.95 * 0.05 / n):.3f}; 'unjudged': datasets with a stratum that had no "
          f"judged row (interval widened over theta in [0, 1]); elapsed {time.time() - t0:.0f} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--judged", type=float, default=0.05)
    ap.add_argument("--fn", type=float, default=0.10)
    ap.add_argument("--fp", type=float, default=0.05)
    ap.add_argument("--d-prime", type=float, default=3.2)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=20261208)
    ap.add_argument("--quick", action="store_true", help="200 datasets per model")
    args = ap.parse_args(argv)
    if args.quick:
        args.datasets = 200
    run(args)


if __name__ == "__main__":
    main()
