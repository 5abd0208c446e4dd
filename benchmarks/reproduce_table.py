"""The seed's results table at small scale, on real weights: SmolLM2-135M-Instruct on a CPU.

Rows (the article's, same training questions for every trained row, same held-out dev
questions for every evaluation, no dev question in training):

    base                     the model as it is
    SFT (LoRA, 0 <blah>)     answer-only LoRA, no pause tokens         (blah_qlora phases=[lora] pause_tokens.num=0)
    5 <blah>, embed only     only the 5 pause embeddings train         (phase embed)
    5 <blah> + SFT           then LoRA on top, pause rows frozen       (phase lora after embed)

plus the always-"?" baseline. Training data: the config's (the bundled slice of the SQuAD 2.0
*training* set for smollm2_135m_blah); evaluation: the eval config's (bundled *dev*-set
articles). Every step is a `tune run` of our recipes; a rerun skips finished trainings and
resumes unfinished evaluations.

    python benchmarks/reproduce_table.py                               # CPU defaults (48 min on 2 cores)
    python benchmarks/reproduce_table.py --config smollm2_1_7b_blah --eval-config smollm2_1_7b_blah_eval \\
        --embed-steps 1000 --lora-steps 3000 --eval-examples 0 --set device=cuda --set dtype=bf16   # a GPU

Writes results.md and results.json into --output-dir and prints the table.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from torchtune_blah.checkpointing import atomic_json, atomic_text, phase_complete
from torchtune_blah.eval.report import comparison_table


def tune_run(recipe, config, overrides, log_path):
    tune = shutil.which("tune") or "tune"
    command = [tune, "run", recipe, "--config", config, *overrides]
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}); see {log_path}")
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="/tmp/torchtune-blah/reproduce_table")
    parser.add_argument("--config", default="smollm2_135m_blah", help="blah_qlora config (name or path)")
    parser.add_argument("--eval-config", default="smollm2_135m_blah_eval", help="blah_eval config (name or path)")
    parser.add_argument("--embed-steps", type=int, default=50, help="optimizer steps of the embed phase")
    parser.add_argument("--lora-steps", type=int, default=100, help="optimizer steps of LoRA (both SFT rows)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-examples", type=int, default=200, help="held-out dev questions (0: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for every training and evaluation run (e.g. device=cuda)")
    args = parser.parse_args(argv)

    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "runs.log")
    common_train = [f"embed.max_steps={args.embed_steps}", f"lora.max_steps={args.lora_steps}",
                    f"embed.batch_size={args.batch_size}", f"lora.batch_size={args.batch_size}",
                    "embed.epochs=100", "lora.epochs=100", *args.set]
    runs = {
        "sft": ["phases=[lora]", "pause_tokens.num=0"],
        "blah": ["phases=[embed,lora]"],
    }
    seconds = {}
    for name, extra in runs.items():
        run_dir = os.path.join(out, name)
        if phase_complete(os.path.join(run_dir, "lora")):
            print(f"{name}: already trained in {run_dir}", flush=True)
            continue
        resume = ["resume_from_checkpoint=true"] if os.path.isfile(os.path.join(run_dir, "blah_config.yaml")) else []
        seconds[f"train_{name}"] = tune_run("blah_qlora", args.config,
                                            [f"output_dir={run_dir}", *common_train, *extra, *resume], log_path)

    rows = [("SmolLM2-135M-Instruct (base)" if args.config == "smollm2_135m_blah" else "base", "sft", "base"),
            ("SFT (LoRA, 0 <blah>)", "sft", "lora"),
            ("5 <blah>, embeddings only", "blah", "embed"),
            ("5 <blah> + SFT (LoRA)", "blah", "lora")]
    examples = "null" if args.eval_examples == 0 else str(args.eval_examples)
    named_metrics = []
    for title, run, stage in rows:
        eval_dir = os.path.join(out, f"eval_{run}_{stage}")
        seconds[f"eval_{run}_{stage}"] = tune_run("blah_eval", args.eval_config, [
            f"run_dir={os.path.join(out, run)}", f"stage={stage}", f"output_dir={eval_dir}",
            f"dataset.max_examples={examples}", f"model_name={title}", *args.set], log_path)
        with open(os.path.join(eval_dir, "metrics.json")) as f:
            named_metrics.append((title, json.load(f)))

    table = comparison_table(named_metrics)
    command = "python benchmarks/reproduce_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    atomic_text(f"{table}\nCommand: `{command.strip()}`\n", os.path.join(out, "results.md"))
    atomic_json({"rows": [{"model": t, **m} for t, m in named_metrics], "seconds": seconds,
                 "settings": vars(args)}, os.path.join(out, "results.json"))
    print(table)
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
