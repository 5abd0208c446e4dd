"""Does a round of expert review pay, and does sending the model's *least certain* answers to the
experts beat sending random ones?

Starting from a trained run (``--run-dir``, e.g. reproduce_table.py's "5 <blah> + SFT" run):

1. an unlabeled pool: ``--pool`` questions of the run's own training-pool articles (bundled_pool,
   split train) that the run did *not* train on (its sampler's order, replayed);
2. the run answers them (``blah_eval``; the gold answers are not shown to it) and ranks them as the
   review queue does (``review_queue.jsonl``: invalid JSON, then answers that disagree with
   P(abstain), then P(abstain) closest to 0.5);
3. a simulated expert answers ``--reviewed`` questions with their gold label: the K least certain,
   and, for comparison, K drawn at random from the same pool;
4. each set of K corrections retrains the run (``blah_qlora init_from=<run> phases=[lora]``,
   ``--epochs`` passes over the K corrections);
5. the start, both retrained runs and the always-"?" baseline are evaluated greedily (the
   article's rule) on the same held-out dev questions (``--test`` of the measurement articles,
   never in any training or review);
6. the table, the paired differences in official EM, the gain per 100 reviewed questions with its
   95% interval, and the time each step took.

    python benchmarks/review_cycle.py --run-dir /tmp/torchtune-blah/reproduce_table/blah

A rerun skips the finished steps. Writes results.md / results.json into --output-dir.
"""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reproduce_table import tune_run  # noqa: E402

from torchtune_blah.checkpointing import atomic_json, atomic_text  # noqa: E402
from torchtune_blah.run_dir import RunDir  # noqa: E402


