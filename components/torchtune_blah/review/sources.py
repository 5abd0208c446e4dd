"""Model outputs to review, read from the files our recipes write.

Three kinds of JSONL file, told apart by their fields:

- ``blah_eval``'s ``predictions.jsonl`` (``gold_answers``, ``model_answer``, ``raw_output``): the
  contexts come from ``eval_data.json`` beside it, run and stage from ``eval_settings.json``;
- ``blah_eval``'s ``review_queue.jsonl`` (``model_output``, ``context``): run and stage from
  ``eval_settings.json`` beside it when there is one;
- ``blah_generate``'s ``generations.jsonl`` (``answer``, ``raw_output``, ``context``, ``run_dir``).

Every line is checked before anything is written; an error names the line and the field.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from torchtune_blah.eval.report import review_priority
from torchtune_blah.resumable import read_jsonl_objects


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

    @property
    def source_key(self) -> str:
        """The same model output imported twice is the same item."""
        key = json.dumps([self.qid, self.run_dir, self.stage, self.raw_output], ensure_ascii=False)
        return hashlib.sha1(key.encode("utf-8")).hexdigest()

    @property
    def priority(self) -> tuple:
        """Queue order, least certain first (``review_priority``, as ``review_queue.jsonl`` ranks)."""
        valid, agrees, distance, _ = review_priority(
            {"model_answer": self.model_answer, "na_prob": self.na_prob, "id": self.qid})
        return int(valid), int(agrees), float(distance)


def _sibling_json(path: str, name: str) -> Optional[Any]:
    sibling = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    if not os.path.isfile(sibling):
        return None
    with open(sibling, encoding="utf-8") as f:
        return json.load(f)


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
    return value


def _kind(row: Mapping[str, Any]) -> str:
    if "gold_answers" in row and "raw_output" in row:
        return "predictions"
    if "model_output" in row and "context" in row:
        return "review_queue"
    if "raw_output" in row and "context" in row and "answer" in row:
        return "generations"
    raise SourceError("not a file this tool reads: expected blah_eval's predictions.jsonl or review_queue.jsonl, "
                      "or blah_generate's generations.jsonl")


def read_items(path: str) -> List[ReviewItem]:
    """Every reviewable item of ``path``; raises ``SourceError`` naming line and field."""
    if not os.path.isfile(path):
        raise SourceError(f"{path} does not exist")
    rows = list(read_jsonl_objects(path, SourceError))
    if not rows:
        raise SourceError(f"{path} holds no rows")
    try:
        kind = _kind(rows[0][1])
    except SourceError as e:
        raise SourceError(f"line {rows[0][0]} of {path}: {e}") from None
    settings = _sibling_json(path, "eval_settings.json") or {}
    contexts: Dict[str, Mapping[str, str]] = {}
    if kind == "predictions":
        data = _sibling_json(path, "eval_data.json")
        if data is None:
            raise SourceError(f"{path}: predictions.jsonl has no contexts; eval_data.json must be beside it "
                              "(blah_eval writes it), or import review_queue.jsonl")
        for article in data["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    contexts[qa["id"]] = {"context": paragraph["context"], "title": article.get("title", "")}
    items = []
    for n, row in rows:
        where = f"line {n} of {path}"
        row_kind = _kind_or_none(row)
        if row_kind != kind:
            raise SourceError(f"{where}: a {row_kind or 'unknown'} row in a {kind} file")
        qid = _field(row, "id", str, where)
        if kind == "predictions":
            if qid not in contexts:
                raise SourceError(f"{where}: id {qid!r} is not in eval_data.json beside it")
            context, title = contexts[qid]["context"], contexts[qid]["title"]
            gold = [str(a) for a in _field(row, "gold_answers", list, where)]
            answer, raw = _field(row, "model_answer", str, where, nullable=True), _field(row, "raw_output", str, where)
        else:
            context, title, gold = _field(row, "context", str, where), str(row.get("title") or ""), None
            if kind == "review_queue":
                answer = _field(row, "model_answer", str, where, nullable=True)
                raw = _field(row, "model_output", str, where)
            else:
                answer, raw = _field(row, "answer", str, where, nullable=True), _field(row, "raw_output", str, where)
        items.append(ReviewItem(
            qid=qid, context=context, question=_field(row, "question", str, where), title=title, model_answer=answer,
            raw_output=raw, na_prob=_field(row, "na_prob", float, where), gold_answers=gold,
            run_dir=str(row.get("run_dir") or settings.get("run_dir") or ""),
            stage=str(row.get("stage") or settings.get("stage") or ""), source_file=os.path.abspath(path)))
    return items


def _kind_or_none(row: Mapping[str, Any]) -> Optional[str]:
    try:
        return _kind(row)
    except SourceError:
        return None
