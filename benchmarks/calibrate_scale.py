"""Scale benchmark for ``calibrate``: prints wall time and peak memory per input size.

Datapoints (full schema, ~550 bytes a JSONL line) are simulated over 300 prompts and 10 topics
with ``calibration.sdt.simulate``, written as JSONL and as the proxy's SQLite log, then calibrated
with 1,000 bootstrap resamples.  Wall time and CPU time (user + system of the child) are both
printed: on a shared machine the wall time includes waiting for the CPU.  Each measurement runs in a fresh child process so its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that size alone; the time is split into
reading the file and the analysis on the columnar arrays.

    python3 benchmarks/calibrate_scale.py                   # 10k, 100k, 1M
    python3 benchmarks/calibrate_scale.py --sizes 10000 50000 --formats jsonl

The statistical quality has its own seeded benchmarks: ``interval_coverage.py`` (interval coverage),
``routing_guarantee.py`` (realised threshold guarantee, coverage) and ``drift_validity.py`` (false
alarms, detection delay).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration.datapoints import FIELDS, SQLITE_DDL  # noqa: E402
from calibration.sdt import simulate  # noqa: E402

N_PROMPTS, N_TOPICS, N_BOOT = 300, 10, 1000


def _rows(n: int):
    reps = -(-n // N_PROMPTS)
    d = simulate(N_PROMPTS, reps, 2.0, -0.2, n_topics=N_TOPICS, seed=0)
    base = dict.fromkeys(FIELDS)
    base.update(ts="2024-05-01T12:00:00.000000+00:00", model="bench-model", mode="enforce", probe_status="ok",
                probe_template="probe-v1", policy_version="0123456789ab", probe_ms=120.5, upstream_ms=800.25,
                total_ms=930.75, p_correct=0.9, action="review", p_refuse_logprob=-0.25)
    for i in range(n):
        r = dict(base)
        p = int(d["prompt"][i])
        refused = bool(d["refused"][i])
        r.update(id=f"prompt-{p:04d}", request_id=f"req-{i:08d}", topic=f"topic-{int(d['topic'][i])}",
                 harm_level=1 + p % 5, will_refuse=bool(d["will_refuse"][i]), confidence=int(d["confidence"][i]),
                 harm_rating=int(d["harm_rating"][i]), refused=refused,
                 label="full_refusal" if refused else "full_compliance", prompt_sha256=f"{p:064x}")
        yield r


def _make(n: int, fmt: str, directory: Path) -> Path:
    if fmt == "jsonl":
        path = directory / f"dp_{n}.jsonl"
        with open(path, "w") as fh:
            for r in _rows(n):
                fh.write(json.dumps(r) + "\n")
    else:
        path = directory / f"dp_{n}.db"
        con = sqlite3.connect(path)
        con.executescript(SQLITE_DDL)
        cols = list(FIELDS)
        con.executemany(f"INSERT INTO datapoints ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                        (tuple(r[c] for c in cols) for r in _rows(n)))
        con.commit()
        con.close()
    return path


def _child(path: str) -> None:
    from calibration.calibrate import calibrate_table
    from calibration.datapoints import read_datapoints

    t0, c0 = time.perf_counter(), time.process_time()
    table = read_datapoints([Path(path)])
    t1 = time.perf_counter()
    res = calibrate_table(table, n_boot=N_BOOT, seed=0)
    t2 = time.perf_counter()
    res.policy.to_json()
    cpu = time.process_time() - c0
    print(json.dumps({"cpu_s": cpu, "n": table.n, "prompts": len(table.prompt_ids), "topics": len(table.topics),
                      "read_s": t1 - t0, "analyse_s": t2 - t1, "total_s": t2 - t0,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--formats", nargs="+", choices=["jsonl", "sqlite"], default=["jsonl", "sqlite"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child)
        return
    print(f"calibrate scale benchmark: {N_PROMPTS} prompts, {N_TOPICS} topics, {N_BOOT} bootstrap resamples")
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (wall times include contention)")
    print(f"{'format':<8}{'rows':>10}{'file MB':>9}{'read s':>8}{'analyse s':>11}{'total s':>9}{'CPU s':>7}"
          f"{'peak RSS MB':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            for n in args.sizes:
                path = _make(n, fmt, Path(tmp))
                out = subprocess.run([sys.executable, __file__, "--child", str(path)], check=True,
                                     capture_output=True, text=True).stdout
                r = json.loads(out)
                print(f"{fmt:<8}{r['n']:>10}{path.stat().st_size / 1e6:>9.0f}{r['read_s']:>8.2f}"
                      f"{r['analyse_s']:>11.2f}{r['total_s']:>9.2f}{r['cpu_s']:>7.2f}{r['peak_rss_mb']:>13.0f}", flush=True)
                path.unlink()


if __name__ == "__main__":
    main()
