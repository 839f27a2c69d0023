"""LiteLLM's proxy in its own virtual environment, for the overhead benchmark.

LiteLLM pins many packages; it lives in a separate venv (default ``/tmp/rg-litellm-venv``,
outside the repository) so none of its pins touch ours. ``ensure_litellm`` creates it on
first use with the ordinary ``pip`` client. If the plain ``pip install 'litellm[proxy]==V'``
cannot resolve (some LiteLLM releases require a ``certifi`` newer than the index has), it
falls back to installing LiteLLM's own declared requirements (base + ``proxy`` extra) with
that one lower bound relaxed, then LiteLLM itself with ``--no-deps``; the fallback is
reported, never silent.

Run directly to (re)build the venv: ``python benchmarks/litellm_env.py [--version V]``.
"""

from __future__ import annotations

import argparse
import email.parser
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_VENV = Path(os.environ.get("RG_LITELLM_VENV", "/tmp/rg-litellm-venv"))
DEFAULT_VERSION = "1.106.10"
RELAXED = {"certifi"}  # requirements whose lower bound is relaxed in the fallback


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, text=True, capture_output=True, **kw)


def litellm_version(venv: Path) -> str | None:
    py = venv / "bin" / "python"
    if not py.exists():
        return None
    out = _run([str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"])
    return out.stdout.strip() if out.returncode == 0 else None


def _fallback_requirements(venv: Path, version: str) -> list[str]:
    """LiteLLM's Requires-Dist for this interpreter with the ``proxy`` extra, RELAXED bounds dropped."""
    pip = str(venv / "bin" / "pip")
    with tempfile.TemporaryDirectory() as tmp:
        got = _run([pip, "download", "-q", "--no-deps", "-d", tmp, f"litellm=={version}"])
        if got.returncode != 0:
            raise RuntimeError(f"pip download litellm=={version} failed:\n{got.stderr[-2000:]}")
        wheel = next(Path(tmp).glob("litellm-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            meta = email.parser.Parser().parsestr(zf.read(meta_name).decode())
    code = (
        "import sys, json\n"
        "from packaging.requirements import Requirement\n"
        "out = []\n"
        "for line in json.load(sys.stdin):\n"
        "    r = Requirement(line)\n"
        "    envs = [{'extra': ''}, {'extra': 'proxy'}]\n"
        "    if r.marker is None or any(r.marker.evaluate(e) for e in envs):\n"
        "        r.marker = None\n"
        "        out.append(str(r))\n"
        "print(json.dumps(out))\n"
    )
    import json

    res = _run([str(venv / "bin" / "python"), "-c", code], input=json.dumps(meta.get_all("Requires-Dist") or []))
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    reqs = []
    for req in json.loads(res.stdout):
        name = req.split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].split("~")[0].strip().lower()
        reqs.append(name if name in RELAXED else req)
    return reqs


def ensure_litellm(venv: Path = DEFAULT_VENV, version: str = DEFAULT_VERSION, log=print) -> Path:
    """Return the venv's python, creating the venv and installing ``litellm[proxy]==version`` if needed."""
    if litellm_version(venv) == version:
        return venv / "bin" / "python"
    log(f"[litellm] creating {venv} with litellm[proxy]=={version} (one-off, a few minutes)")
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = str(venv / "bin" / "pip")
    subprocess.run([pip, "install", "-q", "--upgrade", "pip", "packaging"], check=True)
    res = _run([pip, "install", "-q", f"litellm[proxy]=={version}"])
    if res.returncode != 0:
        log(f"[litellm] plain install failed ({res.stderr.strip().splitlines()[-1] if res.stderr.strip() else '?'}); "
            f"installing its requirements with {sorted(RELAXED)} unpinned, then litellm --no-deps")
        reqs = _fallback_requirements(venv, version)
        subprocess.run([pip, "install", "-q", *reqs], check=True)
        subprocess.run([pip, "install", "-q", "--no-deps", f"litellm=={version}"], check=True)
    got = litellm_version(venv)
    if got != version:
        raise RuntimeError(f"litellm {version} not importable in {venv} (found {got})")
    return venv / "bin" / "python"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--version", default=DEFAULT_VERSION)
    args = ap.parse_args()
    print(ensure_litellm(args.venv, args.version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
