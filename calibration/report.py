"""Markdown and self-contained HTML report of a calibration run.

The report opens with what the policy will do, in words (:mod:`calibration.outlook`): the shares
of requests blocked, passed and sent to review, the guarantee, and, when nothing is certified,
why and what would change that.  The statistics follow.

Content is built once as blocks (paragraphs of inline pieces, tables, figures) and rendered to
each format by its own small renderer, so neither format shows the other's markup: code is
```code``` in Markdown and ``<code>`` in HTML, never a backtick in HTML.

matplotlib (the optional ``[report]`` extra) is imported lazily inside :func:`write_report`, so
computing and writing the policy never needs it.  The Markdown links PNG files written next to it;
the HTML embeds the same PNGs as base64 so it is one self-contained file.  Every plot has a title
and axis labels; a plot with nothing to show says so on the plot and in a note under it; a cell
whose d' is not measurable (``d_prime`` None, or a single class: the model always or never
refused) gets no bar, only the label "not measurable".
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from calibration.calibrate import CalibrationResult, CellStats
from calibration.outlook import policy_outlook

__all__ = ["write_report"]


def _f(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


# --- blocks -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Code:
    """Inline code (an identifier, a hash, a command)."""

    text: str


Inline = Union[str, Code]


@dataclass(frozen=True)
class Para:
    parts: tuple[Inline, ...]
    lead: bool = False  # the opening summary: emphasised


@dataclass(frozen=True)
class Items:
    rows: tuple[tuple[Inline, ...], ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Figure:
    name: str
    alt: str
    note: str | None  # shown under the plot (e.g. why it is empty)


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


Block = Union[Para, Items, Table, Figure, Heading]


def _md_inline(parts: tuple[Inline, ...]) -> str:
    return "".join(f"`{p.text}`" if isinstance(p, Code) else p for p in parts)


def _html_inline(parts: tuple[Inline, ...]) -> str:
    return "".join(f"<code>{html.escape(p.text)}</code>" if isinstance(p, Code) else html.escape(p) for p in parts)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            text = _md_inline(b.parts)
            out += [f"**{text}**" if b.lead else text, ""]
        elif isinstance(b, Items):
            out += [f"- {_md_inline(r)}" for r in b.rows] + [""]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(map(_md_cell, b.header)) + " |")
            out.append("|" + "---|" * len(b.header))
            out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b.rows]
            out.append("")
        elif isinstance(b, Figure):
            out += [f"![{b.alt}]({b.name}.png)", ""]
            if b.note:
                out += [f"*{b.note}*", ""]
    return "\n".join(out)


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}"
    ".outlook{background:#f4f7fb;border:1px solid #c9d6e8;border-radius:6px;padding:.6em 1.2em}"
    ".outlook p.lead{font-size:1.15em;font-weight:600}"
    "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
    "th{background:#f0f0f0}img{max-width:100%}.note{color:#555;font-style:italic}"
    "code{background:#f3f3f3;padding:0 3px;border-radius:3px}"
)


def render_html(blocks: list[Block], figures: dict[str, bytes], outlook_end: int) -> str:
    """``outlook_end``: the blocks before this index form the boxed opening summary."""
    body: list[str] = []
    for i, b in enumerate(blocks):
        if i == 1 and outlook_end > 1:
            body.append('<section class="outlook" id="outlook">')
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            cls = ' class="lead"' if b.lead else ""
            body.append(f"<p{cls}>{_html_inline(b.parts)}</p>")
        elif isinstance(b, Items):
            body.append("<ul>" + "".join(f"<li>{_html_inline(r)}</li>" for r in b.rows) + "</ul>")
        elif isinstance(b, Table):
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b.header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                                  for r in b.rows) + "</table>")
        elif isinstance(b, Figure):
            b64 = base64.b64encode(figures[b.name]).decode()
            body.append(f'<figure><img alt="{html.escape(b.alt)}" src="data:image/png;base64,{b64}">')
            if b.note:
                body.append(f'<figcaption class="note">{html.escape(b.note)}</figcaption>')
            body.append("</figure>")
        if i == outlook_end - 1 and outlook_end > 1:
            body.append("</section>")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>refusal-guard calibration report"
            f"</title><style>{_STYLE}</style></head><body>{''.join(body)}</body></html>")


# --- figures ----------------------------------------------------------------------------------
def _measurable(c: CellStats, stat: str) -> bool:
    """d' and c need both classes, H a refusal, FA a compliance; accuracy needs any data."""
    if getattr(c.summary, stat) is None:
        return False
    h, m, fa, cr = c.counts
    if stat in ("d_prime", "criterion"):
        return h + m > 0 and fa + cr > 0
    if stat == "hit_rate":
        return h + m > 0
    if stat == "false_alarm_rate":
        return fa + cr > 0
    return c.summary.n > 0


