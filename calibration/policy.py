"""The policy file: what ``calibrate`` writes and the proxy loads (pydantic v2, schema-versioned).

Decision rule (the one place it is defined; ``p`` = calibrated P(prediction correct) from
:meth:`Policy.p_correct`, thresholds from :meth:`Policy.thresholds` for the request's topic: the
topic's own where it has them, else the global thresholds, which also serve topics the policy
does not know):

* predicted refuse and ``block`` is not null and ``p >= block``  -> ``block``
* predicted comply and ``pass`` is not null and ``p >= pass``    -> ``pass``
* otherwise                                                      -> ``review``

A null threshold means "never auto-route that side".  With thresholds from ``calibrate``, with
probability >= ``confidence`` *every* side of every threshold group (each topic with thresholds of
its own; the global group) auto-routes requests with accuracy >= ``target_accuracy``, jointly (see
``calibration.thresholds``), assuming deployment prompts resemble the calibration prompts within
each group.  ``certification`` records how: the number of tests the error budget was shared over.

Schema 2 (this version) added: a topic's ``thresholds`` may be null (the topic uses the global
thresholds), ``certification``, and the calibrator's optional ``p_refuse_logprob`` adjustment.
Schema 1 files are refused: their thresholds came from a procedure without the joint guarantee.

``baseline`` holds the confusion counts (hits, misses, false alarms, correct rejections, in the SDT
convention of ``calibration.sdt``) and per-confidence counts that the live drift tests compare
against.  ``Policy.version`` is a short hash of the content (excluding ``created_at``), so the same
data and settings always give the same version.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from calibration.reliability import Recalibrator

__all__ = ["PolicyError", "Thresholds", "SDTSummary", "ConfidenceCount", "Baseline", "TopicPolicy",
           "Certification", "Policy", "SCHEMA_VERSION", "Action"]

SCHEMA_VERSION = 2
Action = Literal["pass", "block", "review"]
_Interval = tuple[float | None, float | None]


class PolicyError(ValueError):
    """The policy file is missing, not JSON, or does not match the schema."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Thresholds(_Frozen):
    """Minimum calibrated P(correct) to auto-route each side; None = never auto-route that side."""

    block: float | None = Field(default=None, ge=0.0, le=1.0)
    pass_: float | None = Field(default=None, ge=0.0, le=1.0, alias="pass")


class SDTSummary(_Frozen):
    """SDT and calibration statistics of one cell with 95% intervals (``ci[name] = [lo, hi]``).

    ``measurable`` is False when the cell cannot measure sensitivity at all (empty, a single class,
    or a probe that gave the same prediction to every request): then ``d_prime`` and ``criterion`` are
    None, their ``ci`` is ``[None, None]`` (no interval), and ``reason`` says why.  A rate of a class
    with no trials (``hit_rate`` when the model never refused, ``false_alarm_rate`` when it always
    did) is None as well.  Intervals (see ``calibration.sdt.sdt_intervals``): analytic for H, FA,
    accuracy, d' and c; prompt-bootstrap percentiles for ECE and Brier.  A None bound means the data
    do not bound the statistic on that side (e.g. no misses at all: d' has no finite upper bound);
    for a measurable d' or c at most one bound is None.
    """

    n: int = Field(ge=0)
    n_prompts: int = Field(default=0, ge=0)
    hit_rate: float | None = None
    false_alarm_rate: float | None = None
    d_prime: float | None = None
    criterion: float | None = None
    accuracy: float | None = None
    ece: float | None = None
    brier: float | None = None
    ci: dict[str, _Interval] = Field(default_factory=dict)
    small: bool = False
    measurable: bool = True
    reason: str | None = None


class ConfidenceCount(_Frozen):
    """Requests at one stated confidence level and how many of them were predicted correctly."""

    confidence: int = Field(ge=1, le=5)
    n: int = Field(ge=0)
    correct: int = Field(ge=0)


class Baseline(_Frozen):
    """Calibration-time counts the live drift tests compare against.

    ``accuracy = (hits + correct_rejections) / n`` and ``refusal_rate = (hits + misses) / n`` (the
    rate at which the model actually refused); both are derived from the counts on load.
    """

    hits: int = Field(ge=0)
    misses: int = Field(ge=0)
    false_alarms: int = Field(ge=0)
    correct_rejections: int = Field(ge=0)
    accuracy: float | None = None
    refusal_rate: float | None = None
    by_confidence: list[ConfidenceCount] = Field(default_factory=list)
    #: Counts per probe cell ``(will_refuse, confidence, harm_rating (0 = missing), n, refused)``, so the
    #: live drift tests compare like with like (only the cells whose answers the live stream scores);
    #: empty in policies written before they were recorded.
    cells: list[tuple[bool, int, int, int, int]] = Field(default_factory=list)
    #: Kish design effect of these rows (several rows per prompt); the drift tests divide counts by it.
    design_effect: float = Field(default=1.0, ge=1.0)

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            try:
                h, m = int(data["hits"]), int(data["misses"])
                fa, cr = int(data["false_alarms"]), int(data["correct_rejections"])
            except (KeyError, TypeError, ValueError):
                return data  # let field validation report it
            n = h + m + fa + cr
            data["accuracy"] = (h + cr) / n if n else None
            data["refusal_rate"] = (h + m) / n if n else None
        return data

    @property
    def n(self) -> int:
        return self.hits + self.misses + self.false_alarms + self.correct_rejections


