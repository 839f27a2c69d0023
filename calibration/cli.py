"""``refusal-guard calibrate``: datapoints (JSONL, SQLite log, PostgreSQL) -> policy JSON (+ optional report).

Registered on the console script's subparsers by :func:`add_calibrate_parser`; ``run(args)``
returns the exit code (0 ok, 2 bad input).  Progress and warnings go to stderr, the summary table to
stdout.  Also runnable standalone: ``python -m calibration.cli calibrate ...``.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Sequence

from calibration.datapoints import DatapointError, parse_duration

__all__ = ["add_calibrate_parser", "run", "main", "summary_table", "corrected_lines"]


def add_calibrate_parser(subparsers: Any) -> None:
    """Register the ``calibrate`` subcommand (``set_defaults(func=run)``)."""
    p = subparsers.add_parser(
        "calibrate", help="fit a policy from datapoints",
        description="Read datapoints (JSONL, the proxy's SQLite log or its PostgreSQL database), compute SDT statistics with "
                    "bootstrap CIs, recalibrate confidence, certify routing thresholds and write the "
                    "policy file the proxy loads.")
    p.add_argument("--datapoints", nargs="+", required=True, metavar="SOURCE",
                   help="JSONL and/or SQLite files, globs (quoted) and postgresql:// URLs; a row given twice "
                        "(same request_id and ts) counts once")
    p.add_argument("--since", type=_duration, metavar="DURATION",
                   help="only datapoints of the last DURATION (90s, 15m, 12h, 7d, 2w)")
    p.add_argument("--out", type=Path, required=True, help="policy JSON to write")
    p.add_argument("--target-accuracy", type=float, default=0.98,
                   help="required accuracy of auto-routed requests (default 0.98)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="probability that the target holds (default 0.95)")
    p.add_argument("--report", type=Path, metavar="DIR", help="also write report.md and report.html here")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="only datapoints of this model (which the policy then names)")
    p.add_argument("--probe-template", help="override the probe template id found in the datapoints")
    p.add_argument("--probe-template-hash", help="hash of the probe template text")
    p.add_argument("--skip-invalid", action="store_true",
                   help="count invalid rows as skipped instead of stopping at the first one")
    p.add_argument("--exclude-client", action="append", default=[], metavar="ID",
                   help="leave out every row of this client (its key's name or hashed id, as the client report "
                        "prints it; '(none)' for rows without one); repeatable")
    p.add_argument("--max-client-share", type=_share, metavar="F",
                   help="drop rows (deterministically, spread over its prompts) so that no client supplies more than F of "
                        "any topic x prediction x confidence cell (0 < F <= 1); default: no cap")
    p.set_defaults(func=run)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError("the maximum client share must be in (0, 1]")
    return value


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def summary_table(result: Any) -> str:
    """Plain-text table of the overall, per-topic and per-harm statistics and the thresholds."""
    pol = result.policy
    head = f"{'cell':<28}{'n':>8}{'acc':>7}{'d_prime [95% CI]':>22}{'c':>7}{'block':>7}{'pass':>7}  note"
    from calibration.outlook import policy_outlook
    lines = [head, "-" * len(head)]
    for cs in result.cells:
        s = cs.summary
        lo, hi = s.ci.get("d_prime", (None, None))
        th = pol.thresholds(cs.name) if cs.group == "topic" else (pol.global_thresholds if cs.group == "overall" else None)
        if cs.group == "topic" and pol.topics[cs.name].thresholds is None:
            s_note = "global threshold; "
        else:
            s_note = ""
        label = cs.name if cs.group == "overall" else f"{cs.group}:{cs.name}"
        dci = f"{_fmt(s.d_prime, '.2f')} [{_fmt(lo, '.2f')},{_fmt(hi, '.2f')}]"
        lines.append(f"{label[:27]:<28}{s.n:>8}{_fmt(s.accuracy):>7}{dci:>22}{_fmt(s.criterion, '.2f'):>7}"
                     f"{_fmt(th.block if th else None, '.3f'):>7}{_fmt(th.pass_ if th else None, '.3f'):>7}"
                     f"  {s_note}{'SMALL: ' + (s.reason or '') if s.small else ''}")
    lines += corrected_lines(result)
    op, base = result.operating_points["policy"], result.operating_points["baseline_conf5"]
    lines.append("")
    lines.append(f"policy:   coverage {_fmt(op['coverage'])}  accuracy {_fmt(op['accuracy'])}  "
                 f"(held-out, n={op['n']})  AURC {_fmt(result.risk_coverage['calibrated']['aurc'], '.4f')}")
    lines.append(f"baseline: coverage {_fmt(base['coverage'])}  accuracy {_fmt(base['accuracy'])}  "
                 f"(trust only confidence 5; certified >= target: {base['meets_target_with_confidence']})  "
                 f"AURC {_fmt(result.risk_coverage['stated_confidence']['aurc'], '.4f')}")
    lines.append(f"ECE {_fmt(pol.sdt.ece)}  Brier {_fmt(pol.sdt.brier)}  policy version {pol.version}")
    cert = pol.certification
    lines.append(f"certification: {cert.tests} test(s) at delta {_fmt(cert.delta_per_test, '.4f')} each; "
                 f"fitting/calibration prompts {cert.fit_prompts}/{cert.calibration_prompts}")
    lines.append("")
    lines.extend(policy_outlook(result).lines())
    return "\n".join(lines)


def corrected_lines(result: Any) -> list[str]:
    """The judge-corrected figures beside the detector's (uncorrected) ones, or why there are none."""
    rows = [cs for cs in result.cells if cs.corrected is not None]
    if not rows:
        return ["", "SDT figures above are UNCORRECTED (no judged rows): outcomes are the detector's labels."]
    head = f"{'judge-corrected':<28}{'judged':>8}{'acc':>7}{'d_prime [95% CI]':>22}{'c':>7}  detector d'  note"
    out = ["", head, "-" * len(head)]
    for cs in rows:
        c = cs.corrected
        lo, hi = c.ci["d_prime"]
        label = cs.name if cs.group == "overall" else f"{cs.group}:{cs.name}"
        dci = f"{_fmt(c.d_prime, '.2f')} [{_fmt(lo, '.2f')},{_fmt(hi, '.2f')}]"
        note = ("SMALL: " if c.small else "") + (f"no judged row in {len(c.unjudged)} stratum(s): interval over "
                                                   "[0, 1]" if c.unjudged else "")
        out.append(f"{label[:27]:<28}{c.n_judged:>8}{_fmt(c.accuracy):>7}{dci:>22}{_fmt(c.criterion, '.2f'):>7}"
                   f"  {_fmt(cs.summary.d_prime, '.2f'):>11}  {note}")
    return out


