"""Proxy overhead: direct calls vs refusal-guard (off, shadow, sequential, parallel) vs LiteLLM.

One command, from the repository root:

    python benchmarks/proxy_overhead.py

It starts ``benchmarks/fast_upstream.py`` (a scripted OpenAI-compatible upstream with fixed
service times), then for each system under test starts it against that same upstream and
drives it with ``benchmarks/loadgen.py`` (an open-loop generator in its own process,
latency measured from each request's scheduled send time) at 100, 200, 500 and 1000
requests/s, non-streamed and streamed, stopping a system's escalation at the first rate
it does not sustain (sustained = no errors and p99 under 50 ms). Direct calls and the guard
with the probe off also run at 25 and 50 requests/s, where LiteLLM is measured when it fails
100, so the two proxies are compared at the same rates. A second part measures
the probe's cost with distinct, known service times (probe 20 ms, generation 50 ms):
probe alone, generation alone (direct), and the guard in off, sequential and parallel mode.

LiteLLM (``litellm[proxy]``) runs from its own venv (see ``benchmarks/litellm_env.py``),
configured as a plain pass-through (``openai/bench`` with ``api_base`` = the upstream).
Both proxies get the same number of worker processes (``--workers``, default 1).

Every prompt is unique, so the probe cache never hits: the probe modes are measured on
the uncached path. Results are printed, written to ``BENCHMARKS.md`` (between the
``proxy_overhead`` markers) and, raw, to ``--json``.

Point ``--guard-root`` (and ``--guard-python``) at a scratch copy to measure a change to
guard/ before it lands, e.g. ``--guard-root /tmp/rg-scratch --only direct,off``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    REPO,
    exit_on_sigterm,
    cpu_seconds,
    free_port,
    git_revision,
    machine_busy_seconds,
    machine_facts,
    stop_process,
    tree_pids,
    versions,
    wait_http,
    wait_quiet,
    write_section,
)
from litellm_env import DEFAULT_VENV, DEFAULT_VERSION, ensure_litellm  # noqa: E402

HERE = Path(__file__).resolve().parent
P99_LIMIT_MS = 50.0
# LiteLLM refuses to start without a master key; every load generator request carries it.
API_KEY = "sk-rgbench-4f8a2c9e7b1d6035a9e4c7f2b8d1e6a3"
GUARD_MODES = ("off", "shadow", "sequential", "parallel")
ALL_SYSTEMS = ("direct", *(f"guard-{m}" for m in GUARD_MODES), "litellm")
OUR_PACKAGES = ["fastapi", "starlette", "uvicorn", "httpx", "aiohttp", "pydantic",
                "prometheus-client", "uvloop", "httptools"]
LITELLM_PACKAGES = ["litellm", "fastapi", "uvicorn", "httpx", "aiohttp", "uvloop", "httptools", "orjson"]


def log(msg: str) -> None:
    print(msg, flush=True)


class System:
    """One system under test: a process we start (or none, for direct calls)."""

    def __init__(self, name: str, args: argparse.Namespace, upstream_port: int, workdir: Path) -> None:
        self.name = name
        self.args = args
        self.upstream_port = upstream_port
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.port = upstream_port
        self.logfile: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def pids(self) -> list[int]:
        return tree_pids(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def start(self) -> None:
        if self.name in ("direct", "probe-alone"):
            self.port = self.upstream_port
            return
        self.port = free_port()
        self.logfile = self.workdir / f"{self.name}-{self.port}.log"
        out = open(self.logfile, "w")
        upstream = f"http://127.0.0.1:{self.upstream_port}/v1"
        env = dict(os.environ)
        if self.name.startswith("guard-"):
            mode = self.name.split("-", 1)[1]
            db = self.workdir / f"datapoints-{mode}-{self.port}.sqlite3"
            cmd = [self.args.guard_python, "-m", "guard.cli", "serve", "--upstream", upstream, "--port", str(self.port),
                   "--mode", mode, "--datapoints", str(db), "--workers", str(self.args.workers)]
            self.proc = subprocess.Popen(cmd, cwd=self.args.guard_root, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)
            wait_http("127.0.0.1", self.port, "/healthz", 60, self.proc)
        elif self.name == "litellm":
            cfg = self.workdir / "litellm.yaml"
            cfg.write_text(
                "model_list:\n"
                "  - model_name: bench\n"
                "    litellm_params:\n"
                "      model: openai/bench\n"
                f"      api_base: {upstream}\n"
                "      api_key: sk-bench\n"
                "litellm_settings:\n"
                "  drop_params: true\n",
                encoding="utf-8",
            )
            env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False",
                       LITELLM_MASTER_KEY=API_KEY)
            exe = str(Path(self.args.litellm_python).parent / "litellm")
            cmd = [exe, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(self.port),
                   "--num_workers", str(self.args.workers)]
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)
            wait_http("127.0.0.1", self.port, "/health/liveliness", 180, self.proc)
        else:
            raise ValueError(self.name)
        # One request through, so lazy imports and the first upstream connection are done.
        subprocess.run([sys.executable, str(HERE / "loadgen.py"), "--url", self.url, "--rate", "20", "--duration", "1",
                        "--warmup", "0", "--tag", f"prime-{self.name}", "--api-key", API_KEY], capture_output=True, check=False)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=5)
            self.proc = None


def run_level(system: System, rate: float, stream: bool, args: argparse.Namespace, upstream_pid: int,
              headers: list[str] | None = None) -> dict:
    own = [upstream_pid, os.getpid(), *(system.pids()[:1])]
    if args.quiet_wait > 0:
        wait_quiet(own, limit=args.quiet_limit, window=1.0, max_wait=args.quiet_wait, log=log)
    sut_pids = system.pids()
    sut0, up0, busy0 = cpu_seconds(sut_pids), cpu_seconds([upstream_pid]), machine_busy_seconds()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, str(HERE / "loadgen.py"), "--url", system.url, "--rate", str(rate),
           "--duration", str(args.duration), "--warmup", str(args.warmup), "--timeout", str(args.timeout),
           "--tag", f"{system.name}-{int(rate)}-{'s' if stream else 'n'}-{time.time_ns()}", "--api-key", API_KEY]
    if stream:
        cmd.append("--stream")
    for h in headers or []:
        cmd += ["--header", h]
    started = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sut1, up1, busy1 = cpu_seconds(sut_pids), cpu_seconds([upstream_pid]), machine_busy_seconds()
    if res.returncode != 0:
        raise RuntimeError(f"loadgen failed: {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    loadgen_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    total_sent = rate * (args.duration + args.warmup)
    out.update(
        system=system.name, sut_cpu_s=round(sut1 - sut0, 3), upstream_cpu_s=round(up1 - up0, 3),
        loadgen_cpu_s=round(loadgen_cpu, 3),
        sut_cpu_ms_per_req=round(1000 * (sut1 - sut0) / total_sent, 3) if system.proc else None,
        foreign_cores=round(max(0.0, (busy1 - busy0) - (sut1 - sut0) - (up1 - up0) - loadgen_cpu) / wall, 2),
    )
    out["sustained"] = out["errors"] == 0 and out["p99_ms"] is not None and out["p99_ms"] < P99_LIMIT_MS
    return out


def fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def level_line(r: dict, direct: dict | None) -> str:
    add = added(r, direct)
    return (f"  {r['system']:<16} {'stream' if r['stream'] else 'whole ':<6} rate {r['rate']:>6.0f} -> {r['achieved_rate']:>7.1f}/s "
            f"err {r['errors']:>5} p50 {fmt(r['p50_ms']):>7} p95 {fmt(r['p95_ms']):>7} p99 {fmt(r['p99_ms']):>7} ms"
            f" | added p50 {fmt(add[0], 2):>6} p95 {fmt(add[1], 2):>6} p99 {fmt(add[2], 2):>6}"
            f" | cpu/req {fmt(r['sut_cpu_ms_per_req'], 2)} ms | other load {r['foreign_cores']:.2f} cores"
            f"{'' if r['sustained'] else '  NOT SUSTAINED'}")


def added(r: dict, direct: dict | None) -> tuple:
    if direct is None or r["system"] == "direct":
        return (None, None, None)
    out = []
    for k in ("p50_ms", "p95_ms", "p99_ms"):
        out.append(None if r[k] is None or direct[k] is None else r[k] - direct[k])
    return tuple(out)


def find(results: list[dict], system: str, rate: float, stream: bool, part: str = "overhead") -> dict | None:
    for r in results:
        if r["system"] == system and r["rate"] == rate and r["stream"] == stream and r.get("part", "overhead") == part:
            return r
    return None


def max_sustained(results: list[dict], system: str, stream: bool) -> float | None:
    rates = [r["rate"] for r in results if r["system"] == system and r["stream"] == stream
             and r.get("part", "overhead") == "overhead" and r["sustained"]]
    return max(rates) if rates else None


def run_overhead(args, upstream_port: int, upstream_pid: int, workdir: Path, results: list[dict]) -> None:
    streams = {"both": (False, True), "whole": (False,), "stream": (True,)}[args.streams]
    for name in args.systems:
        system = System(name, args, upstream_port, workdir)
        log(f"[{name}] starting")
        try:
            system.start()
            for stream in streams:
                # Direct calls, and the guard with the probe off, also at the lower rates where a slower system
                # (LiteLLM) is measured when it fails the lowest one, so that both are compared at the same rates.
                low = [r for r in (args.rates[0] / 4, args.rates[0] / 2) if r >= 25]
                rates = low + args.rates if name in ("direct", "guard-off") else args.rates
                for i, rate in enumerate(rates):
                    r = run_level(system, rate, stream, args, upstream_pid)
                    if r["foreign_cores"] > args.noisy and args.retry_noisy:
                        log(f"  (other processes used {r['foreign_cores']:.2f} cores during the level: measuring it again)")
                        r = run_level(system, rate, stream, args, upstream_pid)
                    r["part"] = "overhead"
                    results.append(r)
                    log(level_line(r, find(results, "direct", rate, stream)))
                    if not r["sustained"] and name != "direct":  # direct calls are the reference: all rates
                        if system.proc is not None:  # drop any backlog before the next series
                            system.stop()
                            system.start()
                        if i == 0:  # not even the lowest rate: find what it does sustain, halving down to 25/s
                            low = rate / 2
                            while low >= 25:
                                r = run_level(system, low, stream, args, upstream_pid)
                                r["part"] = "overhead"
                                results.append(r)
                                log(level_line(r, find(results, "direct", low, stream)))
                                if r["sustained"]:
                                    break
                                if system.proc is not None:
                                    system.stop()
                                    system.start()
                                low /= 2
                        break
        finally:
            system.stop()


def run_timing(args, upstream_port: int, upstream_pid: int, workdir: Path, results: list[dict]) -> None:
    for name in ("direct", "probe-alone", "guard-off", "guard-sequential", "guard-parallel"):
        system = System(name, args, upstream_port, workdir)
        log(f"[timing: {name}] starting")
        try:
            system.start()
            for rate in args.timing_rates:
                headers = ["x-refusal-guard-probe:1"] if name == "probe-alone" else None
                r = run_level(system, rate, False, args, upstream_pid, headers)
                r["part"] = "timing"
                results.append(r)
                log(level_line(r, find(results, "direct", rate, False, "timing")))
        finally:
            system.stop()


# --- the report ------------------------------------------------------------------------------

def overhead_table(results: list[dict], stream: bool) -> list[str]:
    lines = ["| system | target rate | achieved rate | errors | p50 ms | p95 ms | p99 ms | added p50 | added p95 | added p99 "
             "| proxy CPU ms/req | other load (cores) | sustained |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    order = {name: i for i, name in enumerate(ALL_SYSTEMS)}
    for r in sorted(results, key=lambda r: (order.get(r["system"], 99), r["rate"])):
        if r.get("part") != "overhead" or r["stream"] != stream:
            continue
        add = added(r, find(results, "direct", r["rate"], stream))
        errs = str(r["errors"]) + (f" ({', '.join(f'{k} {v}' for k, v in r['error_kinds'].items())})" if r["errors"] else "")
        lines.append(f"| {r['system']} | {r['rate']:.0f} | {r['achieved_rate']:.1f} | {errs} | {fmt(r['p50_ms'])} | "
                     f"{fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} | {fmt(add[0], 2)} | {fmt(add[1], 2)} | {fmt(add[2], 2)} | "
                     f"{fmt(r['sut_cpu_ms_per_req'], 2)} | {r['foreign_cores']:.2f} | {'yes' if r['sustained'] else 'no'} |")
    return lines


def timing_table(results: list[dict]) -> list[str]:
    lines = ["| system | rate | errors | p50 ms | p95 ms | p99 ms | max ms | proxy CPU ms/req | other load (cores) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.get("part") != "timing":
            continue
        lines.append(f"| {r['system']} | {r['rate']:.0f} | {r['errors']} | {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | "
                     f"{fmt(r['p99_ms'])} | {fmt(r['max_ms'])} | {fmt(r['sut_cpu_ms_per_req'], 2)} | {r['foreign_cores']:.2f} |")
    return lines


def targets(results: list[dict], args) -> list[str]:
    out = []
    for stream in ((False, True) if args.streams == "both" else ((args.streams == "stream"),)):
        label = "streamed" if stream else "non-streamed"
        off200, d200 = find(results, "guard-off", 200, stream), find(results, "direct", 200, stream)
        if off200 and d200 and off200["p99_ms"] is not None and d200["p99_ms"] is not None:
            a = off200["p99_ms"] - d200["p99_ms"]
            out.append(f"- {label}: guard (probe off) p99 added at 200 req/s = {a:.2f} ms (target <= 2 ms): "
                       f"**{'met' if a <= 2 and off200['errors'] == 0 else 'missed'}**")
        elif "guard-off" in args.systems:
            out.append(f"- {label}: guard (probe off) p99 added at 200 req/s: not measured (the guard did not sustain a lower "
                       "rate, so its escalation stopped before 200): **missed**")
        if "litellm" in args.systems and "guard-off" in args.systems:
            pairs = []
            all_rates = sorted({r["rate"] for r in results if r.get("part", "overhead") == "overhead"})
            for rate in all_rates:
                g, ll, d = (find(results, s, rate, stream) for s in ("guard-off", "litellm", "direct"))
                if g and ll and d and g["sustained"] and ll["sustained"]:
                    ga, la = g["p99_ms"] - d["p99_ms"], ll["p99_ms"] - d["p99_ms"]
                    pairs.append((rate, ga, la, ga <= la / 5))
            if pairs:
                ok = all(p[3] for p in pairs)
                detail = "; ".join(f"{r:.0f}/s: {g:.2f} vs {l:.2f} ms" for r, g, l, _ in pairs)
                out.append(f"- {label}: guard (off) p99 added <= 1/5 of LiteLLM's at every rate both sustain ({detail}): "
                           f"**{'met' if ok else 'missed'}**")
            else:
                out.append(f"- {label}: guard (off) vs LiteLLM p99 added: no rate sustained by both")
            gs, ls = max_sustained(results, "guard-off", stream), max_sustained(results, "litellm", stream)
            tested = max(args.rates)
            if gs is None:
                verdict = "missed"
            elif ls is None:
                verdict = (f"not decidable: LiteLLM sustained none of the rates tried (down to 25/s), so the ratio is only "
                           f"known to exceed {gs / 25:.0f}x")
            else:
                verdict = "met" if gs >= 5 * ls else ("not decidable: guard sustained the highest rate tested"
                                                     if gs == tested else "missed")
            out.append(f"- {label}: highest sustained rate (no errors, p99 < {P99_LIMIT_MS:.0f} ms) among the rates tried: guard (off) {fmt(gs, 0)}, LiteLLM {fmt(ls, 0)} "
                       f"(target guard >= 5x LiteLLM): **{verdict}**")
    if args.timing_rates and not args.skip_timing:
        for rate in args.timing_rates:
            d, pa, par, seq, off = (find(results, s, rate, False, "timing")
                                    for s in ("direct", "probe-alone", "guard-parallel", "guard-sequential", "guard-off"))
            if d and pa and par and par["p99_ms"] is not None:
                base = max(d["p99_ms"], pa["p99_ms"])
                limit = base * 1.05 + 2
                out.append(f"- parallel mode at {rate:.0f} req/s: p99 {par['p99_ms']:.1f} ms vs max(probe alone p99 "
                           f"{pa['p99_ms']:.1f}, generation alone p99 {d['p99_ms']:.1f}) = {base:.1f} ms; limit "
                           f"(+5% + 2 ms) {limit:.1f} ms: **{'met' if par['p99_ms'] <= limit and par['errors'] == 0 else 'missed'}**")
            if d and pa and seq and seq["p50_ms"] is not None:
                extra = seq["p50_ms"] - d["p50_ms"]
                extra99 = seq["p99_ms"] - d["p99_ms"]
                limit = pa["p50_ms"] * 1.05 + 2
                out.append(f"- sequential mode at {rate:.0f} req/s: adds {extra:.1f} ms at p50 ({extra99:.1f} ms at p99) over "
                           f"generation alone; one probe round trip is {pa['p50_ms']:.1f} ms at p50 ({pa['p99_ms']:.1f} at p99); "
                           f"limit (+5% + 2 ms at p50) {limit:.1f} ms: "
                           f"**{'met' if extra <= limit and seq['errors'] == 0 else 'missed'}**")
    return out


def report(results: list[dict], args, facts: dict, ours: dict, theirs: dict | None, command: str, elapsed: float) -> str:
    lines = ["## Proxy overhead (`benchmarks/proxy_overhead.py`)", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')}" + (f" in {elapsed / 60:.1f} minutes" if elapsed else "") + "; guard code: "
             f"{args.guard_label or git_revision(Path(args.guard_root))}.", "",
             "Command:", "", "```", command, "```", "",
             f"Machine: {facts['nproc']} cores ({facts['cpu']}), {facts['memory']} RAM, Linux {facts['kernel']}, "
             f"Python {facts['python']} ({facts['python_loop']}: a rough speed of this machine's cores, for comparing "
             "runs on different machines). Everything (load generator, upstream, proxy) ran on this machine.", "",
             "Our environment: " + ", ".join(f"{k} {v}" for k, v in ours.items()) + ".",
             ("LiteLLM's venv: " + ", ".join(f"{k} {v}" for k, v in theirs.items()) + ".") if theirs else "", "",
             "Setup:", "",
             f"- Upstream: `benchmarks/fast_upstream.py`, generation {args.gen_ms:g} ms, probe {args.probe_ms:g} ms; "
             f"streamed answers send their first event at {args.gen_ms:g} ms then 8 more content events 1 ms apart.",
             f"- Load: `benchmarks/loadgen.py` in its own process, open loop, {args.warmup:g} s warm-up then {args.duration:g} s "
             f"measured per level; latency from each request's scheduled send time to its last byte; timeout {args.timeout:g} s. "
             "Every prompt is unique, so the probe cache never hits (uncached probe path).",
             f"- refusal-guard: `refusal-guard serve --mode M --workers {args.workers}` (one process per mode, default settings, "
             "no policy file: the default rule; the probe answer is `will_refuse=false, confidence=4`, so every request passes), "
             "datapoints to a temporary SQLite file.",
             f"- LiteLLM {theirs.get('litellm', '?') if theirs else '(not run)'}: `litellm --config cfg --num_workers {args.workers}`, "
             "model_list entry `openai/bench` with `api_base` = the upstream, `drop_params: true`, a master key "
             "(`LITELLM_MASTER_KEY`; LiteLLM refuses to start without one, no database), nothing else.",
             "- added = the system's percentile minus direct's at the same rate (difference of percentiles).",
             f"- sustained = no errors and p99 < {P99_LIMIT_MS:.0f} ms; a system's escalation stops at its first unsustained rate.",
             "- proxy CPU ms/req = CPU time of the proxy's processes during the level / requests sent (warm-up included).",
             "- other load = CPU used by processes outside the benchmark during the level (the machine is shared); "
             f"levels with more than {args.noisy:g} cores of other load are measured again once.", "",
             "### Non-streamed", "", *overhead_table(results, False), "",
             "### Streamed", "", *overhead_table(results, True), ""]
    if not args.skip_timing:
        lines += [f"### Probe cost (generation {args.timing_gen_ms:g} ms, probe {args.timing_probe_ms:g} ms, non-streamed)", "",
                  "`probe-alone` = a direct call answered as a probe; `direct` = generation alone.", "",
                  *timing_table(results), ""]
    lines += ["### Targets", "", *targets(results, args), ""]
    return "\n".join(lines)


def main() -> int:
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--rates", default="100,200,500,1000")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--streams", choices=("both", "whole", "stream"), default="both")
    ap.add_argument("--only", default=",".join(ALL_SYSTEMS), help=f"systems, from {','.join(ALL_SYSTEMS)}")
    ap.add_argument("--workers", type=int, default=1, help="worker processes for refusal-guard and for LiteLLM")
    ap.add_argument("--gen-ms", type=float, default=5.0)
    ap.add_argument("--probe-ms", type=float, default=5.0)
    ap.add_argument("--timing-gen-ms", type=float, default=50.0)
    ap.add_argument("--timing-probe-ms", type=float, default=20.0)
    ap.add_argument("--timing-rates", default="100,200")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--guard-root", default=str(REPO), help="directory holding the guard package to run")
    ap.add_argument("--guard-python", default=sys.executable)
    ap.add_argument("--guard-label", default=None, help="how the report names the guard code (default: its git commit)")
    ap.add_argument("--litellm-venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--litellm-version", default=DEFAULT_VERSION)
    ap.add_argument("--quiet-wait", type=float, default=20.0,
                    help="before each level, wait up to this many seconds for other processes to go quiet (0: don't)")
    ap.add_argument("--quiet-limit", type=float, default=0.15, help="cores of other load counted as quiet")
    ap.add_argument("--noisy", type=float, default=0.3, help="cores of other load that make a level be measured again")
    ap.add_argument("--retry-noisy", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", help="markdown file to update ('-': none)")
    ap.add_argument("--json", type=Path, default=None, help="raw results (default: a temp file)")
    ap.add_argument("--from-json", default=None, help="comma-separated raw result files: only write the report")
    ap.add_argument("--command", default=None, help="with --from-json: the command(s) to show in the report")
    args = ap.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    args.timing_rates = [float(r) for r in args.timing_rates.split(",") if r]
    args.systems = [s for s in args.only.split(",") if s]
    for s in args.systems:
        if s not in ALL_SYSTEMS:
            ap.error(f"unknown system {s}")
    started = time.monotonic()
    command = "python benchmarks/proxy_overhead.py " + " ".join(sys.argv[1:])
    if args.from_json:
        # Re-write the report from earlier runs' raw results (later files win for the same level).
        merged: dict = {}
        for path in args.from_json.split(","):
            data = json.loads(Path(path).read_text())
            for r in data["results"]:
                merged[(r["system"], r["rate"], r["stream"], r.get("part"))] = r
        args.litellm_python = None
        text = report(list(merged.values()), args, data["facts"], data["ours"], data["litellm"],
                      args.command or command, 0.0)
        print(text)
        if str(args.out) != "-":
            write_section(args.out, "proxy_overhead", text)
        return 0
    facts = machine_facts()
    log(f"machine: {facts}")
    theirs = None
    if "litellm" in args.systems:
        args.litellm_python = str(ensure_litellm(args.litellm_venv, args.litellm_version, log=log))
        theirs = versions(LITELLM_PACKAGES, args.litellm_python)
    ours = versions(["refusal-guard", *OUR_PACKAGES], args.guard_python if args.guard_python != sys.executable else None)
    log(f"ours: {ours}\nlitellm venv: {theirs}")

    workdir = Path(tempfile.mkdtemp(prefix="rg-overhead-"))
    port_a, port_b = free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(HERE / "fast_upstream.py"), "--serve", f"{port_a}:{args.gen_ms}:{args.probe_ms}",
         "--serve", f"{port_b}:{args.timing_gen_ms}:{args.timing_probe_ms}"],
        stdout=subprocess.PIPE, stderr=open(workdir / "upstream.log", "w"), text=True, start_new_session=True)
    assert upstream.stdout is not None
    if upstream.stdout.readline().strip() != "ready":
        raise RuntimeError("fast_upstream did not start")
    results: list[dict] = []
    json_path = args.json or workdir / "results.json"
    try:
        run_overhead(args, port_a, upstream.pid, workdir, results)
        if not args.skip_timing and args.timing_rates:
            run_timing(args, port_b, upstream.pid, workdir, results)
    finally:
        stop_process(upstream)
        json_path.write_text(json.dumps({"facts": facts, "ours": ours, "litellm": theirs, "results": results}, indent=1))
        log(f"raw results: {json_path}; logs in {workdir}")
    text = report(results, args, facts, ours, theirs, command, time.monotonic() - started)
    print("\n" + text)
    if str(args.out) != "-":
        write_section(args.out, "proxy_overhead", text)
        log(f"updated {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
