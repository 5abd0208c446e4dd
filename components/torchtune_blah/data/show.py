"""See what the model is trained on: one formatted sample, supervised tokens marked.

    python -m torchtune_blah.data.show --config configs/x.yaml [--index 3] [--plain] [key=value ...]

The config is any recipe config with ``tokenizer`` and ``dataset`` sections (and
``pause_tokens``, which the dataset usually references). Supervised tokens (the
loss is computed on them) print in green, or between ``[[`` and ``]]`` with
``--plain`` or when the output is not a terminal; pause tokens print by their
own names (``<blah_0>``...) in magenta or as ``{<blah_0>}``.
"""

import argparse
import sys
from itertools import groupby
from typing import Any, Dict, Sequence

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from torchtune_blah.chat_format import chat_format
from torchtune_blah.pause import PauseTokens

_GREEN, _MAGENTA, _RESET = "\033[32m", "\033[35m", "\033[0m"


def format_sample(tokenizer: Any, sample: Dict[str, Sequence[int]], pause: PauseTokens, color: bool = False) -> str:
    """Decode ``sample["tokens"]`` with supervised spans and pause tokens marked."""
    def kind(pair):
        token, label = pair
        if pause.name_of(token) is not None:
            return "pause"
        return "supervised" if label != CROSS_ENTROPY_IGNORE_IDX else "context"

    out = []
    # Decode runs, not single tokens: one character can span several BPE tokens.
    for k, run in groupby(zip(sample["tokens"], sample["labels"]), key=kind):
        ids = [token for token, _ in run]
        if k == "pause":
            text = "".join(pause.name_of(t) for t in ids)
            out.append(f"{_MAGENTA}{text}{_RESET}" if color else "{" + text + "}")
            continue
        text = chat_format(tokenizer).decode(ids, skip_special_tokens=False)
        if k == "supervised":
            text = f"{_GREEN}{text}{_RESET}" if color else f"[[{text}]]"
        out.append(text)
    return "".join(out)


def main(argv=None) -> int:
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    from torchtune_blah.pause import as_pause_tokens

    parser = argparse.ArgumentParser(prog="python -m torchtune_blah.data.show", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML with tokenizer and dataset sections")
    parser.add_argument("--index", type=int, default=0, help="which sample (default 0)")
    parser.add_argument("--plain", action="store_true", help="mark with [[ ]] and { } instead of colours")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, as with tune run")
    args = parser.parse_args(argv)

    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.overrides))
    for section in ("tokenizer", "dataset"):
        if section not in cfg:
            parser.error(f"{args.config} has no '{section}' section")
    tokenizer = tt_config.instantiate(cfg.tokenizer)
    dataset = tt_config.instantiate(cfg.dataset, tokenizer)
    if not 0 <= args.index < len(dataset):
        parser.error(f"--index {args.index} is out of range: the dataset has {len(dataset)} samples")
    pause = getattr(dataset, "pause", None) or as_pause_tokens(cfg.get("pause_tokens"), tokenizer)
    sample = dataset[args.index]
    supervised = sum(label != CROSS_ENTROPY_IGNORE_IDX for label in sample["labels"])
    color = not args.plain and sys.stdout.isatty()
    print(format_sample(tokenizer, sample, pause, color=color))
    print(f"\n-- sample {args.index} of {len(dataset)}: {len(sample['tokens'])} tokens, "
          f"{supervised} supervised, {pause.num} pause tokens per assistant turn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
