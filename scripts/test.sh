#!/usr/bin/env bash
# The tests (README "Install and the two commands", command 2; .ci/run runs this same line): install the test
# dependencies, install Debian's Chromium for the browser tests where it is missing and we may (root or
# passwordless sudo), then run pytest (docs/testing.md).
# Where Chromium cannot be installed the browser tests skip with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[app]" -r requirements-test.txt
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
  if [ -z "$SUDO" ] || sudo -n true 2>/dev/null; then
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } \
      >/dev/null 2>&1 || echo "scripts/test.sh: could not install chromium; the browser tests will skip" >&2
  fi
fi
# One pytest-xdist worker per core, at most 4 (each holds a few GiB of compiled programs); whole files per worker
# (module fixtures build once), longest files first (tests/conftest.py). BAGEL_JAX_TEST_WORKERS=0 runs in one
# process.
WORKERS="${BAGEL_JAX_TEST_WORKERS:-$(python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}"
python -m pytest -q -n "$WORKERS" --dist loadfile --no-loadscope-reorder "$@"
