"""Answering SQuAD questions with a model, the seed's protocol, in batches.

One call answers a batch of records: prompts forced through the pause ids and
``"\\n```json"``, greedy decoding until a ``}`` token, the answer parsed from the
JSON block, and the model's probability of abstaining read where the answer
value starts. The two-turn style asks the yes/no question first and feeds the
model's reply back (as the JSON block of its parsed answer, the form it was
trained on; the raw reply when it did not parse).
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from torchtune_blah.chat_format import chat_format
from torchtune_blah.data.chat import answer_prompt
from torchtune_blah.data.squad import ANSWER_PREFIX, NO_ANSWER, SquadRecord, answer_block
from torchtune_blah.eval.metrics import official_prediction, score_example
from torchtune_blah.eval.parse import extract_answer
from torchtune_blah.generation import greedy_generate, last_logits
from torchtune_blah.pause import PauseTokens, mask_pause_logits


@dataclass(frozen=True)
class AbstentionProbe:
    """Where, in the tokens after the forced prefix, the answer value starts, and the
    token that starts the abstention value ``"?"`` there."""

    scaffold: Tuple[int, ...]  # the JSON tokens before the value: '\n{\n  "answer": ' (tokenized)
    token: int

    @property
    def step(self) -> int:
        return len(self.scaffold)


def abstention_probe(tokenizer: Any) -> AbstentionProbe:
    """Find the value position by tokenizing an abstention and an answer block and
    taking their first difference (BPE may fuse the quote with the value)."""
    encode = chat_format(tokenizer).encode
    forced = encode(ANSWER_PREFIX)
    abstain, answer = encode(answer_block(NO_ANSWER)), encode(answer_block("Normandy"))
    if abstain[: len(forced)] != forced or answer[: len(forced)] != forced:
        raise ValueError("this tokenizer merges the forced prefix '\\n```json' with what follows it; the seed's "
                         "forced-prefix protocol needs it to be a token prefix of every reply")
    k = next(i for i, (a, b) in enumerate(zip(abstain, answer)) if a != b)
    return AbstentionProbe(scaffold=tuple(abstain[len(forced):k]), token=abstain[k])


@torch.inference_mode()
def _abstention_prob_forced(model: nn.Module, prompt: List[int], probe: AbstentionProbe,
                            pause: Optional[PauseTokens]) -> float:
    """P(abstention token) with the JSON scaffold written for the model (it wrote something else)."""
    device = next(model.parameters()).device
    logits = last_logits(model(torch.tensor([prompt + list(probe.scaffold)], device=device))).float()
    if pause is not None:
        mask_pause_logits(logits, pause)
    return float(torch.softmax(logits, dim=-1)[0, probe.token])


def _generate(model, tokenizer, prompts, pause, stop_ids, max_new_tokens, probe, use_cache):
    gens = greedy_generate(model, prompts, pad_id=tokenizer.pad_id, stop_ids=stop_ids, max_new_tokens=max_new_tokens,
                           pause=pause, use_cache=use_cache,
                           probe=(probe.step, probe.token))
    fmt = chat_format(tokenizer)
    replies = []
    for prompt, gen in zip(prompts, gens):
        ids = [t for t in gen.tokens if t not in fmt.end_ids]
        text = ANSWER_PREFIX + fmt.decode(ids)
        prob = gen.probe_prob
        if tuple(gen.tokens[: probe.step]) != probe.scaffold:  # it left the scaffold: ask directly
            prob = _abstention_prob_forced(model, list(prompt), probe, pause)
        replies.append((text, prob))
    return replies


def answer_records(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[SquadRecord],
    pause: Optional[PauseTokens],
    *,
    prompt_style: str,
    stop_ids: Set[int],
    probe: AbstentionProbe,
    max_new_tokens: int = 64,
    use_cache: bool = True,
    prompts: Optional[Dict[str, Any]] = None,
) -> List[Dict[str, Any]]:
    """Answer ``records`` (one batch); one result row per record (predictions.jsonl)."""
    prompts = prompts or {}
    pause = pause if pause is not None and pause.num else None  # zero pause tokens: nothing to insert or mask
    pause_ids = pause.sequence if pause is not None else []
    first = [answer_prompt(tokenizer, r, pause_ids, prompt_style, **prompts) for r in records]
    replies = _generate(model, tokenizer, first, pause, stop_ids, max_new_tokens, probe, use_cache)
    first_turn = [None] * len(records)
    if prompt_style == "multi_turn":
        first_turn = [reply for reply, _ in replies]
        fed_back = [answer_block(a) if (a := extract_answer(t)) is not None else t for t in first_turn]
        second = [answer_prompt(tokenizer, r, pause_ids, prompt_style, first_reply=f, **prompts)
                  for r, f in zip(records, fed_back)]
        replies = _generate(model, tokenizer, second, pause, stop_ids, max_new_tokens, probe, use_cache)
    rows = []
    for record, (reply, na_prob), turn1 in zip(records, replies, first_turn):
        answer = extract_answer(reply)
        row = {
            "id": record.id, "question": record.question, "gold_answers": list(record.answers),
            "has_answer": record.has_answer, "model_answer": answer, "raw_output": reply,
            "prediction": official_prediction(answer), "na_prob": na_prob,
            **score_example(record.answers, answer),
        }
        if turn1 is not None:
            row["first_turn_output"] = turn1
        rows.append(row)
    return rows
