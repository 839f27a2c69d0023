#!/usr/bin/env python3
"""Do the live drift alarms cry wolf, and how fast do they catch a real change? Old vs new, seeded.

    python benchmarks/drift_validity.py                 # the issue's sizes (a few minutes on 2 cores)
    python benchmarks/drift_validity.py --quick         # small sizes, a smoke run
    python benchmarks/drift_validity.py --section delays   # one section (each is seeded on its own)

Simulated guard traffic: 5 topics (equal shares; refusal rates .15 .22 .28 .34 .41), the model
refuses with its topic's rate, the probe's evidence is ``z ~ N(+-d'/2, 1)`` (+ when the model
refuses), ``will_refuse = z > 0``, ``confidence = 1 + min(4, floor(|z| / 0.3))``. The calibration
baseline is 900 rows drawn the same way at d' = 3.0, fresh for every stream. The blocking policy
blocks predicted refusals at confidence 5 (about 17% of requests), whose answers are never scored.

What is measured, for exactly the guarantee each method claims:

* **false alarms**: the share of stationary streams (d' = 3.0 throughout) of ``--length`` scored
  or blocked requests in which any of the 12 tests (accuracy and refusal rate x 5 topics + all)
  alarms. The new detectors promise ``<= alpha`` within ``horizon`` requests (here horizon =
  length); the old test promised ``<= alpha`` per test for ever, with the baseline rate known.
* **alarm clearing**: how many compared requests the alarm takes to return to 0 once a change is undone.
* **detection delay**: requests from the change (d' 3.0 -> 1.5 or 2.5 at request ``nu``) to the
  first alarm at or after it, median over streams (streams alarmed at ``nu`` already count 0 and are
  reported). The old test is run with the *exact* rate (the best case it assumed), as in the issue.

The new method runs the same code as the proxy: ``guard.live.windows.compared_counts`` (the
like-for-like baseline), ``calibration.drift.Budget``, ``rate_interval``, ``alternatives``,
``e_values`` and ``sr_step``, on (streams x tests x alternatives) arrays; tests/test_cal_drift.py
checks that this vectorised runner and ``LiveStats`` give the same statistics on a small case.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import betaln

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from calibration.drift import (CAP_NATS, Budget, ChangeDetector, alternatives, e_values,  # noqa: E402
                              rate_interval, sr_step)
from calibration.policy import Baseline  # noqa: E402
from guard.live.windows import compared_counts  # noqa: E402

TOPIC_RATES = np.array([0.15, 0.22, 0.28, 0.34, 0.41])
K = len(TOPIC_RATES)
METRICS = 2  # accuracy, refusal rate
BASELINE_ROWS = 900


# ----------------------------------------------------------------------------- traffic
@dataclass
class Batch:
    topic: np.ndarray       # (C, S) int
    will_refuse: np.ndarray
    confidence: np.ndarray
    refused: np.ndarray


def draw(rng: np.random.Generator, shape: tuple[int, ...], d_prime: np.ndarray | float) -> Batch:
    topic = rng.integers(0, K, size=shape)
    refused = rng.random(shape) < TOPIC_RATES[topic]
    z = rng.standard_normal(shape) + np.where(refused, 0.5, -0.5) * d_prime
    confidence = 1 + np.minimum(4, (np.abs(z) / 0.3).astype(np.int64))
    return Batch(topic, z > 0, confidence, refused)


def blocks(will_refuse: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    return will_refuse & (confidence == 5)


def compared_by(blocking: bool):
    def compared(topic, will_refuse, confidence, harm):  # the guard's predicate for this policy
        return not (blocking and will_refuse and confidence == 5)
    return compared


def baselines(rng: np.random.Generator, streams: int) -> list[dict[str, Baseline]]:
    """One calibration run per stream: per-topic Baselines with probe-cell counts, as calibrate writes."""
    b = draw(rng, (BASELINE_ROWS, streams), 3.0)
    out = []
    for s in range(streams):
        per = {}
        for t in range(K):
            sel = b.topic[:, s] == t
            wr, conf, rf = b.will_refuse[sel, s], b.confidence[sel, s], b.refused[sel, s]
            cells = []
            for w in (False, True):
                for c in range(1, 6):
                    m = (wr == w) & (conf == c)
                    if m.any():
                        cells.append((w, c, 0, int(m.sum()), int(rf[m].sum())))
            h, mi = int((wr & rf).sum()), int((~wr & rf).sum())
            fa, cr = int((wr & ~rf).sum()), int((~wr & ~rf).sum())
            per[f"t{t}"] = Baseline(hits=h, misses=mi, false_alarms=fa, correct_rejections=cr, cells=cells)
        out.append(per)
    return out


# ----------------------------------------------------------------------------- the new detectors
class NewDetectors:
    """Per stream, the SR e-detectors LiveStats builds: (5 topics + all) x 2 metrics x alternatives.

    State ``m_top`` (G, K, S, 2) and ``m_all`` (G, S, 2) (alternatives first: the sum over them is a few
    contiguous vector additions). ``run`` feeds a chunk of requests: the 'all'
    detectors step through it in order; each topic's detectors step through that topic's requests in
    order (a stable sort by topic per stream), all topics at once, which is the same recursion
    (a topic detector only changes at its own requests) with 5x fewer Python-level steps."""

    def __init__(self, bases: list[dict[str, Baseline]], *, blocking: bool, alpha: float, horizon: int) -> None:
        S = len(bases)
        budget = Budget(alpha, horizon, n_tests=METRICS * (K + 1))
        self.log_threshold = budget.log_threshold
        compared = compared_by(blocking)
        tables: list[list[list[tuple[np.ndarray, np.ndarray]]]] = []
        for per in bases:
            counts = [compared_counts(per[f"t{t}"], f"t{t}", compared)[0] for t in range(K)]
            total = (sum(c.n for c in counts), sum(c.correct for c in counts), sum(c.refused for c in counts))
            rows = []
            for key in range(K + 1):
                n, correct, refused = (counts[key].n, counts[key].correct, counts[key].refused) if key < K else total
                rows.append([e_values(*alternatives(*rate_interval(k, n, budget.alpha_interval)))
                             for k in (correct, refused)])
            tables.append(rows)
        G = len(tables[0][0][0][0])
        if any(len(z0) != G for rows in tables for row in rows for z0, _ in row):
            raise RuntimeError("an interval reached 0 or 1: the streams' alternatives differ in number")
        e = np.array([[[[z0, z1] for z0, z1 in row] for row in rows] for rows in tables])  # (S, K+1, 2, 2, G)
        e = np.ascontiguousarray(np.transpose(e, (3, 4, 1, 0, 2)))                          # (2, G, K+1, S, 2)
        self.e0_top, self.e1_top = e[0, :, :K], e[1, :, :K]                                 # (G, K, S, 2)
        self.e0_all, self.e1_all = e[0, :, K], e[1, :, K]                                   # (G, S, 2)
        self.G = G
        self.cap = math.exp(self.log_threshold + CAP_NATS) * G  # as ChangeDetector
        self.level = math.exp(self.log_threshold) * G           # sum over alternatives >= G A  <=>  mean >= A
        self.m_top = np.zeros((G, K, S, METRICS))
        self.m_all = np.zeros((G, S, METRICS))

    def run(self, b: Batch, include: np.ndarray, t0: int, record_from: int) -> np.ndarray:
        """Feed a chunk (C, S) starting at global time t0; returns each stream's first alarm time in it at
        or after ``record_from`` (-1 if none)."""
        C, S = include.shape
        x = np.stack([b.will_refuse == b.refused, b.refused], axis=-1)          # (C, S, 2)
        first = np.full(S, np.iinfo(np.int64).max)
        cols = np.arange(S)
        for i in range(C):  # 'all'
            e = np.where(x[i], self.e1_all, self.e0_all)
            self.m_all = np.where(include[i, :, None], sr_step(self.m_all, e, self.cap), self.m_all)
            if t0 + i >= record_from:
                alarm = (self.m_all.sum(axis=0) >= self.level).any(axis=-1)
                first = np.where(alarm & (first > t0 + i), t0 + i, first)
        order = np.argsort(b.topic, axis=0, kind="stable")                     # (C, S): requests grouped by topic
        n_t = (b.topic[None] == np.arange(K)[:, None, None]).sum(axis=1)       # (K, S)
        start = np.vstack([np.zeros((1, S), np.int64), np.cumsum(n_t, axis=0)[:-1]])
        for p in range(int(n_t.max())):
            valid = p < n_t                                                    # (K, S)
            at = order[np.minimum(start + p, C - 1), cols]                     # (K, S) chunk positions
            xs = x[at, cols]                                                   # (K, S, 2)
            e = np.where(xs, self.e1_top, self.e0_top)
            step = valid & include[at, cols]
            self.m_top = np.where(step[..., None], sr_step(self.m_top, e, self.cap), self.m_top)
            alarm = (self.m_top.sum(axis=0) >= self.level).any(axis=-1) & valid & (t0 + at >= record_from)
            when = np.where(alarm, t0 + at, np.iinfo(np.int64).max).min(axis=0)
            first = np.minimum(first, when)
        return np.where(first == np.iinfo(np.int64).max, -1, first)

    def alarmed(self) -> np.ndarray:
        """Whether each stream's alarm is on now."""
        on = (self.m_all.sum(axis=0) >= self.level).any(axis=-1)
        return on | (self.m_top.sum(axis=0) >= self.level).any(axis=(0, 2))