def run(args: argparse.Namespace) -> int:
    """Execute ``calibrate``; returns the process exit code."""
    from calibration.calibrate import CalibrationError, calibrate_table  # heavy imports only when used
    from calibration.datapoints import read_datapoints

    t0 = time.perf_counter()
    err = sys.stderr
    print(f"calibrate: reading {len(args.datapoints)} source(s)", file=err)
    since = datetime.now(timezone.utc) - timedelta(seconds=args.since) if args.since else None
    try:
        table = read_datapoints(args.datapoints, on_error="skip" if args.skip_invalid else "raise",
                                since=since, model=args.model)
        table, client_notes = _clients(table, args, err)
        result = calibrate_table(table, target_accuracy=args.target_accuracy, confidence=args.confidence,
                                 n_boot=args.n_boot, seed=args.seed, model=args.model,
                                 probe_template=args.probe_template, probe_template_hash=args.probe_template_hash)
    except (DatapointError, CalibrationError) as exc:
        print(f"calibrate: error: {exc}", file=err)
        return 2
    table = result.table
    print(f"calibrate: {table.n} usable datapoints from {table.n_read} rows, "
          f"{len(table.prompt_ids)} prompts, {len(table.topics)} topics", file=err)
    print(f"calibrate: skipped {table.n_skipped} rows" + (f": {table.skipped_summary()}" if table.n_skipped else ""),
          file=err)
    if result.judge_agreement is not None:
        ja = result.judge_agreement
        print(f"calibrate: {ja['n']} rows carry a judge label (a random sample: the SDT figures are corrected "
              f"with it, the thresholds take it as those rows' truth); detector-vs-judge "
              f"agreement {ja['rate']:.3f}, {ja['confidence']:.0%} CI [{ja['ci'][0]:.3f}, {ja['ci'][1]:.3f}] "
              f"({ja['method']}, {ja['n_clusters']} prompts)", file=err)
    for note in result.notes:
        if not note.startswith("skipped"):
            print(f"calibrate: note: {note}", file=err)
    result.notes.extend(client_notes)  # printed already; for the report
    try:
        result.policy.save(args.out)
    except OSError as exc:
        print(f"calibrate: error: cannot write {args.out}: {exc}", file=err)
        return 2
    print(f"calibrate: wrote {args.out} (version {result.policy.version})", file=err)
    if args.report is not None:
        from calibration.report import write_report
        try:
            md, html = write_report(result, args.report)
        except ImportError:
            print("calibrate: error: the report needs matplotlib (pip install 'refusal-guard[report]'); "
                  "the policy was written", file=err)
            return 2
        print(f"calibrate: wrote {md} and {html}", file=err)
    print(summary_table(result))
    print(f"calibrate: done in {time.perf_counter() - t0:.1f}s", file=err)
    return 0


def _clients(table: Any, args: argparse.Namespace, err: Any) -> tuple[Any, list[str]]:
    """Report rows per client and dominated cells, then apply ``--exclude-client``/``--max-client-share``."""
    from calibration.clients import apply_client_limits, client_report

    report = client_report(table)
    for line in report.lines():
        print(f"calibrate: clients: {line}", file=err)
    for warning in report.warnings():
        print(f"calibrate: warning: {warning}", file=err)
    table, notes = apply_client_limits(table, args.exclude_client, args.max_client_share)
    for note in notes:
        print(f"calibrate: {note}", file=err)
    return table, notes


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (the product's console script lives in guard/cli.py)."""
    parser = argparse.ArgumentParser(prog="refusal-guard")
    sub = parser.add_subparsers(dest="command", required=True)
    add_calibrate_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
