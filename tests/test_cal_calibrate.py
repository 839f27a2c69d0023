"""End-to-end calibration: CLI, policy contents, small/single-class/empty cells, errors, report."""

import argparse
import json
import math

import numpy as np
import pytest

from calibration.calibrate import CalibrationError, calibrate, calibrate_table
from calibration.cli import add_calibrate_parser, main
from calibration.datapoints import FIELDS, DatapointTable
from calibration.policy import Policy
from calibration.sdt import sdt_from_counts, simulate


def _jsonl(path, d, topics, **extra):
    with open(path, "w") as fh:
        for i in range(d["prompt"].size):
            r = dict.fromkeys(FIELDS)
            r.update(id=f"p{d['prompt'][i]}", ts="2024-01-01T00:00:00+00:00", topic=topics[d["topic"][i]],
                     will_refuse=bool(d["will_refuse"][i]), confidence=int(d["confidence"][i]),
                     harm_rating=int(d["harm_rating"][i]), refused=bool(d["refused"][i]), probe_status="ok",
                     prompt_sha256="0" * 64, probe_template="tmpl-1", model="m-1")
            r.update(extra)
            fh.write(json.dumps(r) + "\n")
    return path


def test_cli_end_to_end(tmp_path, capsys):
    d = simulate(120, 8, 2.5, -0.2, n_topics=3, seed=11)
    f = _jsonl(tmp_path / "d.jsonl", d, ["cyber", "bio", "misc"])
    with open(f, "a") as fh:   # one unusable row (probe timed out)
        fh.write(json.dumps({"id": "q", "will_refuse": None, "confidence": None, "refused": True,
                             "probe_status": "timeout"}) + "\n")
    out = tmp_path / "policy.json"
    rc = main(["calibrate", "--datapoints", str(f), "--out", str(out), "--n-boot", "200",
               "--target-accuracy", "0.9", "--report", str(tmp_path / "rep")])
    assert rc == 0
    cap = capsys.readouterr()
    assert "skipped 1 rows" in cap.err and "probe_status=timeout" in cap.err
    assert "cyber" in cap.out and "baseline:" in cap.out
    pol = Policy.load(out)
    assert pol.model == "m-1" and pol.probe_template == "tmpl-1" and pol.n == d["prompt"].size
    counts = np.bincount(2 * (~d["refused"]) + (~d["will_refuse"]), minlength=4)
    ref = sdt_from_counts(*counts)
    assert pol.sdt.d_prime == pytest.approx(ref.d_prime)
    lo, hi = pol.sdt.ci["d_prime"]
    assert lo < pol.sdt.d_prime < hi
    b = pol.global_baseline
    assert (b.hits, b.misses, b.false_alarms, b.correct_rejections) == tuple(counts)
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert "Confusion table" in (tmp_path / "rep" / "report.md").read_text()


def test_parser_registration():
    parser = argparse.ArgumentParser()
    add_calibrate_parser(parser.add_subparsers())
    args = parser.parse_args(["calibrate", "--datapoints", "a.jsonl", "b.db", "--out", "p.json"])
    assert args.target_accuracy == 0.98 and args.confidence == 0.95 and len(args.datapoints) == 2
    assert callable(args.func)


def test_cli_bad_input_exit_code(tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"will_refuse": true, "confidence": 3, "refused": true}\n{oops\n')
    assert main(["calibrate", "--datapoints", str(f), "--out", str(tmp_path / "p.json")]) == 2
    assert f"{f}:2" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_single_class_model_never_refuses():
    d = simulate(60, 5, 2.0, 0.0, n_topics=2, seed=4)
    d["will_refuse"][:] = False
    d["refused"][:] = False
    t = DatapointTable.from_arrays(topics=["a", "b"], **d)
    res = calibrate_table(t, n_boot=100)
    s = res.policy.sdt
    assert s.accuracy == 1.0 and s.hit_rate is None and s.small   # no refusals: no hit rate to report
    assert not s.measurable and s.d_prime is None and s.ci["d_prime"] == (None, None)
    assert "never refused" in s.reason
    assert res.policy.global_thresholds.block is None     # no predicted refusals to certify


def test_empty_and_small_topics_are_marked_not_hidden():
    d = simulate(100, 5, 2.0, 0.0, n_topics=1, seed=5)
    d["topic"][:10] = 1                                  # topic "tiny": 2 prompts, 10 rows
    t = DatapointTable.from_arrays(topics=["main", "tiny", "empty"], **d)
    res = calibrate_table(t, n_boot=100)
    empty = res.policy.topics["empty"]
    assert empty.n == 0 and empty.sdt.small and empty.sdt.reason == "empty"
    assert empty.sdt.accuracy is None and empty.thresholds.block is None and empty.thresholds.pass_ is None
    tiny = res.policy.topics["tiny"].sdt
    assert tiny.small and "n=10" in tiny.reason
    assert not res.policy.topics["main"].sdt.small


def test_mixed_templates_and_no_usable_rows(tmp_path):
    d = simulate(10, 2, 2.0, 0.0, seed=6)
    a = _jsonl(tmp_path / "a.jsonl", d, ["t"])
    b = _jsonl(tmp_path / "b.jsonl", d, ["t"], probe_template="tmpl-2")
    with pytest.raises(CalibrationError, match="several probe templates"):
        calibrate([a, b], n_boot=10)
    assert calibrate([a, b], n_boot=10, probe_template="tmpl-2").policy.probe_template == "tmpl-2"
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps({"id": "x", "will_refuse": None, "confidence": 3, "refused": True}) + "\n")
    with pytest.raises(CalibrationError, match="no usable datapoints.*missing will_refuse"):
        calibrate([c])


def test_thresholds_certify_on_easy_data_and_beat_nothing_on_hard():
    easy = simulate(2000, 1, 5.0, 0.0, n_topics=2, seed=8)
    res = calibrate_table(DatapointTable.from_arrays(topics=["a", "b"], **easy), n_boot=50, target_accuracy=0.95)
    op = res.operating_points["policy"]
    assert op["coverage"] > 0.5 and op["accuracy"] >= 0.95
    assert res.policy.global_thresholds.block is not None and res.policy.global_thresholds.pass_ is not None
    hard = simulate(500, 1, 0.2, 0.0, seed=9)       # near-chance predictions
    res2 = calibrate_table(DatapointTable.from_arrays(topics=["a"], **hard), n_boot=50)
    assert res2.policy.global_thresholds.block is None and res2.policy.global_thresholds.pass_ is None
    assert res2.operating_points["policy"]["coverage"] == 0.0
    assert math.isfinite(res2.risk_coverage["calibrated"]["aurc"])


def test_a_class_with_few_trials_is_marked_small_even_in_a_large_cell():
    from calibration.calibrate import MIN_CLASS_N, _flag

    small, reason = _flag(600, 300, np.array([0, 6, 7, 587]))  # 0 hits of 6 refusals: d' > 0 only by the prior
    assert small and "only 6 refusal(s)" in reason
    assert _flag(600, 300, np.array([MIN_CLASS_N, 0, 7, 583])) == (False, None)