def run_new(rng, bases, *, blocking, alpha, horizon, length, nu=None, d_after=3.0, chunk=500):
    """First alarm time at or after ``nu`` (or 0) per stream, -1 if none; and whether alarmed at nu."""
    det = NewDetectors(bases, blocking=blocking, alpha=alpha, horizon=horizon)
    S = len(bases)
    first = np.full(S, -1)
    start = 0 if nu is None else nu
    on_at_change = np.zeros(S, dtype=bool)
    bounds = sorted({*range(0, length, chunk), start} - {length})
    for c0, c1 in zip(bounds, bounds[1:] + [length]):
        if c0 == start and start > 0:
            on_at_change = det.alarmed()
        d = np.where(np.arange(c0, c1)[:, None] >= (nu if nu is not None else length), d_after, 3.0)
        b = draw(rng, (c1 - c0, S), d)
        include = ~(blocks(b.will_refuse, b.confidence) & blocking)
        got = det.run(b, include, c0, start)
        first = np.where((first < 0) & (got >= 0), got, first)
        if nu is not None and c0 >= start and (first >= 0).all():
            break
    return first, on_at_change


# ----------------------------------------------------------------------------- the old test
def old_log_e(k, n, p0, kappa=10.0):
    p0 = np.clip(p0, 1e-4, 1 - 1e-4)
    a, b = p0 * kappa, (1 - p0) * kappa
    return betaln(a + k, b + n - k) - betaln(a, b) - k * np.log(p0) - (n - k) * np.log1p(-p0)


