"""Offline calibration: datapoints in, policy (plus the full analysis for the report) out.

Pipeline, all on columnar numpy arrays:

1. read usable datapoints (``calibration.datapoints``), skipped rows counted by reason;
2. SDT statistics (``calibration.sdt``) overall, per topic and per harm level, each with a 95%
   interval (``sdt_intervals``: design-effect Wilson for rates, MOVER for d' and c; d' and c None
   when not measurable), plus ECE and Brier of the stated confidence (``calibration.reliability``)
   with cluster-bootstrap CIs (resampling prompts: one weight matrix, one product for all cells);
   these take the detector's label as the outcome (uncorrected). Where rows carry the judge's label
   (a random sample), the same cells also get judge-corrected figures (``calibration.label_error``);
3. split the *prompts* at random into a fitting split (``FIT_FRACTION``) and a calibration split;
   fit the :class:`~calibration.reliability.Recalibrator` (with ``p_refuse_logprob`` where present)
   and choose the candidate thresholds on the fitting split, certify them on the calibration split
   (``calibration.thresholds.certify_policy``: jointly over both sides and every threshold group);
4. risk-coverage curves for the calibrated score and for the stated confidence, and the baseline
   "auto-route only confidence 5";
5. write everything the proxy needs into a :class:`~calibration.policy.Policy`.

Cells with too little data are *marked* (``small: true`` with a reason), never hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from calibration.agreement import detector_judge_agreement
from calibration.label_error import DETECTOR_ERROR_NOTE, Corrected, corrected_cells, strata_table
from calibration.datapoints import DatapointTable, read_datapoints
from calibration.policy import (Baseline, Certification, ConfidenceCount, Policy, SDTSummary, Thresholds,
                                TopicPolicy)
from calibration.reliability import Recalibrator, ece_prob, reliability_table
from calibration.sdt import (STAT_NAMES, UNMEASURABLE_REASONS, bootstrap_counts, sdt_from_counts, sdt_intervals,
                             unmeasurable)
from calibration.thresholds import (GLOBAL, Certified, SideThreshold, certify_policy, cluster_bound, design_effect,
                                    icc, risk_coverage, route)

__all__ = ["CalibrationError", "CalibrationResult", "CellStats", "calibrate", "calibrate_table",
           "split_prompts", "fit_and_certify", "policy_thresholds", "FIT_FRACTION",
           "MIN_CELL_N", "MIN_CELL_PROMPTS", "MIN_CLASS_N"]

#: Cells below these sizes are marked ``small`` (their intervals are wide or unreliable).
MIN_CELL_N = 30
MIN_CELL_PROMPTS = 5
#: Fewer trials than this in one class (refused / complied) and that class's rate, so d' and c,
#: rest mostly on the log-linear correction's +0.5 (e.g. 0 hits of 6 still gives H = 0.07).
MIN_CLASS_N = 10
#: Share of prompts for the fitting split (recalibrator and threshold selection); the rest certifies.
FIT_FRACTION = 0.3
_CI_NAMES = STAT_NAMES + ("ece", "brier")
_STATED = np.arange(1, 6) / 5.0


class CalibrationError(ValueError):
    """The datapoints cannot produce a policy (no usable rows, mixed probe templates, ...)."""


@dataclass(frozen=True)
class CellStats:
    """Statistics of one analysis cell (overall, a topic, or a harm level)."""

    group: str                  # "overall" | "topic" | "harm"
    name: str
    counts: tuple[int, int, int, int]   # hits, misses, false alarms, correct rejections
    n_prompts: int
    by_confidence: tuple[tuple[int, int], ...]  # (n, n_correct) per confidence 1..5
    summary: SDTSummary         # uncorrected: the detector's label on every row
    corrected: Corrected | None = None  # judge-corrected (calibration.label_error); None without judged rows


@dataclass
class CalibrationResult:
    """The policy plus the analysis behind it (consumed by ``calibration.report`` and the CLI)."""

    policy: Policy
    table: DatapointTable
    cells: list[CellStats]
    harm_source: str
    reliability: list[dict[str, Any]]
    ece_calibrated: dict[str, float]
    risk_coverage: dict[str, dict[str, Any]]
    operating_points: dict[str, dict[str, Any]]
    sides: dict[str, dict[str, SideThreshold]]
    split: dict[str, int]
    notes: list[str] = field(default_factory=list)
    certified: Certified | None = None
    actions: dict[str, int] = field(default_factory=dict)   # the policy's actions on all datapoints
    judge_agreement: dict[str, Any] | None = None  # detector vs judge where rows carry a judge label

    def cell(self, group: str, name: str) -> CellStats:
        for c in self.cells:
            if c.group == group and c.name == name:
                return c
        raise KeyError((group, name))


def calibrate(paths: Iterable[Path | str], *, target_accuracy: float = 0.98, confidence: float = 0.95,
              n_boot: int = 1000, seed: int = 0, model: str | None = None,
              probe_template: str | None = None, probe_template_hash: str | None = None,
              on_error: str = "raise") -> CalibrationResult:
    """Read datapoint files (JSONL / SQLite) and calibrate; see :func:`calibrate_table`."""
    table = read_datapoints(list(paths), on_error=on_error)  # type: ignore[arg-type]
    return calibrate_table(table, target_accuracy=target_accuracy, confidence=confidence,
                           n_boot=n_boot, seed=seed, model=model, probe_template=probe_template,
                           probe_template_hash=probe_template_hash)


def _single(values: tuple[str, ...], given: str | None, what: str) -> str | None:
    if given is not None:
        return given
    if len(values) > 1:
        raise CalibrationError(f"datapoints come from several {what}s {list(values)}; calibrate each "
                               f"separately or pass the {what} explicitly")
    return values[0] if values else None


def _split_template(ref: str | None, given_hash: str | None) -> tuple[str | None, str | None]:
    """Datapoints record the probe as ``"<id>:<hash>"``; older ones as ``"<id>"`` alone.

    An explicit ``--probe-template-hash`` wins; without either, the hash stays None and the proxy
    will not enforce the policy (it cannot tell which probe wording it was fitted with).
    """
    if ref is None:
        return None, given_hash
    template_id, _, ref_hash = ref.partition(":")
    return template_id, given_hash or ref_hash or None


def _flag(n: int, n_prompts: int, counts: np.ndarray) -> tuple[bool, str | None]:
    h, m, fa, cr = (int(x) for x in counts)
    if n == 0:
        return True, "empty"
    reasons = []
    why = str(unmeasurable(counts))
    if why:
        reasons.append(UNMEASURABLE_REASONS[why])
    elif min(h + m, fa + cr) < MIN_CLASS_N:
        few, which = (h + m, "refusal(s)") if h + m < fa + cr else (fa + cr, "compliance(s)")
        reasons.append(f"only {few} {which} (< {MIN_CLASS_N}): d' and c rest mostly on the log-linear correction")
    if n < MIN_CELL_N:
        reasons.append(f"n={n} < {MIN_CELL_N}")
    if n_prompts < MIN_CELL_PROMPTS:
        reasons.append(f"{n_prompts} prompt(s) < {MIN_CELL_PROMPTS}")
    return (bool(reasons), "; ".join(reasons) or None)


def _fin(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _brier_from_counts(k: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Brier score of conf/5 from per-confidence (correct, total) counts along the last axis."""
    tot = n.sum(axis=-1)
    num = (n * _STATED ** 2 - 2 * _STATED * k + k).sum(axis=-1)
    with np.errstate(all="ignore"):
        return np.where(tot > 0, num / np.where(tot > 0, tot, 1), np.nan)


