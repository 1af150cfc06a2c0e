#!/usr/bin/env bash
# Set up, lint, and run every test: what CI runs (.ci/run calls this), so a green run here means what CI's does.
#   bash scripts/test.sh            # everything: slow tests and the browser tests included
#   bash scripts/test.sh --fast     # the development subset: no slow tests (about 5 minutes on 2 cores)
# Extra arguments go to pytest. The browser tests need Debian's chromium: installed here when root or sudo can;
# otherwise one line says how, and those tests skip naming it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
if [ -z "${ILF_LAB_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export ILF_LAB_DATA_DIR="$(cd ../shared/data && pwd)"
fi
markers=(-m "slow or not slow")
if [ "${1:-}" = "--fast" ]; then
  markers=(-m "not slow")
  shift
elif [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; then
  bash scripts/install_browser.sh >/dev/null 2>&1 || echo "note: chromium could not be installed (bash scripts/install_browser.sh); the browser tests will skip"
else
  echo "note: the browser tests need chromium: run 'sudo bash scripts/install_browser.sh' (they skip without it)"
fi
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest "${markers[@]}" --durations=10 "$@"
