"""The human-in-the-loop cycle over several rounds: does expert review pay, and does sending the
model's *least confident* answers beat sending random ones, once retraining replays what the run
learned?

From one finished run (``--run-dir``, e.g. the demo's), three arms go through ``--rounds`` rounds:

- ``least_confident``: the arm's current run answers the unlabeled pool (training-pool articles,
  ``bundled_pool`` split train, that the start run never trained on; gold answers hidden), and the
  ``--per-round`` answers first in review order (invalid JSON, then the least ``confidence``) go to
  a simulated expert, who answers with the gold label;
- ``random``: the same number drawn at random from the arm's unreviewed pool;
- ``control``: no new labels: the same number of questions drawn from what the start run trained
  on (their own gold labels), so the arm spends the same retraining steps on replay alone. It
  separates the labels' effect from the extra steps'.

Each round retrains every arm from its previous run (``blah_qlora init_from=<previous>
phases=[lora]``) on that round's questions plus the replay the configs ship (``dataset.replay:
from_run: ${init_from}``, ``--replay-ratio`` per question), ``--epochs`` passes, then measures:
the arm's reviewed questions of that round (official EM: did it learn them?) and the same
``--test`` held-out dev questions (measurement articles, never trained or reviewed on), greedy
(the article's rule). Output: a table per round and arm (EM with its 95% interval, the paired
difference against the start), a learning-curve plot (``learning_curve.png``: EM against questions
reviewed), and the seconds each step took.

    python benchmarks/review_cycle.py --run-dir /tmp/torchtune-blah/demo --rounds 3 --per-round 100

A rerun skips the finished steps (every step writes its outputs atomically; the recipes resume).
Writes results.md / results.json / learning_curve.png into --output-dir.
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

ARMS = ("least_confident", "random", "control")


def jsonl_records(records) -> str:
    return "".join(json.dumps({"id": r.id, "title": r.title, "context": r.context, "question": r.question,
                               "answers": list(r.answers)}, ensure_ascii=False) + "\n" for r in records)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a finished blah_qlora run (its lora phase): the start")
    parser.add_argument("--output-dir", default="/tmp/torchtune-blah/review_cycle")
    parser.add_argument("--config", default="smollm2_135m_blah", help="blah_qlora config for the retraining")
    parser.add_argument("--eval-config", default="smollm2_135m_blah_eval")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=100, help="questions reviewed per round and arm")
    parser.add_argument("--pool", type=int, default=400, help="unlabeled questions (>= rounds x per-round)")
    parser.add_argument("--pool-max-context-words", type=int, default=120,
                        help="pool questions with contexts up to this many words (null-like 0: all)")
    parser.add_argument("--replay-ratio", type=float, default=1.0, help="replayed questions per reviewed one")
    parser.add_argument("--corrections-repeat", type=int, default=None,
                        help="each reviewed question this many times per epoch (dataset.replay.corrections_repeat; "
                             "default: the config's)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over each round's questions + replay")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--test", type=int, default=300, help="held-out questions (0: all 469)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for every run (e.g. device=cuda)")
    args = parser.parse_args(argv)
    if args.pool < args.rounds * args.per_round:
        raise SystemExit(f"--pool {args.pool} < --rounds x --per-round = {args.rounds * args.per_round}")

    from torchtune import config

    from torchtune_blah.data.replay import trained_records
    from torchtune_blah.data.squad import filter_context_words, load_squad_records
    from torchtune_blah.eval.folder import load_rows
    from torchtune_blah.eval.report import always_abstain_rows
    from torchtune_blah.eval.stats import bootstrap_ci, paired_difference

    start_run = RunDir(args.run_dir)
    if "lora" not in start_run.finished_phases():
        raise SystemExit(f"--run-dir {args.run_dir}: no finished lora phase")
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "runs.log")
    seconds_path = os.path.join(out, "seconds.json")
    seconds = json.load(open(seconds_path)) if os.path.isfile(seconds_path) else {}

    def timed(key, recipe, cfg, overrides):
        seconds[key] = tune_run(recipe, cfg, [*overrides, *args.set], log_path)
        atomic_json(seconds, seconds_path)

    # the unlabeled pool and the control arm's replay questions, from the start run
    pool_path, seen_path = os.path.join(out, "pool.jsonl"), os.path.join(out, "start_trained.jsonl")
    if not os.path.isfile(pool_path):
        run_cfg = start_run.read_config()
        tokenizer = config.instantiate(run_cfg.tokenizer)
        seen = trained_records(args.run_dir, tokenizer)
        ids = {r.id for r in seen}
        records = [r for r in load_squad_records("bundled_pool", split="train") if r.id not in ids]
        records = filter_context_words(records, args.pool_max_context_words or None)
        random.Random(args.seed).shuffle(records)
        if len(records) < args.pool:
            raise SystemExit(f"only {len(records)} unseen pool questions; lower --pool")
        atomic_text(jsonl_records(seen), seen_path)
        atomic_text(jsonl_records(records[: args.pool]), pool_path)
        print(f"pool: {args.pool} of {len(records)} unseen training-pool questions; the start trained on {len(seen)}",
              flush=True)
    pool = {r["id"]: r for r in read_jsonl(pool_path)}
    start_trained = read_jsonl(seen_path)

    test = "null" if args.test == 0 else str(args.test)

    def evaluate(run_dir, folder, name, extra=()):
        key = "eval_" + os.path.relpath(folder, out).replace(os.sep, "_")
        if not os.path.isfile(os.path.join(folder, "metrics.json")):
            timed(key, "blah_eval", args.eval_config, [f"run_dir={run_dir}", "stage=lora", f"output_dir={folder}",
                                                       f"model_name={name}", *extra])
        return folder

    test_overrides = [f"dataset.max_examples={test}"]
    results = {"start": evaluate(args.run_dir, os.path.join(out, "test_start"), "start", test_overrides)}
    learned = {}
    state = {arm: {"run": args.run_dir, "reviewed": []} for arm in ARMS}
    for rnd in range(1, args.rounds + 1):
        for arm in ARMS:
            folder = os.path.join(out, f"round{rnd}", arm)
            os.makedirs(folder, exist_ok=True)
            picked_path = os.path.join(folder, "questions.jsonl")
            current, reviewed = state[arm]["run"], state[arm]["reviewed"]
            if not os.path.isfile(picked_path):
                left = [i for i in sorted(pool) if i not in set(reviewed)]
                if arm == "least_confident":  # the arm's run answers what is left; the review order picks
                    left_path = os.path.join(folder, "unlabeled.jsonl")
                    atomic_text("".join(json.dumps(pool[i], ensure_ascii=False) + "\n" for i in left), left_path)
                    answered = evaluate(current, os.path.join(folder, "answer_pool"), "pool", [
                        "dataset.source=json", f"dataset.data_files={left_path}", "dataset.max_context_words=null",
                        "dataset.shuffle_seed=null", "dataset.max_examples=null", "review_queue_size=null"])
                    queue = [r["id"] for r in read_jsonl(os.path.join(answered, "review_queue.jsonl"))]
                    picked = [pool[i] for i in queue[: args.per_round]]
                elif arm == "random":
                    picked = [pool[i] for i in random.Random(args.seed * 1000 + rnd).sample(left, args.per_round)]
                else:  # replay alone: questions the start trained on, with their own labels
                    picked = random.Random(args.seed * 1000 + rnd).sample(start_trained, args.per_round)
                atomic_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in picked), picked_path)
            picked = read_jsonl(picked_path)
            run_dir = os.path.join(folder, "run")
            if "lora" not in RunDir(run_dir).finished_phases():
                resume = ["resume_from_checkpoint=true"] if RunDir(run_dir).is_run() else []
                timed(f"train_round{rnd}_{arm}", "blah_qlora", args.config, [
                    f"output_dir={run_dir}", f"init_from={current}", "phases=[lora]", "validation=null",
                    "dataset.source=json", f"dataset.data_files=[{picked_path}]", "dataset.holdout_fraction=0.0",
                    f"dataset.replay.ratio={args.replay_ratio}", f"dataset.replay.seed={rnd}",
                    *([f"dataset.replay.corrections_repeat={args.corrections_repeat}"]
                      if args.corrections_repeat is not None else []),
                    f"lora.batch_size={args.batch_size}", f"lora.epochs={args.epochs}", "lora.max_steps=null",
                    *resume])
            if arm != "control":  # did it learn the answers it was given?
                evaluate(run_dir, os.path.join(folder, "reviewed"), f"round {rnd} {arm}, its reviewed questions", [
                    "dataset.source=json", f"dataset.data_files={picked_path}", "dataset.max_context_words=null",
                    "dataset.shuffle_seed=null", "dataset.max_examples=null"])
                rows = read_jsonl(os.path.join(folder, "reviewed", "predictions.jsonl"))
                learned[f"round{rnd}/{arm}"] = 100.0 * sum(r["official_exact"] for r in rows) / len(rows)
            results[f"round{rnd}/{arm}"] = evaluate(run_dir, os.path.join(folder, "test"), f"round {rnd} {arm}",
                                                    test_overrides)
            state[arm] = {"run": run_dir, "reviewed": reviewed + [r["id"] for r in picked] if arm != "control"
                          else reviewed}

    # the table: EM on the held-out questions, paired against the start
    loaded = dict(load_rows([f"{name}={folder}" for name, folder in results.items()]))
    exact = {name: [100.0 * float(r["official_exact"]) for r in rows] for name, rows in loaded.items()}
    baseline = [100.0 * float(r["official_exact"]) for r in always_abstain_rows(loaded["start"])]
    table = {}
    lines = [f"Start: {args.run_dir}. Each round and arm: {args.per_round} questions, retrained from the arm's "
             f"previous run (phases=[lora], {args.epochs} epochs of batch {args.batch_size} over them"
             + (f" x{args.corrections_repeat}" if args.corrections_repeat else "") +
             f" + {args.replay_ratio:g} replayed per question); pool: {len(pool)} unseen training-pool questions "
             f"(contexts <= {args.pool_max_context_words or 'any'} words); test: {len(exact['start'])} held-out "
             "questions of the measurement articles (bundled_sample), greedy.", "",
             "| round | arm | reviewed so far | EM on its reviewed questions | held-out EM [95% CI] | vs start [95% CI] |",
             "|---:|---|---:|---:|---:|---:|"]
    low, high = bootstrap_ci(exact["start"])
    lines.append(f"| 0 | start | 0 | | {sum(exact['start']) / len(exact['start']):.1f} [{low:.1f}, {high:.1f}] | |")
    for name in results:
        if name == "start":
            continue
        rnd, arm = name.split("/")
        n = int(rnd[5:])
        d = paired_difference(exact["start"], exact[name])
        low, high = bootstrap_ci(exact[name])
        em = sum(exact[name]) / len(exact[name])
        reviewed = 0 if arm == "control" else n * args.per_round
        table[name] = {"round": n, "arm": arm, "reviewed": reviewed, "em": em, "ci95": [low, high],
                       "vs_start": d, "reviewed_em": learned.get(name)}
        cell = f"{learned[name]:.1f}" if name in learned else "(no new labels)"
        lines.append(f"| {n} | {arm} | {reviewed} | {cell} | {em:.1f} [{low:.1f}, {high:.1f}] | "
                     f"{d['difference']:+.2f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}] |")
    b = sum(baseline) / len(baseline)
    last = args.rounds
    versus = {other: paired_difference(exact[f"round{last}/{other}"], exact[f"round{last}/least_confident"])
              for other in ("random", "control")}
    lines += ["", f"always \"?\" on the same questions: {b:.1f}.",
              f"Round {last}, least confident minus random: {versus['random']['difference']:+.2f} "
              f"[{versus['random']['ci_low']:+.1f}, {versus['random']['ci_high']:+.1f}]; minus control: "
              f"{versus['control']['difference']:+.2f} [{versus['control']['ci_low']:+.1f}, "
              f"{versus['control']['ci_high']:+.1f}].", "",
              "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    rounds_seconds = {r: sum(v for k, v in seconds.items() if f"round{r}" in k) for r in range(1, last + 1)}
    lines.append("Per round (all arms): " + ", ".join(f"round {r} {v / 60:.1f} min" for r, v in rounds_seconds.items()))
    text = "\n".join(lines) + "\n"
    atomic_text(text, os.path.join(out, "results.md"))
    atomic_json({"table": table, "start_em": sum(exact["start"]) / len(exact["start"]), "always_abstain_em": b,
                 "round_last_least_minus": versus, "seconds": seconds, "args": vars(args)},
                os.path.join(out, "results.json"))
    _plot(out, table, exact, args)
    print(text)


def _plot(out, table, exact, args):
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from torchtune_blah.eval.stats import bootstrap_ci

    fig, ax = plt.subplots(figsize=(6, 4))
    start = sum(exact["start"]) / len(exact["start"])
    low, high = bootstrap_ci(exact["start"])
    for arm, color in zip(ARMS, ("tab:blue", "tab:orange", "gray")):
        rows = sorted((v for v in table.values() if v["arm"] == arm), key=lambda v: v["round"])
        xs = [0] + [v["round"] * args.per_round for v in rows]  # control: the same steps, no labels
        ys = [start] + [v["em"] for v in rows]
        errs = [[start - low] + [v["em"] - v["ci95"][0] for v in rows], [high - start] + [v["ci95"][1] - v["em"] for v in rows]]
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, color=color,
                    label=arm + (" (replay only, same steps)" if arm == "control" else ""))
    ax.set_xlabel("questions reviewed (control: the same retraining steps, no new labels)")
    ax.set_ylabel("% official EM, held-out questions")
    ax.set_title(f"review cycle: {args.per_round} per round, {len(exact['start'])} held-out questions", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = os.path.join(out, "learning_curve.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, os.path.join(out, "learning_curve.png"))


if __name__ == "__main__":
    main()
