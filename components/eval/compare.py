"""Print evaluations side by side, in the seed's layout, with the always-"?" baseline.

    python -m torchtune_blah.eval.compare "base=RUN/eval_base" "5 <blah> + LoRA=RUN/eval_lora"

Each argument is ``name=folder`` (a ``blah_eval`` output_dir holding metrics.json) or just a
folder. Evaluations of different question sets are refused: rows must be comparable.
"""

import json
import os
import sys
from typing import List, Optional, Sequence

from torchtune_blah.eval.report import comparison_table


def load_rows(args: Sequence[str]) -> List[tuple]:
    rows, question_sets = [], set()
    for arg in args:
        name, _, folder = arg.rpartition("=") if "=" in arg else ("", "", arg)
        path = os.path.join(folder, "metrics.json")
        if not os.path.isfile(path):
            raise SystemExit(f"{path} not found: give blah_eval output folders")
        with open(path) as f:
            metrics = json.load(f)
        with open(os.path.join(folder, "eval_settings.json")) as f:
            question_sets.add(tuple(json.load(f)["ids"]))
        rows.append((name or os.path.basename(os.path.normpath(folder)), metrics))
    if len(question_sets) > 1:
        raise SystemExit("these evaluations scored different questions; compare evaluations of the same set")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit(__doc__)
    print(comparison_table(load_rows(args)), end="")


if __name__ == "__main__":
    main()
