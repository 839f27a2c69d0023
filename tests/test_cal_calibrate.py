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
    assert "cyber" in cap.out and "baseline:" in cap.out and "On the calibration datapoints the policy" in cap.out
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
    assert empty.sdt.accuracy is None and empty.thresholds is None          # no data: the global threshold
    assert res.policy.thresholds("empty") == res.policy.global_thresholds
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


# --- the continuous score, the certified policy as the proxy applies it, the outlook -----------

def _latent_world(n_prompts, seed, logprob, reps=3):
    """SDT with a continuous evidence x; verbal confidence only says 4 or 5, so a logprob that tracks x
    can rank requests within a verbal level."""
    from scipy.special import expit

    rng = np.random.default_rng(seed)
    prompt = np.repeat(np.arange(n_prompts), reps)
    refused = np.repeat(rng.random(n_prompts) < 0.4, reps)
    x = np.where(refused, 1.5, -1.5) + np.repeat(rng.normal(0, 0.6, n_prompts), reps) + rng.normal(0, 0.8, prompt.size)
    conf = np.where(np.abs(x) > 1.0, 5, 4)
    lp = {"signal": expit(2.0 * x + rng.normal(0, 0.5, x.size)),
          "none": expit(np.where(x > 0, 2.5, -2.5) + rng.normal(0, 1, x.size)), None: None}[logprob]
    return DatapointTable.from_arrays(prompt=prompt, will_refuse=x > 0, refused=refused, confidence=conf,
                                      harm_rating=np.full(x.size, 3), p_refuse_logprob=lp)


def test_a_logprob_with_signal_raises_coverage_and_one_without_is_left_out():
    with_signal = calibrate_table(_latent_world(3000, 1, "signal"), n_boot=20, target_accuracy=0.97)
    verbal = with_signal.table.__class__(**{**with_signal.table.__dict__, "p_refuse_logprob": None})
    without = calibrate_table(verbal, n_boot=20, target_accuracy=0.97)
    assert Recalibrator_logprob(with_signal) is not None
    assert with_signal.operating_points["policy"]["coverage"] > without.operating_points["policy"]["coverage"] + 0.05
    assert with_signal.operating_points["policy"]["accuracy"] >= 0.97
    assert any("used in the calibrated P(correct)" in n for n in with_signal.notes)
    noise = calibrate_table(_latent_world(3000, 1, "none"), n_boot=20, target_accuracy=0.97)
    assert Recalibrator_logprob(noise) is None
    assert any("no significant signal" in n for n in noise.notes)
    # the policy file carries the adjustment; p_correct moves with the logprob only where it was kept
    pol = with_signal.policy
    hi, lo = pol.p_correct(None, True, 5, 3, 0.999), pol.p_correct(None, True, 5, 3, 0.6)
    assert hi > lo and pol.p_correct(None, True, 5, 3, None) == pol.p_correct(None, True, 5, 3)
    assert noise.policy.p_correct(None, True, 5, 3, 0.999) == noise.policy.p_correct(None, True, 5, 3, 0.6)


def Recalibrator_logprob(result):
    from calibration.reliability import Recalibrator

    return Recalibrator.from_dict(result.policy.calibrator).logprob


def test_the_policy_file_decides_what_calibrate_counted():
    """Policy.decide (what the proxy runs) on every datapoint gives the action shares calibrate reports."""
    t = _latent_world(800, 2, "signal")
    res = calibrate_table(t, n_boot=20, target_accuracy=0.95)
    pol = Policy.model_validate_json(res.policy.to_json())
    acts = [pol.decide(None, bool(t.will_refuse[i]), int(t.confidence[i]), int(t.harm_rating[i]),
                       float(t.p_refuse_logprob[i])) for i in range(t.n)]
    assert {a: acts.count(a) for a in ("block", "pass", "review")} == res.actions
    assert res.actions["block"] + res.actions["pass"] > 0


def test_outlook_certified_and_not():
    from calibration.outlook import policy_outlook

    res = calibrate_table(_latent_world(3000, 3, None), n_boot=20, target_accuracy=0.95)
    o = policy_outlook(res)
    assert o.certified and o.why_not is None and o.more_datapoints is None
    assert o.share_block + o.share_pass + o.share_review == pytest.approx(1.0)
    assert o.share_block == pytest.approx(res.actions["block"] / res.table.n)
    assert o.guarantee == "with 95% confidence at least 95% of auto-routed requests are routed correctly"
    lines = o.lines()
    assert lines[1] == "With 95% confidence at least 95% of auto-routed requests are routed correctly."
    assert all("*" not in ln and "#" not in ln for ln in lines)
    hard = calibrate_table(DatapointTable.from_arrays(topics=["a"], **simulate(500, 1, 0.2, 0.0, seed=9)), n_boot=20)
    h = policy_outlook(hard)
    assert not h.certified and h.share_review == 1.0 and h.more_datapoints is None
    assert "at least 98% accurate" in h.why_not and "would not" in h.lines()[-1]


def test_outlook_more_datapoints_is_about_right():
    """Too few datapoints: the median estimate, collected, certifies in most simulated runs, and a
    quarter of it in fewer (the estimate from 180 rows is noisy, so it is checked across seeds)."""
    from calibration.outlook import policy_outlook

    totals = []
    for seed in range(4, 20):
        small = calibrate_table(_latent_world(60, seed, None), n_boot=20, target_accuracy=0.95)
        o = policy_outlook(small)
        if not o.certified:
            assert o.why_not and (o.more_datapoints is None or o.more_datapoints > 0)
            if o.more_datapoints is not None:
                totals.append(small.table.n + o.more_datapoints)
    assert len(totals) >= 6
    n_prompts = int(np.median(totals)) // 3

    def certified(n, s):
        return policy_outlook(calibrate_table(_latent_world(n, 100 + s, None), n_boot=20,
                                              target_accuracy=0.95)).certified

    at = sum(certified(n_prompts, s) for s in range(10))
    quarter = sum(certified(max(n_prompts // 4, 10), s) for s in range(10))
    assert at >= 6 and quarter < at


def test_p_refuse_logprob_is_read_from_jsonl_and_sqlite(tmp_path):
    import sqlite3

    from calibration.datapoints import SQLITE_DDL, read_datapoints

    d = simulate(20, 2, 2.0, 0.0, seed=12)
    f = _jsonl(tmp_path / "d.jsonl", d, ["t"])
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["p_refuse_logprob"] = None if i % 4 == 0 else i / 100
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = read_datapoints([f])
    assert np.isnan(t.p_refuse_logprob[0]) and t.p_refuse_logprob[1] == pytest.approx(0.01)
    db = tmp_path / "d.sqlite3"
    con = sqlite3.connect(db)
    con.executescript(SQLITE_DDL)
    cols = ["id", "will_refuse", "confidence", "refused", "p_refuse_logprob"]
    con.executemany(f"INSERT INTO datapoints ({', '.join(cols)}) VALUES (?, ?, ?, ?, ?)",
                    [(r["id"], int(r["will_refuse"]), r["confidence"], int(r["refused"]), r["p_refuse_logprob"])
                     for r in rows])
    con.commit()
    con.close()
    s = read_datapoints([db])
    assert np.array_equal(np.isnan(s.p_refuse_logprob), np.isnan(t.p_refuse_logprob))
    assert read_datapoints([_jsonl(tmp_path / "e.jsonl", d, ["t"])]).p_refuse_logprob is None   # all null
    assert t.data_hash() != read_datapoints([_jsonl(tmp_path / "g.jsonl", d, ["t"])]).data_hash()