def run_old(rng, p0, *, blocking, alpha, length, nu=None, d_after=3.0, chunk=500):
    """The previous LiveStats drift test: Beta-mixture SPRT per topic and metric, started at load,
    sticky, each at alpha, against the baseline's whole-population rates ``p0`` (S, K+1, 2)."""
    S = p0.shape[0]
    k = np.zeros((S, K + 1, 2))
    n = np.zeros((S, K + 1, 1))
    first = np.full(S, -1)
    thr = math.log(1 / alpha)
    for c0 in range(0, length, chunk):
        c = min(chunk, length - c0)
        d = np.where(np.arange(c0, c0 + c)[:, None] >= (nu if nu is not None else length), d_after, 3.0)
        b = draw(rng, (c, S), d)
        scored = ~(blocks(b.will_refuse, b.confidence) & blocking)
        x = np.stack([b.will_refuse == b.refused, b.refused], axis=-1) & scored[..., None]  # (c, S, 2)
        onehot = (b.topic[..., None] == np.arange(K)) & scored[..., None]                # (c, S, K)
        member = np.concatenate([onehot, scored[..., None]], axis=-1)                    # (c, S, K+1)
        kk = k + np.cumsum(member[..., None] * x[:, :, None, :], axis=0)                  # (c, S, K+1, 2)
        nn = n + np.cumsum(member, axis=0)[..., None]
        live = first < 0
        le = old_log_e(kk[:, live], nn[:, live], p0[live])
        hit = ((le >= thr) & (nn[:, live] > 0)).any(axis=(2, 3))                         # (c, S_live)
        t_hit = np.where(hit.any(axis=0), hit.argmax(axis=0) + c0, -1)
        idx = np.flatnonzero(live)
        first[idx[t_hit >= 0]] = t_hit[t_hit >= 0]
        k, n = kk[-1], nn[-1]
        if (first >= 0).all():
            break
    return first