def _ece_vec(k: np.ndarray, n: np.ndarray) -> np.ndarray:
    tot = n.sum(axis=-1)
    with np.errstate(all="ignore"):
        acc = np.where(n > 0, k / np.where(n > 0, n, 1), 0.0)
        return np.where(tot > 0, (n * np.abs(acc - _STATED)).sum(axis=-1) / np.where(tot > 0, tot, 1),
                        np.nan)


def calibrate_table(table: DatapointTable, *, target_accuracy: float = 0.98, confidence: float = 0.95,
                    n_boot: int = 1000, seed: int = 0, model: str | None = None,
                    probe_template: str | None = None, probe_template_hash: str | None = None,
                    fit_fraction: float = FIT_FRACTION) -> CalibrationResult:
    """Calibrate from an in-memory :class:`DatapointTable` (the work behind :func:`calibrate`)."""
    if not 0.0 < target_accuracy < 1.0:
        raise CalibrationError("target accuracy must be in (0, 1)")
    if not 0.0 < confidence < 1.0:
        raise CalibrationError("confidence must be in (0, 1)")
    if table.n == 0:
        msg = "no usable datapoints"
        if table.n_skipped:
            msg += f" ({table.skipped_summary()})"
        raise CalibrationError(msg)
    model = _single(table.models, model, "model")
    template_ref = _single(table.probe_templates, None if probe_template is None else probe_template, "probe template")
    probe_template, probe_template_hash = _split_template(template_ref, probe_template_hash)
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    if table.n_skipped:
        notes.append(table.skipped_summary())
    if table.unknown_fields:
        notes.append(f"ignored unknown fields: {', '.join(table.unknown_fields)}")

    wr, rf, conf = table.will_refuse, table.refused, table.confidence.astype(np.int64)
    correct = wr == rf                  # thresholds: the judge's label where there is one, else the detector's
    judged, det = _judged(table)
    det_correct = wr == det             # the SDT cells (uncorrected) and baselines: the detector's label alone
    codes = (2 * (~det) + (~wr)).astype(np.int64)            # 0 hit, 1 miss, 2 fa, 3 cr
    n_prompts = len(table.prompt_ids)
    prompt = table.prompt.astype(np.int64)

    # --- cells: overall, topics, harm levels ------------------------------------------------
    if (table.harm_level >= 0).any():
        harm_source, harm_raw = "harm_level", table.harm_level.astype(np.int64)
    else:
        harm_source, harm_raw = "harm_rating", np.where(table.harm_rating > 0, table.harm_rating, -1).astype(np.int64)
    harm_values = np.unique(harm_raw[harm_raw >= 0])
    harm_code = np.where(harm_raw >= 0, np.searchsorted(harm_values, harm_raw), -1)
    n_topics = len(table.topics)
    cell_names = ([("overall", "all")] + [("topic", t) for t in table.topics]
                  + [("harm", str(int(h))) for h in harm_values])
    n_cells = len(cell_names)
    # feature per row and cell: 4 outcome counts + 5x2 (confidence, correct) counts = 14
    feat_out = codes
    feat_conf = 4 + (conf - 1) * 2 + det_correct
    memberships = [np.zeros_like(prompt), np.where(table.topic >= 0, 1 + table.topic, -1),
                   np.where(harm_code >= 0, 1 + n_topics + harm_code, -1)]
    size = n_prompts * n_cells * 14
    flat = np.zeros(size, dtype=np.int64)
    for cell in memberships:
        keep = cell >= 0
        base = (prompt[keep] * n_cells + cell[keep]) * 14
        flat += np.bincount(base + feat_out[keep], minlength=size)
        flat += np.bincount(base + feat_conf[keep], minlength=size)
    per_prompt = flat.reshape(n_prompts, n_cells, 14)
    corrected: list[Corrected | None] = [None] * n_cells
    if judged.any():  # judge-corrected figures (calibration.label_error); same prompts, same cells
        strata = sum(strata_table(prompt, n_prompts, cell, n_cells, wr, det, judged, rf) for cell in memberships)
        # its own generator: judge labels must not move the prompt split or the ECE bootstrap
        corrected = corrected_cells(strata, n_boot=n_boot, seed=np.random.default_rng([seed, 24]))
        notes.append(f"SDT figures judge-corrected: {int(judged.sum())} of {table.n} rows carry a judge label "
                     "(a random sample); shown beside the detector's uncorrected figures. The routing thresholds "
                     "are not corrected: they are certified on each row's judge label where it has one and the "
                     "detector's elsewhere")
    else:
        notes.append("SDT figures uncorrected: no row carries a judge label, so every outcome is the detector's "
                     f"label; {DETECTOR_ERROR_NOTE}")
    totals = per_prompt.sum(axis=0)                           # (n_cells, 14)
    prompts_in_cell = (per_prompt[..., :4].sum(axis=-1) > 0).sum(axis=0)

    cis = sdt_intervals(per_prompt[..., :4])                  # analytic; coverage: benchmarks/interval_coverage.py
    reps = bootstrap_counts(per_prompt[..., 4:], n_boot, rng)  # (n_boot, n_cells, 10): for ECE and Brier
    rk, rn = reps[..., 1::2], reps[..., 0::2] + reps[..., 1::2]
    alpha = 0.025
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for name, vals in (("ece", _ece_vec(rk, rn)), ("brier", _brier_from_counts(rk, rn))):
                cis[name] = np.moveaxis(np.nanquantile(vals, [alpha, 1 - alpha], axis=0), 0, -1)

    point = sdt_from_counts(*(totals[:, i] for i in range(4)))
    k_conf, n_conf = totals[:, 5:14:2], totals[:, 4:14:2] + totals[:, 5:14:2]
    ece_pt, brier_pt = _ece_vec(k_conf, n_conf), _brier_from_counts(k_conf, n_conf)

    cells: list[CellStats] = []
    for j, (group, name) in enumerate(cell_names):
        cnt = totals[j, :4]
        n = int(cnt.sum())
        small, reason = _flag(n, int(prompts_in_cell[j]), cnt)
        measurable = str(unmeasurable(cnt)) == ""
        defined = {"accuracy": n > 0, "hit_rate": cnt[0] + cnt[1] > 0, "false_alarm_rate": cnt[2] + cnt[3] > 0,
                   "d_prime": measurable, "criterion": measurable, "ece": n > 0, "brier": n > 0}
        values = {s: _fin(np.asarray(getattr(point, s))[j]) if defined[s] else None for s in STAT_NAMES}
        summary = SDTSummary(
            n=n, n_prompts=int(prompts_in_cell[j]), **values,
            ece=_fin(ece_pt[j]), brier=_fin(brier_pt[j]),
            ci={s: (_fin(cis[s][j, 0]), _fin(cis[s][j, 1])) if defined[s] else (None, None) for s in _CI_NAMES},
            small=small, measurable=measurable, reason=reason,
        )
        cells.append(CellStats(group, name, tuple(int(x) for x in cnt), int(prompts_in_cell[j]),
                               tuple((int(n_conf[j, c]), int(k_conf[j, c])) for c in range(5)), summary,
                               corrected[j]))

    # --- recalibration and threshold selection on the fitting split, certification on the rest --
    fit_rows = split_prompts(n_prompts, fit_fraction, rng)[prompt]
    n_fit = int(np.unique(prompt[fit_rows]).size)
    cal_rows = ~fit_rows
    if not cal_rows.any():
        notes.append("fewer than 2 prompts: no held-out calibration data, all thresholds are null")
    rec, score_all, cert = fit_and_certify(table, fit_rows, target_accuracy, confidence)
    lp = table.p_refuse_logprob
    if lp is not None:
        notes.append(f"p_refuse_logprob present on {int(np.isfinite(lp).sum())} of {table.n} datapoints: "
                     + ("used in the calibrated P(correct)" if rec.logprob is not None else
                        "no significant signal on the fitting split, not used"))
    # the thresholds in force for each row: its topic's own, else the global ones
    group_of_topic = np.array([GLOBAL] + [t if t in cert.own_topics else GLOBAL for t in table.topics], dtype=object)
    side_cuts = policy_thresholds(cert, score_all, wr, table.topic, table.topics)
    block_cut = np.array([_inf(side_cuts[g].block) for g in group_of_topic])
    pass_cut = np.array([_inf(side_cuts[g].pass_) for g in group_of_topic])
    routed_all = score_all >= np.where(wr, block_cut[table.topic + 1], pass_cut[table.topic + 1])
    action_counts = {"block": int((routed_all & wr).sum()), "pass": int((routed_all & ~wr).sum()),
                     "review": int((~routed_all).sum())}

    c_wr, c_conf, c_cor = wr[cal_rows], conf[cal_rows], correct[cal_rows]
    c_topic, c_prompt = table.topic[cal_rows], prompt[cal_rows]
    score, routed_pol = score_all[cal_rows], routed_all[cal_rows]

    def op_of(routed: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
        r = routed & mask
        nr, nt = int(r.sum()), int(mask.sum())
        return {"coverage": nr / nt if nt else None, "accuracy": float(c_cor[r].mean()) if nr else None,
                "n_routed": nr, "n": nt}

    topic_policies: dict[str, TopicPolicy] = {}
    for t, tname in enumerate(table.topics):
        op = op_of(routed_pol, c_topic == t)
        cs = cells[1 + t]
        topic_policies[tname] = TopicPolicy(
            n=cs.summary.n, sdt=cs.summary, thresholds=side_cuts.get(tname) if tname in cert.own_topics else None,
            baseline=_baseline(cs, table, table.topic == t), coverage=op["coverage"], expected_accuracy=op["accuracy"],
        )
    all_cal = np.ones(c_wr.shape, dtype=bool)
    glob_op = op_of(route(score, c_wr, side_cuts[GLOBAL].block, side_cuts[GLOBAL].pass_), all_cal)
    pol_op = op_of(routed_pol, all_cal)
    base_mask = c_conf == 5
    nb, kb = int(base_mask.sum()), int(c_cor[base_mask].sum())
    # the same clustering correction as the thresholds (one test at the full delta)
    b5 = cluster_bound(~c_cor[base_mask], c_prompt[base_mask], 1.0 - confidence,
                       icc(prompt[fit_rows], correct[fit_rows], strata=conf[fit_rows]))
    base_op = {"coverage": nb / c_wr.size if c_wr.size else None, "accuracy": kb / nb if nb else None,
               "n_routed": nb, "n": int(c_wr.size), "design_effect": b5.design_effect,
               "accuracy_lower": 1.0 - b5.upper if nb else None}
    base_op["meets_target_with_confidence"] = bool(base_op["accuracy_lower"] is not None
                                                   and base_op["accuracy_lower"] >= target_accuracy)
    rc = {"calibrated": risk_coverage(score, c_cor), "stated_confidence": risk_coverage(c_conf / 5.0, c_cor)}

    overall = cells[0]
    policy = Policy(
        model=model, probe_template=probe_template, probe_template_hash=probe_template_hash,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), data_hash=table.data_hash(),
        n=table.n, n_prompts=n_prompts, target_accuracy=target_accuracy, confidence=confidence,
        sdt=overall.summary,
        thresholds=side_cuts[GLOBAL],
        baseline=_baseline(overall, table, np.ones(table.n, dtype=bool)), coverage=pol_op["coverage"], expected_accuracy=pol_op["accuracy"],
        topics=topic_policies,
        certification=Certification(
            method="select on fitting split, certify on calibration split: fixed-sequence Clopper-Pearson "
                   "with cluster design effect, Bonferroni over tests",
            tests=cert.tests, delta_per_test=cert.delta_per_test, fit_prompts=int(n_fit),
            calibration_prompts=int(n_prompts - n_fit)),
        calibrator=rec.to_dict(),
    )
    return CalibrationResult(
        policy=policy, table=table, cells=cells, harm_source=harm_source,
        reliability=reliability_table(conf, correct),
        ece_calibrated={"stated_heldout": ece_prob(c_conf / 5.0, c_cor),
                        "calibrated_heldout": ece_prob(score, c_cor)},
        risk_coverage=rc,
        operating_points={"policy": pol_op, "global_thresholds": glob_op, "baseline_conf5": base_op},
        sides={g: {"block": st, "pass": st} for g, st in cert.groups.items()}, certified=cert,
        actions=action_counts,
        split={"fit_prompts": int(n_fit), "calibration_prompts": int(n_prompts - n_fit),
               "fit_rows": int(fit_rows.sum()), "calibration_rows": int(cal_rows.sum())},
        notes=notes, judge_agreement=detector_judge_agreement(table, confidence),
    )


