"""Install llama-cpp-python from a portable wheel that this project builds itself (stdlib only).

Why: a default source build of llama-cpp-python compiles ggml with ``-march=native``. Built on a
Xeon with AMX, the model server then dies with SIGSEGV in ``ggml_backend_amx_mul_mat`` wherever
AMX tiles are not allowed; a wheel built natively on one machine and handed back by pip's wheel
cache on another carries the same risk, whatever CMAKE_ARGS says. So:

1. The wheel is built once with ``CMAKE_ARGS=-DGGML_NATIVE=OFF`` (ggml then compiles for
   AVX/AVX2/FMA/F16C/BMI2, without AVX512 and without AMX) by ``pip wheel --no-cache-dir
   --no-deps --no-binary llama-cpp-python``: never from pip's cache, always from the sdist.
2. It is kept in a project-owned cache keyed by the flags (directory) and the version (file name):
   ``${RG_WHEEL_CACHE:-~/.cache/rg-wheels}/portable/llama_cpp_python-<version>-*.whl``.
3. It is installed with ``--no-index --no-deps --find-links <that dir>``; its dependencies (and
   the ``[server]`` extra's) come from the index afterwards, with the pinned version already
   satisfied so pip never resolves llama-cpp-python itself again.
4. The installed files are checked against the wheel's RECORD (sha256 of every file), so a
   substituted build is detected and replaced.

Usage (inside the virtualenv): ``python scripts/llama_wheel.py``. ``--print-dir`` prints the
cache directory and exits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

VERSION = "0.3.36"
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF"
DISTRIBUTION = "llama-cpp-python"
_STEP = re.compile(rb"^\s*\[(\d+)/(\d+)\]")


def cache_dir(cmake_args: str = PORTABLE_CMAKE_ARGS, root: Path | None = None) -> Path:
    """The wheel directory for these build flags: ``portable`` for the default flags."""
    if root is None:
        base = os.environ.get("RG_WHEEL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rg-wheels"
        root = Path(base)
    if cmake_args == PORTABLE_CMAKE_ARGS:
        return root / "portable"
    return root / ("cmake-" + hashlib.sha256(cmake_args.encode()).hexdigest()[:12])


def find_wheel(directory: Path, version: str = VERSION) -> Path | None:
    found = sorted(directory.glob(f"llama_cpp_python-{version}-*.whl"))
    return found[-1] if found else None


def wheel_record(wheel: Path) -> dict[str, str]:
    """{path: 'sha256=...'} from the wheel's RECORD (files with a hash only)."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        return _parse_record(zf.read(name).decode())


def _parse_record(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[1]:
            out[parts[0]] = parts[1]
    return out


def installed_record(python: str) -> dict[str, str] | None:
    """The RECORD of the llama-cpp-python installed for ``python``, or None if not installed."""
    code = ("import importlib.metadata as m\n"
            "try:\n d = m.distribution('llama-cpp-python')\nexcept m.PackageNotFoundError:\n print('-')\n"
            "else:\n print(d.read_text('RECORD') or '')")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return None if out.strip() == "-" else _parse_record(out)


def is_installed_from(wheel: Path, python: str) -> bool:
    """True when every binary of the wheel is installed with the same sha256 (nothing substituted)."""
    installed = installed_record(python)
    if installed is None:
        return False
    want = {p: h for p, h in wheel_record(wheel).items() if p.endswith(".so") or ".so." in p}
    return bool(want) and all(installed.get(p) == h for p, h in want.items())


def progress_line(log_tail: bytes, elapsed: float) -> str:
    """'step 45/210 (21%), 3m10s' from the last ninja ``[n/m]`` line of the build log, or the time alone."""
    minutes, seconds = divmod(int(elapsed), 60)
    clock = f"{minutes}m{seconds:02d}s"
    for line in reversed(log_tail.splitlines()):
        m = _STEP.match(line)
        if m:
            done, total = int(m.group(1)), int(m.group(2))
            return f"compiling: step {done}/{total} ({100 * done // max(total, 1)}%), {clock} elapsed"
    return f"preparing the build (cmake), {clock} elapsed"


def build(directory: Path, python: str, cmake_args: str = PORTABLE_CMAKE_ARGS, version: str = VERSION,
          interval: float = 15.0) -> Path:
    """Build the wheel from the sdist into ``directory``; prints progress; returns the wheel path."""
    directory.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=directory))
    log_path = work / "build.log"
    env = {**os.environ, "CMAKE_ARGS": cmake_args, "FORCE_CMAKE": "1"}
    command = [python, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-cache-dir", "--no-deps",
               "--no-binary", DISTRIBUTION, "-v", "-w", str(work), f"{DISTRIBUTION}=={version}"]
    print(f"   building {DISTRIBUTION}=={version} with CMAKE_ARGS={cmake_args} (log: {log_path})", flush=True)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None:
                try:
                    proc.wait(timeout=interval)
                except subprocess.TimeoutExpired:
                    with open(log_path, "rb") as f:
                        f.seek(max(0, log_path.stat().st_size - 65536))
                        print("   " + progress_line(f.read(), time.monotonic() - started), flush=True)
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    seconds = time.monotonic() - started
    built = find_wheel(work, version)
    if proc.returncode != 0 or built is None:
        tail = log_path.read_text(errors="replace").splitlines()[-40:]
        raise SystemExit(f"building {DISTRIBUTION} failed (exit {proc.returncode}); last lines of {log_path}:\n"
                         + "\n".join(tail))
    target = directory / built.name
    os.replace(built, target)  # same filesystem: atomic, so a half-built wheel is never found
    info = {"version": version, "cmake_args": cmake_args, "build_seconds": round(seconds, 1),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (directory / f"{target.name}.build.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    minutes, secs = divmod(int(seconds), 60)
    print(f"   built {target.name} in {minutes}m{secs:02d}s", flush=True)
    return target


def pip(python: str, *args: str) -> None:
    subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check", "-q", *args], check=True)


def ensure(python: str = sys.executable, cmake_args: str = PORTABLE_CMAKE_ARGS, version: str = VERSION,
           root: Path | None = None) -> Path:
    """Build (once) and install the portable wheel plus the server extra's dependencies."""
    directory = cache_dir(cmake_args, root)
    wheel = find_wheel(directory, version)
    if wheel is None:
        print(f"   no portable {DISTRIBUTION} {version} wheel in {directory} yet: building it once "
              "(about 10 minutes on 2 cores; progress below)", flush=True)
        wheel = build(directory, python, cmake_args, version)
    else:
        print(f"   using the portable wheel {wheel}", flush=True)
    if not is_installed_from(wheel, python):
        pip(python, "--no-index", "--no-deps", "--force-reinstall", "--find-links", str(directory),
            f"{DISTRIBUTION}=={version}")
    pip(python, f"{DISTRIBUTION}[server]=={version}")  # dependencies only: the pinned version is satisfied
    if not is_installed_from(wheel, python):
        raise SystemExit(f"the installed {DISTRIBUTION} is not the portable wheel {wheel}; "
                         f"remove it (pip uninstall {DISTRIBUTION}) and run this again")
    return wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--print-dir", action="store_true", help="print the wheel cache directory and exit")
    args = parser.parse_args(argv)
    if args.print_dir:
        print(cache_dir())
        return 0
    ensure()
    return 0


if __name__ == "__main__":
    sys.exit(main())
