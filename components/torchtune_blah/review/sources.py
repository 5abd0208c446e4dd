"""Model outputs to review: ``Prediction`` rows (``torchtune_blah.prediction``), as ``blah_eval``
writes them (``predictions.jsonl``, ``review_queue.jsonl``) and ``blah_generate`` does
(``generations.jsonl``). Every row stands alone (question, context, reply, run); rows of earlier
versions are read with today's field names. Every line is checked before anything is written;
an error names the line and the field.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from torchtune_blah.data.squad import NO_ANSWER
from torchtune_blah.eval.folder import SETTINGS_FILE
from torchtune_blah.eval.routing import review_key
from torchtune_blah.prediction import REQUIRED, upgrade_row
from torchtune_blah.resumable import read_json, read_jsonl_objects


class SourceError(ValueError):
    pass


@dataclass
class ReviewItem:
    qid: str
    context: str
    question: str
    title: str
    model_answer: Optional[str]  # None: the reply was not valid JSON
    raw_output: str
    na_prob: float
    gold_answers: Optional[List[str]]  # known for evaluated dev questions, else None
    run_dir: str
    stage: str
    source_file: str
    confidence: Optional[float] = None  # P(the answer given); rows of earlier versions have none

    @property
    def source_key(self) -> str:
        """The same model output imported twice is the same item."""
        key = json.dumps([self.qid, self.run_dir, self.stage, self.raw_output], ensure_ascii=False)
        return hashlib.sha1(key.encode("utf-8")).hexdigest()

    @property
    def priority(self) -> tuple:
        """Queue order (``eval.routing.review_key``, as ``review_queue.jsonl`` ranks): invalid JSON
        first, then the least confident. (The database keeps three columns; the middle one, once
        "disagrees with na_prob", is 0 for every item.)"""
        valid, confidence, _ = review_key({"model_answer": self.model_answer, "na_prob": self.na_prob,
                                           "confidence": self.confidence, "id": self.qid})
        return int(valid), 0, float(confidence)


_KINDS = {str: "a string", float: "a number", list: "a list"}


def _field(row: Mapping[str, Any], name: str, kind, where: str, nullable: bool = False):
    """``row[name]``, checked: present, of ``kind`` (or None when ``nullable``), non-empty for ids and texts."""
    if name not in row:
        raise SourceError(f"{where}: missing field {name!r}")
    value = row[name]
    if value is None and nullable:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    empty = name in ("id", "context", "question") and not str(value).strip()
    if isinstance(value, bool) or not isinstance(value, kind) or empty:
        expected = "a non-empty string" if name in ("id", "context", "question") else _KINDS[kind]
        raise SourceError(f"{where}: field {name!r} must be {expected}{' or null' if nullable else ''}, "
                          f"got {value!r:.80}")
    if kind is float and not 0.0 <= value <= 1.0:  # (NaN fails this too; SQLite would store it as NULL)
        raise SourceError(f"{where}: field {name!r} must be a probability from 0 to 1, got {value!r}")
    return value


def read_items(path: str) -> List[ReviewItem]:
    """Every reviewable item of ``path``; raises ``SourceError`` naming line and field."""
    if not os.path.isfile(path):
        raise SourceError(f"{path} does not exist")
    try:
        rows = list(read_jsonl_objects(path, SourceError))
    except UnicodeDecodeError as e:
        raise SourceError(f"{path} is not UTF-8 text (byte {e.start}): import blah_eval's predictions.jsonl or "
                          "review_queue.jsonl, or blah_generate's generations.jsonl") from None
    if not rows:
        raise SourceError(f"{path} holds no rows")
    # Rows of an earlier review_queue.jsonl name no run: the evaluation's settings beside it do.
    settings_path = os.path.join(os.path.dirname(os.path.abspath(path)), SETTINGS_FILE)
    settings = None
    if os.path.isfile(settings_path):
        try:
            settings = read_json(settings_path, f"the settings of the evaluation beside {os.path.basename(path)}")
        except ValueError as e:
            raise SourceError(str(e)) from None
        if not isinstance(settings, dict):
            raise SourceError(f"{settings_path} must hold a JSON object")
    items = []
    for n, raw in rows:
        where = f"line {n} of {path}"
        row = upgrade_row(raw, settings=settings)
        if "context" not in row and "gold_answers" in row:
            raise SourceError(f"{where}: a predictions.jsonl row of an earlier blah_eval, without its context; "
                              "rerun blah_eval with the same config and output_dir to rewrite it in today's fields "
                              "(nothing is answered again), then import it")
        for name in REQUIRED:
            if name not in row:
                raise SourceError(f"{where}: missing field {name!r} (not a Prediction row: import blah_eval's "
                                  "predictions.jsonl or review_queue.jsonl, or blah_generate's generations.jsonl)")
        gold = row.get("gold_answers")
        items.append(ReviewItem(
            qid=_field(row, "id", str, where), context=_field(row, "context", str, where),
            question=_field(row, "question", str, where), title=_field(row, "title", str, where),
            model_answer=_field(row, "model_answer", str, where, nullable=True),
            raw_output=_field(row, "raw_output", str, where), na_prob=_field(row, "na_prob", float, where),
            gold_answers=None if gold is None else [str(a) for a in _field(row, "gold_answers", list, where)],
            run_dir=_field(row, "run_dir", str, where), stage=_field(row, "stage", str, where),
            source_file=os.path.abspath(path),
            confidence=_field(row, "confidence", float, where) if "confidence" in row else None))
    return items


def item_view(row) -> Dict[str, Any]:
    """What the review page shows of an item."""
    model = row["model_answer"]
    start = row["context"].find(model) if model and model != NO_ANSWER else -1
    return {
        "item_id": row["id"], "qid": row["qid"], "title": row["title"], "context": row["context"],
        "question": row["question"], "model_answer": model, "raw_output": row["raw_output"], "na_prob": row["na_prob"],
        "highlight": [start, start + len(model)] if start >= 0 else None,
        "run_dir": row["run_dir"], "stage": row["stage"],
    }
