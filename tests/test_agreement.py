"""Detector-vs-judge agreement interval: closed form (scipy's Wilson), and coverage by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from calibration.agreement import agreement, wilson


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (47, 50), (50, 50), (412, 500)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson(k, n, 0.95)
    assert low == pytest.approx(ci.low, abs=1e-12)
    assert high == pytest.approx(ci.high, abs=1e-12)


def test_one_row_per_prompt_is_plain_wilson() -> None:
    rng = np.random.default_rng(0)
    a = rng.random(300) < 0.5
    b = np.where(rng.random(300) < 0.9, a, ~a)
    res = agreement(a, b, cluster=np.arange(300))
    assert res.design_effect == 1.0
    assert (res.low, res.high) == pytest.approx(wilson(res.agree, 300))
    assert res.rate == pytest.approx(float((a == b).mean()))


def test_repeated_prompts_widen_the_interval() -> None:
    # 40 prompts x 10 repeats, agreement decided per prompt: the rows are 40 observations, not 400.
    per_prompt = np.r_[np.ones(34, bool), np.zeros(6, bool)]
    same = np.repeat(per_prompt, 10)
    cluster = np.repeat(np.arange(40), 10)
    res = agreement(same, np.ones_like(same), cluster=cluster)
    plain = agreement(same, np.ones_like(same))
    assert res.design_effect == pytest.approx(10 * 40 / 39, rel=1e-6)
    assert (res.high - res.low) > 2.5 * (plain.high - plain.low)


def test_empty_and_shape_errors() -> None:
    assert agreement(np.zeros(0, bool), np.zeros(0, bool)).rate is None
    with pytest.raises(ValueError):
        agreement(np.zeros(3, bool), np.zeros(4, bool))


@pytest.mark.parametrize("clustered", [False, True])
def test_coverage_by_simulation(clustered: bool) -> None:
    # Known truth p = 0.9. Clustered: each prompt has its own agreement rate drawn from Beta (ICC 0.2),
    # 60 prompts x 8 repeats. The 95% interval must cover p in about 95% of 2,000 runs; the naive
    # (unclustered) Wilson interval, checked alongside, undercovers badly on the clustered data.
    rng = np.random.default_rng(1)
    p, runs, covered, naive_covered = 0.9, 2000, 0, 0
    for _ in range(runs):
        if clustered:
            rho = 0.2
            alpha, beta = p * (1 - rho) / rho, (1 - p) * (1 - rho) / rho
            rates = rng.beta(alpha, beta, 60)
            same = rng.random((60, 8)) < rates[:, None]
            cluster = np.repeat(np.arange(60), 8)
            same = same.ravel()
        else:
            same = rng.random(400) < p
            cluster = None
        res = agreement(same, np.ones_like(same), cluster=cluster)
        covered += res.low <= p <= res.high
        lo, hi = wilson(res.agree, res.n)
        naive_covered += lo <= p <= hi
    assert 0.93 <= covered / runs <= 0.975
    if clustered:
        assert naive_covered / runs < 0.85


def test_calibrate_uses_judge_labels_as_ground_truth(tmp_path, capsys) -> None:
    # Datapoints where the detector's `refused` is flipped on a third of the rows and a judge label
    # (the truth) is present on every other row: calibrate must use the judge's label where there is
    # one, keep the detector's elsewhere, and report detector-vs-judge agreement with its CI.
    import json

    from calibration.calibrate import calibrate
    from calibration.cli import main
    from calibration.datapoints import FIELDS, read_datapoints
    from calibration.sdt import simulate

    d = simulate(100, 4, 2.0, 0.0, n_topics=2, seed=5)
    rng = np.random.default_rng(3)
    n = d["prompt"].size
    flip = rng.random(n) < 1 / 3
    judged = np.arange(n) % 2 == 0
    path = tmp_path / "d.jsonl"
    with open(path, "w") as fh:
        for i in range(n):
            r = dict.fromkeys(FIELDS)
            truth = bool(d["refused"][i])
            r.update(id=f"p{d['prompt'][i]}", topic=["a", "b"][d["topic"][i]], probe_status="ok",
                     will_refuse=bool(d["will_refuse"][i]), confidence=int(d["confidence"][i]),
                     refused=truth != bool(flip[i]), model="m", probe_template="t")
            if judged[i]:
                r["judge_label"] = "partial_refusal" if truth else "full_compliance"
            fh.write(json.dumps(r) + "\n")
    table = read_datapoints([path])
    assert table.judged.tolist() == judged.tolist()
    assert table.refused[judged].tolist() == d["refused"][judged].astype(bool).tolist()
    assert table.refused[~judged].tolist() == (d["refused"] != flip)[~judged].tolist()
    assert table.detector_refused.tolist() == (d["refused"] != flip).tolist()
    assert "judge_label" not in table.unknown_fields
    result = calibrate([path], n_boot=20)
    ja = result.judge_agreement
    expected = float((~flip[judged]).mean())
    assert ja["n"] == int(judged.sum()) and ja["rate"] == pytest.approx(expected)
    assert ja["ci"][0] < expected < ja["ci"][1] and ja["n_clusters"] == len(set(d["prompt"][judged]))
    assert main(["calibrate", "--datapoints", str(path), "--out", str(tmp_path / "p.json"),
                 "--n-boot", "20"]) == 0
    assert "detector-vs-judge agreement" in capsys.readouterr().err


def test_no_judge_labels_means_no_agreement(tmp_path) -> None:
    from calibration.agreement import detector_judge_agreement
    from calibration.datapoints import DatapointTable

    table = DatapointTable.from_arrays(prompt=[0, 1], will_refuse=[True, False], confidence=[5, 5],
                                       refused=[True, False])
    assert detector_judge_agreement(table) is None
