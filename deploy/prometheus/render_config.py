#!/usr/bin/env python3
"""Render prometheus.template.yml for static refusal-guard targets (tests, bare-metal, one-offs).

    python deploy/prometheus/render_config.py --target 127.0.0.1:18080 --target 127.0.0.1:18081 \\
        --scrape-interval 1s --evaluation-interval 1s --out /tmp/prom/prometheus.yml

From Python (e.g. a test that starts real proxies and a real Prometheus)::

    import importlib.util
    spec = importlib.util.spec_from_file_location("render_config", "deploy/prometheus/render_config.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    text = mod.render(["127.0.0.1:18080", "127.0.0.1:18081"], scrape_interval="1s")

The rule files are referenced by absolute path (``--rules-dir``, default: this directory's
``rules/``), so the rendered file may be written anywhere. Check it with ``promtool check config``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from string import Template

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "prometheus.template.yml"
RULES_DIR = HERE / "rules"
_DURATION = re.compile(r"^[0-9]+(ms|s|m|h)$")
_TARGET = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:[0-9]+$")


def render(targets: list[str], *, scrape_interval: str = "15s", evaluation_interval: str | None = None,
           rules_dir: Path | str = RULES_DIR, job: str = "refusal-guard") -> str:
    """The config text for ``targets`` ("host:port" each)."""
    if not targets:
        raise ValueError("at least one target is needed")
    for target in targets:
        if not _TARGET.match(target):
            raise ValueError(f"target {target!r} is not host:port")
    evaluation_interval = evaluation_interval or scrape_interval
    for value in (scrape_interval, evaluation_interval):
        if not _DURATION.match(value):
            raise ValueError(f"{value!r} is not a Prometheus duration like 15s")
    return Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        scrape_interval=scrape_interval,
        evaluation_interval=evaluation_interval,
        rules_dir=json.dumps(str(Path(rules_dir).resolve()))[1:-1],
        job=job,
        targets=json.dumps(targets),  # a YAML flow sequence
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", required=True, help="host:port of one replica (repeat)")
    parser.add_argument("--scrape-interval", default="15s")
    parser.add_argument("--evaluation-interval", default=None, help="default: the scrape interval")
    parser.add_argument("--rules-dir", type=Path, default=RULES_DIR)
    parser.add_argument("--job", default="refusal-guard")
    parser.add_argument("--out", type=Path, help="file to write (default: stdout)")
    args = parser.parse_args()
    text = render(args.target, scrape_interval=args.scrape_interval, evaluation_interval=args.evaluation_interval,
                  rules_dir=args.rules_dir, job=args.job)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
