"""Answering SQuAD questions with a model, llama-squad's protocol, in batches.

One call answers a batch of records: prompts forced through the pause ids and
``"\\n```json"``, greedy decoding until a ``}`` token, the answer parsed from the
JSON block, and the model's probability of abstaining read where the answer
value starts. The two-turn style asks the yes/no question first and feeds the
model's reply back (as the JSON block of its parsed answer, the form it was
trained on; the raw reply when it did not parse).

With ``abstention=(rule, threshold)`` (``torchtune_blah.eval.abstention``) the
abstention token is masked where the value starts, so every question gets its
best span, and the rule decides between that span and ``"?"``; in the two-turn
style the span turn is then asked after a "yes".
"""

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from torchtune_blah.chat_format import chat_format, render_chat
from torchtune_blah.data.chat import answer_prompt
from torchtune_blah.data.squad import ANSWER_PREFIX, NO_ANSWER, ChatMessage, SquadRecord, answer_block, squad_messages
from torchtune_blah.eval.parse import extract_answer
from torchtune_blah.generation import greedy_generate, last_logits, stop_token_ids
from torchtune_blah.pause import PauseTokens, mask_pause_logits
from torchtune_blah.prediction import Prediction, prediction_rows
from torchtune_blah.resumable import ResumableJsonl


PROMPT_KEYS = ("system_prompt", "single_turn_prompt", "multi_turn_first_prompt", "multi_turn_second_prompt")