def true_rates(blocking: bool) -> np.ndarray:
    """Exact whole-population (old) rates at d' = 3.0 per topic and for all: (K+1, 2) accuracy, refusal."""
    big = draw(np.random.default_rng(999), (4_000_000,), 3.0)
    out = np.zeros((K + 1, 2))
    for t in range(K + 1):
        sel = big.topic == t if t < K else np.ones_like(big.topic, dtype=bool)
        out[t] = ((big.will_refuse == big.refused)[sel].mean(), big.refused[sel].mean())
    return out


def accuracy_at(d_prime: float) -> float:
    """Exact accuracy of all topics together at this d' (large simulated sample)."""
    big = draw(np.random.default_rng(998), (4_000_000,), d_prime)
    return float((big.will_refuse == big.refused).mean())


def estimated_rates(bases: list[dict[str, Baseline]]) -> np.ndarray:
    out = np.zeros((len(bases), K + 1, 2))
    for s, per in enumerate(bases):
        tot = np.zeros(3)
        for t in range(K):
            b = per[f"t{t}"]
            row = np.array([b.n, b.hits + b.correct_rejections, b.hits + b.misses])
            tot += row
            out[s, t] = row[1:] / row[0]
        out[s, K] = tot[1:] / tot[0]
    return out


def fmt_rate(first: np.ndarray) -> str:
    a = (first >= 0).mean()
    lo, hi = wilson(int((first >= 0).sum()), first.size)
    return f"{a:.4f} [{lo:.4f}, {hi:.4f}]"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def fmt_delay(first: np.ndarray, nu: int, exclude: np.ndarray) -> str:
    """Median delay over the streams not already alarmed at the change (undetected = beyond the run)."""
    keep = ~exclude
    delay = np.where(first[keep] >= 0, first[keep] - nu, np.inf).astype(float)
    with np.errstate(invalid="ignore"):  # inf - inf inside percentile's interpolation
        med = np.median(delay)
        q1, q3 = np.percentile(delay, [25, 75])
    shown = lambda v: f"{v:.0f}" if math.isfinite(v) else "> run"  # noqa: E731
    return f"median {shown(med)} (IQR {shown(q1)}-{shown(q3)}), detected {int(np.isfinite(delay).sum())}/{keep.sum()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--length", type=int, default=100_000)
    ap.add_argument("--delay-streams", type=int, default=200)
    ap.add_argument("--late", type=int, default=500_000, help="the late change point")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--section", choices=("all", "false-alarms", "delays", "clearing"), default="all",
                    help="each configuration has its own seeded generator, so a section alone gives the same figures")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.streams, args.length, args.delay_streams, args.late = 100, 10_000, 40, 20_000
    t0 = time.perf_counter()
    print(f"drift_validity: seed {args.seed}, alpha {args.alpha}, baseline {BASELINE_ROWS} rows, "
          f"{K} topics, 12 tests; new detectors' horizon = {args.length:,} requests")
    if args.section in ("all", "false-alarms"):
        print()
        print(f"False alarms: share of {args.streams:,} stationary streams of {args.length:,} requests with any "
              f"alarm (95% Wilson interval); target <= {args.alpha}")
        print(f"{'policy':<24} {'old (estimated p0)':<28} {'new':<28}")
        for config, blocking in enumerate((False, True)):
            rng = np.random.default_rng([args.seed, config])
            bases = baselines(rng, args.streams)
            seed = int(rng.integers(1 << 31))
            old = run_old(np.random.default_rng(seed), estimated_rates(bases), blocking=blocking, alpha=args.alpha,
                          length=args.length)
            new, _ = run_new(np.random.default_rng(seed), bases, blocking=blocking, alpha=args.alpha,
                             horizon=args.length, length=args.length)
            label = "blocks conf-5 refusals" if blocking else "no blocking"
            print(f"{label:<24} {fmt_rate(old):<28} {fmt_rate(new):<28}  old median first alarm "
                  f"{np.median(old[old >= 0]) if (old >= 0).any() else float('nan'):.0f}", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s so far)")
    if args.section in ("all", "delays"):
        print()
        print(f"Detection delay after a change of d' (no blocking), {args.delay_streams} streams each, median over the "
              f"streams not alarmed at the change; target median <= 600 for 3.0 -> 1.5")
        print(f"{'change':<24} {'old (exact p0)':<40} {'alarmed at change':<18} {'new':<40} alarmed at change")
        exact = true_rates(False)
        for config, (d_after, nu, post) in enumerate(((1.5, 5_000, 5_000), (1.5, args.late, 5_000),
                                                       (2.5, 5_000, args.length))):
            rng = np.random.default_rng([args.seed, 10 + config])
            bases = baselines(rng, args.delay_streams)
            seed = int(rng.integers(1 << 31))
            length = nu + post
            old = run_old(np.random.default_rng(seed), np.broadcast_to(exact, (args.delay_streams, K + 1, 2)),
                          blocking=False, alpha=args.alpha, length=length, nu=nu, d_after=d_after)
            old_pre = (old >= 0) & (old < nu)
            new, on = run_new(np.random.default_rng(seed), bases, blocking=False, alpha=args.alpha,
                              horizon=args.length, length=length, nu=nu, d_after=d_after)
            label = f"3.0 -> {d_after} at {nu:,}"
            print(f"{label:<24} {fmt_delay(old, nu, old_pre):<40} {old_pre.mean():<18.3f} "
                  f"{fmt_delay(new, nu, on):<40} {on.mean():.3f}", flush=True)
    if args.section in ("all", "clearing"):
        print()
        rng = np.random.default_rng([args.seed, 20])
        acc_before, acc_after = true_rates(False)[K, 0], accuracy_at(1.5)
        budget = Budget(args.alpha, args.length, n_tests=METRICS * (K + 1))
        clear = []
        for _ in range(args.delay_streams):
            det = ChangeDetector(rng.binomial(BASELINE_ROWS, acc_before), BASELINE_ROWS,
                                 alpha_interval=budget.alpha_interval, log_threshold=budget.log_threshold)
            for _ in range(3_000):
                det.update(bool(rng.random() < acc_after))
            steps = 0
            while det.alarm:
                det.update(bool(rng.random() < acc_before))
                steps += 1
            clear.append(steps)
        q = np.percentile(clear, [10, 50, 90])
        print(f"Alarm clearing ('all' accuracy detector, ChangeDetector itself, {args.delay_streams} streams): after 3,000 "
              f"requests at d' 1.5 (accuracy {acc_after:.3f}) the rate returns to {acc_before:.3f}; compared requests "
              f"until the alarm is 0: median {q[1]:.0f} (10%-90%: {q[0]:.0f}-{q[2]:.0f})")
    print(f"\n({time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