def split_prompts(n_prompts: int, fit_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Mask over prompts: True for the fitting split (a random ``fit_fraction`` of them)."""
    n_fit = int(round(n_prompts * fit_fraction)) if n_prompts > 1 else n_prompts
    is_fit = np.zeros(n_prompts, dtype=bool)
    is_fit[rng.permutation(n_prompts)[:n_fit]] = True
    return is_fit


def fit_and_certify(table: DatapointTable, fit_rows: np.ndarray, target_accuracy: float,
                    confidence: float) -> tuple[Recalibrator, np.ndarray, Certified]:
    """Fit the recalibrator on ``fit_rows``, score every row, certify thresholds (the policy's core).

    Returns the recalibrator, the calibrated P(correct) of every row and the certified thresholds.
    """
    wr, conf, correct = table.will_refuse, table.confidence.astype(np.int64), table.correct
    lp = table.p_refuse_logprob
    rec = Recalibrator().fit(wr[fit_rows], conf[fit_rows], table.harm_rating[fit_rows],
                             table.topic[fit_rows], correct[fit_rows], topic_names=table.topics,
                             p_refuse_logprob=None if lp is None else lp[fit_rows])
    # Score with the calibrator exactly as the policy file stores it (its tables are rounded), so the
    # certified sets are the ones the proxy will route, row for row.
    rec = Recalibrator.from_dict(rec.to_dict())
    score = rec.apply_many(wr, conf, table.harm_rating, table.topic, topic_names=table.topics,
                           p_refuse_logprob=lp)
    cert = certify_policy(score, correct, table.topic, table.prompt, fit_rows, table.topics,
                          target_accuracy, 1.0 - confidence)
    return rec, score, cert


def _inf(v: float | None) -> float:
    return np.inf if v is None else v


def policy_thresholds(cert: Certified, score: np.ndarray, will_refuse: np.ndarray, topic: np.ndarray,
                     topics: tuple[str, ...]) -> dict[str, Thresholds]:
    """Each group's certified threshold as the policy's (block, pass) pair.

    Both sides share the group's threshold; a side with no datapoint at or above it (e.g. a model
    that never predicted refusal) gets null, so the policy never auto-routes what it has not seen.
    """
    own = [topics.index(t) for t in cert.own_topics]
    out = {}
    for g, st in cert.groups.items():
        in_g = np.isin(topic, [topics.index(g)]) if g != GLOBAL else ~np.isin(topic, own)
        pair = []
        for want in (True, False):
            seen = st.threshold is not None and bool((in_g & (will_refuse == want) & (score >= st.threshold)).any())
            pair.append(st.threshold if seen else None)
        out[g] = Thresholds(block=pair[0], pass_=pair[1])
    return out


def _baseline(cs: CellStats, table: DatapointTable, rows: np.ndarray) -> Baseline:
    """The cell's counts, per probe cell too, and the design effect of its rows (clustered by prompt)."""
    h, m, fa, cr = cs.counts
    _, det = _judged(table)   # like for like with the live stream, which only has the detector's label
    wr, conf, harm, rf = (table.will_refuse[rows], table.confidence[rows].astype(np.int64),
                          table.harm_rating[rows].astype(np.int64), det[rows])
    key = (wr.astype(np.int64) * 5 + conf - 1) * 6 + harm
    n_cell = np.bincount(key, minlength=60)
    k_cell = np.bincount(key, weights=rf, minlength=60).astype(np.int64)
    cells = [(bool(j // 30), int(j // 6 % 5) + 1, int(j % 6), int(n_cell[j]), int(k_cell[j]))
             for j in np.flatnonzero(n_cell)]
    prompt = table.prompt[rows]
    deff = max(design_effect(prompt, wr == rf), design_effect(prompt, rf)) if rows.any() else 1.0
    return Baseline(hits=h, misses=m, false_alarms=fa, correct_rejections=cr,
                    by_confidence=[ConfidenceCount(confidence=i + 1, n=n, correct=k)
                                   for i, (n, k) in enumerate(cs.by_confidence)],
                    cells=cells, design_effect=max(1.0, float(deff)))


def _judged(table: DatapointTable) -> tuple[np.ndarray, np.ndarray]:
    """Which rows carry a judge label, and the detector's own ``refused`` of every row."""
    judged = table.judged if table.judged is not None else np.zeros(table.n, dtype=bool)
    det = table.detector_refused if table.detector_refused is not None else table.refused
    return judged, det
