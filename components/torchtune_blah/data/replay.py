"""Replay: retraining on reviewed corrections without forgetting what the run had learned.

Fine-tuning a run on a hundred corrections alone memorises them and costs accuracy elsewhere
(``benchmarks/review_cycle.py``: -2 to -5 EM points on held-out questions). The standard guard in
continual fine-tuning is replay: mix the new labels with a sample of the earlier training data.
``squad_chat_dataset`` does it with a ``replay`` section::

    dataset:
      source: json
      data_files: [corrections.jsonl]
      replay:
        from_run: ${init_from}   # the run being retrained: a sample of the questions it trained on
        ratio: 1.0               # replayed questions per correction
        corrections_repeat: 2    # each correction this many times per epoch: weighs the corrections up
        seed: 0

``from_run: null`` (the shipped configs' default when ``init_from`` is null) replays and repeats
nothing: a first run trains on its data as it is. The defaults (ratio 1, each correction twice,
with ``lora.epochs=2``) were chosen on validation articles: docs/review.md. What a
run "trained on" is read from its own ``blah_config.yaml``: its dataset (built again, replay and all,
so a chain of retrainings replays the corrections of earlier rounds too) in its sampler's order
for the steps each of its phases took. Questions among the corrections are never replayed.
"""

import logging
import os
import random
from typing import Any, List, Mapping, Optional, Sequence

from torchtune_blah.data.squad import SquadRecord

log = logging.getLogger(__name__)

REPLAY_KEYS = ("from_run", "ratio", "corrections_repeat", "seed")


class ReplayError(ValueError):
    pass


def check_replay(replay: Optional[Mapping[str, Any]]) -> Optional[dict]:
    """The ``dataset.replay`` section with defaults, checked (None: no replay)."""
    if replay is None:
        return None
    if not isinstance(replay, Mapping):
        raise ReplayError(f"dataset.replay must be a section with keys {REPLAY_KEYS}, got {replay!r}")
    unknown = [k for k in replay if k not in REPLAY_KEYS]
    if unknown:
        raise ReplayError(f"dataset.replay.{unknown[0]} is not a replay key; the keys are {REPLAY_KEYS}")
    out = {"from_run": replay.get("from_run"), "ratio": replay.get("ratio", 1.0),
           "corrections_repeat": replay.get("corrections_repeat", 2), "seed": replay.get("seed", 0)}
    ratio = out["ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 0:
        raise ReplayError(f"dataset.replay.ratio={ratio!r}: give replayed questions per correction, a number >= 0 "
                          "(0 replays nothing)")
    if isinstance(out["seed"], bool) or not isinstance(out["seed"], int):
        raise ReplayError(f"dataset.replay.seed={out['seed']!r}: give an integer")
    repeat = out["corrections_repeat"]
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ReplayError(f"dataset.replay.corrections_repeat={repeat!r}: give how many times each correction is "
                          "seen per epoch, an integer >= 1 (1: once)")
    if out["from_run"] is None:  # a first run (no init_from): its data as it is, nothing repeated or replayed
        return None
    from torchtune_blah.run_dir import RunDir

    run = RunDir(str(out["from_run"]))
    if not os.path.isfile(run.config_path):
        raise ReplayError(f"dataset.replay.from_run: {run.config_path} not found; from_run must be a blah_qlora "
                          "output_dir (the run being retrained: init_from)")
    out["from_run"] = str(out["from_run"])
    return out


def trained_records(run_dir: str, tokenizer: Any) -> List[SquadRecord]:
    """The records a finished run's phases trained on, in the order its sampler drew them (epoch 0;
    every record when a phase took more than one epoch). Each record once."""
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
    from torchtune import config

    from torchtune_blah.run_dir import RunDir

    run_cfg = RunDir(run_dir).read_config()
    dataset = config.instantiate(run_cfg.dataset, tokenizer)
    dataset = getattr(dataset, "ds", dataset)  # (a PackedDataset wraps the records' dataset)
    order = list(StatefulDistributedSampler(dataset, num_replicas=1, rank=0, shuffle=run_cfg.get("shuffle", True),
                                            seed=run_cfg.seed))
    take = 0
    from torchtune_blah.config_schema import QLoRAConfig

    for phase in run_cfg.get("phases") or QLoRAConfig().phases:  # (a config that left phases out: the default)
        p = run_cfg[phase]
        per_step = p.batch_size * p.get("gradient_accumulation_steps", 1)
        steps = p.get("epochs", 1) * (len(order) // per_step)
        if p.get("max_steps") is not None:
            steps = min(steps, int(p.max_steps))
        take = max(take, steps * per_step)
    seen, out = set(), []
    for i in order[: min(take, len(order))]:
        record = dataset.records[i]
        if record.id not in seen:
            seen.add(record.id)
            out.append(record)
    return out


def with_replay(records: Sequence[SquadRecord], replay: Optional[Mapping[str, Any]],
                tokenizer: Any) -> List[SquadRecord]:
    """``records`` ``corrections_repeat`` times, then ``ratio`` x len(records) questions drawn
    (seeded) from what ``from_run`` trained on, never one of ``records``."""
    out = list(records)
    if replay is None or not records:
        return out
    out = out * replay["corrections_repeat"]
    own = {r.id for r in records}
    candidates = [r for r in trained_records(replay["from_run"], tokenizer) if r.id not in own]
    count = int(round(replay["ratio"] * len(records)))
    if count > len(candidates):
        log.warning("dataset.replay: ratio %s asks for %d questions, %s trained on %d others; replaying all of them",
                    replay["ratio"], count, replay["from_run"], len(candidates))
        count = len(candidates)
    sample = random.Random(replay["seed"]).sample(candidates, count)
    log.info("dataset.replay: %d records (x%d) + %d replayed questions that %s trained on", len(records),
             replay["corrections_repeat"], len(sample), replay["from_run"])
    return out + sample
