"""Evaluation speed: batched + KV cache + stop rule vs llama-squad's one question at a time.

    python benchmarks/eval_speed.py --run-dir /tmp/torchtune-blah/demo [--questions 64] [--batch-size 16]

Runs a trained blah_qlora run's model (the CPU demo's, by default) over the same
questions twice: (1) our way, left-padded batches through torchtune's KV cache,
greedy, stopping each row at its first "}" token; (2) llama-squad's way, one question
at a time, recomputing the whole sequence for every new token (no cache), with the
same stop rule. Prints examples/s of each, the ratio (target >= 5x), and checks that
both ways give the same answers.
"""
import argparse
import os
import time

import torch
from omegaconf import OmegaConf
from torchtune import config

from torchtune_blah.data.squad import load_squad_records
from torchtune_blah.eval.run import abstention_probe, answer_records
from torchtune_blah.generation import stop_token_ids
from torchtune_blah.model import load_run_model
from torchtune_blah.run_dir import RunDir


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", default="/tmp/torchtune-blah/demo")
    p.add_argument("--stage", default="lora")
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()
    cfg_path = RunDir(args.run_dir).config_path
    if not os.path.isfile(cfg_path):
        raise SystemExit(f"{cfg_path} not found: train first (tune run blah_qlora --config demo_cpu_blah "
                         f"output_dir={args.run_dir})")
    run_cfg = OmegaConf.load(cfg_path)
    tokenizer = config.instantiate(run_cfg.tokenizer)
    model, pause = load_run_model(run_cfg, args.run_dir, args.stage, torch.device("cpu"), torch.float32,
                                  staging_dir=os.path.join(args.run_dir, ".bench_staging"))
    records = load_squad_records("bundled_sample")[: args.questions]
    kwargs = dict(prompt_style="single_turn", stop_ids=stop_token_ids(tokenizer),
                  probe=abstention_probe(tokenizer), max_new_tokens=args.max_new_tokens)

    start = time.perf_counter()
    ours = []
    for i in range(0, len(records), args.batch_size):
        ours += answer_records(model, tokenizer, records[i:i + args.batch_size], pause, **kwargs)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    seed = answer_records(model, tokenizer, records, pause, use_cache=False, **kwargs)
    seed_s = time.perf_counter() - start

    same = sum(a["raw_output"] == b["raw_output"] for a, b in zip(ours, seed))
    stopped = sum(r["raw_output"].rstrip().endswith("}") for r in ours)
    print(f"{len(records)} questions, {args.stage} model of {args.run_dir}, {torch.get_num_threads()} CPU threads")
    print(f"  batched (batch {args.batch_size}) + KV cache + stop rule: {len(records) / ours_s:7.2f} examples/s")
    print(f"  one at a time, no cache, stop rule (seed):   {len(records) / seed_s:7.2f} examples/s")
    print(f"  ratio = {seed_s / ours_s:.2f}x  (target >= 5x); identical answers {same}/{len(records)}, "
          f"{stopped} stopped at '}}'")


if __name__ == "__main__":
    main()
