"""What a calibrated policy will do, in words: the report's opening (rendered by ``calibration.report``).

:func:`policy_outlook` reads a :class:`~calibration.calibrate.CalibrationResult` and returns an
:class:`Outlook`: the shares of the calibration datapoints the policy auto-blocks, auto-passes and
sends to review; the guarantee in words; and, when nothing is certified, why, and about how many
more datapoints would make a threshold certifiable.

The estimate of "how many more": over the nested sets the policy could route (the calibrated
P(correct) of every datapoint, highest first), each set with observed error rate ``p`` below
``1 - target``, share routed ``r`` and design effect ``deff`` (as in ``calibration.thresholds``)
needs about ``n_cal = deff * p (1 - p) (z(1 - delta) + z(0.8))^2 / (1 - target - p)^2`` routed
calibration-split rows (and at least the rows a zero-error set needs) for its test to pass with
probability about 0.8 (normal approximation), so about ``n_cal / (r * (1 - FIT_FRACTION))``
datapoints in all; the smallest over the sets, minus what there is, is the answer.  It assumes new
datapoints look like the ones at hand: an estimate to plan collection with, not a promise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import ndtri

from calibration.reliability import Recalibrator
from calibration.thresholds import _nested_bounds, icc, n_needed

if TYPE_CHECKING:
    from calibration.calibrate import CalibrationResult

__all__ = ["Outlook", "policy_outlook"]

_POWER = 0.8
_MIN_ROUTED = 30


@dataclass(frozen=True)
class Outlook:
    share_block: float
    share_pass: float
    share_review: float
    certified: bool
    guarantee: str
    why_not: str | None
    more_datapoints: int | None

    def lines(self) -> list[str]:
        """Plain sentences (no markup), in reading order."""
        out = [f"On the calibration datapoints the policy auto-blocks {_pct(self.share_block)}, auto-passes "
               f"{_pct(self.share_pass)} and sends {_pct(self.share_review)} to review."]
        if self.certified:
            out.append(self.guarantee[0].upper() + self.guarantee[1:] + ".")
        else:
            out.append(f"Nothing is certified, so every request goes to review: {self.why_not}.")
            if self.more_datapoints is not None:
                out.append(f"About {self.more_datapoints:,} more datapoints like these would likely make a "
                           f"threshold certifiable.")
            else:
                out.append("More datapoints like these would not make a threshold certifiable.")
        return out


def _pct(x: float) -> str:
    v = 100.0 * x
    return f"{v:.0f}%" if abs(v - round(v)) < 0.05 else f"{v:.1f}%"


def _scores(result: "CalibrationResult") -> np.ndarray:
    t = result.table
    rec = Recalibrator.from_dict(result.policy.calibrator)
    return rec.apply_many(t.will_refuse, t.confidence, t.harm_rating, t.topic, topic_names=t.topics,
                          p_refuse_logprob=t.p_refuse_logprob)


def _more_needed(result: "CalibrationResult", delta: float) -> tuple[int | None, float | None]:
    """(datapoints needed in all, or None; the lowest error rate of a set of >= _MIN_ROUTED rows)."""
    from calibration.calibrate import FIT_FRACTION

    t = result.table
    target = result.policy.target_accuracy
    eps = 1.0 - target
    score, correct = _scores(result), t.correct
    if score.size == 0:
        return None, None
    cand = np.unique(score)[::-1]
    n_cum = score.size - np.searchsorted(np.sort(score), cand, side="left")
    _, k, n, _, deff = _nested_bounds(score, ~correct, t.prompt, n_cum, delta,
                                      icc(t.prompt, correct, strata=score))
    p = k / n
    p_plan = (k + 1) / (n + 2)          # Laplace: the best of many noisy sets looks too good otherwise
    big = n >= min(_MIN_ROUTED, score.size)
    best_rate = float(p[big].min()) if big.any() else None
    z = float(ndtri(1.0 - delta) + ndtri(_POWER))
    need = []
    for pi, ni, di in zip(p_plan[big], n[big], deff[big]):
        if pi >= eps:
            continue
        n_cal = max(di * pi * (1 - pi) * z * z / (eps - pi) ** 2, float(n_needed(pi, target, delta, di) or 0))
        need.append(n_cal / ((ni / score.size) * (1.0 - FIT_FRACTION)))
    return (int(math.ceil(min(need))) if need else None), best_rate


def policy_outlook(result: "CalibrationResult") -> Outlook:
    """The outlook of a calibration run (see the module docstring)."""
    pol = result.policy
    counts = result.actions
    total = sum(counts.values()) or 1
    shares = {a: counts.get(a, 0) / total for a in ("block", "pass", "review")}
    cert = result.certified
    certified = cert is not None and any(st.threshold is not None for st in cert.groups.values())
    conf, target = _pct(pol.confidence), _pct(pol.target_accuracy)
    if certified:
        where = ""
        if cert.own_topics:
            where = (f", separately in {'topic' if len(cert.own_topics) == 1 else 'topics'} "
                     f"{', '.join(cert.own_topics)} (own thresholds) and in all other topics together")
        guarantee = (f"with {conf} confidence at least {target} of auto-routed requests are routed correctly"
                     f"{where}")
        return Outlook(shares["block"], shares["pass"], shares["review"], True, guarantee, None, None)

    guarantee = "no request is auto-routed, so there is no accuracy claim"
    delta = 1.0 - pol.confidence
    if result.split.get("calibration_rows", 0) == 0:
        return Outlook(shares["block"], shares["pass"], shares["review"], False, guarantee,
                       "there are too few prompts to hold any out for certification", None)
    # the selection step tests at delta / (1 + topics) (calibration.thresholds.certify_policy)
    needed, best = _more_needed(result, delta / (1 + len(result.table.topics)))
    if needed is None:
        acc = "" if best is None else (f" (the most accurate set of at least {_MIN_ROUTED} of them is right "
                                       f"{_pct(1 - best)} of the time)")
        why = (f"no group of requests the probe's answers pick out is at least {target} accurate on these "
               f"datapoints{acc}")
        return Outlook(shares["block"], shares["pass"], shares["review"], False, guarantee, why, None)
    tested = cert is not None and cert.tests > 0
    why = (f"the thresholds tested did not pass at {target} accuracy with {conf} confidence on the held-out "
           f"prompts" if tested else
           f"no set of requests is large enough to show {target} accuracy with {conf} confidence")
    return Outlook(shares["block"], shares["pass"], shares["review"], False, guarantee, why,
                   max(needed - pol.n, 1))
