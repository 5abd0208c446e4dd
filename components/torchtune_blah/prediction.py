"""One answer row, the same everywhere: ``blah_eval``'s ``predictions.jsonl`` and
``review_queue.jsonl``, ``blah_generate``'s ``generations.jsonl``, in-training validation, and
what the review tool imports.

Every row says which question it answers (with its context, so a row stands alone), what the
model wrote and what that means, and which run answered. What only some rows have:

- ``gold_answers``, ``has_answer`` and the per-question scores (``score_example``): questions with
  known answers (``blah_eval``, validation);
- ``first_turn_output``: the two-turn style's yes/no reply;
- ``confidence``: the model's probability of the answer it gives (``eval.routing``);
- ``span_answer``, ``span_prob``, ``abstain_scores`` (and ``greedy_answer``, single turn): a threshold rule;
- ``explanation``: ``blah_generate explain=true``;
- ``answers``, ``review_reason``: the review queue (``answers`` is the model's proposal as a
  training record's answers, for an expert to correct).

``upgrade_row`` reads rows written by earlier versions (other field names), so older outputs
resume and import.
"""

from typing import Any, Dict, List, Mapping, Optional, Sequence, TypedDict

from torchtune_blah.data.squad import SquadRecord
from torchtune_blah.eval.metrics import official_prediction, score_example


class _Required(TypedDict):
    id: str
    title: str
    context: str
    question: str
    model_answer: Optional[str]  # parsed from the reply's JSON block; None: it was not valid JSON
    raw_output: str  # the reply from the forced prefix "\n```json" on, as generated
    prediction: str  # the official script's answer ("" = abstain)
    na_prob: float  # P(abstain), the score the abstention rule reads
    run_dir: str
    stage: str


class Prediction(_Required, total=False):
    confidence: float  # P(the answer given), eval.routing.answer_confidence (rows of earlier versions lack it)
    gold_answers: List[str]
    has_answer: bool
    valid_json: bool
    llama_squad_exact: bool
    official_exact: int
    official_f1: float
    first_turn_output: str
    span_answer: Optional[str]
    span_prob: float
    abstain_scores: Dict[str, float]
    greedy_answer: Optional[str]
    explanation: str
    answers: List[str]
    review_reason: str


REQUIRED = tuple(_Required.__annotations__)


def prediction_rows(records: Sequence[SquadRecord], replies: Sequence[Any], *, run_dir: str, stage: str,
                    scored: bool) -> List[Prediction]:
    """One row per (record, ``eval.run.Reply``); ``scored``: the records' answers are the gold ones
    (``blah_eval``), not unknown (``blah_generate``)."""
    rows = []
    for record, reply in zip(records, replies):
        row: Prediction = {
            "id": record.id, "title": record.title, "context": record.context, "question": record.question,
            "model_answer": reply.answer, "raw_output": reply.text, "prediction": official_prediction(reply.answer),
            "na_prob": reply.na_prob, "run_dir": run_dir, "stage": stage,
        }
        if reply.confidence is not None:
            row["confidence"] = reply.confidence
        if scored:
            row.update(gold_answers=list(record.answers), has_answer=record.has_answer,
                       **score_example(record.answers, reply.answer))
        if reply.first_turn is not None:
            row["first_turn_output"] = reply.first_turn
        if reply.scores is not None:
            row.update(span_answer=reply.span_answer, span_prob=reply.span_prob, abstain_scores=reply.scores)
            if reply.greedy_known:
                row["greedy_answer"] = reply.greedy_answer
        rows.append(row)
    return rows


# Field names of earlier versions: review_queue.jsonl's "model_output", generations.jsonl's
# "answer", llama-squad's exact match once named after "the seed".
_RENAMED = {"model_output": "raw_output", "answer": "model_answer", "seed_exact": "llama_squad_exact"}


def upgrade_row(row: Mapping[str, Any], record: Optional[SquadRecord] = None,
                settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``row`` with today's field names; a row of an earlier ``predictions.jsonl`` (no context, no
    run) gets them from its ``record`` and the output folder's ``settings``."""
    out = {_RENAMED.get(k, k) if _RENAMED.get(k) not in row else k: v for k, v in row.items()}
    if record is not None:
        out.setdefault("title", record.title)
        out.setdefault("context", record.context)
    for key in ("run_dir", "stage"):
        if key not in out and settings and settings.get(key) is not None:
            out[key] = str(settings[key])
    order = {k: i for i, k in enumerate(REQUIRED)}  # today's field order, so upgraded files read the same
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))
