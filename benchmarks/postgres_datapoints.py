"""Datapoints in PostgreSQL against SQLite and JSONL, in one run on one machine (seeded).

Starts a throwaway PostgreSQL (as the tests do: Debian's binaries, fsync off -- so write rates
are upper bounds for a durable server), then for N simulated datapoints (300 prompts, 10 topics,
``calibration.sdt.simulate``, the full schema):

1. writes them through the proxy's sinks: ``PostgresSink`` vs the SQLite ``DatapointRecorder``
   (rows/s from the first ``put`` to the end of ``stop``; both batch 500);
2. bytes a row on disk: ``pg_total_relation_size`` vs the SQLite file;
3. reads them for calibration, each in a fresh child process (peak RSS: VmHWM after a reset, Linux):
   ``postgresql://`` (aggregated in the database) vs the JSONL export of the same database, and
   the JSONL read with ``request_id`` removed (no de-duplication work) to show what dedup costs.

    python3 benchmarks/postgres_datapoints.py                 # N = 200,000
    python3 benchmarks/postgres_datapoints.py --n 50000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration.datapoints import FIELDS  # noqa: E402
from calibration.sdt import simulate  # noqa: E402

N_PROMPTS, N_TOPICS = 300, 10


def rows(n: int) -> list[dict]:
    reps = -(-n // N_PROMPTS)
    d = simulate(N_PROMPTS, reps, 2.0, -0.2, n_topics=N_TOPICS, seed=0)
    base = dict.fromkeys(FIELDS)
    base.update(model="bench-model", mode="sequential", probe_status="ok", probe_template="rg-probe-v1:abc",
                policy_version="0123456789ab", probe_ms=120.5, upstream_ms=800.25, total_ms=930.75, p_correct=0.9,
                action="pass", p_refuse_logprob=-0.25)
    out = []
    for i in range(n):
        p = int(d["prompt"][i])
        refused = bool(d["refused"][i])
        out.append({**base, "id": f"{p:064x}", "request_id": f"req-{i:08d}",
                    "ts": f"2026-11-{1 + i * 28 // n:02d}T12:00:00.{i % 1000:03d}+00:00",
                    "topic": f"topic-{int(d['topic'][i])}", "will_refuse": bool(d["will_refuse"][i]),
                    "confidence": int(d["confidence"][i]), "harm_rating": int(d["harm_rating"][i]), "refused": refused,
                    "label": "full_refusal" if refused else "full_compliance", "prompt_sha256": f"{p:064x}"})
    return out


async def write(sink, records: list[dict]) -> float:
    await sink.start()
    t0 = time.perf_counter()
    for i, r in enumerate(records):
        sink.put(r)
        if i % 5000 == 4999:
            await asyncio.sleep(0)  # let the drain task run, as between requests
            while sink._queue.qsize() > 5000:
                await asyncio.sleep(0.01)
    await sink.stop()
    return time.perf_counter() - t0


def child(source: str) -> None:
    from calibration.datapoints import read_datapoints

    # The peak RSS a forked child inherits is its parent's (which holds N records here): reset the
    # high-water mark (Linux: 5 > /proc/self/clear_refs), then read VmHWM after the read.
    Path("/proc/self/clear_refs").write_text("5")
    t0, c0 = time.perf_counter(), time.process_time()
    table = read_datapoints([source])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    status = Path("/proc/self/status").read_text()
    rss = int(status.split("VmHWM:")[1].split()[0]) / 1024
    print(json.dumps({"n": table.n, "wall": wall, "cpu": cpu, "rss_mib": rss, "hash": table.data_hash()}))


def measure(source: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", source], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    from prometheus_client import CollectorRegistry
    from pydantic import SecretStr

    from guard.cli import main as guard_main
    from guard.live.metrics import GuardMetrics
    from guard.stores.postgres import PostgresSink
    from guard.stores.recorder import DatapointRecorder
    from tests.postgres_server import PostgresServer

    records = rows(args.n)
    print(f"N = {args.n:,} datapoints, {N_PROMPTS} prompts, {N_TOPICS} topics; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    with PostgresServer() as pg, tempfile.TemporaryDirectory() as tmp:
        url = pg.create_database("bench")
        m_pg, m_sq = GuardMetrics(CollectorRegistry()), GuardMetrics(CollectorRegistry())
        t_pg = asyncio.run(write(PostgresSink(SecretStr(url), m_pg.datapoints_dropped, queue_size=20_000), records))
        db = Path(tmp) / "dp.sqlite3"
        t_sq = asyncio.run(write(DatapointRecorder(db, m_sq.datapoints_dropped, queue_size=20_000), records))
        for m in (m_pg, m_sq):
            assert not m.registry.get_sample_value("refusal_guard_datapoints_dropped_total")

        async def size() -> int:
            import asyncpg
            con = await asyncpg.connect(url)
            try:
                await con.execute("VACUUM ANALYZE datapoints")
                return await con.fetchval("SELECT pg_total_relation_size('datapoints')")
            finally:
                await con.close()

        pg_bytes = asyncio.run(size())
        sq_bytes = sum(p.stat().st_size for p in Path(tmp).glob("dp.sqlite3*"))
        print("\nwrite through the sink         rows/s     bytes/row on disk")
        print(f"  PostgresSink (COPY)       {args.n / t_pg:>10,.0f}     {pg_bytes / args.n:>6.0f}  (table + indexes)")
        print(f"  DatapointRecorder SQLite  {args.n / t_sq:>10,.0f}     {sq_bytes / args.n:>6.0f}  (file + WAL)")

        export = Path(tmp) / "export.jsonl"
        with open(os.devnull, "w") as devnull:
            stderr, sys.stderr = sys.stderr, devnull
            try:
                guard_main(["export", "--db", url, "--out", str(export)])
            finally:
                sys.stderr = stderr
        no_ids = Path(tmp) / "no_ids.jsonl"
        with open(export) as src, open(no_ids, "w") as dst:
            for line in src:
                r = json.loads(line)
                r["request_id"] = None
                dst.write(json.dumps(r) + "\n")
        print("\nread for calibration           wall s    CPU s   peak RSS MiB   usable rows")
        results = {}
        for name, source in (("postgresql:// (aggregated)", url), ("its JSONL export", str(export)),
                             ("JSONL, no request_id (no dedup)", str(no_ids))):
            r = results[name] = measure(source)
            print(f"  {name:<30}{r['wall']:>7.2f}  {r['cpu']:>7.2f}   {r['rss_mib']:>10.0f}   {r['n']:>11,}")
        hashes = {r["hash"] for r in results.values()}
        print(f"\nsame data hash from all three: {len(hashes) == 1}")


if __name__ == "__main__":
    main()
