#!/usr/bin/env bash
# The machinery demo, end to end on a fresh machine: install into ./.venv, train both phases
# (pause embeddings, then QLoRA with an NF4 base) on a tiny *random-weight* Llama 3-architecture
# model and the bundled real SQuAD 2.0 sample, then evaluate it and print the metrics table.
# About 3 minutes on 2 cores after the install, no downloads. The model learns the answer
# format, not reading comprehension: scripts/demo.sh is the demo on real weights.
# Usage: bash scripts/demo_tiny.sh [OUTPUT_DIR]   (default: a new folder under /tmp/torchtune-blah)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
out="${1:-/tmp/torchtune-blah/demo-$(date +%Y%m%d-%H%M%S)}"
tune run blah_qlora --config demo_cpu_blah output_dir="$out"
tune run blah_eval --config demo_cpu_blah_eval run_dir="$out"
echo
echo "Outputs in $out:"
echo "  embed/pause_embeddings.safetensors   the trained pause rows"
echo "  lora/adapter_model.safetensors       the QLoRA adapter (PEFT layout) + adapter_config.json"
echo "  lora/model-00001-of-00001.safetensors the merged model; logs/ the per-step losses"
echo "  eval_latest/                         metrics.json, predictions.json, na_probs.json, results.md,"
echo "                                       predictions.jsonl, review_queue.jsonl"
