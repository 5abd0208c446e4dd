"""Print evaluations side by side, with the always-"?" baseline and paired differences.

    python -m torchtune_blah.eval.compare "base=RUN/eval_base" "5 <blah> + LoRA=RUN/eval_lora"
    python -m torchtune_blah.eval.compare "greedy=RUN/eval_cal@greedy" "calibrated=RUN/eval_cal"

Each argument is ``name=folder`` (a ``blah_eval`` output_dir holding predictions.jsonl) or just a
folder. ``folder@greedy``: the greedy answers of a thresholded evaluation, read off the same pass
(single-turn). Evaluations of different question sets are refused: rows must be paired.
"""

import sys
from typing import Optional, Sequence

from torchtune_blah.eval.folder import load_rows
from torchtune_blah.eval.report import comparison_table


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit(__doc__)
    print(comparison_table(load_rows(args)), end="")


if __name__ == "__main__":
    main()