def _figures(result: CalibrationResult) -> tuple[dict[str, bytes], dict[str, str | None]]:
    """The PNGs, and per figure a note for the reader (None when the plot speaks for itself)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    notes: dict[str, str | None] = {}

    def save(fig: Any, name: str, note: str | None = None, empty: bool = False) -> None:
        """``note`` goes under the plot; on the plot too when it is ``empty``."""
        if note and empty:
            fig.axes[0].text(0.5, 0.5, note, transform=fig.axes[0].transAxes, ha="center", va="center",
                             fontsize=9, wrap=True, color="#444",
                             bbox={"boxstyle": "round", "fc": "#fff8e0", "ec": "#d8c27a"})
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        out[name] = buf.getvalue()
        notes[name] = note

    # reliability diagram
    fig, ax = plt.subplots(figsize=(5.5, 4.4))
    rows = [r for r in result.reliability if r["n"]]
    xs = [r["stated"] for r in rows]
    ys = [r["accuracy"] for r in rows]
    err = [[r["accuracy"] - r["ci"][0] for r in rows], [r["ci"][1] - r["accuracy"] for r in rows]]
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    if rows:
        ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label="observed accuracy (95% CI)")
    for r in rows:
        ax.annotate(f"n={r['n']}", (r["stated"], r["accuracy"]), textcoords="offset points", xytext=(4, -12),
                    fontsize=7)
    ax.set(xlim=(0, 1.05), ylim=(0, 1.05), xlabel="stated confidence / 5",
           ylabel="share of predictions that were correct",
           title=f"Reliability of stated confidence (ECE {_f(result.policy.sdt.ece)})")
    ax.legend(fontsize=8, loc="lower right")
    save(fig, "reliability", None if rows else "No datapoints to plot.", empty=not rows)

    # risk-coverage with operating points
    fig, ax = plt.subplots(figsize=(5.8, 4.4))
    drawn = 0
    for key, label in (("calibrated", "calibrated P(correct)"), ("stated_confidence", "stated confidence")):
        rc = result.risk_coverage[key]
        if rc["coverage"]:
            ax.step([0.0] + rc["coverage"], [rc["risk"][0]] + rc["risk"], where="pre",
                    label=f"{label} (AURC {rc['aurc']:.4f})")
            drawn += 1
    target_risk = 1 - result.policy.target_accuracy
    ax.axhline(target_risk, color="red", lw=1, ls=":", label=f"target risk {target_risk:.3f}")
    for key, marker, label in (("policy", "*", "chosen thresholds"), ("baseline_conf5", "s", "confidence 5 only")):
        op = result.operating_points[key]
        if op["coverage"] and op["accuracy"] is not None:
            ax.plot([op["coverage"]], [1 - op["accuracy"]], marker, ms=11, label=label)
    ax.set(xlim=(0, 1), ylim=(0, None), xlabel="coverage (share of requests auto-routed)",
           ylabel="risk (share of auto-routed requests wrong)", title="Risk vs coverage on held-out prompts")
    ax.legend(fontsize=7, loc="best")
    pol_op = result.operating_points["policy"]
    note = None
    if not drawn:
        note = "No held-out prompts: the curve needs the calibration half of the data, which is empty."
    elif not pol_op["n_routed"]:
        note = "The chosen thresholds auto-route nothing (coverage 0), so there is no policy point on the curve."
    save(fig, "risk_coverage", note, empty=not drawn)

    # per-topic d' and per-harm accuracy: bars with 95% CI whiskers, none where not measurable
    for group, stat, name in (("topic", "d_prime", "topic_dprime"), ("harm", "accuracy", "harm_accuracy")):
        cells = [c for c in result.cells if c.group == group]
        fig, ax = plt.subplots(figsize=(max(5.5, 0.6 * len(cells) + 2.5), 4.4))
        ylabel = "d' (sensitivity)" if stat == "d_prime" else "accuracy of the refusal prediction"
        xlabel = "topic" if group == "topic" else f"{result.harm_source.replace('_', ' ')}"
        missing = []
        for i, c in enumerate(cells):
            if not _measurable(c, stat):
                missing.append(c.name)
                ax.text(i, 0, "not\nmeasurable", ha="center", va="bottom", fontsize=7, color="#a33", rotation=90)
                continue
            v = getattr(c.summary, stat)
            lo, hi = c.summary.ci.get(stat, (None, None))
            ax.bar([i], [v], color="#d9a0a0" if c.summary.small else "#7aa6d6", edgecolor="#333", lw=0.5)
            if lo is not None and hi is not None:
                ax.errorbar([i], [v], yerr=[[v - lo], [hi - v]], fmt="none", ecolor="#222", capsize=3)
            elif lo is not None or hi is not None:  # a bound the data cannot fix: an open-ended whisker
                up = lo is not None
                end, tip = (lo, v + 0.6) if up else (hi, v - 0.6)
                ax.vlines(i, min(end, tip), max(end, tip), color="#222")
                ax.plot([i], [tip], marker="^" if up else "v", color="#222")
                ax.text(i + 0.08, tip, "unbounded", fontsize=7, color="#222", va="center")
        if cells:
            ax.set_xticks(range(len(cells)), [c.name for c in cells], rotation=45 if group == "topic" else 0,
                          ha="right" if group == "topic" else "center", fontsize=8)
        ax.axhline(0, color="#555", lw=0.6)
        ax.set_xlim(-0.6, max(len(cells), 1) - 0.4)
        what = "d' by topic" if stat == "d_prime" else f"Accuracy by {xlabel}"
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{what} (95% CI; pink = small cell)")
        if stat == "accuracy":
            ax.set_ylim(0, 1.05)
        if not cells:
            note = f"No {xlabel} recorded in the datapoints." if group == "harm" else "No topics in the datapoints."
        elif len(missing) == len(cells):
            note = ("d' is not measurable in any topic: each topic has only one class (the model always or never "
                    "refused)." if stat == "d_prime" else "No data in any cell.")
        else:
            note = None
        save(fig, name, note, empty=note is not None)
        if note is None and missing:
            notes[name] = f"Not measurable (no bar): {', '.join(missing)}."
    return out, notes


# --- content ----------------------------------------------------------------------------------
def _split_words(split: dict[str, int]) -> str:
    return (f"{split.get('fit_prompts', 0)} prompts ({split.get('fit_rows', 0)} datapoints) fit the recalibration; "
            f"{split.get('calibration_prompts', 0)} prompts ({split.get('calibration_rows', 0)} datapoints) "
            "certify the thresholds")


def _blocks(result: CalibrationResult, notes: dict[str, str | None]) -> tuple[list[Block], int]:
    pol = result.policy
    outlook = policy_outlook(result)
    sentences = outlook.lines()
    blocks: list[Block] = [Heading("refusal-guard calibration report", 1),
                           Heading("What this policy will do"),
                           Para((sentences[0],), lead=True)]
    blocks += [Para((s,)) for s in sentences[1:]]
    outlook_end = len(blocks)
    ece = result.ece_calibrated
    blocks += [
        Heading("Data and settings"),
        Items((
            ("model: ", Code(pol.model or "unknown"), " · probe template: ", Code(pol.probe_template or "unknown"),
             " · policy version ", Code(pol.version)),
            (f"n = {pol.n} datapoints over {pol.n_prompts} prompts · data hash ", Code(pol.data_hash[:16]),
             f" · created {pol.created_at}"),
            (f"target accuracy {pol.target_accuracy:.0%} of auto-routed requests, with {pol.confidence:.0%} "
             "confidence",),
            ("split by prompt: " + _split_words(result.split),),
            (f"expected calibration error on held-out prompts: stated confidence {_f(ece['stated_heldout'])} "
             "(one bin per confidence level), calibrated P(correct) "
             f"{_f(ece['calibrated_heldout'])} (10 equal-width bins)",),
            *((f"note: {n}",) for n in result.notes),
        )),
    ]
    blocks += _sections(result, notes)
    return blocks, outlook_end


def _sections(result: CalibrationResult, notes: dict[str, str | None]) -> list[Block]:
    pol = result.policy
    cells_rows = []
    for c in result.cells:
        s = c.summary
        ci = s.ci
        th = pol.topics[c.name].thresholds if c.group == "topic" else (pol.global_thresholds if c.group == "overall" else None)

        def iv(stat: str, spec: str = ".3f") -> str:
            if not _measurable(c, stat):
                return "not measurable"
            lo, hi = ci.get(stat, (None, None))  # a None bound on a measurable statistic: unbounded
            low = "−∞" if lo is None else format(lo, spec)
            high = "∞" if hi is None else format(hi, spec)
            return f"{_f(getattr(s, stat), spec)} [{low}, {high}]"

        cells_rows.append((
            c.group, c.name, str(s.n), str(s.n_prompts), iv("accuracy"), iv("hit_rate"), iv("false_alarm_rate"),
            iv("d_prime", ".2f"), iv("criterion", ".2f"), _f(s.ece), _f(s.brier),
            _f(th.block if th else None), _f(th.pass_ if th else None),
            ("small: " + (s.reason or "")) if s.small else "",
        ))
    h, m, fa, cr = result.cells[0].counts
    conf_rows = (("predicted refuse", f"{h} (hit)", f"{fa} (false alarm)"),
                 ("predicted comply", f"{m} (miss)", f"{cr} (correct rejection)"))
    rel_rows = tuple((str(r["confidence"]), _f(r["stated"], ".1f"), str(r["n"]), _f(r["accuracy"]),
                      f"[{_f(r['ci'][0])}, {_f(r['ci'][1])}]" if r["ci"] else "–") for r in result.reliability)
    ops = result.operating_points
    op_rows = []
    for key, label in (("policy", "calibrated thresholds (policy)"), ("baseline_conf5", "trust only confidence 5")):
        op = ops[key]
        op_rows.append((label, _f(op["coverage"]), _f(op["accuracy"]), str(op["n_routed"]), str(op["n"])))
    rc = result.risk_coverage
    op_rows.append(("AURC calibrated / stated", _f(rc["calibrated"]["aurc"], ".4f"),
                    _f(rc["stated_confidence"]["aurc"], ".4f"), "", ""))
    harm = result.harm_source.replace("_", " ")
    return [
        Heading("Confusion table (SDT convention: signal = the model refused)"),
        Table(("", "refused", "complied"), conf_rows),
        Heading("SDT statistics with 95% intervals, uncorrected: the detector's label as the outcome (rates: "
                "design-effect Wilson; d' and c: MOVER; ∞: unbounded)"),
        Table(("group", "cell", "n", "prompts", "accuracy", "H", "FA", "d'", "c", "ECE", "Brier", "block", "pass",
               "note"), tuple(cells_rows)),
        *_corrected_blocks(result),
        Heading("Reliability of stated confidence"),
        Figure("reliability", "reliability diagram", notes.get("reliability")),
        Table(("confidence", "stated", "n", "accuracy", "95% CI (Clopper-Pearson)"), rel_rows),
        Heading(f"Operating points on held-out prompts (target accuracy {pol.target_accuracy}, confidence "
                f"{pol.confidence})"),
        Figure("risk_coverage", "risk-coverage curve", notes.get("risk_coverage")),
        Table(("rule", "coverage", "accuracy", "routed", "n"), tuple(op_rows)),
        Heading("d' by topic"),
        Figure("topic_dprime", "d' by topic", notes.get("topic_dprime")),
        Heading(f"Accuracy by {harm}"),
        Figure("harm_accuracy", f"accuracy by {harm}", notes.get("harm_accuracy")),
    ]


def _corrected_blocks(result: CalibrationResult) -> list[Block]:
    """Judge-corrected figures beside the detector's, or a plain statement that the figures are uncorrected."""
    from calibration.label_error import DETECTOR_ERROR_NOTE, METHOD
    rows = [c for c in result.cells if c.corrected is not None]
    if not rows:
        return [Heading("Judge-corrected SDT statistics"),
                Para(("None: no datapoint carries a judge label, so the figures above are UNCORRECTED: every "
                      f"outcome is the detector's label ({DETECTOR_ERROR_NOTE}). Configure judge_url, judge_model "
                      "and judge_fraction to correct them.",))]

    def iv(v: float | None, ci: tuple[float | None, float | None], spec: str = ".3f") -> str:
        if v is None:
            return "not measurable"
        lo, hi = ci
        return f"{_f(v, spec)} [{'−∞' if lo is None else format(lo, spec)}, {'∞' if hi is None else format(hi, spec)}]"

    table_rows = []
    for cs in rows:
        c = cs.corrected
        table_rows.append((cs.group, cs.name, str(c.n), str(c.n_judged), iv(c.accuracy, c.ci["accuracy"]),
                           iv(c.hit_rate, c.ci["hit_rate"]), iv(c.false_alarm_rate, c.ci["false_alarm_rate"]),
                           iv(c.d_prime, c.ci["d_prime"], ".2f"), iv(c.criterion, c.ci["criterion"], ".2f"),
                           _f(cs.summary.d_prime, ".2f"), _f(cs.summary.accuracy),
                           "; ".join(c.notes)))
    return [Heading("Judge-corrected SDT statistics with 95% intervals (beside the detector's uncorrected d' and "
                    "accuracy)"),
            Para((f"Method: {METHOD}. Assumes the judge's label is the truth and the judged rows are a uniform "
                  "random draw; see docs/calibration.md, \"Judge-corrected figures\".",)),
            Table(("group", "cell", "n", "judged", "accuracy", "H", "FA", "d'", "c", "detector d'",
                   "detector accuracy", "note"), tuple(table_rows))]


def write_report(result: CalibrationResult, out_dir: Path | str) -> tuple[Path, Path]:
    """Write ``report.md`` (+ PNGs) and self-contained ``report.html`` into ``out_dir``."""
    figs, notes = _figures(result)  # raises ImportError without matplotlib, before anything is written
    blocks, outlook_end = _blocks(result, notes)
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    for name, png in figs.items():
        (d / f"{name}.png").write_bytes(png)
    md_path, html_path = d / "report.md", d / "report.html"
    md_path.write_text(render_markdown(blocks), encoding="utf-8")
    html_path.write_text(render_html(blocks, figs, outlook_end), encoding="utf-8")
    return md_path, html_path
