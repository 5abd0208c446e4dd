"""Print evaluations side by side, with the always-"?" baseline and paired differences.

    python -m torchtune_blah.eval.compare "base=RUN/eval_base" "5 <blah> + LoRA=RUN/eval_lora"
    python -m torchtune_blah.eval.compare "greedy=RUN/eval_cal@greedy" "calibrated=RUN/eval_cal"

Each argument is ``name=folder`` (a ``blah_eval`` output_dir holding predictions.jsonl) or just a
folder. ``folder@greedy``: the greedy answers of a thresholded evaluation, read off the same pass
(single-turn). Evaluations of different question sets are refused: rows must be paired.
"""

import json
import os
import sys
from typing import List, Optional, Sequence

from torchtune_blah.eval.abstention import apply_rule
from torchtune_blah.eval.report import comparison_table
from torchtune_blah.resumable import read_jsonl_objects


def load_rows(args: Sequence[str]) -> List[tuple]:
    named, question_sets = [], set()
    for arg in args:
        name, _, folder = arg.rpartition("=") if "=" in arg else ("", "", arg)
        folder, _, variant = folder.partition("@")
        path = os.path.join(folder, "predictions.jsonl")
        if not os.path.isfile(os.path.join(folder, "metrics.json")) or not os.path.isfile(path):
            raise SystemExit(f"{folder}: no metrics.json / predictions.jsonl; give finished blah_eval output folders")
        rows = [dict(row) for _, row in read_jsonl_objects(path)]
        if variant == "greedy":
            if not all("greedy_answer" in r for r in rows):
                raise SystemExit(f"{folder}@greedy: its rows carry no greedy answers (a thresholded single-turn "
                                 "evaluation has them)")
            rows = apply_rule(rows, "p_abstain", None)
        elif variant:
            raise SystemExit(f"{arg}: the only variant is @greedy")
        with open(os.path.join(folder, "eval_settings.json")) as f:
            question_sets.add(tuple(json.load(f)["ids"]))
        named.append((name or os.path.basename(os.path.normpath(folder)), rows))
    if len(question_sets) > 1:
        raise SystemExit("these evaluations scored different questions; compare evaluations of the same set")
    return named


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit(__doc__)
    print(comparison_table(load_rows(args)), end="")


if __name__ == "__main__":
    main()
