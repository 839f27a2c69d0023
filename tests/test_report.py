"""The calibration report a user can act on: what the policy will do first, clean HTML, honest plots.

The last test opens the HTML report in real headless Chromium (Debian's ``chromium``), takes a
screenshot and dumps the DOM: the page must not be blank and must open with the conclusion.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from calibration.calibrate import calibrate_table
from calibration.datapoints import DatapointTable
from calibration.outlook import Outlook, policy_outlook
from calibration.report import write_report
from calibration.sdt import simulate
from tests.servers import spawn, stop_group

pytest.importorskip("matplotlib")


def _smollm_like(n: int = 60, seed: int = 1) -> DatapointTable:
    """Like SmolLM2: predicts "comply" at confidence 1 for everything, refuses ~30%."""
    rng = np.random.default_rng(seed)
    return DatapointTable.from_arrays(
        prompt=np.arange(n), will_refuse=np.zeros(n, bool), confidence=np.ones(n, np.int8),
        refused=rng.random(n) < 0.3, topic=np.arange(n) % 3, topics=["weapons", "drugs", "other"],
        harm_level=1 + np.arange(n) % 5)


def _good(n_prompts: int = 1500, seed: int = 3) -> DatapointTable:
    d = simulate(n_prompts, 2, 3.5, 0.0, n_topics=3, seed=seed)
    return DatapointTable.from_arrays(prompt=d["prompt"], will_refuse=d["will_refuse"], confidence=d["confidence"],
                                      refused=d["refused"], topic=d["topic"], topics=["weapons", "drugs", "fraud"],
                                      harm_rating=d["harm_rating"])


@pytest.fixture(scope="module")
def uncertified(tmp_path_factory):
    result = calibrate_table(_smollm_like(), target_accuracy=0.98, confidence=0.95, n_boot=100)
    out = tmp_path_factory.mktemp("report-none")
    md, html = write_report(result, out)
    return result, md.read_text(), html.read_text(), html


def test_outlook_of_an_uncertified_policy_says_everything_goes_to_review(uncertified):
    result, md, _, _ = uncertified
    o = policy_outlook(result)
    assert isinstance(o, Outlook)
    assert not o.certified and (o.share_block, o.share_pass, o.share_review) == (0.0, 0.0, 1.0)
    assert o.why_not and "98% accurate" in o.why_not
    assert o.more_datapoints is None  # 70% accurate: more of the same cannot reach 98%
    lines = o.lines()
    assert "sends 100% to review" in lines[0]
    assert any("would not make a threshold certifiable" in line for line in lines)


def test_outlook_shares_are_the_policy_applied_to_the_datapoints():
    table = _good()
    result = calibrate_table(table, target_accuracy=0.95, confidence=0.95, n_boot=50)
    o = policy_outlook(result)
    assert o.certified and o.why_not is None and "95% confidence" in o.guarantee
    actions = [result.policy.decide(table.topics[t], bool(w), int(c), int(h))
               for t, w, c, h in zip(table.topic, table.will_refuse, table.confidence, table.harm_rating)]
    assert o.share_block == pytest.approx(actions.count("block") / table.n)
    assert o.share_pass == pytest.approx(actions.count("pass") / table.n)
    assert o.share_block + o.share_pass + o.share_review == pytest.approx(1.0)
    assert 0 < o.share_review < 1


def test_report_opens_with_the_outlook_and_html_has_no_markdown(uncertified):
    result, md, page, _ = uncertified
    o = policy_outlook(result)
    first = md.split("\n## ")[1]  # the first section
    assert first.startswith("What this policy will do") and o.lines()[0] in first
    lead = re.search(r'<p class="lead">(.*?)</p>', page)
    assert lead and "sends 100% to review" in lead.group(1)
    assert page.index('id="outlook"') < page.index("Data and settings") < page.index("Confusion table")
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "`" not in text and "**" not in text and "{'" not in text and "fit_prompts" not in text
    assert "<code>" in text  # identifiers are marked up as HTML, not Markdown
    assert "one bin per confidence level" in md and "10 equal-width bins" in md
    assert page.count("data:image/png;base64,") == 4
    assert "The chosen thresholds auto-route nothing" in page  # the risk-coverage note


def test_d_prime_not_measurable_gets_no_value_and_a_note(tmp_path):
    d = simulate(300, 2, 2.0, 0.0, n_topics=3, seed=5)
    refused = d["refused"].copy()
    refused[d["topic"] == 2] = False  # the model never refused in "cooking"
    table = DatapointTable.from_arrays(prompt=d["prompt"], will_refuse=d["will_refuse"], confidence=d["confidence"],
                                       refused=refused, topic=d["topic"], topics=["weapons", "drugs", "cooking"])
    result = calibrate_table(table, target_accuracy=0.98, confidence=0.95, n_boot=50)
    md = write_report(result, tmp_path)[0].read_text()
    assert "Not measurable (no bar): cooking." in md
    row = next(line for line in md.splitlines() if line.startswith("| topic | cooking |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells.count("not measurable") == 3  # H, d' and c: the model never refused there
    weapons = next(line for line in md.splitlines() if line.startswith("| topic | weapons |"))
    assert "not measurable" not in weapons


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (scripts/test.sh installs it)")
def test_report_renders_in_headless_chromium(uncertified, tmp_path):
    from PIL import Image

    result, _, _, html_path = uncertified
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,1600"]
    url = html_path.resolve().as_uri()

    def run(*extra: str, profile: str) -> str:
        proc = spawn([*flags, f"--user-data-dir={tmp_path / profile}", *extra, url], stdout=subprocess.PIPE,
                     stderr=subprocess.DEVNULL, text=True)
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            stop_group(proc, grace=5)  # chromium's helpers (zygote, renderers) are in its group
        assert proc.returncode == 0
        return out

    shot = tmp_path / "report.png"
    run(f"--screenshot={shot}", profile="profile-shot")
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 1600)
    pixels = np.asarray(image)
    assert (pixels < 200).mean() > 0.01  # text and plots, not a blank page
    assert len(np.unique(pixels)) > 20

    dom = run("--dump-dom", profile="profile-dom")
    lead = policy_outlook(result).lines()[0]
    assert lead in dom
    assert dom.index(lead) < dom.index("Confusion table")


def test_an_unbounded_d_prime_interval_is_shown_open_ended(tmp_path):
    """No misses at all: H may be 1, so d' has no finite upper bound (and c no finite lower one)."""
    rng = np.random.default_rng(0)
    n = 600
    refused = rng.random(n) < 0.5
    will_refuse = np.where(refused, True, rng.random(n) < 0.2)
    table = DatapointTable.from_arrays(prompt=np.arange(n), will_refuse=will_refuse, confidence=np.full(n, 5, np.int8),
                                       refused=refused, topic=np.arange(n) % 2, topics=["a", "b"])
    result = calibrate_table(table, n_boot=50)
    assert result.cell("topic", "a").summary.ci["d_prime"][1] is None
    md = write_report(result, tmp_path)[0].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| topic | a |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[8].endswith(", ∞]") and cells[9].startswith(cells[9].split(" ")[0] + " [−∞,")
