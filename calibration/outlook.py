"""What the calibrated policy will do, in words: the opening of the report.

PROVISIONAL (issue 18): the thresholds engineer (issue 14) writes the real version of this module
with exactly this interface; the report renders only through :class:`Outlook` and
:func:`policy_outlook`.  Here the shares are computed simply: the policy's own decision rule
(:meth:`calibration.policy.Policy.decide`) applied to every datapoint it was calibrated on.

``more_datapoints`` (when nothing is certified) is a rough planning figure, not a promise: for the
side whose best-scoring requests are most accurate, the number of datapoints at which a one-sided
Clopper-Pearson bound at that side's level (``(1 - confidence) / 2``), with that observed accuracy
and the data's design effect, would reach the target, scaled by how often that group occurs and
by the half of the prompts the certification uses, plus 50% for the randomness of that split
and of sampling (tests/test_report.py checks that the figure suffices and that half of it does
not, on data where only the amount limits certification).  None when the observed accuracy is not above
the target (more of the same data cannot certify it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from calibration.thresholds import cp_lower

if TYPE_CHECKING:
    from calibration.calibrate import CalibrationResult

__all__ = ["Outlook", "policy_outlook"]

_SIDE_WORDS = {"block": ("predicted refusals", "blocked"), "pass": ("predicted compliances", "passed")}


@dataclass(frozen=True)
class Outlook:
    """The shares of requests the policy auto-blocks, auto-passes and sends to review, and why."""

    share_block: float
    share_pass: float
    share_review: float
    certified: bool
    guarantee: str
    why_not: str | None
    more_datapoints: int | None

    def lines(self) -> list[str]:
        """Plain sentences, the first saying what happens to requests."""
        out = [f"On traffic like the calibration data, the policy blocks {self.share_block:.0%} of requests "
               f"automatically, passes {self.share_pass:.0%} automatically and sends {self.share_review:.0%} "
               f"to review."]
        out.append(self.guarantee)
        if self.why_not:
            out.append(self.why_not)
        if not self.certified:
            if self.more_datapoints is not None:
                out.append(f"About {self.more_datapoints:,} more datapoints like these could certify a threshold "
                           "(a rough estimate: collect them with refusal-guard collect and calibrate again).")
            else:
                out.append("More datapoints like these would not change that: the model's self-predictions are not "
                           "accurate enough at any confidence; a model that predicts its refusals better, or a "
                           "lower --target-accuracy, would.")
        return out


def _shares(result: "CalibrationResult") -> tuple[float, float, float]:
    table, policy = result.table, result.policy
    if table.n == 0:
        return 0.0, 0.0, 1.0
    names = table.topics
    keys = np.stack([table.topic.astype(np.int64), table.will_refuse.astype(np.int64),
                     table.confidence.astype(np.int64), table.harm_rating.astype(np.int64)], axis=1)
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    actions = [policy.decide(names[t] if t >= 0 else None, bool(wr), int(c), int(h) if h > 0 else None)
               for t, wr, c, h in uniq]
    counts = np.bincount(inv.ravel(), minlength=len(actions))
    total = float(table.n)
    block = sum(int(n) for n, a in zip(counts, actions) if a == "block") / total
    pass_ = sum(int(n) for n, a in zip(counts, actions) if a == "pass") / total
    return block, pass_, max(0.0, 1.0 - block - pass_)


def _n_needed(accuracy: float, target: float, delta: float) -> int | None:
    """Smallest n with cp_lower(accuracy * n, n, delta) >= target (None if accuracy <= target)."""
    if accuracy <= target:
        return None
    n = 1
    while float(cp_lower(accuracy * n, n, delta)) < target:
        n *= 2
        if n > 10**8:
            return None
    lo, hi = n // 2, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if float(cp_lower(accuracy * mid, mid, delta)) >= target else (mid, hi)
    return hi


def _why_not_and_more(result: "CalibrationResult") -> tuple[str, int | None]:
    pol = result.policy
    target, delta = pol.target_accuracy, (1.0 - pol.confidence) / 2.0
    n_min = int(np.ceil(np.log(delta) / np.log(target)))
    sides = result.sides.get("(global)", {})
    reasons: list[str] = []
    estimates: list[int] = []
    cal_rows = max(result.split.get("calibration_rows", 0), 1)
    fraction_cal = cal_rows / max(result.table.n, 1)
    for side in ("block", "pass"):
        words, verb = _SIDE_WORDS[side]
        st = sides.get(side)
        n_side = st.n_total if st is not None else 0
        if n_side == 0:
            reasons.append(f"the calibration half holds no {words}, so nothing can be {verb} automatically")
            continue
        deff = st.design_effect if st is not None else 1.0
        # the best-scoring candidate group of this side: the rows with the highest stated confidence
        wr = result.table.will_refuse == (side == "block")
        conf = result.table.confidence
        best = wr & (conf == conf[wr].max()) if wr.any() else wr
        acc = float((result.table.will_refuse[best] == result.table.refused[best]).mean()) if best.any() else 0.0
        if n_side / deff < n_min:
            reasons.append(f"only {n_side} {words} were held out to certify on (about {n_side / deff:.0f} "
                           f"independent ones); even with no error, {n_min} are needed for "
                           f"{target:.0%} accuracy at {pol.confidence:.0%} confidence")
        else:
            reasons.append(f"the most confident {words} (confidence {int(conf[best].max())}) were right only "
                           f"{acc:.1%} of the time, which cannot show {target:.0%} at {pol.confidence:.0%} confidence")
        need = _n_needed(acc, target, delta)
        share = best.sum() / max(result.table.n, 1)
        if need is not None and share > 0:
            # x 1.5: room for the random split by prompt and sampling noise, so the figure is enough
            # in most re-runs rather than in half of them
            estimates.append(int(np.ceil(1.5 * need * deff / share / fraction_cal)) - result.table.n)
    why = "Why: " + "; ".join(reasons) + "."
    more = max(min(estimates), 1) if estimates else None
    return why, more


def policy_outlook(result: "CalibrationResult") -> Outlook:
    """The outlook of ``result.policy`` on the datapoints it was calibrated on."""
    pol = result.policy
    block, pass_, review = _shares(result)
    th = [pol.global_thresholds, *(t.thresholds for t in pol.topics.values())]
    certified = any(t.block is not None or t.pass_ is not None for t in th)
    if certified:
        guarantee = (f"Guarantee: with {pol.confidence:.0%} confidence, at least {pol.target_accuracy:.0%} of "
                     "auto-routed requests (blocked or passed without review) are routed correctly, provided "
                     "live traffic resembles the calibration data.")
        why_not, more = None, None
    else:
        guarantee = ("No threshold was certified, so there is no accuracy guarantee to state: every request is "
                     "forwarded and sent to review, none is blocked or passed on the guard's word.")
        why_not, more = _why_not_and_more(result)
    return Outlook(share_block=block, share_pass=pass_, share_review=review, certified=certified,
                   guarantee=guarantee, why_not=why_not, more_datapoints=more)
