"""The article's results table at small scale, on real weights: SmolLM2-135M-Instruct on a CPU.

Rows (the article's; the same training questions for every trained row, the same held-out
questions for every evaluation, no measured article in training or calibration):

    base                     the model as it is
    SFT (LoRA, 0 <blah>)     answer-only LoRA, no pause tokens         (blah_qlora phases=[lora] pause_tokens.num=0)
    5 <blah>, embed only     only the 5 pause embeddings train         (phase embed)
    5 <blah> + SFT           then LoRA on top, pause rows frozen       (phase lora after embed)

each answered twice from one pass: greedy (the article's rule) and calibrated (the abstention
rule and threshold chosen on validation articles, torchtune_blah.eval.abstention); plus the
always-"?" baseline and paired differences. Data (all real SQuAD 2.0 *dev*-set articles):

    training     bundled_pool split train       16 articles (2,776 questions; the first
                                                 steps x batch of a seeded shuffle are seen)
    calibration  bundled_pool split validation  Black Death, Pharmacy, Private school,
                                                 Scottish Parliament (a seeded sample)
    measurement  bundled_sample                 Normans, Computational complexity theory,
                                                 contexts <= 120 words (469 questions)

Every step is a `tune run` of our recipes; a rerun skips finished trainings and resumes
unfinished evaluations.

    python benchmarks/reproduce_table.py                      # CPU defaults (about 2.5 hours on 2 cores)
    python benchmarks/reproduce_table.py --config smollm2_1_7b_blah --eval-config smollm2_1_7b_blah_eval \\
        --embed-steps 1000 --lora-steps 3000 --set device=cuda --set dtype=bf16   # a GPU

Writes results.md and results.json into --output-dir and prints the table.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from torchtune_blah.checkpointing import atomic_json, atomic_text
from torchtune_blah.run_dir import CALIBRATION_FILE, RunDir
from torchtune_blah.eval.folder import load_rows
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
    parser.add_argument("--embed-steps", type=int, default=250, help="optimizer steps of the embed phase")
    parser.add_argument("--embed-lr", type=float, default=2e-3)
    parser.add_argument("--lora-steps", type=int, default=250, help="optimizer steps of LoRA (both SFT rows)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--validation-examples", type=int, default=200,
                        help="validation-article questions the threshold is chosen on (0: all 603)")
    parser.add_argument("--test-examples", type=int, default=0, help="held-out questions (0: all 469)")
    parser.add_argument("--rows", default="base,sft,embed,blah",
                        help="which rows to train (as needed) and evaluate, in order: a subset of base,sft,embed,blah")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for every training and evaluation run (e.g. device=cuda)")
    args = parser.parse_args(argv)
    base_name = "SmolLM2-135M-Instruct (base)" if args.config == "smollm2_135m_blah" else "base"
    all_rows = {"base": (base_name, "blah", "base"), "sft": ("SFT (LoRA, 0 <blah>)", "sft", "lora"),
                "embed": ("5 <blah>, embeddings only", "blah", "embed"), "blah": ("5 <blah> + SFT (LoRA)", "blah", "lora")}
    unknown = [r for r in args.rows.split(",") if r not in all_rows]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {list(all_rows)}")
    rows = [all_rows[r] for r in args.rows.split(",")]

    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "runs.log")
    common_train = ["dataset.source=bundled_pool", "dataset.split=train",
                    f"embed.max_steps={args.embed_steps}", f"embed.optimizer.lr={args.embed_lr}",
                    f"lora.max_steps={args.lora_steps}", f"embed.batch_size={args.batch_size}",
                    f"lora.batch_size={args.batch_size}", *args.set]
    runs = {"sft": ["phases=[lora]", "pause_tokens.num=0"], "blah": ["phases=[embed,lora]"]}
    seconds = {}
    for name, extra in runs.items():
        if not any(run == name for _, run, _ in rows):
            continue
        run_dir = os.path.join(out, name)
        if "lora" in RunDir(run_dir).finished_phases():
            print(f"{name}: already trained in {run_dir}", flush=True)
            continue
        resume = ["resume_from_checkpoint=true"] if RunDir(run_dir).is_run() else []
        seconds[f"train_{name}"] = tune_run("blah_qlora", args.config,
                                            [f"output_dir={run_dir}", *common_train, *extra, *resume], log_path)

    validation = "null" if args.validation_examples == 0 else str(args.validation_examples)
    test = "null" if args.test_examples == 0 else str(args.test_examples)
    named = []
    for title, run, stage in rows:
        common = [f"run_dir={os.path.join(out, run)}", f"stage={stage}", f"model_name={title}", *args.set]
        val_dir, test_dir = os.path.join(out, f"val_{run}_{stage}"), os.path.join(out, f"test_{run}_{stage}")
        if os.path.isfile(os.path.join(test_dir, "metrics.json")):
            print(f"{title}: already evaluated in {test_dir}", flush=True)
            named += [(f"{title}, greedy", f"{test_dir}@greedy"), (f"{title}, calibrated", test_dir)]
            continue
        seconds[f"calibrate_{run}_{stage}"] = tune_run("blah_eval", args.eval_config, [
            *common, f"output_dir={val_dir}", "dataset.source=bundled_pool", "dataset.split=validation",
            f"dataset.max_examples={validation}", "calibrate=true"], log_path)
        seconds[f"test_{run}_{stage}"] = tune_run("blah_eval", args.eval_config, [
            *common, f"output_dir={test_dir}", f"dataset.max_examples={test}", "abstain_threshold=calibrated"],
            log_path)
        named += [(f"{title}, greedy", f"{test_dir}@greedy"), (f"{title}, calibrated", test_dir)]

    table = comparison_table(load_rows([f"{name}={folder}" for name, folder in named]))
    calibrations = {}
    for title, run, stage in rows:
        with open(os.path.join(out, f"val_{run}_{stage}", CALIBRATION_FILE)) as f:
            c = json.load(f)
        calibrations[title] = {"rule": c["rule"], "threshold": c["threshold"],
                               "validation_auroc": {r: v["auroc"] for r, v in c["rules"].items()}}
    lines = [f"| {t} | {c['rule']} > {c['threshold']:.3f} | " +
             ", ".join(f"{r} {v:.3f}" for r, v in c["validation_auroc"].items()) + " |"
             for t, c in calibrations.items()]
    calibration_table = "\n".join(["| Model | calibrated rule | AUROC on validation |", "|---|---|---|", *lines])
    command = "python benchmarks/reproduce_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    atomic_text(f"{table}\n{calibration_table}\n\nCommand: `{command.strip()}`\n", os.path.join(out, "results.md"))
    previous = {}
    if os.path.isfile(os.path.join(out, "results.json")):  # times of the steps an earlier call ran
        with open(os.path.join(out, "results.json")) as f:
            previous = json.load(f).get("seconds", {})
    seconds = {**previous, **seconds}
    atomic_json({"calibrations": calibrations, "seconds": seconds, "settings": vars(args)},
                os.path.join(out, "results.json"))
    print(table)
    print(calibration_table)
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
