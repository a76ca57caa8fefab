#!/usr/bin/env bash
# Quick start, step 2: set up and run the whole test suite. Extra arguments go to pytest
# (e.g. `-m "not real"` for the fast unit tests only, `-m real` for the end-to-end tests on the real model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser test (tests/serving/test_webui.py, marker `browser`) drives Debian's headless Chromium.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing chromium and chromium-driver (for the browser test)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "test: /usr/bin/chromium or /usr/bin/chromedriver is missing, so the browser test will be skipped;" \
         "install them as root: apt-get install chromium chromium-driver" >&2
  fi
fi
.venv/bin/python -m pytest "$@"