def trained_ids(run_cfg) -> set:
    """The ids of the questions the run's phases saw: the first steps x batch x accumulation
    samples of the recipe's sampler order (epoch 0, the run's seed), for each phase it trained."""
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
    from torchtune import config

    tokenizer = config.instantiate(run_cfg.tokenizer)
    dataset = config.instantiate(run_cfg.dataset, tokenizer)
    order = list(StatefulDistributedSampler(dataset, num_replicas=1, rank=0, shuffle=run_cfg.get("shuffle", True),
                                            seed=run_cfg.seed))
    seen = set()
    for phase in run_cfg.phases:
        p = run_cfg[phase]
        per_epoch = len(order) // (p.batch_size * p.get("gradient_accumulation_steps", 1))
        steps = min(p.get("epochs", 1) * per_epoch, p.max_steps if p.get("max_steps") is not None else 10 ** 12)
        take = steps * p.batch_size * p.get("gradient_accumulation_steps", 1)
        seen |= {dataset.records[order[i % len(order)]].id for i in range(take)}
    return seen


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a finished blah_qlora run (its lora phase)")
    parser.add_argument("--output-dir", default="/tmp/torchtune-blah/review_cycle")
    parser.add_argument("--config", default="smollm2_135m_blah", help="blah_qlora config for the retraining")
    parser.add_argument("--eval-config", default="smollm2_135m_blah_eval")
    parser.add_argument("--pool", type=int, default=400, help="unlabeled questions the run answers")
    parser.add_argument("--reviewed", type=int, default=100, help="K: questions the expert corrects")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the K corrections")
    parser.add_argument("--test", type=int, default=300, help="held-out questions (0: all 469)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for every run (e.g. device=cuda)")
    args = parser.parse_args(argv)

    from torchtune_blah.data.squad import load_squad_records
    from torchtune_blah.eval.compare import load_rows
    from torchtune_blah.eval.report import BASELINE_NAME, always_abstain_rows, comparison_table
    from torchtune_blah.eval.stats import paired_difference

    run = RunDir(args.run_dir)
    if "lora" not in run.finished_phases():
        raise SystemExit(f"--run-dir {args.run_dir}: no finished lora phase")
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "runs.log")
    seconds = {}

    # 1. the unlabeled pool
    pool_path = os.path.join(out, "pool.jsonl")
    if not os.path.isfile(pool_path):
        run_cfg = run.read_config()
        seen = trained_ids(run_cfg)
        records = [r for r in load_squad_records("bundled_pool", split="train") if r.id not in seen]
        random.Random(args.seed).shuffle(records)
        rows = [{"id": r.id, "title": r.title, "context": r.context, "question": r.question,
                 "answers": list(r.answers)} for r in records[: args.pool]]
        atomic_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows), pool_path)
        print(f"pool: {len(rows)} of {len(records)} unseen training-pool questions ({len(seen)} seen)", flush=True)
    pool = {json.loads(line)["id"]: json.loads(line) for line in open(pool_path, encoding="utf-8")}

    # 2. the run answers the pool; the review queue's order
    pool_eval = os.path.join(out, "pool_eval")
    if not os.path.isfile(os.path.join(pool_eval, "review_queue.jsonl")):
        seconds["answer_pool"] = tune_run("blah_eval", args.eval_config, [
            f"run_dir={args.run_dir}", "stage=lora", f"output_dir={pool_eval}", "dataset.source=json",
            f"dataset.data_files={pool_path}", "dataset.max_context_words=null", "dataset.shuffle_seed=null",
            "dataset.max_examples=null", "review_queue_size=null", *args.set], log_path)
    queue = [json.loads(line)["id"] for line in open(os.path.join(pool_eval, "review_queue.jsonl"), encoding="utf-8")]

    # 3. the simulated expert: gold labels for the K least certain, and for K random questions
    picks = {"uncertain": queue[: args.reviewed],
             "random": random.Random(args.seed + 1).sample(sorted(pool), args.reviewed)}
    for name, ids in picks.items():
        path = os.path.join(out, f"corrections_{name}.jsonl")
        if not os.path.isfile(path):
            atomic_text("".join(json.dumps(pool[i], ensure_ascii=False) + "\n" for i in ids), path)
    unanswerable = {name: sum(not pool[i]["answers"] for i in ids) for name, ids in picks.items()}

    # 4. retrain from the run on each set of corrections
    batch = 4
    steps = max(1, args.epochs * args.reviewed // batch)
    for name in picks:
        run_dir = os.path.join(out, f"run_{name}")
        if "lora" in RunDir(run_dir).finished_phases():
            continue
        resume = ["resume_from_checkpoint=true"] if RunDir(run_dir).is_run() else []
        seconds[f"train_{name}"] = tune_run("blah_qlora", args.config, [
            f"output_dir={run_dir}", f"init_from={args.run_dir}", "phases=[lora]", "validation=null",
            "dataset.source=json", f"dataset.data_files={os.path.join(out, f'corrections_{name}.jsonl')}",
            "dataset.holdout_fraction=0.0", f"lora.batch_size={batch}", f"lora.epochs={args.epochs}",
            f"lora.max_steps={steps}", *resume, *args.set], log_path)

    # 5. the same held-out questions for all
    test = "null" if args.test == 0 else str(args.test)
    named = []
    for title, run_dir in (("start", args.run_dir), (f"+ {args.reviewed} least certain reviewed", f"{out}/run_uncertain"),
                           (f"+ {args.reviewed} random reviewed", f"{out}/run_random")):
        test_dir = os.path.join(out, "test_" + os.path.basename(run_dir.rstrip("/")))
        if not os.path.isfile(os.path.join(test_dir, "metrics.json")):
            seconds[f"test_{os.path.basename(run_dir)}"] = tune_run("blah_eval", args.eval_config, [
                f"run_dir={run_dir}", "stage=lora", f"output_dir={test_dir}", f"dataset.max_examples={test}",
                f"model_name={title}", *args.set], log_path)
        named.append((title, test_dir))

    # 6. the table and the gain per 100 reviewed questions
    loaded = load_rows([f"{name}={folder}" for name, folder in named])
    table = comparison_table(loaded)
    exact = {name: [100.0 * float(r["official_exact"]) for r in rows] for name, rows in loaded}
    exact[BASELINE_NAME] = [100.0 * float(r["official_exact"]) for r in always_abstain_rows(loaded[0][1])]
    start = exact["start"]
    gains = {}
    for name in list(exact)[1:3]:
        d = paired_difference(start, exact[name])
        gains[name] = {k: v * 100.0 / args.reviewed for k, v in d.items() if k in ("difference", "ci_low", "ci_high")}
    versus = paired_difference(exact[list(exact)[2]], exact[list(exact)[1]])
    lines = [f"Start: {args.run_dir}. Pool: {len(pool)} unseen training-pool questions (bundled_pool, split "
             f"train); reviewed: {args.reviewed} (unanswerable among them: least certain "
             f"{unanswerable['uncertain']}, random {unanswerable['random']}); retraining: phases=[lora], "
             f"{steps} steps of batch {batch} from init_from; test: {len(start)} questions of the measurement "
             "articles (bundled_sample), greedy.", "", table, "",
             "Gain in official EM per 100 reviewed questions, points [95% CI]:", "", "| Reviewed | gain |", "|---|---:|"]
    lines += [f"| {name} | {g['difference']:+.2f} [{g['ci_low']:+.2f}, {g['ci_high']:+.2f}] |" for name, g in gains.items()]
    lines += ["", f"Least certain minus random: {versus['difference']:+.2f} points [{versus['ci_low']:+.1f}, "
              f"{versus['ci_high']:+.1f}]", "", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    text = "\n".join(lines) + "\n"
    atomic_text(text, os.path.join(out, "results.md"))
    atomic_json({"gains_per_100": gains, "uncertain_minus_random": versus, "seconds": seconds,
                 "unanswerable_reviewed": unanswerable, "args": vars(args)}, os.path.join(out, "results.json"))
    print(text)


if __name__ == "__main__":
    main()
