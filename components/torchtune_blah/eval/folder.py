"""A ``blah_eval`` output folder: the names of its files (one owner: the recipe writes them, the
review tool, ``compare``, ``routing`` and the benchmarks read them) and its answer rows read back.

    output_dir/eval_settings.json   what was asked (run, stage, rule, question ids): a rerun resumes only with the same
    output_dir/predictions.jsonl    one answer row per question (torchtune_blah.prediction), scored
    output_dir/metrics.json         every number; results.md the table; review_queue.jsonl the least confident first
"""

import os
from typing import List, Sequence

from torchtune_blah.eval.abstention import apply_rule
from torchtune_blah.resumable import read_json, read_jsonl_objects

SETTINGS_FILE = "eval_settings.json"
PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.md"
QUEUE_FILE = "review_queue.jsonl"


def load_rows(args: Sequence[str]) -> List[tuple]:
    """``[(name, rows)]`` for ``name=folder[@greedy]`` arguments: finished evaluations of one question set."""
    named, question_sets = [], set()
    for arg in args:
        name, _, folder = arg.rpartition("=") if "=" in arg else ("", "", arg)
        folder, _, variant = folder.partition("@")
        path = os.path.join(folder, PREDICTIONS_FILE)
        if not os.path.isfile(os.path.join(folder, METRICS_FILE)) or not os.path.isfile(path):
            raise SystemExit(f"{folder}: no metrics.json / predictions.jsonl; give finished blah_eval output folders")
        rows = [dict(row) for _, row in read_jsonl_objects(path)]
        if variant == "greedy":
            if not all("greedy_answer" in r for r in rows):
                raise SystemExit(f"{folder}@greedy: its rows carry no greedy answers (a thresholded single-turn "
                                 "evaluation has them)")
            rows = apply_rule(rows, "p_abstain", None)
        elif variant:
            raise SystemExit(f"{arg}: the only variant is @greedy")
        question_sets.add(tuple(read_json(os.path.join(folder, SETTINGS_FILE), "the evaluation's settings")["ids"]))
        named.append((name or os.path.basename(os.path.normpath(folder)), rows))
    if len(question_sets) > 1:
        raise SystemExit("these evaluations scored different questions; compare evaluations of the same set")
    return named
