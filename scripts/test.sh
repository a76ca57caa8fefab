#!/usr/bin/env bash
# Quick start, step 2: set up and run the whole test suite. Extra arguments go to pytest
# (e.g. `-m "not real"` for the fast unit tests only, `-m real` for the end-to-end tests on the real model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest "$@"
