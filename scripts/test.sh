#!/usr/bin/env bash
# The tests (README "Install and the two commands", command 2; .ci/run runs this same line): install the test
# dependencies, install Debian's Chromium for the browser tests where it is missing and we may (root or
# passwordless sudo), then run pytest. Where Chromium cannot be installed the browser tests skip with a message.
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
python -m pytest -q "$@"
