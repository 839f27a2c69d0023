"""The policy in force: load, validate, hot-swap, and turn a prediction into an action.

A calibrated policy (``calibration.policy.Policy``, written by ``refusal-guard calibrate``)
is enforced only if it was fitted with the probe template that is running: P(correct) from
another probe wording means nothing. A mismatched policy is kept for its figures but the
guard runs in shadow and says so (log line and ``refusal_guard_policy_info{enforced="false"}``).

Without a calibrated policy the documented default applies:
block predicted refusals stated at confidence 5; review when confidence <= 3 or
harm_rating == 3; pass otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from calibration.policy import Policy, PolicyError
from guard.live.metrics import GuardMetrics
from guard.probe.template import Prediction

log = logging.getLogger("refusal_guard")


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # pass | block | review
    p_correct: float | None


@dataclass(frozen=True, slots=True)
class ActivePolicy:
    policy: Policy | None
    enforced: bool
    note: str

    @property
    def version(self) -> str:
        return self.policy.version if self.policy else "default"

    @property
    def template(self) -> str:
        return (self.policy.probe_template or "unknown") if self.policy else "default"

    def decide(self, prediction: Prediction) -> Decision:
        if self.policy is None:
            return default_decision(prediction)
        p, topic = prediction, prediction.topic
        p_correct = self.policy.p_correct(topic, p.will_refuse, p.confidence, p.harm_rating, p.p_refuse_logprob)
        return Decision(self.policy.action(topic, p.will_refuse, p_correct), p_correct)


def default_decision(prediction: Prediction) -> Decision:
    if prediction.will_refuse and prediction.confidence == 5:
        return Decision("block", None)
    if prediction.confidence <= 3 or prediction.harm_rating == 3:
        return Decision("review", None)
    return Decision("pass", None)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    message: str
    version: str


class PolicyStore:
    """Holds the active policy; ``reload`` swaps it atomically or keeps the old one."""

    def __init__(self, path: Path | None, template_hash: str, metrics: GuardMetrics) -> None:
        self.path = path
        self.template_hash = template_hash
        self.metrics = metrics
        self.current = ActivePolicy(None, True, "no policy file configured: default rule")
        self._exported_info: tuple[str, str, str] | None = None
        self._exported_baseline: set[tuple[str, str]] = set()
        if path is not None:
            result = self.reload()
            if not result.ok:
                raise PolicyError(result.message)
        self._export()

    def reload(self) -> ReloadResult:
        """Re-read the policy file. On any error the policy in force stays and the reason is returned."""
        if self.path is None:
            return ReloadResult(False, "no policy file configured", self.current.version)
        try:
            policy = Policy.load(self.path)
        except PolicyError as exc:
            log.error("policy reload failed, keeping version %s: %s", self.current.version, exc)
            return ReloadResult(False, str(exc), self.current.version)
        if policy.probe_template_hash != self.template_hash:
            note = (f"policy {policy.version} was fitted with probe template hash {policy.probe_template_hash}, "
                    f"running probe is {self.template_hash}: not enforced, running in shadow")
            log.warning(note)
            self.current = ActivePolicy(policy, False, note)
        else:
            self.current = ActivePolicy(policy, True, f"policy {policy.version} enforced")
            log.info("policy %s loaded from %s", policy.version, self.path)
        self._export()
        return ReloadResult(True, self.current.note, self.current.version)

    def _export(self) -> None:
        """Publish the policy in force. Old series are set to 0 / NaN rather than removed,
        because prometheus-client's multiprocess mode cannot remove series."""
        active = self.current
        if self._exported_info is not None:
            self.metrics.policy_info.labels(*self._exported_info).set(0)
        self._exported_info = (active.version, active.template, str(active.enforced).lower())
        self.metrics.policy_info.labels(*self._exported_info).set(1)
        values: dict[tuple[str, str], float] = {}
        if active.policy is not None:
            summaries = {"all": active.policy.sdt, **{t: tp.sdt for t, tp in active.policy.topics.items()}}
            for topic, sdt in summaries.items():
                for statistic in ("d_prime", "criterion", "accuracy", "hit_rate", "false_alarm_rate"):
                    value = getattr(sdt, statistic, None)
                    if value is not None:
                        values[(topic, statistic)] = value
        for key in self._exported_baseline - values.keys():
            self.metrics.policy_baseline.labels(*key).set(float("nan"))
        for key, value in values.items():
            self.metrics.policy_baseline.labels(*key).set(value)
        self._exported_baseline = set(values)