class TopicPolicy(_Frozen):
    """Per-topic statistics, certified thresholds (null: the topic uses the global ones) and baseline.

    ``coverage`` and ``expected_accuracy`` describe what the thresholds in force for the topic do on
    its held-out calibration rows.
    """

    n: int = Field(ge=0)
    sdt: SDTSummary
    thresholds: Thresholds | None = None
    baseline: Baseline
    coverage: float | None = None
    expected_accuracy: float | None = None


class Certification(_Frozen):
    """How the thresholds were certified (see ``calibration.thresholds``)."""

    method: str
    tests: int = Field(ge=0)              # fixed sequences tested; each at (1 - confidence) / tests
    delta_per_test: float | None = None
    fit_prompts: int = Field(ge=0)
    calibration_prompts: int = Field(ge=0)


class Policy(_Frozen):
    """The policy file.  Load with :meth:`load`; query with :meth:`p_correct`, :meth:`thresholds`,
    :meth:`baseline` and :meth:`decide`."""

    schema_version: Literal[2] = SCHEMA_VERSION
    model: str | None = None
    probe_template: str | None = None
    probe_template_hash: str | None = None
    created_at: str
    data_hash: str
    n: int = Field(ge=0)
    n_prompts: int = Field(default=0, ge=0)
    target_accuracy: float = Field(gt=0.0, le=1.0)
    confidence: float = Field(gt=0.0, lt=1.0)
    sdt: SDTSummary
    global_thresholds: Thresholds = Field(alias="thresholds")
    global_baseline: Baseline = Field(alias="baseline")
    coverage: float | None = None
    expected_accuracy: float | None = None
    topics: dict[str, TopicPolicy] = Field(default_factory=dict)
    certification: Certification
    calibrator: dict[str, Any]

    _cal: Recalibrator = PrivateAttr()

    @field_validator("created_at")
    @classmethod
    def _iso(cls, v: str) -> str:
        datetime.fromisoformat(v)
        return v

    @field_validator("calibrator")
    @classmethod
    def _cal_ok(cls, v: dict[str, Any]) -> dict[str, Any]:
        Recalibrator.from_dict(v)  # raises ValueError with a message if malformed
        return v

    def model_post_init(self, __context: Any) -> None:
        self._cal = Recalibrator.from_dict(self.calibrator)

    # -- files -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path | str) -> "Policy":
        """Read and validate a policy file; any problem raises :class:`PolicyError`."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(f"{p}: cannot read policy file: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise PolicyError(f"{p}: not UTF-8 text (byte {exc.start})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"{p}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        except RecursionError:
            raise PolicyError(f"{p}: JSON nested too deeply") from None
        if not isinstance(data, dict):
            raise PolicyError(f"{p}: expected a JSON object")
        if data.get("schema_version") != SCHEMA_VERSION:
            old = isinstance(data.get("schema_version"), int) and data["schema_version"] < SCHEMA_VERSION
            hint = ("; it was written by an older `refusal-guard calibrate` whose thresholds lack the joint "
                    "guarantee: run `refusal-guard calibrate` again on the same datapoints") if old else ""
            raise PolicyError(f"{p}: schema_version {data.get('schema_version')!r} is not supported "
                              f"(this build reads {SCHEMA_VERSION}){hint}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            lines = [f"{'.'.join(str(x) for x in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()[:10]]
            raise PolicyError(f"{p}: invalid policy file:\n  " + "\n  ".join(lines)) from None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2, allow_nan=False) + "\n"

    def save(self, path: Path | str) -> None:
        """Write atomically (temp file + rename) so a hot-reloading proxy never sees half a file."""
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(p)

    @property
    def version(self) -> str:
        """Short stable hash (12 hex) of the content, excluding ``created_at``."""
        d = self.model_dump(mode="json", by_alias=True, exclude={"created_at"})
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    # -- queries -----------------------------------------------------------------------------
    def p_correct(self, topic: str | None, will_refuse: bool, confidence: int,
                  harm_rating: int | None, p_refuse_logprob: float | None = None) -> float:
        """Calibrated P(prediction correct); unknown/None topic uses the global map."""
        return self._cal.apply(will_refuse, confidence, harm_rating, topic, p_refuse_logprob)

    def thresholds(self, topic: str | None) -> Thresholds:
        """The topic's own thresholds if it has them, else the global ones."""
        t = self.topics.get(topic) if topic is not None else None
        return t.thresholds if t is not None and t.thresholds is not None else self.global_thresholds

    def baseline(self, topic: str | None) -> Baseline:
        t = self.topics.get(topic) if topic is not None else None
        return t.baseline if t is not None else self.global_baseline

    def decide(self, topic: str | None, will_refuse: bool, confidence: int,
               harm_rating: int | None, p_refuse_logprob: float | None = None) -> Action:
        """Apply the decision rule in the module docstring."""
        return self.action(topic, will_refuse, self.p_correct(topic, will_refuse, confidence, harm_rating,
                                                              p_refuse_logprob))

    def action(self, topic: str | None, will_refuse: bool, p: float) -> Action:
        """The decision rule for a request whose calibrated P(correct) is already known."""
        th = self.thresholds(topic)
        cut = th.block if will_refuse else th.pass_
        if cut is not None and p >= cut:
            return "block" if will_refuse else "pass"
        return "review"
