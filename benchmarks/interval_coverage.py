"""Coverage of the 95% intervals of accuracy, H, FA, d' and c: old bootstrap vs the analytic method.

Seeded simulation with known truth (``calibration.sdt.simulate``: equal-variance Gaussian SDT, each
prompt refused or not as a whole, evidence correlated within a prompt through a shared N(0, ICC)
term).  The four regimes are the H / FA pairs implied by the paper's figures, at n = 900 requests:

* ``iid``: 900 prompts x 1 request;
* ``clustered``: 300 prompts x 3 paraphrases sharing an ``id`` (ICC of the evidence ``--icc``).

For every simulated dataset both methods run on the same per-prompt count table:

* ``old``: percentile cluster bootstrap (``bootstrap_sdt_ci(bootstrap_counts(...))``, 1,000
  resamples of prompts) of the log-linear statistics;
* ``wilson`` (new, what ``calibrate`` uses): ``sdt_intervals`` (design-effect-deflated Wilson
  intervals of the raw rates; d' and c by MOVER on the z scale around the log-linear point
  estimates); ``cp`` and ``jeffreys`` are the same construction with Clopper-Pearson or Jeffreys
  intervals, the alternatives measured when choosing.

Printed per regime x design x statistic: coverage of the true value (share of datasets whose
interval contains it) with its Monte-Carlo SE ``sqrt(cov (1 - cov) / datasets)``, and the median
interval width.  ``inf`` counts datasets whose new d' interval is unbounded above (no misses at all).

    python3 benchmarks/interval_coverage.py                  # 1,000 datasets per row, ~5 CPU-minutes
    python3 benchmarks/interval_coverage.py --methods wilson cp jeffreys     # variants, no bootstrap
    python3 benchmarks/interval_coverage.py --methods wilson --icc 0.8 --p-signal 0.3
    python3 benchmarks/interval_coverage.py --cost          # CPU time of the interval step
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

from calibration.sdt import (STAT_NAMES, bootstrap_counts, bootstrap_sdt_ci, count_table, outcome_codes,  # noqa: E402
                             sdt_from_counts, sdt_intervals, simulate)

#: (H, FA) implied by the paper's figures for the four models.
REGIMES = {"H.985/FA.091": (0.985, 0.091), "H.902/FA.025": (0.902, 0.025),
           "H.846/FA.084": (0.846, 0.084), "H.994/FA.216": (0.994, 0.216)}
DESIGNS = {"iid": (900, 1), "clustered": (300, 3)}
SHORT = {"accuracy": "acc", "hit_rate": "H", "false_alarm_rate": "FA", "d_prime": "d'", "criterion": "c"}


def truth(h: float, fa: float, p_signal: float) -> dict[str, float]:
    zh, zf = norm.ppf(h), norm.ppf(fa)
    return {"accuracy": p_signal * h + (1 - p_signal) * (1 - fa), "hit_rate": h, "false_alarm_rate": fa,
            "d_prime": zh - zf, "criterion": -(zh + zf) / 2}


def run_cell(h: float, fa: float, n_prompts: int, repeats: int, args, rng: np.random.Generator,
             boot_rng: np.random.Generator, methods: list[str]) -> dict:
    t = truth(h, fa, args.p_signal)
    icc = args.icc if repeats > 1 else 0.0
    cover = {m: {s: 0 for s in STAT_NAMES} for m in methods}
    widths = {m: {s: [] for s in STAT_NAMES} for m in methods}
    unbounded, bias = {m: 0 for m in methods}, []
    for _ in range(args.datasets):
        d = simulate(n_prompts, repeats, t["d_prime"], t["criterion"], p_signal=args.p_signal, icc=icc, seed=rng)
        codes = outcome_codes(d["will_refuse"], d["refused"]).astype(np.int64)
        tab = count_table(d["prompt"], n_prompts, np.zeros_like(d["prompt"]), 1, codes)
        bias.append(sdt_from_counts(*tab.sum(axis=0)[0]).d_prime - t["d_prime"])
        for m in methods:
            ci = (bootstrap_sdt_ci(bootstrap_counts(tab, args.n_boot, boot_rng)) if m == "old"
                  else sdt_intervals(tab, method=m))
            for s in STAT_NAMES:
                lo, hi = ci[s][0]
                cover[m][s] += bool(lo <= t[s] <= hi)
                widths[m][s].append(hi - lo)
            unbounded[m] += bool(np.isinf(ci["d_prime"][0, 1]))
    return {"cover": cover, "width": widths, "unbounded": unbounded, "bias": float(np.mean(bias))}


def cost() -> None:
    """CPU time of the interval step in ``calibrate``: analytic (now) vs bootstrap percentiles (before)."""
    rng = np.random.default_rng(0)
    for n_prompts in (300, 10_000):
        tab = rng.integers(0, 3, (n_prompts, 16, 4))
        t0 = time.process_time()
        sdt_intervals(tab)
        t1 = time.process_time()
        reps = bootstrap_counts(tab, 1000, rng)
        t2 = time.process_time()
        bootstrap_sdt_ci(reps)
        t3 = time.process_time()
        print(f"{n_prompts} prompts x 16 cells: sdt_intervals {1000 * (t1 - t0):.1f} ms CPU; "
              f"bootstrap_sdt_ci on 1,000 replicates {1000 * (t3 - t2):.1f} ms CPU "
              f"(+ {1000 * (t2 - t1):.0f} ms for the replicates, still drawn for ECE and Brier)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=int, default=1000, help="simulated datasets per regime x design")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--icc", type=float, default=0.5, help="ICC of the evidence within a prompt (clustered)")
    ap.add_argument("--p-signal", type=float, default=0.5, help="share of prompts the model refuses")
    ap.add_argument("--methods", nargs="+", default=["old", "wilson"],
                    help="old (bootstrap) and/or new-method variants: wilson (the one calibrate uses), cp, jeffreys")
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--seed", type=int, default=20240501)
    ap.add_argument("--cost", action="store_true", help="print the CPU cost of the interval step instead")
    args = ap.parse_args()
    if args.cost:
        cost()
        return
    methods = args.methods
    print(f"interval coverage, nominal 95%: {args.datasets} simulated datasets per row, n = 900 requests, "
          f"p_signal {args.p_signal}, clustered = 300 prompts x 3 (evidence ICC {args.icc}), "
          f"old = percentile prompt bootstrap ({args.n_boot} resamples)")
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    mc = lambda p: np.sqrt(p * (1 - p) / args.datasets)  # noqa: E731
    head = "".join(f"{'cov ' + m:>14}{'width':>7}" for m in methods)
    print(f"{'regime':<14}{'design':<10}{'stat':<5}{head}")
    t0 = time.perf_counter()
    # separate streams: the simulated datasets are the same whichever methods are run
    rng, boot_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(args.seed).spawn(2))
    for name in args.regimes:
        h, fa = REGIMES[name]
        for design, (n_prompts, repeats) in DESIGNS.items():
            r = run_cell(h, fa, n_prompts, repeats, args, rng, boot_rng, methods)
            for s in STAT_NAMES:
                row = ""
                for m in methods:
                    p = r["cover"][m][s] / args.datasets
                    row += f"{p:>8.3f}±{mc(p):.3f}{np.median(r['width'][m][s]):>7.3f}"
                print(f"{name:<14}{design:<10}{SHORT[s]:<5}{row}")
            extra = ", ".join(f"{m} {r['unbounded'][m]}" for m in methods if m != "old")
            print(f"{'':<24}mean bias of the log-linear d' {r['bias']:+.3f}; d' unbounded above in: {extra}",
                  flush=True)
    print(f"elapsed {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
