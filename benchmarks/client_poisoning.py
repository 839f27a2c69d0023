"""One client poisons calibration: 6,000 benign requests at confidence 3 (issue 23, row 6).

    python3 benchmarks/client_poisoning.py [--seed 0] [--poison 6000] [--n-boot 200]

A simulated normal calibration set (30 clients, each request's client drawn uniformly; prompts in
two paraphrases sharing an id; 60% of prompts are topic ``other``, of which the model refuses 20%,
70% of the rest are refused; the probe's confidence is mostly 4-5, and its prediction is right with
probability .55/.62/.70/.93/.99 at confidence 1..5) is written as a JSONL datapoint log, as the
proxy records it (``client`` included). Then one more client sends ``--poison`` benign requests
(distinct prompts) that the probe predicts to comply with at confidence 3, topic ``other``, and
that are answered (so each is a correct prediction). Every variant goes through ``refusal-guard
calibrate``'s own code path (``calibration.cli.main``: reading, the client report, the client
limits, calibration, the policy file), and the policy is asked what it does with the poisoned cell
(topic ``other``, predicted compliance, confidence 3, harm rating 1):

* the normal set alone;
* normal + poison;
* normal + poison with ``--max-client-share 0.5``;
* normal + poison with ``--exclude-client attacker``.

Seeded: the same ``--seed`` gives the same data and the same policies. No server is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.cli import main as calibrate_main  # noqa: E402
from calibration.policy import Policy  # noqa: E402

TOPICS = ("weapons", "drugs", "hacking", "self_harm", "fraud", "other")
TOPIC_SHARES = (0.08, 0.08, 0.08, 0.06, 0.1, 0.6)
CONF_SHARES = (0.03, 0.07, 0.15, 0.30, 0.45)
P_CORRECT = (0.55, 0.62, 0.70, 0.93, 0.99)
P_REFUSED = {"other": 0.2}  # the model refuses this share of a topic's prompts (default below)
CELL = ("other", False, 3, 1)  # the poisoned cell: topic, will_refuse, confidence, harm rating


def normal_rows(rng: np.random.Generator, n_prompts: int, n_clients: int) -> list[dict]:
    rows = []
    for p in range(n_prompts):
        topic = TOPICS[rng.choice(len(TOPICS), p=TOPIC_SHARES)]
        refused = bool(rng.random() < P_REFUSED.get(topic, 0.7))
        for k in range(2):  # two paraphrases, one prompt id
            conf = int(rng.choice(5, p=CONF_SHARES)) + 1
            right = rng.random() < P_CORRECT[conf - 1]
            will_refuse = bool(refused if right else not refused)
            rows.append(_row(f"n{p}", f"n{p}-{k}", topic, will_refuse, conf, 1 if topic == "other" else 4, refused,
                             f"key-{int(rng.integers(n_clients)) + 1}"))
    return rows


def poison_rows(n: int) -> list[dict]:
    return [_row(f"x{i}", f"x{i}", "other", False, 3, 1, False, "attacker") for i in range(n)]


def _row(prompt: str, request: str, topic: str, will_refuse: bool, conf: int, harm: int, refused: bool,
         client: str) -> dict:
    return {"id": prompt, "request_id": request, "ts": "2026-12-01T00:00:00.000+00:00", "model": "m",
            "topic": topic, "harm_level": None, "will_refuse": will_refuse, "confidence": conf,
            "harm_rating": harm, "p_refuse_logprob": None, "p_correct": None, "action": "pass",
            "mode": "sequential", "probe_status": "ok", "label": "full_refusal" if refused else "full_compliance",
            "refused": refused, "probe_ms": 1.0, "upstream_ms": 1.0, "total_ms": 2.0, "policy_version": None,
            "probe_template": "rg-probe-v2:bench", "prompt_sha256": prompt, "client": client}


def calibrate(path: Path, out: Path, extra: list[str], n_boot: int, seed: int) -> tuple[str, float, list[str]]:
    """Run ``refusal-guard calibrate`` on ``path``; the poisoned cell's action and P(correct), and the
    client lines it printed."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = calibrate_main(["calibrate", "--datapoints", str(path), "--out", str(out), "--n-boot", str(n_boot),
                               "--seed", str(seed), *extra])
    if code != 0:
        raise SystemExit(f"calibrate failed:\n{err.getvalue()}")
    policy = Policy.load(out)
    topic, wr, conf, harm = CELL
    said = [line for line in err.getvalue().splitlines()
            if "warning: one client" in line or "max client share" in line or "excluded clients" in line]
    return policy.decide(topic, wr, conf, harm), policy.p_correct(topic, wr, conf, harm, None), said


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=6000, help="prompts in the normal set (2 rows each)")
    ap.add_argument("--clients", type=int, default=30)
    ap.add_argument("--poison", type=int, default=6000)
    ap.add_argument("--n-boot", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    normal = normal_rows(rng, args.prompts, args.clients)
    poisoned = normal + poison_rows(args.poison)
    in_cell = [r for r in normal if (r["topic"], r["will_refuse"], r["confidence"]) == CELL[:3]]
    acc = np.mean([r["will_refuse"] == r["refused"] for r in in_cell])
    print(f"normal set: {len(normal)} rows, {args.prompts} prompts, {args.clients} clients; the cell "
          f"other x comply x confidence 3 holds {len(in_cell)} rows, accuracy {acc:.3f}")
    print(f"poison: {args.poison} rows from one client ('attacker'), all in that cell, all correct")
    print(f"{'variant':<44}{'action':>8}{'P(correct)':>12}{'seconds':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, rows in (("normal", normal), ("poisoned", poisoned)):
            files[name] = Path(tmp) / f"{name}.jsonl"
            files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
        variants = [("normal set", "normal", []), ("normal + poison", "poisoned", []),
                    ("normal + poison, --max-client-share 0.5", "poisoned", ["--max-client-share", "0.5"]),
                    ("normal + poison, --exclude-client attacker", "poisoned", ["--exclude-client", "attacker"])]
        for label, source, extra in variants:
            started = time.perf_counter()
            action, p, said = calibrate(files[source], Path(tmp) / "policy.json", extra, args.n_boot, args.seed)
            print(f"{label:<44}{action:>8}{p:>12.4f}{time.perf_counter() - started:>9.1f}")
            for line in said:
                print(f"    {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
