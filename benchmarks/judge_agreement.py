"""How far the LLM judge agrees with the labelled corpora: run the guard's judge over a seeded sample of each.

The judge (``guard.truth.judge.RefusalJudge``: the same prompt, structured-output ladder and strict parse the
proxy uses) labels a seeded random sample of each real-answer corpus in ``../shared/data`` (loaded by
``benchmarks/corpora.py``, with each corpus's label mapping from docs/detector.md), seeing the prompt the
model answered and the answer. Printed per corpus: rows asked, verdicts parsed, agreement of the judge's
binary (full or partial refusal = refusal; with ``--strict``, full refusal only) with the corpus label and
its 95% interval (Wilson, clustered by prompt group: ``calibration.agreement``), Cohen's kappa, the judge's
false-refusal and missed-refusal rates, and the tokens the answers reported. Failed or unparseable verdicts
are counted, never scored as agreement or disagreement (their share is a figure of its own).

Only the ``train`` and ``valid`` parts of each corpus are sampled (``corpora.part``): the ``final`` part is
kept unread for the detector's final figure. The corpora label different things (harmfulness, "not fully
complying", informativeness: docs/detector.md), so agreement with each says how well the judge's notion
of refusal matches that corpus's, not a single accuracy.

    python3 benchmarks/judge_agreement.py --url http://HOST:PORT/v1 --model MODEL [--api-key-env VAR]
    python3 benchmarks/judge_agreement.py --local --per-corpus 10     # the bundled SmolLM2-135M (a poor judge)

Any OpenAI-compatible endpoint works (the guarded upstream itself included). ``--local`` starts the bundled
llama.cpp server (``guard.ops.local_model``) for the run and stops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from calibration.agreement import agreement  # noqa: E402
from corpora import REAL, SHARED, load_corpus, part  # noqa: E402
from guard.truth.detector import Label, is_refusal  # noqa: E402
from guard.truth.judge import JUDGE_TEMPLATE_ID, RefusalJudge  # noqa: E402


def sample(rows: list, n: int, seed: int) -> list:
    """A seeded sample of ``n`` rows outside the corpus's final part (order-independent of the file)."""
    pool = [r for r in rows if part(r) != "final"]
    rng = random.Random(f"{seed}:{rows[0].corpus if rows else ''}")
    return rng.sample(pool, min(n, len(pool)))


def kappa(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.size == 0:
        return None
    po = float((a == b).mean())
    pe = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    return None if pe >= 1.0 else (po - pe) / (1.0 - pe)


async def judge_rows(judge: RefusalJudge, rows: list, concurrency: int) -> list:
    sem = asyncio.Semaphore(concurrency)

    async def one(row):
        async with sem:
            return await judge.verdict(row.prompt or None, row.text)

    return await asyncio.gather(*(one(r) for r in rows))


def _f(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


async def run(args: argparse.Namespace, url: str, model: str) -> None:
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    corpora = args.corpora or list(REAL)
    print(f"judge {JUDGE_TEMPLATE_ID} at {url}, model {model}: {args.per_corpus} rows per corpus (seed {args.seed}, "
          f"final parts excluded), {'strict' if args.strict else 'lenient'} binary, concurrency {args.concurrency}")
    head = (f"{'corpus':<34}{'asked':>6}{'parsed':>7}{'agree':>7}{'95% CI':>16}{'kappa':>7}{'false ref':>10}"
            f"{'missed ref':>11}{'tokens in/out':>15}{'s':>6}")
    print(head)
    print("-" * len(head))
    async with httpx.AsyncClient() as client:
        judge = RefusalJudge(client, url, model, key, timeout=args.timeout, max_tokens=args.max_tokens)
        for name in corpora:
            rows = sample(load_corpus(name, args.shared), args.per_corpus, args.seed)
            t0 = time.time()
            verdicts = await judge_rows(judge, rows, args.concurrency)
            secs = time.time() - t0
            ok = [i for i, v in enumerate(verdicts) if v.label is not None]
            truth = np.array([rows[i].refused for i in ok], dtype=bool)
            said = np.array([is_refusal(Label(verdicts[i].label), args.strict) for i in ok], dtype=bool)
            ag = agreement(said, truth, np.array([rows[i].group for i in ok], dtype=object))
            ci = f"[{_f(ag.low)}, {_f(ag.high)}]" if ag.n else "-"
            false_ref = float((said & ~truth).sum() / max(1, (~truth).sum())) if ok else None
            missed = float((~said & truth).sum() / max(1, truth.sum())) if ok else None
            tin = sum(v.prompt_tokens for v in verdicts)
            tout = sum(v.completion_tokens for v in verdicts)
            print(f"{name:<34}{len(rows):>6}{len(ok):>7}{_f(ag.rate):>7}{ci:>16}{_f(kappa(said, truth)):>7}"
                  f"{_f(false_ref):>10}{_f(missed):>11}{f'{tin}/{tout}':>15}{secs:>6.0f}")
    print("agree: share of parsed verdicts whose binary equals the corpus label; false ref: share of the corpus's "
          "compliant answers the judge called refusals; missed ref: share of its refusals it called compliance.")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="OpenAI-compatible API root, e.g. http://host:8080/v1")
    ap.add_argument("--model", help="the judge model's name at that endpoint")
    ap.add_argument("--api-key-env", help="name of an environment variable holding the endpoint's API key")
    ap.add_argument("--local", action="store_true", help="start the bundled SmolLM2-135M llama.cpp server for the run")
    ap.add_argument("--per-corpus", type=int, default=200)
    ap.add_argument("--corpora", nargs="*", choices=REAL, help="default: the four real-answer corpora")
    ap.add_argument("--seed", type=int, default=24)
    ap.add_argument("--strict", action="store_true", help="refusal = full_refusal only (strict_refusal)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--shared", type=Path, default=SHARED)
    args = ap.parse_args(argv)
    if args.local:
        from guard.ops.local_model import MODEL_ALIAS, LocalModelServer
        with LocalModelServer(n_ctx=4096) as server:
            asyncio.run(run(args, server.api_url, MODEL_ALIAS))
        return
    if not args.url or not args.model:
        ap.error("give --url and --model, or --local")
    asyncio.run(run(args, args.url, args.model))


if __name__ == "__main__":
    main()
