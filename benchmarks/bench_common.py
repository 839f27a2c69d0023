"""Shared helpers for the benchmarks: ports, process trees, CPU accounting, machine facts, BENCHMARKS.md sections."""

from __future__ import annotations

import http.client
import importlib.metadata
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url_host: str, port: int, path: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until GET path answers with any status below 500."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {path} answered")
        try:
            conn = http.client.HTTPConnection(url_host, port, timeout=2)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            if status < 500:
                return
            last = f"status {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{url_host}:{port}{path} not ready after {timeout}s ({last})")


def tree_pids(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            pass
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / TICK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def machine_busy_seconds() -> float:
    """CPU-seconds all cores spent busy since boot (from /proc/stat)."""
    with open("/proc/stat") as fh:
        parts = fh.readline().split()[1:]
    values = [int(x) for x in parts]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / TICK


def wait_quiet(own: list[int], limit: float = 0.15, window: float = 2.0, max_wait: float = 60.0, log=print) -> float:
    """Wait (up to max_wait) until processes other than ``own`` use < ``limit`` cores; return their load."""
    start = time.monotonic()
    while True:
        b0, o0 = machine_busy_seconds(), cpu_seconds([p for q in own for p in tree_pids(q)])
        time.sleep(window)
        b1, o1 = machine_busy_seconds(), cpu_seconds([p for q in own for p in tree_pids(q)])
        foreign = max(0.0, (b1 - b0) - (o1 - o0)) / window
        if foreign < limit or time.monotonic() - start > max_wait:
            if foreign >= limit:
                log(f"  [machine] other processes still use {foreign:.2f} cores after {max_wait:.0f}s; measuring anyway")
            return foreign
        log(f"  [machine] other processes use {foreign:.2f} cores; waiting for a quieter machine")


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group we started, then SIGKILL it after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(names: list[str], python: str | None = None) -> dict[str, str]:
    """Installed versions of ``names`` in this interpreter, or in ``python`` (another venv)."""
    if python is None:
        out = {}
        for name in names:
            try:
                out[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                out[name] = "not installed"
        return out
    code = ("import importlib.metadata as m, json, sys\nout={}\nfor n in sys.argv[1:]:\n"
            "    try: out[n]=m.version(n)\n    except m.PackageNotFoundError: out[n]='not installed'\nprint(json.dumps(out))")
    res = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, check=False)
    import json

    return json.loads(res.stdout) if res.returncode == 0 else {n: "?" for n in names}


def python_loop_seconds(n: int = 10_000_000) -> float:
    """Seconds this interpreter takes for ``n`` additions in a loop: a rough speed of the machine's
    cores, so that figures from runs on different machines can be compared (best of three)."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for i in range(n):
            total += i
        best = min(best, time.perf_counter() - started)
    return best


def machine_facts() -> dict[str, str]:
    return {
        "nproc": str(os.cpu_count()),
        "python_loop": f"{python_loop_seconds():.2f} s for 10M loop additions",
        "cpu": cpu_model(),
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "python": sys.version.split()[0],
    }


def git_revision(root: Path = REPO) -> str:
    """The commit of ``root`` (marked if guard/ differs from it), or a note that ``root`` is no checkout."""
    res = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if res.returncode != 0 or Path(root).resolve() != Path(subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True, text=True).stdout.strip() or "/").resolve():
        return f"a copy of the code in {root} (not a git checkout)"
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "guard"], capture_output=True, text=True)
    return res.stdout.strip() + (" (guard/ has uncommitted changes)" if dirty.stdout.strip() else "")


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the block between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path`` (append if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    current = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(current):
        updated = pattern.sub(lambda _: block, current)
    else:
        updated = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(updated, encoding="utf-8")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so the finally blocks stop the processes a run started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
