"""Realised guarantee and coverage of the routing thresholds, old procedure vs new, with known truth.

    python3 benchmarks/routing_guarantee.py [--deployments 200] [--seed 0] [--quick] [--jobs 2]
        [--rho 0.5] [--only SUBSTRING]

Each simulated *deployment* draws a calibration data set (prompts x 3 paraphrases sharing an id,
correctness correlated within a prompt), fits a policy with the old procedure (policy schema 1:
50/50 split, per topic and side a fixed sequence from the strictest score at delta/2) and with the
new one (``calibration.calibrate.fit_and_certify``, the code ``refusal-guard calibrate`` runs), and
applies both policies to a large population from the same world whose true P(correct) is known
for every request.  A deployment *meets the guarantee* when every side of every threshold group
(topics with their own thresholds, and the global group) routes population requests with true
accuracy >= the target; nothing routed meets it trivially.  Target accuracy 0.98, confidence 0.95.

World (equal-variance Gaussian SDT): a prompt is refused with probability pi (0.35; with 10 topics
pi runs from 0.2 to 0.5 across topics); each paraphrase draws evidence x = +-d'/2 + a_prompt + e
with a ~ N(0, 0.5), e ~ N(0, 0.5), predicts refusal when x > c.  Confidence bins |x - c| + N(0, 0.44)
at population quantiles (paper regimes: 2/3/10/25/60% at confidence 1..5; Sonnet-4.5-like:
.25/.25/.5/14/85%), harm rating bins x + N(0, 0.7) (35/20/15/15/15%).  The paper regimes take d'
and c from the implied H/FA pairs.  The below-target regime keeps the Sonnet-4.5-like features but
every request is correct with probability .975 (prompt-level Gaussian copula, latent ICC 0.5), so
any auto-routing violates the target.  Continuous score: ``p_refuse_logprob`` with signal is
expit(1.5 (x - c) + N(0, 0.7)); without signal it is expit(+-2.5 + N(0, 1)), the sign that of the
verbal answer (agrees with it, says nothing more).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import expit
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.calibrate import FIT_FRACTION, fit_and_certify, policy_thresholds, split_prompts  # noqa: E402
from calibration.datapoints import DatapointTable  # noqa: E402
from calibration.reliability import Recalibrator  # noqa: E402
from calibration.thresholds import GLOBAL, cluster_bound, ltt_threshold  # noqa: E402

TARGET, CONFIDENCE = 0.98, 0.95
RHO = 0.5                      # share of evidence variance shared by a prompt's paraphrases (--rho)
PAPER_CONF = (0.02, 0.03, 0.10, 0.25, 0.60)
SONNET45_CONF = (0.0025, 0.0025, 0.005, 0.14, 0.85)
HARM_Q = (0.35, 0.55, 0.70, 0.85)
SIGMA_CONF = 0.44


@dataclass(frozen=True)
class Regime:
    name: str
    d: float
    c: float
    conf_shares: tuple[float, ...]
    flat: float | None = None          # every request correct with this probability

    @classmethod
    def from_rates(cls, name: str, h: float, fa: float) -> "Regime":
        zh, zf = norm.ppf(h), norm.ppf(fa)
        return cls(name, zh - zf, -(zh + zf) / 2, PAPER_CONF)


REGIMES = [
    Regime.from_rates("H .985 FA .091", 0.985, 0.091),
    Regime.from_rates("H .902 FA .025", 0.902, 0.025),
    Regime.from_rates("H .846 FA .084", 0.846, 0.084),
    Regime.from_rates("H .994 FA .216", 0.994, 0.216),
    Regime("Sonnet-4.5-like", 3.401, 0.0, SONNET45_CONF),     # fitted: conf 5 85% at .983, conf 4 14% at .813
    Regime("below target .975", 3.401, 0.0, SONNET45_CONF, flat=0.975),
]


class World:
    """One regime x topic count: draws calibration data and holds the population with known truth."""

    def __init__(self, regime: Regime, n_topics: int, logprob: str | None, seed: int, n_pop: int = 200_000,
                 rho: float = RHO):
        self.r, self.n_topics, self.logprob, self.rho = regime, n_topics, logprob, rho
        self.pi = np.linspace(0.2, 0.5, n_topics) if n_topics > 1 else np.array([0.35])
        rng = np.random.default_rng(seed)
        topic = rng.integers(0, n_topics, n_pop)
        s = rng.random(n_pop) < self.pi[topic]
        x = np.where(s, regime.d / 2, -regime.d / 2) + rng.normal(size=n_pop)
        v = np.abs(x - regime.c) + SIGMA_CONF * rng.normal(size=n_pop)
        self.conf_cuts = np.quantile(v, np.cumsum(regime.conf_shares)[:-1])
        h = x + 0.7 * rng.normal(size=n_pop)
        self.harm_cuts = np.quantile(h, HARM_Q)
        self.pop = self._features(x, topic, rng)
        if regime.flat is not None:
            self.pop["p_correct"] = np.full(n_pop, regime.flat)
        else:
            f1 = self.pi[topic] * norm.pdf(x - regime.d / 2)
            post = f1 / (f1 + (1 - self.pi[topic]) * norm.pdf(x + regime.d / 2))
            self.pop["p_correct"] = np.where(self.pop["will_refuse"], post, 1 - post)
        self.pop["w"] = np.ones(n_pop)
        if logprob is None:     # the score depends on the cell only: evaluate on cells, exactly
            p = self.pop
            key = ((p["topic"].astype(np.int64) * 2 + p["will_refuse"]) * 6 + p["confidence"]) * 6 + p["harm_rating"]
            _, first, inv = np.unique(key, return_index=True, return_inverse=True)
            w = np.bincount(inv).astype(np.float64)
            cells = {k: v[first] for k, v in p.items() if k not in ("p_correct", "w")}
            cells["p_correct"] = np.bincount(inv, weights=p["p_correct"]) / w
            cells["w"] = w
            self.pop = cells

    def _features(self, x: np.ndarray, topic: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        r = self.r
        wr = x > r.c
        v = np.abs(x - r.c) + SIGMA_CONF * rng.normal(size=x.size)
        out = {"will_refuse": wr, "topic": topic.astype(np.int32),
               "confidence": (1 + np.searchsorted(self.conf_cuts, v)).astype(np.int8),
               "harm_rating": (1 + np.searchsorted(self.harm_cuts, x + 0.7 * rng.normal(size=x.size))).astype(np.int8)}
        if self.logprob == "signal":
            out["p_refuse_logprob"] = expit(1.5 * (x - r.c) + 0.7 * rng.normal(size=x.size))
        elif self.logprob == "none":
            out["p_refuse_logprob"] = expit(np.where(wr, 2.5, -2.5) + rng.normal(size=x.size))
        return out

    def draw(self, n: int, rng: np.random.Generator, reps: int = 3) -> DatapointTable:
        n_prompts = n // reps
        prompt = np.repeat(np.arange(n_prompts, dtype=np.int32), reps)
        ptopic = (np.arange(n_prompts) % self.n_topics)
        topic = ptopic[prompt]
        s = (rng.random(n_prompts) < self.pi[ptopic])[prompt]
        a = rng.normal(0, np.sqrt(self.rho), n_prompts)[prompt]
        x = np.where(s, self.r.d / 2, -self.r.d / 2) + a + rng.normal(0, np.sqrt(1 - self.rho), prompt.size)
        f = self._features(x, topic, rng)
        if self.r.flat is not None:
            g = rng.normal(0, np.sqrt(self.rho), n_prompts)[prompt] + rng.normal(0, np.sqrt(1 - self.rho), prompt.size)
            correct = g > norm.ppf(1 - self.r.flat)
            refused = np.where(correct, f["will_refuse"], ~f["will_refuse"])
        else:
            refused = s
        return DatapointTable.from_arrays(prompt=prompt, refused=refused,
                                          topics=[f"t{i}" for i in range(self.n_topics)], **f)

    # -- evaluation on the population --------------------------------------------------------
    def evaluate(self, score: np.ndarray, cuts: dict[str, tuple[float, float]],
                 group_of: np.ndarray) -> tuple[bool, bool, float]:
        """For a policy with per-group (block, pass) cuts (``group_of[t]`` names topic t's group):
        (every group routes at true accuracy >= target, every side of every group does, share routed)."""
        wr, pc, topic, w = self.pop["will_refuse"], self.pop["p_correct"], self.pop["topic"], self.pop["w"]
        routed = np.zeros(wr.size, dtype=bool)
        ok = side_ok = True

        def acc(r: np.ndarray) -> float:
            return float(np.sum(w[r] * pc[r]) / np.sum(w[r]))

        for g, (b, p) in cuts.items():
            in_g = np.isin(topic, np.flatnonzero(group_of == g))
            r_g = in_g & np.where(wr, score >= b, score >= p)
            if r_g.any():
                routed |= r_g
                ok &= acc(r_g) >= TARGET
                for side in (wr, ~wr):
                    if (r_g & side).any():
                        side_ok &= acc(r_g & side) >= TARGET
        return ok, side_ok, float(w[routed].sum() / w.sum())

    def score_pop(self, rec: Recalibrator) -> np.ndarray:
        p = self.pop
        return rec.apply_many(p["will_refuse"], p["confidence"], p["harm_rating"], p["topic"],
                              topic_names=[f"t{i}" for i in range(self.n_topics)],
                              p_refuse_logprob=p.get("p_refuse_logprob"))


def _cut(v: float | None) -> float:
    return np.inf if v is None else v


def run_new(world: World, table: DatapointTable, rng: np.random.Generator) -> tuple[bool, bool, float]:
    fit_rows = split_prompts(len(table.prompt_ids), FIT_FRACTION, rng)[table.prompt]
    rec, score, cert = fit_and_certify(table, fit_rows, TARGET, CONFIDENCE)
    names = np.array([f"t{i}" for i in range(world.n_topics)], dtype=object)
    group_of = np.array([n if n in cert.own_topics else GLOBAL for n in names], dtype=object)
    th = policy_thresholds(cert, score, table.will_refuse, table.topic, table.topics)
    cuts = {g: (_cut(t.block), _cut(t.pass_)) for g, t in th.items()}
    return world.evaluate(world.score_pop(rec), cuts, group_of)


def run_old(world: World, table: DatapointTable, rng: np.random.Generator) -> tuple[bool, bool, float]:
    """Policy schema 1: 50/50 split, per topic and side ltt_threshold at delta/2 (no logprob)."""
    fit_rows = split_prompts(len(table.prompt_ids), 0.5, rng)[table.prompt]
    cal = ~fit_rows
    names = [f"t{i}" for i in range(world.n_topics)]
    rec = Recalibrator().fit(table.will_refuse[fit_rows], table.confidence[fit_rows], table.harm_rating[fit_rows],
                             table.topic[fit_rows], table.correct[fit_rows], topic_names=names)
    score = rec.apply_many(table.will_refuse, table.confidence, table.harm_rating, table.topic, topic_names=names)
    delta = (1 - CONFIDENCE) / 2
    cuts = {}
    for t, name in enumerate(names):
        m = cal & (table.topic == t)
        th = [ltt_threshold(score[m & (table.will_refuse == w)], table.correct[m & (table.will_refuse == w)],
                            TARGET, delta, unit=table.prompt[m & (table.will_refuse == w)]).threshold
              for w in (True, False)]
        cuts[name] = (_cut(th[0]), _cut(th[1]))
    pop = world.pop
    score_pop = rec.apply_many(pop["will_refuse"], pop["confidence"], pop["harm_rating"], pop["topic"], topic_names=names)
    return world.evaluate(score_pop, cuts, np.array(names, dtype=object))


def conf5_check(table: DatapointTable) -> bool:
    """One cluster-corrected Clopper-Pearson check of "confidence 5 only" on all the data."""
    m = table.confidence == 5
    return bool(m.any() and 1 - cluster_bound(~table.correct[m], table.prompt[m], 1 - CONFIDENCE).upper >= TARGET)


def row(world: World, n: int, deployments: int, seed: int, old: bool = True) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    res: dict[str, list[float]] = {k: [] for k in ("old_ok", "old_side", "old_cov", "new_ok", "new_side",
                                                   "new_cov", "c5")}
    for _ in range(deployments):
        table = world.draw(n, rng)
        for name, fn in (("new", run_new), ("old", run_old)) if old else (("new", run_new),):
            ok, side_ok, cov = fn(world, table, rng)
            res[f"{name}_ok"].append(ok)
            res[f"{name}_side"].append(side_ok)
            res[f"{name}_cov"].append(cov)
        res["c5"].append(conf5_check(table))
    c5 = world.pop["confidence"] == 5
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in res.items()}
    out["new_routed_any"] = float(np.mean(np.asarray(res["new_cov"]) > 0))
    out["old_routed_any"] = float(np.mean(np.asarray(res["old_cov"]) > 0)) if old else float("nan")
    w = world.pop["w"]
    out["c5_cov"] = float(w[c5].sum() / w.sum())
    out["c5_acc"] = float(np.sum(w[c5] * world.pop["p_correct"][c5]) / w[c5].sum())
    return out


def _main_row(job: tuple) -> tuple:
    regime, n_topics, n, d, seed, world_seed, rho = job
    return job, row(World(regime, n_topics, None, seed=world_seed, rho=rho), n, d, seed)


def _lp_row(job: tuple) -> tuple:
    regime, lp, d, seed, world_seed, rho = job
    return job, row(World(regime, 1, lp, seed=world_seed, n_pop=100_000, rho=rho), 9000, d, seed, old=False)


def main() -> None:
    from concurrent.futures import ProcessPoolExecutor

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deployments", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="50 deployments, for a smoke run")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (rows are seeded independently)")
    ap.add_argument("--rho", type=float, default=RHO, help="share of evidence variance a prompt's paraphrases share")
    ap.add_argument("--only", help="only regimes whose name contains this (skips the continuous-score table)")
    args = ap.parse_args()
    d = 50 if args.quick else args.deployments
    t0 = time.perf_counter()
    se = np.sqrt(0.95 * 0.05 / d)
    print(f"target accuracy {TARGET}, confidence {CONFIDENCE}; paraphrases share {args.rho:.0%} of the evidence "
          f"variance; {d} deployments per row (binomial SE of a "
          f"share near .95: {se:.3f}, near .99: {np.sqrt(0.99 * 0.01 / d):.3f})\n"
          f"met = share of deployments where every threshold group's auto-routed requests have true accuracy "
          f">= target (the guarantee; groups are topics for the old procedure); side = the same for every "
          f"side of every group (claimed by the old procedure, not by the new); cov = mean share of requests "
          f"auto-routed; any = share of deployments auto-routing something; conf5 = the 'confidence 5 only' "
          f"rule: coverage, true accuracy, share of deployments where one cluster-corrected Clopper-Pearson "
          f"check on all the data certifies it")
    head = (f"{'regime':<20}{'topics':>6}{'n':>6}  {'old met':>7}{'side':>6}{'cov':>6}{'any':>6}  {'new met':>7}"
            f"{'side':>6}{'cov':>6}{'any':>6}  {'conf5 cov':>9}{'acc':>7}{'cert':>6}")
    print(head)
    print("-" * len(head))
    jobs = [(regime, n_topics, n, d, args.seed + 100 * i + 10 * j + k, 10_000 + args.seed + 10 * i + j, args.rho)
            for i, regime in enumerate(REGIMES) for j, n_topics in enumerate((1, 10)) for k, n in enumerate((900, 9000))
            if args.only is None or args.only in regime.name]
    lp_jobs = [(regime, lp, d, args.seed + 5000 + 10 * i + j, 20_000 + args.seed + i, args.rho)
               for i, regime in enumerate((REGIMES[4], REGIMES[0])) for j, lp in enumerate((None, "none", "signal"))
               if args.only is None]
    with ProcessPoolExecutor(args.jobs) as pool:
        lp_results = pool.map(_lp_row, lp_jobs)
        for (regime, n_topics, n, *_), r in pool.map(_main_row, jobs):
            print(f"{regime.name:<20}{n_topics:>6}{n:>6}  {r['old_ok']:>7.3f}{r['old_side']:>6.3f}"
                  f"{r['old_cov']:>6.3f}{r['old_routed_any']:>6.2f}  {r['new_ok']:>7.3f}{r['new_side']:>6.3f}"
                  f"{r['new_cov']:>6.3f}{r['new_routed_any']:>6.2f}"
                  f"  {r['c5_cov']:>9.3f}{r['c5_acc']:>7.4f}{r['c5']:>6.2f}", flush=True)
        if lp_jobs:
            print()
            print("continuous score (p_refuse_logprob), new procedure, 1 topic, n = 9000")
            head2 = f"{'regime':<20}{'logprob':>12}  {'met':>6}{'cov':>7}"
            print(head2)
            print("-" * len(head2))
        for (regime, lp, *_), r in lp_results:
            print(f"{regime.name:<20}{str(lp if lp else 'absent'):>12}  {r['new_ok']:>6.3f}{r['new_cov']:>7.3f}",
                  flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