def run_prompts(run_cfg: Any, prompt_style: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
    """The prompt style (``prompt_style`` overrides the run's) and prompt texts a run trained with."""
    from torchtune_blah.data.squad import PROMPT_STYLES

    dataset = run_cfg.get("dataset") or {}
    style = str(prompt_style or dataset.get("prompt_style", "single_turn"))
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {style!r}")
    return style, {k: dataset[k] for k in PROMPT_KEYS if k in dataset}


@dataclass(frozen=True)
class AbstentionProbe:
    """Where, in the tokens after the forced prefix, the answer value starts, and the
    token that starts the abstention value ``"?"`` there."""

    scaffold: Tuple[int, ...]  # the JSON tokens before the value: '\n{\n  "answer": ' (tokenized)
    token: int
    # Every token that starts the value the way the abstention does ('?"', but also a lone '?'
    # that a '"' would follow): what the threshold rule masks, and whose probabilities it sums.
    abstain_ids: Tuple[int, ...]

    @property
    def step(self) -> int:
        return len(self.scaffold)


def abstention_probe(tokenizer: Any, value: str = NO_ANSWER, other: str = "Normandy") -> AbstentionProbe:
    """Find the value position by tokenizing an abstention and an answer block and
    taking their first difference (BPE may fuse the quote with the value).
    ``value="no", other="yes"``: the two-turn style's first reply."""
    fmt = chat_format(tokenizer)
    forced = fmt.encode(ANSWER_PREFIX)
    abstain, answer = fmt.encode(answer_block(value)), fmt.encode(answer_block(other))
    if abstain[: len(forced)] != forced or answer[: len(forced)] != forced:
        raise ValueError("this tokenizer merges the forced prefix '\\n```json' with what follows it; llama-squad's "
                         "forced-prefix protocol needs it to be a token prefix of every reply")
    k = next(i for i, (a, b) in enumerate(zip(abstain, answer)) if a != b)
    first, rest = fmt.decode([abstain[k]]), fmt.decode(abstain[k:])
    same_start = tuple(i for i, text in enumerate(fmt.token_texts())
                       if text and (rest.startswith(text) or text.startswith(first)))
    return AbstentionProbe(scaffold=tuple(abstain[len(forced):k]), token=abstain[k],
                           abstain_ids=tuple(sorted(set(same_start) | {abstain[k]})))


@torch.inference_mode()
def _abstention_prob_forced(model: nn.Module, prompt: List[int], probe: AbstentionProbe,
                            pause: PauseTokens, summed: bool = False) -> float:
    """P(abstention token) with the JSON scaffold written for the model (it wrote something else);
    ``summed``: P(any token that starts the abstention), as the threshold rule reads it."""
    device = next(model.parameters()).device
    logits = last_logits(model(torch.tensor([prompt + list(probe.scaffold)], device=device))).float()
    mask_pause_logits(logits, pause)
    probs = torch.softmax(logits, dim=-1)[0]
    if summed:
        return float(probs[list(probe.abstain_ids)].sum())
    return float(probs[probe.token])


def _generate(model, tokenizer, prompts, pause, stop_ids, max_new_tokens, probe, use_cache, on_token=None,
              mask=False, share_prefix=True):
    # Greedy reads P(the abstention token); the threshold rule P(any token that starts "?"), all masked.
    probe_ids = probe.abstain_ids if mask else probe.token
    gens = greedy_generate(model, prompts, pad_id=tokenizer.pad_id, stop_ids=stop_ids, max_new_tokens=max_new_tokens,
                           pause=pause, use_cache=use_cache, share_prefix=share_prefix,
                           probe=(probe.step, probe_ids), probe_mask=mask, on_token=on_token)
    fmt = chat_format(tokenizer)
    replies = []
    for prompt, gen in zip(prompts, gens):
        ids = [t for t in gen.tokens if t not in fmt.end_ids]
        text = ANSWER_PREFIX + fmt.decode(ids)
        prob = gen.probe_prob
        if tuple(gen.tokens[: probe.step]) != probe.scaffold:  # it left the scaffold: ask directly
            prob = _abstention_prob_forced(model, list(prompt), probe, pause, summed=mask)
        replies.append((text, prob, gen))
    return replies


@dataclass
class Reply:
    """The model's answer to one question."""

    text: str  # the reply from the forced prefix "\n```json" on, as generated
    # The abstention score the rule reads: greedy, P(abstention token) where the answer value
    # starts; a threshold rule, that rule's score (``scores[rule]``).
    na_prob: float
    answer: Optional[str]  # parsed from the JSON block; None when it does not parse
    first_turn: Optional[str] = None  # multi_turn: the reply to the yes/no question
    confidence: Optional[float] = None  # P(the answer given): ``eval.routing.answer_confidence``
    # With a threshold rule (abstention given): the best non-abstention span and its probability,
    # every score, and (single turn) what greedy decoding would have answered.
    span_answer: Optional[str] = None
    span_prob: Optional[float] = None
    scores: Optional[Dict[str, float]] = None
    greedy_answer: Optional[str] = None  # None: invalid JSON (or unknown, see greedy_known)
    greedy_known: bool = False


def generate_replies(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[SquadRecord],
    pause: PauseTokens,
    *,
    prompt_style: str,
    stop_ids: Set[int],
    probe: AbstentionProbe,
    max_new_tokens: int = 64,
    use_cache: bool = True,
    prompts: Optional[Dict[str, Any]] = None,
    on_token: Optional[Callable[[int, int], None]] = None,
    abstention: Optional[Tuple[str, float]] = None,
    yes_no_probe: Optional[AbstentionProbe] = None,
    share_prefix: bool = True,
) -> List[Reply]:
    """Answer ``records`` (one batch; gold answers are not needed). ``on_token(row, id)``
    sees every generated token (of the last turn, in multi_turn). ``abstention=(rule,
    threshold)``: the threshold rule (module docstring); None: greedy, the article's rule.
    ``yes_no_probe`` (multi_turn): where P("no") of the first reply is read. ``share_prefix``: the
    prompts' common prefix is pre-filled once per batch (``generation.greedy_generate``)."""
    from torchtune_blah.eval.abstention import abstention_scores, decide
    from torchtune_blah.eval.routing import answer_confidence

    prompts = prompts or {}
    pause_ids = pause.sequence  # (none with NO_PAUSE)
    masked = abstention is not None
    first = [answer_prompt(tokenizer, r, pause_ids, prompt_style, **prompts) for r in records]
    first_turn, p_no = [None] * len(records), [None] * len(records)
    if prompt_style == "multi_turn":
        turn1 = _generate(model, tokenizer, first, pause, stop_ids, max_new_tokens, yes_no_probe or probe, use_cache,
                          share_prefix=share_prefix)
        first_turn = [text for text, _, _ in turn1]
        if yes_no_probe is not None:
            p_no = [prob for _, prob, _ in turn1]
        # Greedy: the model's own first reply goes back. The threshold rule asks for the span
        # after a "yes" (the rule, not the first reply, decides whether to abstain).
        fed_back = [answer_block("yes") if masked else answer_block(a) if (a := extract_answer(t)) is not None else t
                    for t in first_turn]
        prompts_last = [answer_prompt(tokenizer, r, pause_ids, prompt_style, first_reply=f, **prompts)
                        for r, f in zip(records, fed_back)]
    else:
        prompts_last = first
    replies = _generate(model, tokenizer, prompts_last, pause, stop_ids, max_new_tokens, probe, use_cache, on_token,
                        mask=masked, share_prefix=share_prefix)
    out = []
    for (text, prob, gen), turn1, no in zip(replies, first_turn, p_no):
        answer = extract_answer(text)
        # log P(the value it wrote), from where the value starts; the whole reply's when it left the scaffold
        on_scaffold = tuple(gen.tokens[: probe.step]) == probe.scaffold
        value_logprob = gen.span_logprob if on_scaffold else gen.reply_logprob
        if not masked:
            out.append(Reply(text=text, na_prob=prob, answer=answer, first_turn=turn1,
                             confidence=answer_confidence(answer, prob, value_logprob)))
            continue
        rule, threshold = abstention
        scores = abstention_scores(prob, gen.span_logprob, no)
        single = prompt_style == "single_turn"  # masking changed nothing unless "?" was the greedy choice
        greedy = (NO_ANSWER if gen.probe_argmax else answer) if single else None
        decided = decide(answer, scores[rule], threshold)
        out.append(Reply(text=text, na_prob=scores[rule], answer=decided, first_turn=turn1,
                         confidence=answer_confidence(decided, scores[rule], value_logprob),
                         span_answer=answer, span_prob=math.exp(min(value_logprob, 0.0)),
                         scores=scores, greedy_answer=greedy, greedy_known=single))
    return out


def answer_records(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[SquadRecord],
    pause: PauseTokens,
    *,
    run_dir: str = "",
    stage: str = "",
    **kwargs: Any,
) -> List[Prediction]:
    """Answer and score ``records`` (one batch, gold answers known): one ``Prediction`` row each.
    Keyword arguments as ``generate_replies``."""
    return prediction_rows(records, generate_replies(model, tokenizer, records, pause, **kwargs),
                           run_dir=run_dir, stage=stage, scored=True)


EXPLAIN_PROMPT = "Explain your reasoning."


def explain_replies(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[SquadRecord],
    replies: Sequence[Reply],
    pause: PauseTokens,
    *,
    prompt_style: str,
    explain_prompt: str = EXPLAIN_PROMPT,
    max_new_tokens: int = 256,
    prompts: Optional[Dict[str, Any]] = None,
    on_token: Optional[Callable[[int, int], None]] = None,
) -> List[str]:
    """The follow-up turn of llama-squad's chat app: after its answer, the model is asked
    ``explain_prompt`` and answers in free text (until its end of turn)."""
    fmt = chat_format(tokenizer)
    pause_ids = pause.sequence
    conversations = []
    for record, reply in zip(records, replies):
        turns = [reply.first_turn, reply.text] if prompt_style == "multi_turn" else [reply.text]
        # Each earlier reply goes back as the JSON block it parsed to (the form it was trained on).
        fed_back = iter([answer_block(a) if (a := extract_answer(t)) is not None else t for t in turns])
        messages = [ChatMessage(m.role, next(fed_back)) if m.role == "assistant" else m
                    for m in squad_messages(record, prompt_style, **(prompts or {}))]
        messages += [ChatMessage("user", explain_prompt), ChatMessage("assistant", "")]
        conversations.append(render_chat(fmt, messages, pause_ids, add_last_end=False)[0])
    gens = greedy_generate(model, conversations, pad_id=tokenizer.pad_id, stop_ids=set(fmt.end_ids),
                           max_new_tokens=max_new_tokens, pause=pause, on_token=on_token)
    return [fmt.decode([t for t in g.tokens if t not in fmt.end_ids]).strip() for g in gens]


class Answerer:
    """A run's model set up to answer questions: what ``blah_eval``, ``blah_generate`` and in-training
    validation share (tokenizer, pause tokens, prompt style and texts, stop rule, the probes where
    P(abstain) is read, the abstention rule: ``(rule, threshold)`` or None for greedy)."""

    def __init__(self, model: nn.Module, tokenizer: Any, pause: PauseTokens, *, prompt_style: str,
                 prompts: Optional[Dict[str, Any]] = None, max_new_tokens: int = 64,
                 abstention: Optional[Tuple[str, float]] = None, run_dir: str = "", stage: str = ""):
        self.model, self.tokenizer, self.pause = model, tokenizer, pause
        self.prompt_style, self.prompts, self.max_new_tokens = prompt_style, dict(prompts or {}), max_new_tokens
        self.abstention, self.run_dir, self.stage = abstention, run_dir, stage
        self.stop_ids = stop_token_ids(tokenizer)
        self.probe = abstention_probe(tokenizer)
        self.yes_no_probe = abstention_probe(tokenizer, "no", "yes") if prompt_style == "multi_turn" else None

    @classmethod
    def load(cls, run_cfg: Any, run_dir: str, stage: str, device: Any, dtype: Any, *, staging_dir: str,
             quantize_base: Optional[bool] = None, **kwargs: Any) -> "Answerer":
        """The run's tokenizer and model at ``stage`` (``torchtune_blah.model.load_run_model``)."""
        from torchtune import config

        from torchtune_blah.model import load_run_model

        tokenizer = config.instantiate(run_cfg.tokenizer)
        model, pause = load_run_model(run_cfg, run_dir, stage, device, dtype, staging_dir=staging_dir,
                                      quantize_base=quantize_base)
        return cls(model, tokenizer, pause, run_dir=run_dir, stage=stage, **kwargs)

    def by_prompt_length(self, records: Sequence[SquadRecord]) -> List[SquadRecord]:
        """``records`` ordered by prompt length (stable), so that a batch's rows need little padding."""
        lengths = {r.id: len(answer_prompt(self.tokenizer, r, self.pause.sequence, self.prompt_style, **self.prompts))
                   for r in records}
        return sorted(records, key=lambda r: lengths[r.id])

    def replies(self, records: Sequence[SquadRecord], on_token: Optional[Callable[[int, int], None]] = None,
                use_cache: bool = True) -> List[Reply]:
        return generate_replies(self.model, self.tokenizer, records, self.pause, prompt_style=self.prompt_style,
                                stop_ids=self.stop_ids, probe=self.probe, max_new_tokens=self.max_new_tokens,
                                use_cache=use_cache, prompts=self.prompts, on_token=on_token,
                                abstention=self.abstention, yes_no_probe=self.yes_no_probe)

    def rows(self, records: Sequence[SquadRecord], replies: Sequence[Reply], *, scored: bool) -> List[Prediction]:
        return prediction_rows(records, replies, run_dir=self.run_dir, stage=self.stage, scored=scored)

    def answer(self, records: Sequence[SquadRecord], *, scored: bool) -> List[Prediction]:
        """One batch: a ``Prediction`` each (``scored``: the records' answers are the gold ones)."""
        return self.rows(records, self.replies(records), scored=scored)

    def explain(self, records: Sequence[SquadRecord], replies: Sequence[Reply], *, explain_prompt: str = EXPLAIN_PROMPT,
                max_new_tokens: int = 256, on_token: Optional[Callable[[int, int], None]] = None) -> List[str]:
        return explain_replies(self.model, self.tokenizer, records, replies, self.pause,
                               prompt_style=self.prompt_style, explain_prompt=explain_prompt,
                               max_new_tokens=max_new_tokens, prompts=self.prompts, on_token=on_token)


def answer_into(output: ResumableJsonl, answer_batch: Callable[[List[SquadRecord]], List[Prediction]], *,
                show: bool = True, on_rows: Optional[Callable[[List[Prediction]], None]] = None) -> List[Prediction]:
    """The answering loop of ``blah_eval`` and ``blah_generate``: every batch ``output`` still lacks is
    answered and appended as it finishes (a killed run resumes there); returns every row of
    ``output``'s batches, in order. ``on_rows`` sees each finished batch."""
    from torchtune import utils
    from tqdm import tqdm

    if output.done:
        utils.get_logger("INFO").info(f"Resuming: {len(output.done)} questions already answered in {output.path}")
    pbar = tqdm(total=len(output.items), initial=len(output.done), unit="q", dynamic_ncols=True, disable=not show)
    start, answered = time.perf_counter(), 0
    with output.open_append() as out:
        for batch in output.todo():
            rows = answer_batch(batch)
            output.append(out, rows)
            if on_rows is not None:
                on_rows(rows)
            answered += len(rows)
            pbar.update(len(rows))
            pbar.set_postfix(q_per_s=f"{answered / (time.perf_counter() - start):.2f}")
    pbar.close()
    return output.rows()
