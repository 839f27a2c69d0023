"""Markdown and self-contained HTML report of a calibration run.

matplotlib (the optional ``[report]`` extra) is imported lazily inside :func:`write_report`, so
computing and writing the policy never needs it.  The Markdown links PNG files written next to it;
the HTML embeds the same PNGs as base64 so it is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from calibration.calibrate import CalibrationResult

__all__ = ["write_report"]


def _f(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def _figures(result: CalibrationResult) -> dict[str, bytes]:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        out[name] = buf.getvalue()

    # reliability diagram
    fig, ax = plt.subplots(figsize=(5, 4.2))
    rows = [r for r in result.reliability if r["n"]]
    xs = [r["stated"] for r in rows]
    ys = [r["accuracy"] for r in rows]
    err = [[r["accuracy"] - r["ci"][0] for r in rows], [r["ci"][1] - r["accuracy"] for r in rows]]
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label="observed accuracy (95% CI)")
    for r in rows:
        ax.annotate(f"n={r['n']}", (r["stated"], r["accuracy"]), textcoords="offset points", xytext=(4, -12),
                    fontsize=7)
    ax.set(xlim=(0, 1.05), ylim=(0, 1.05), xlabel="stated confidence / 5", ylabel="P(prediction correct)",
           title=f"Reliability (ECE {_f(result.policy.sdt.ece)})")
    ax.legend(fontsize=8, loc="lower right")
    save(fig, "reliability")

    # risk-coverage with operating points
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for key, label in (("calibrated", "calibrated P(correct)"), ("stated_confidence", "stated confidence")):
        rc = result.risk_coverage[key]
        if rc["coverage"]:
            ax.step([0.0] + rc["coverage"], [rc["risk"][0]] + rc["risk"], where="pre",
                    label=f"{label} (AURC {rc['aurc']:.4f})")
    target_risk = 1 - result.policy.target_accuracy
    ax.axhline(target_risk, color="red", lw=1, ls=":", label=f"target risk {target_risk:.3f}")
    for key, marker, label in (("policy", "*", "chosen thresholds"), ("baseline_conf5", "s", "confidence 5 only")):
        op = result.operating_points[key]
        if op["coverage"] and op["accuracy"] is not None:
            ax.plot([op["coverage"]], [1 - op["accuracy"]], marker, ms=11, label=label)
    ax.set(xlim=(0, 1), ylim=(0, None), xlabel="coverage (share auto-routed)", ylabel="risk (error rate)",
           title="Risk-coverage (held-out prompts)")
    ax.legend(fontsize=7)
    save(fig, "risk_coverage")

    # per-topic d' with CIs, and per-harm accuracy
    for group, stat, name, ylabel in (("topic", "d_prime", "topic_dprime", "d'"),
                                      ("harm", "accuracy", "harm_accuracy", "accuracy")):
        cells = [c for c in result.cells if c.group == group]
        fig, ax = plt.subplots(figsize=(max(4.5, 0.5 * len(cells) + 2), 4))
        if cells:
            xs = list(range(len(cells)))
            vals = [getattr(c.summary, stat) for c in cells]
            lo = [c.summary.ci.get(stat, (None, None))[0] for c in cells]
            hi = [c.summary.ci.get(stat, (None, None))[1] for c in cells]
            for i, c in enumerate(cells):
                if vals[i] is None:
                    continue
                e = [[vals[i] - (lo[i] if lo[i] is not None else vals[i])],
                     [(hi[i] if hi[i] is not None else vals[i]) - vals[i]]]
                ax.errorbar([i], [vals[i]], yerr=e, fmt="o" if not c.summary.small else "x", capsize=3,
                            color="C0" if not c.summary.small else "C3")
            ax.set_xticks(xs, [c.name for c in cells], rotation=45, ha="right", fontsize=8)
        title = "d' by topic" if group == "topic" else f"accuracy by {result.harm_source}"
        ax.set(ylabel=ylabel, title=title + " (95% CI; red x = small cell)")
        save(fig, name)
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _sections(result: CalibrationResult) -> list[tuple[str, str | None, list[str], list[list[str]]]]:
    """(title, figure name, table header, table rows) for each report section."""
    pol = result.policy
    cells_rows = []
    for c in result.cells:
        s = c.summary
        ci = s.ci
        th = pol.topics[c.name].thresholds if c.group == "topic" else (pol.global_thresholds if c.group == "overall" else None)
        cells_rows.append([
            c.group, c.name, str(s.n), str(s.n_prompts),
            f"{_f(s.accuracy)} [{_f(ci['accuracy'][0])}, {_f(ci['accuracy'][1])}]",
            f"{_f(s.hit_rate)} [{_f(ci['hit_rate'][0])}, {_f(ci['hit_rate'][1])}]",
            f"{_f(s.false_alarm_rate)} [{_f(ci['false_alarm_rate'][0])}, {_f(ci['false_alarm_rate'][1])}]",
            f"{_f(s.d_prime, '.2f')} [{_f(ci['d_prime'][0], '.2f')}, {_f(ci['d_prime'][1], '.2f')}]",
            f"{_f(s.criterion, '.2f')} [{_f(ci['criterion'][0], '.2f')}, {_f(ci['criterion'][1], '.2f')}]",
            _f(s.ece), _f(s.brier),
            _f(th.block if th else None), _f(th.pass_ if th else None),
            ("**small**: " + (s.reason or "")) if s.small else "",
        ])
    h, m, fa, cr = result.cells[0].counts
    conf_rows = [["predicted refuse", f"{h} (hit)", f"{fa} (false alarm)"],
                 ["predicted comply", f"{m} (miss)", f"{cr} (correct rejection)"]]
    rel_rows = [[str(r["confidence"]), _f(r["stated"], ".1f"), str(r["n"]), _f(r["accuracy"]),
                 f"[{_f(r['ci'][0])}, {_f(r['ci'][1])}]" if r["ci"] else "–"] for r in result.reliability]
    ops = result.operating_points
    op_rows = []
    for key, label in (("policy", "calibrated thresholds (policy)"), ("baseline_conf5", "trust only confidence 5")):
        op = ops[key]
        op_rows.append([label, _f(op["coverage"]), _f(op["accuracy"]), str(op["n_routed"]), str(op["n"])])
    rc = result.risk_coverage
    op_rows.append(["AURC calibrated / stated", _f(rc["calibrated"]["aurc"], ".4f"),
                    _f(rc["stated_confidence"]["aurc"], ".4f"), "", ""])
    return [
        ("Confusion table (SDT convention: signal = the model refused)", None,
         ["", "refused", "complied"], conf_rows),
        ("SDT statistics with 95% prompt-bootstrap CIs", None,
         ["group", "cell", "n", "prompts", "accuracy", "H", "FA", "d'", "c", "ECE", "Brier", "block", "pass", "note"],
         cells_rows),
        ("Reliability of stated confidence", "reliability",
         ["confidence", "stated", "n", "accuracy", "95% CI (Clopper-Pearson)"], rel_rows),
        (f"Operating points on held-out prompts (target accuracy {pol.target_accuracy}, confidence "
         f"{pol.confidence})", "risk_coverage", ["rule", "coverage", "accuracy", "routed", "n"], op_rows),
        ("d' by topic", "topic_dprime", [], []),
        (f"Accuracy by {result.harm_source}", "harm_accuracy", [], []),
    ]


def write_report(result: CalibrationResult, out_dir: Path | str) -> tuple[Path, Path]:
    """Write ``report.md`` (+ PNGs) and self-contained ``report.html`` into ``out_dir``."""
    figs = _figures(result)  # raises ImportError without matplotlib, before anything is written
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    pol = result.policy
    intro = [
        f"model: `{pol.model}` · probe template: `{pol.probe_template}` · policy version `{pol.version}`",
        f"n = {pol.n} datapoints over {pol.n_prompts} prompts · data hash `{pol.data_hash[:16]}` · created {pol.created_at}",
        f"fit/calibration split by prompt: {result.split}",
        f"ECE of stated confidence on held-out prompts {_f(result.ece_calibrated['stated_heldout'])}, "
        f"after recalibration {_f(result.ece_calibrated['calibrated_heldout'])} (10 equal-width bins)",
    ] + [f"note: {n}" for n in result.notes]
    md = ["# refusal-guard calibration report", ""] + [f"- {x}" for x in intro] + [""]
    body = ["<h1>refusal-guard calibration report</h1>", "<ul>"]
    body += [f"<li>{html.escape(x)}</li>" for x in intro] + ["</ul>"]
    for title, fig, header, rows in _sections(result):
        md += [f"## {title}", ""]
        body.append(f"<h2>{html.escape(title)}</h2>")
        if fig:
            (d / f"{fig}.png").write_bytes(figs[fig])
            md += [f"![{fig}]({fig}.png)", ""]
            b64 = base64.b64encode(figs[fig]).decode()
            body.append(f'<img alt="{fig}" src="data:image/png;base64,{b64}">')
        if rows:
            md += [_md_table(header, rows), ""]
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{html.escape(c.replace('**', ''))}</td>" for c in r) + "</tr>" for r in rows]
            body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>refusal-guard calibration</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    md_path, html_path = d / "report.md", d / "report.html"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    html_path.write_text(page, encoding="utf-8")
    return md_path, html_path
